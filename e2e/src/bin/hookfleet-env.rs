//! `hookfleet-env`: the local stack from the shell.
//!
//! ```text
//! hookfleet-env up [--node | --no-workloads] [--no-rabbitmq] [--exit]
//! ```
//! starts the local control plane (etcd, kube-apiserver, and unless `--no-workloads` the controller-manager,
//! scheduler and kwok), a throwaway RabbitMQ node, installs the Integration CRD, applies the sample
//! Integration, prints what it started and `export KUBECONFIG=…`, and keeps running until Ctrl-C (or exits
//! at once after the checks with `--exit`). Everything is torn down on exit.
//!
//! `--node` (root only) runs a real node instead of kwok ([`hookfleet_e2e::Cluster`]): containerd, kubelet,
//! kube-proxy and a bridge pod network; RabbitMQ then also listens on the bridge's gateway, and the sample's
//! Secret names that address so that workers in pods reach it.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hookfleet_crds::Integration;
use hookfleet_e2e::control_plane::Options;
use hookfleet_e2e::{Cluster, ClusterOptions, ControlPlane, RabbitMq};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};

const USAGE: &str = "usage: hookfleet-env up [--node | --no-workloads] [--no-rabbitmq] [--exit]";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookfleet-env: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, flags) = args.split_first().context(USAGE)?;
    if cmd != "up" {
        bail!("unknown command {cmd:?}\n{USAGE}");
    }
    let mut workloads = true;
    let mut rabbitmq = true;
    let mut exit = false;
    let mut node = false;
    for flag in flags {
        match flag.as_str() {
            "--node" => node = true,
            "--no-workloads" => workloads = false,
            "--no-rabbitmq" => rabbitmq = false,
            "--exit" => exit = true,
            other => bail!("unknown flag {other:?}\n{USAGE}"),
        }
    }

    if node && !workloads {
        bail!("--node runs workloads; it cannot go with --no-workloads\n{USAGE}");
    }
    say("starting the local control plane (first run on a machine builds it from the Go module proxy)");
    let (cluster, plain) = if node {
        say("with a real node (containerd, kubelet, kube-proxy; needs root)");
        (Some(Cluster::start(ClusterOptions::default()).await?), None)
    } else {
        let cp = ControlPlane::start_with(Options {
            workloads,
            ..Options::default()
        })
        .await?;
        (None, Some(cp))
    };
    let cp: &ControlPlane = match (&cluster, &plain) {
        (Some(c), _) => c.control_plane(),
        (None, Some(cp)) => cp,
        (None, None) => unreachable!("one of them was started"),
    };
    if let Some(c) = &cluster {
        say(&format!(
            "node {} Ready: bridge {} ({}), host address for pods {}, containerd {} (logs in {})",
            c.node().name(),
            c.bridge(),
            c.pod_cidr(),
            c.host_addr(),
            c.node().socket().display(),
            c.node().dir().display()
        ));
    }
    say(&format!(
        "kube-apiserver {} (logs in {})",
        cp.server(),
        cp.dir().display()
    ));
    cp.install_crds().await?;
    say("CRD integrations.hookfleet.io installed and Established");

    let rmq = if rabbitmq {
        say("starting a throwaway RabbitMQ node");
        let rmq = RabbitMq::start_on(cluster.as_ref().map(|c| c.host_addr().into())).await?;
        say(&format!(
            "RabbitMQ {} (pods: {})",
            rmq.amqp_uri(),
            rmq.amqp_uri_for_pods()
        ));
        Some(rmq)
    } else {
        None
    };

    // The sample's connection Secret, then the sample itself (it references the Secret by name only).
    let uri = rmq
        .as_ref()
        .map(RabbitMq::amqp_uri_for_pods)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rabbitmq", "namespace": "default"},
        "stringData": {"uri": uri}
    }))?;
    let ssa = PatchParams::apply("hookfleet-env").force();
    Api::<Secret>::namespaced(cp.client(), "default")
        .patch("rabbitmq", &ssa, &Patch::Apply(&secret))
        .await?;
    let sample_path = hookfleet_e2e::tools::repo_root().join("crds/examples/minimal.yaml");
    let sample: Integration = serde_yaml::from_str(&std::fs::read_to_string(&sample_path)?)?;
    let name = sample.metadata.name.clone().context("the sample has a name")?;
    Api::<Integration>::namespaced(cp.client(), "default")
        .patch(&name, &ssa.clone().validation_strict(), &Patch::Apply(&sample))
        .await
        .with_context(|| format!("applying {}", sample_path.display()))?;
    say(&format!(
        "sample Integration {name} accepted ({})",
        sample_path.display()
    ));

    let table = cp
        .kubectl()?
        .args(["get", "integrations", "-o", "wide"])
        .output()?;
    std::io::stdout().write_all(&table.stdout)?;

    let env_file = cp.dir().join("env");
    let mut env = format!("export KUBECONFIG={}\n", cp.kubeconfig().display());
    // The pinned kubectl (and helm) first on PATH, matching the API server's version.
    let kubectl = hookfleet_e2e::tools::path(hookfleet_e2e::tools::Tool::Kubectl)?;
    if let Some(dir) = kubectl.parent() {
        env.push_str(&format!("export PATH={}:$PATH\n", dir.display()));
    }
    if let Some(rmq) = &rmq {
        env.push_str(&format!("export HOOKFLEET_AMQP_URI={}\n", rmq.amqp_uri()));
    }
    if let Some(c) = &cluster {
        // What a shell needs to put images on the node and point pods at host services.
        env.push_str(&format!("export HOOKFLEET_HOST_ADDR={}\n", c.host_addr()));
        env.push_str(&format!(
            "export CONTAINERD_ADDRESS={} CONTAINERD_NAMESPACE=k8s.io   # ctr images import x.oci.tar\n",
            c.node().socket().display()
        ));
    }
    std::fs::write(&env_file, &env)?;
    print!("{env}");
    if exit {
        say("--exit: tearing down");
        return Ok(());
    }
    say(&format!(
        "ready; in another shell: source {}; Ctrl-C tears everything down",
        env_file.display()
    ));
    wait_for_signal().await?;
    say("tearing down");
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn say(msg: &str) {
    eprintln!("hookfleet-env: {msg}");
}
