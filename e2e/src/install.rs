//! hookfleet on a cluster the way users install it: `helm install` of `charts/hookfleet`, here with the images
//! this build wrote (imported into the local node, never pulled). Used by the e2e suite and by `make demo`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hookfleet_crds::Integration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::cluster::Cluster;
use crate::process::wait_for;
use crate::{chart, images, tools};

/// Release name and namespace of the installation.
pub const RELEASE: &str = "hookfleet";
pub const NAMESPACE: &str = "hookfleet-system";

/// Builds the worker and operator images from release binaries (cargo, cached in the target dir) into `dir` and
/// imports them into every node's containerd.
pub fn load_images(cluster: &Cluster, dir: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    cluster.import(&images::build(dir)?)?;
    Ok(t0.elapsed())
}

/// `helm install` of the chart into [`NAMESPACE`] with images that are never pulled (`pullPolicy: Never`) plus
/// `set` (`key=value` each), waits for the release and for an operator replica to lead, and returns the
/// leader's identity. `helm_home` keeps helm's own config and cache away from the user's.
pub async fn helm_install(
    client: &Client,
    kubeconfig: &Path,
    helm_home: &Path,
    set: &[&str],
) -> Result<String> {
    let chart = chart::dir().display().to_string();
    let mut all = vec!["image.pullPolicy=Never", "worker.image.pullPolicy=Never"];
    all.extend_from_slice(set);
    helm_install_chart(client, kubeconfig, helm_home, &[chart.as_str()], &all).await
}

/// `helm install` of `chart` (the chart's arguments: a directory, or `oci://…` with `--version` and the
/// like) into [`NAMESPACE`] with `set`, then as [`helm_install`].
pub async fn helm_install_chart(
    client: &Client,
    kubeconfig: &Path,
    helm_home: &Path,
    chart: &[&str],
    set: &[&str],
) -> Result<String> {
    let mut cmd = chart::helm(helm_home)?;
    cmd.env("KUBECONFIG", kubeconfig)
        .args(["install", RELEASE])
        .args(chart)
        .args(["-n", NAMESPACE, "--create-namespace", "--wait", "--timeout", "5m"]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // One of the operator replicas leads: its Lease names a holder.
    wait_for(
        "an operator replica to lead",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || leader(client),
    )
    .await
}

/// The sample Integration (`crds/examples/minimal.yaml`) in `default`, consuming the RabbitMQ at
/// `amqp_uri_for_pods` (its Secret `rabbitmq`, created here) and delivering to `destination` (a private
/// address, allowed explicitly); returns its name and queue once it is Ready with 2 consumers.
pub async fn apply_sample(
    client: &Client,
    amqp_uri_for_pods: &str,
    destination: &str,
) -> Result<(String, String)> {
    let ssa = PatchParams::apply("hookfleet-e2e").force();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rabbitmq", "namespace": "default"},
        "stringData": {"uri": amqp_uri_for_pods}
    }))?;
    Api::<Secret>::namespaced(client.clone(), "default")
        .patch("rabbitmq", &ssa, &Patch::Apply(&secret))
        .await?;
    let sample_path = tools::repo_root().join("crds/examples/minimal.yaml");
    let mut sample: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(&sample_path)?)?;
    sample["spec"]["destination"]["url"] = destination.into();
    sample["spec"]["destination"]["allowPrivateNetworks"] = true.into();
    let name = sample["metadata"]["name"]
        .as_str()
        .context("the sample has a name")?
        .to_string();
    let queue = sample["spec"]["source"]["queue"]
        .as_str()
        .context("the sample has a queue")?
        .to_string();
    let intgs = Api::<Integration>::namespaced(client.clone(), "default");
    intgs.patch(&name, &ssa, &Patch::Apply(&sample)).await?;
    wait_for(
        "the sample Ready with 2 consumers",
        Duration::from_secs(300),
        Duration::from_secs(1),
        || {
            let intgs = intgs.clone();
            let name = name.clone();
            async move {
                let i = intgs.get(&name).await?;
                let ok = i.condition("Ready").is_some_and(|c| c.status == "True")
                    && i.status.as_ref().is_some_and(|s| s.consumers == Some(2));
                Ok(ok.then_some(()))
            }
        },
    )
    .await?;
    Ok((name, queue))
}

/// The operator replica holding the leader Lease in the release namespace (its identity: the pod name), if
/// one does.
pub async fn leader(client: &Client) -> Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    Ok(leases
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find_map(|l| l.spec.and_then(|s| s.holder_identity)))
}
