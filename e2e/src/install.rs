//! hookfleet on a cluster the way users install it: `helm install` of `charts/hookfleet`, here with the images
//! this build wrote (imported into the local node, never pulled). Used by the e2e suite and by `make demo`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::cluster::Cluster;
use crate::process::wait_for;
use crate::{chart, images};

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
    let mut cmd = chart::helm(helm_home)?;
    cmd.env("KUBECONFIG", kubeconfig)
        .args(["install", RELEASE])
        .arg(chart::dir())
        .args(["-n", NAMESPACE, "--create-namespace", "--wait", "--timeout", "5m"])
        .args([
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "worker.image.pullPolicy=Never",
        ]);
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
