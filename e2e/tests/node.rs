//! The real node (root only; skipped with a message otherwise): a pod runs a real container that reaches a
//! sink on the host and the API server through the `kubernetes` Service IP with its ServiceAccount token,
//! sees containerd's nofile limits, and has its output read through `kubectl logs` (the API server calling
//! the kubelet). After the cluster is dropped nothing of the node is left on the host.
//!
//! Both node configurations (1024:4096 and 1024:1024) run in one test, one after the other: a node owns
//! host-wide iptables chains, so clusters take turns, and the "nothing left" check must run before the next
//! cluster starts.

use std::time::Instant;

mod common;

use anyhow::{Context, Result};
use common::{assert_nothing_left, run_pod};
use hookfleet_e2e::control_plane::SERVICE_IP;
use hookfleet_e2e::sink::Sink;
use hookfleet_e2e::{Cluster, ClusterOptions, RabbitMq, cluster, images};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_the_real_node_reach_the_host_and_the_api_and_leave_nothing_behind() -> Result<()> {
    hookfleet_e2e::init_tracing();
    if !cluster::is_root() {
        eprintln!("SKIPPED: the real node needs root (bridge, iptables, mounts, cgroups); CI runs as root");
        return Ok(());
    }
    let images_dir = tempfile::Builder::new()
        .prefix("hookfleet-test-images-")
        .tempdir()?;
    let tools = images::tools(images_dir.path())?;
    let (tools_archive, tools_image) = (tools.path, tools.name);

    // The incident's server: soft 1024, hard 4096.
    let t0 = Instant::now();
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    eprintln!("node cluster (1024:4096) up in {:.1?}", t0.elapsed());
    let sink = Sink::start_on(cluster.host_addr().into(), true).await?;
    let rmq = RabbitMq::start_on(Some(cluster.host_addr().into())).await?;
    // guest logs in from an address that is not loopback (the host's own gateway address is not 127.0.0.1).
    let conn = lapin::Connection::connect(&rmq.amqp_uri_for_pods(), Default::default())
        .await
        .context("guest login at the pod address")?;
    conn.close(200, "ok".into()).await?;
    cluster.node().import_image(&tools_archive)?;

    let script = format!(
        r#"set -e
echo "nofile $(ulimit -n) $(ulimit -Hn)"
wget -q -O /dev/null --header 'webhook-id: from-pod' {sink}
# AMQP 0-9-1 protocol header: the broker answers with Connection.Start, which names the product.
echo "amqp $(printf 'AMQP\0\0\11\1' | nc -w 2 {host} {amqp_port} | tr -cd 'A-Za-z' | grep -o RabbitMQ | head -n1)"
token=$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)
wget -q -O - --no-check-certificate --header "Authorization: Bearer $token" \
  --header 'Content-Type: application/json' \
  --post-data '{{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}}' \
  https://{SERVICE_IP}:443/apis/authentication.k8s.io/v1/selfsubjectreviews
echo
echo done"#,
        sink = sink.url(),
        host = cluster.host_addr(),
        amqp_port = rmq.port(),
    );
    let t1 = Instant::now();
    let logs = run_pod(&cluster, "probe", None, &tools_image, &script).await?;
    eprintln!("probe pod ran to completion in {:.1?}", t1.elapsed());

    assert!(
        logs.lines().any(|l| l.trim() == "nofile 1024 4096"),
        "the container inherits containerd's 1024:4096; logs:\n{logs}"
    );
    assert!(
        logs.contains("system:serviceaccount:default:default"),
        "the API server, through the Service IP, authenticated the pod's ServiceAccount token; logs:\n{logs}"
    );
    assert!(
        logs.lines().any(|l| l.trim() == "amqp RabbitMQ"),
        "the pod reached RabbitMQ at the host address; logs:\n{logs}"
    );
    assert!(
        logs.trim_end().ends_with("done"),
        "the script ran to its end; logs:\n{logs}"
    );
    let hits: Vec<_> = sink
        .hits()
        .into_iter()
        .filter(|h| h.id.as_deref() == Some("from-pod"))
        .collect();
    assert_eq!(hits.len(), 1, "the sink on the host got the pod's request once");

    // Pods reach the host and each other, nothing else: the bridge's forward-drop chain is in place (after
    // kube-proxy's and the kubelet's own rules were installed).
    let filter = std::process::Command::new("iptables-save")
        .args(["-t", "filter"])
        .output()?;
    let filter = String::from_utf8_lossy(&filter.stdout);
    let bridge = cluster.bridge();
    let chain = format!("HOOKFLEET-{}", bridge.trim_start_matches("hfn"));
    for rule in [
        format!("-A FORWARD -j {chain}"),
        format!("-A {chain} -i {bridge} ! -o {bridge} -j DROP"),
        format!("-A {chain} ! -i {bridge} -o {bridge} -j DROP"),
    ] {
        assert!(
            filter.lines().any(|l| l == rule),
            "missing `{rule}` in:\n{filter}"
        );
    }

    drop(rmq);
    drop(sink);
    let t2 = Instant::now();
    drop(cluster);
    eprintln!("teardown in {:.1?}", t2.elapsed());
    assert_nothing_left();

    // A node that cannot give more than 1024.
    let t0 = Instant::now();
    let cluster = Cluster::start(ClusterOptions {
        nofile: (1024, 1024),
        ..ClusterOptions::default()
    })
    .await?;
    eprintln!("node cluster (1024:1024) up in {:.1?}", t0.elapsed());
    cluster.node().import_image(&tools_archive)?;
    let logs = run_pod(
        &cluster,
        "limits",
        None,
        &tools_image,
        r#"echo "nofile $(ulimit -n) $(ulimit -Hn)""#,
    )
    .await?;
    assert_eq!(logs.trim(), "nofile 1024 1024");
    drop(cluster);
    assert_nothing_left();
    Ok(())
}
