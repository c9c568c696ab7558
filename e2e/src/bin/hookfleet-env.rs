//! `hookfleet-env`: the local stack from the shell.
//!
//! ```text
//! hookfleet-env up [--node | --nodes=N | --no-workloads] [--no-rabbitmq] [--exit]
//! ```
//! starts the local control plane (etcd, kube-apiserver, and unless `--no-workloads` the controller-manager,
//! scheduler and kwok), a throwaway RabbitMQ node, installs the Integration CRD, applies the sample
//! Integration, prints what it started and `export KUBECONFIG=…`, and keeps running until Ctrl-C (or exits
//! at once after the checks with `--exit`). Everything is torn down on exit.
//!
//! ```text
//! hookfleet-env demo
//! ```
//! (root only; `make demo`) shows hookfleet doing its job: a control plane with a real node, RabbitMQ and a
//! webhook sink on the host, hookfleet installed with its Helm chart from images built here, the sample
//! Integration pointed at the sink, and a stream of device events published to its queue, with a live count of
//! what arrived, until Ctrl-C.
//!
//! `--node` (root only) runs a real node instead of kwok ([`hookfleet_e2e::Cluster`]): containerd, kubelet,
//! kube-proxy and a bridge pod network; RabbitMQ then also listens on the bridge's gateway, and the sample's
//! Secret names that address so that workers in pods reach it. `--nodes=3` runs three real nodes (see
//! [`hookfleet_e2e::cluster`]); the env file's `CONTAINERD_ADDRESS` is the first node's.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hookfleet_crds::Integration;
use hookfleet_e2e::control_plane::Options;
use hookfleet_e2e::{Cluster, ClusterOptions, ControlPlane, RabbitMq};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};

const USAGE: &str = "usage: hookfleet-env up [--node | --nodes=N | --no-workloads] [--no-rabbitmq] [--exit]\n       hookfleet-env demo";

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
    if cmd == "demo" && flags.is_empty() {
        return demo().await;
    }
    if cmd != "up" {
        bail!("unknown command {cmd:?}\n{USAGE}");
    }
    let mut workloads = true;
    let mut rabbitmq = true;
    let mut exit = false;
    let mut node = false;
    let mut nodes = 1;
    for flag in flags {
        if let Some(n) = flag.strip_prefix("--nodes=") {
            nodes = n
                .parse()
                .with_context(|| format!("{flag}: a number of nodes\n{USAGE}"))?;
            node = true;
            continue;
        }
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
        (
            Some(Cluster::start(ClusterOptions::with_nodes(nodes)).await?),
            None,
        )
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
        for n in c.nodes() {
            say(&format!(
                "node {} ({}) Ready: bridge {} ({}), host address for pods {}, containerd {} (logs in {})",
                n.name(),
                n.address(),
                c.bridge(),
                c.pod_cidr(),
                c.host_addr(),
                n.socket().display(),
                n.dir().display()
            ));
        }
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

/// `make demo`: webhooks delivered by a fleet the operator runs on a real node.
async fn demo() -> Result<()> {
    use hookfleet_e2e::sink::Sink;
    use hookfleet_e2e::{install, messages};
    use std::time::{Duration, Instant};

    if !hookfleet_e2e::cluster::is_root() {
        bail!(
            "the demo runs a real node (containerd, kubelet) and needs root; without root, `hookfleet-env up` \
             brings up the rootless stack (control plane + kwok + RabbitMQ) with the sample Integration"
        );
    }
    let dir = tempfile::Builder::new().prefix("hookfleet-demo-").tempdir()?;
    say(
        "starting a control plane and a real node (first run on a machine builds them from the Go module proxy)",
    );
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let cp = cluster.control_plane();
    say(
        "building the worker and operator images (first run: a release build) and importing them into the node",
    );
    install::load_images(&cluster, &dir.path().join("images"))?;
    let host = std::net::IpAddr::V4(cluster.host_addr());
    let rmq = RabbitMq::start_on(Some(host)).await?;
    let sink = Sink::start_on(host, false).await?;
    say(&format!(
        "RabbitMQ {} and a webhook sink {} on the host",
        rmq.amqp_uri_for_pods(),
        sink.url()
    ));
    say(
        "installing hookfleet: helm install hookfleet charts/hookfleet -n hookfleet-system --create-namespace",
    );
    let leader = install::helm_install(
        &cp.client(),
        cp.kubeconfig(),
        dir.path(),
        &["operator.logFormat=text"],
    )
    .await?;
    say(&format!("operator running (2 replicas, {leader} leads)"));

    say("applying crds/examples/minimal.yaml (destination: the sink); waiting for its workers");
    let (name, queue) = install::apply_sample(
        &cp.client(),
        &rmq.amqp_uri_for_pods(),
        &format!("{}/devices", sink.url()),
    )
    .await?;
    let intgs = Api::<Integration>::namespaced(cp.client(), "default");
    let table = cp
        .kubectl()?
        .args(["get", "integrations", "-o", "wide"])
        .output()?;
    std::io::stdout().write_all(&table.stdout)?;

    let env_file = dir.path().join("env");
    let kubectl = hookfleet_e2e::tools::path(hookfleet_e2e::tools::Tool::Kubectl)?;
    let env = format!(
        "export KUBECONFIG={}\nexport PATH={}:$PATH\n",
        cp.kubeconfig().display(),
        kubectl
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    std::fs::write(&env_file, &env)?;
    say(&format!(
        "publishing device events to queue {queue} at 20/s; in another shell: source {}",
        env_file.display()
    ));
    say("  kubectl get integrations -w                          # Ready, 2 ready pods, 2 consumers");
    say(&format!(
        "  kubectl delete pod -l hookfleet.io/integration={name}   # kill a worker: nothing is lost"
    ));
    say("Ctrl-C tears everything down");

    let uri = rmq.amqp_uri();
    let published = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let (published, queue) = (published.clone(), queue.clone());
        tokio::spawn(async move {
            for batch in 0.. {
                // Small batches, so the published count (confirmed by the broker) keeps up with the sink's.
                let ids = messages::ids(&format!("device-event-{batch}"), 4);
                if let Err(e) = messages::publish(&uri, &queue, &ids, Some(20)).await {
                    say(&format!("publishing: {e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                published.fetch_add(ids.len(), std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let signal = wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            r = &mut signal => { r?; break; }
            _ = tick.tick() => {}
        }
        let delivered = sink.delivered();
        let dup: usize = delivered.values().map(|n| n - 1).sum();
        let p = published.load(std::sync::atomic::Ordering::Relaxed);
        let status = intgs.get(&name).await.ok().and_then(|i| {
            let ready = i
                .condition("Ready")
                .map(|c| format!("{} ({})", c.status, c.reason))?;
            let s = i.status?;
            Some(format!(
                "Ready {ready}, pods ready {}/{}, consumers {}",
                s.ready_replicas.unwrap_or(0),
                s.replicas.unwrap_or(0),
                s.consumers.map_or("?".into(), |c| c.to_string())
            ))
        });
        println!(
            "{:>5}s  published {p:>6}  delivered {:>6}  duplicates {dup:>3}  |  {}",
            t0.elapsed().as_secs(),
            delivered.len(),
            status.unwrap_or_default()
        );
    }
    publisher.abort();
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
