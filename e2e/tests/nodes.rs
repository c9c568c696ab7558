//! Three real nodes on this machine (root only; skipped with a message otherwise): each its own containerd
//! and kubelet with its own nofile limits (a pod on each reads `/proc/self/limits` and reaches the host's
//! sink), a pod on node 1 reaches a pod on node 3 through a Service (and directly), node 2 is lost (kill -9
//! of its kubelet, containerd, shims and a running container) and comes back Ready, runs a new pod and its
//! lost one again (a new container), and after the cluster is dropped nothing of the nodes is left on the
//! host. `make test-nodes` runs it alone (about 30 s); `make test` runs it too (`--tests`).

use std::time::{Duration, Instant};

mod common;

use anyhow::{Context, Result};
use common::{assert_nothing_left, describe, run_pod};
use hookfleet_e2e::cluster::NodeSpec;
use hookfleet_e2e::process::wait_for;
use hookfleet_e2e::sink::Sink;
use hookfleet_e2e::{Cluster, ClusterOptions, cluster, images};
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod, Service};
use kube::api::{Api, PostParams};

/// (soft, hard) of nodes 1, 2 and 3.
const LIMITS: [(u64, u64); 3] = [(1024, 4096), (4096, 8192), (1024, 1024)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_their_own_limits_reach_each_other_and_leave_nothing_behind() -> Result<()> {
    hookfleet_e2e::init_tracing();
    if !cluster::is_root() {
        eprintln!("SKIPPED: real nodes need root (bridge, iptables, mounts, cgroups); CI runs as root");
        return Ok(());
    }
    let images_dir = tempfile::Builder::new()
        .prefix("hookfleet-test-images-")
        .tempdir()?;
    let tools = images::tools(images_dir.path())?;

    let t0 = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: LIMITS.iter().map(|&l| NodeSpec { nofile: Some(l) }).collect(),
        ..ClusterOptions::default()
    })
    .await?;
    eprintln!("3-node cluster up in {:.1?}", t0.elapsed());
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name().to_owned()).collect();
    assert_eq!(names, ["hookfleet-node", "hookfleet-node-2", "hookfleet-node-3"]);

    // Ready in the API, each at its own address.
    let api: Api<NodeObject> = Api::all(cluster.client());
    for n in cluster.nodes() {
        let obj = api.get(n.name()).await?;
        assert!(
            hookfleet_e2e::control_plane::node_ready(&obj),
            "{} Ready",
            n.name()
        );
        let ips: Vec<String> = obj
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        assert_eq!(ips, [n.address().to_string()], "{}'s InternalIP", n.name());
    }
    let t1 = Instant::now();
    cluster.import_image(&tools.path)?;
    eprintln!("tools image imported into 3 nodes in {:.1?}", t1.elapsed());
    let sink = Sink::start_on(cluster.host_addr().into(), true).await?;

    // Each node's own limits, and the host's sink from each.
    for (i, n) in cluster.nodes().iter().enumerate() {
        let script = format!(
            r#"set -e
grep 'Max open files' /proc/self/limits
wget -q -O /dev/null --header 'webhook-id: from-node-{k}' {sink}
echo done"#,
            k = i + 1,
            sink = sink.url(),
        );
        let logs = run_pod(
            &cluster,
            &format!("limits-{}", i + 1),
            Some(n.name()),
            &tools.name,
            &script,
        )
        .await?;
        let (soft, hard) = LIMITS[i];
        let line = logs
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .with_context(|| format!("no limits line in:\n{logs}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words[3..5],
            [soft.to_string(), hard.to_string()],
            "node {}'s pod limits: {line}",
            n.name()
        );
        assert_eq!(n.nofile(), (soft, hard));
    }
    for k in 1..=3 {
        let id = format!("from-node-{k}");
        let hits = sink
            .hits()
            .into_iter()
            .filter(|h| h.id.as_deref() == Some(&id))
            .count();
        assert_eq!(hits, 1, "the sink got node {k}'s pod once");
    }

    // A server on node 3 behind a Service; a client on node 1.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let server: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "server", "labels": {"app": "server"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "hookfleet-node-3"},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": tools.name,
                "imagePullPolicy": "Never",
                "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "command": ["sh", "-c",
                    "mkdir -p /tmp/www && echo \"served on $NODE\" > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
            }]
        }
    }))?;
    pods.create(&PostParams::default(), &server).await?;
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server"},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))?;
    let svc = services.create(&PostParams::default(), &svc).await?;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).context("no ClusterIP")?;
    let server_ip = wait_for(
        "the server pod Ready",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            let running = cluster.check_running();
            async move {
                running?;
                let status = pods.get("server").await?.status.unwrap_or_default();
                let ready = status
                    .conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                Ok(ready.then_some(status.pod_ip).flatten())
            }
        },
    )
    .await
    .with_context(|| describe(&cluster, "server"))?;
    // (This busybox's `wget -T` segfaults: `timeout` bounds each try instead.)
    let script = format!(
        r#"set -e
for i in $(seq 1 30); do timeout 3 wget -q -O - http://{cluster_ip}/ && break; sleep 1; done
timeout 3 wget -q -O - http://{server_ip}:8080/"#
    );
    let t2 = Instant::now();
    let logs = run_pod(&cluster, "client", Some("hookfleet-node"), &tools.name, &script).await?;
    eprintln!("node 1 → Service → node 3 in {:.1?}", t2.elapsed());
    assert_eq!(
        logs.lines()
            .filter(|l| l.trim() == "served on hookfleet-node-3")
            .count(),
        2,
        "the client on node 1 reached the server on node 3 through the Service and directly; logs:\n{logs}"
    );

    // Node loss and return: node 2, with a container running on it.
    let sleeper: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "hookfleet-node-2"},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": tools.name,
                "imagePullPolicy": "Never",
                "command": ["sleep", "3600"]
            }]
        }
    }))?;
    pods.create(&PostParams::default(), &sleeper).await?;
    let cgroup = cluster.nodes()[1]
        .dir()
        .file_name()
        .context("node dir name")?
        .to_string_lossy()
        .into_owned();
    let container_id = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .filter(|c| c.ready)
            .and_then(|c| c.container_id.clone())
    };
    let lost = wait_for(
        "the sleeper running on node 2",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            let running = cluster.check_running();
            async move {
                running?;
                Ok(container_id(&pods.get("sleeper").await?))
            }
        },
    )
    .await
    .with_context(|| describe(&cluster, "sleeper"))?;
    let before = cgroup_pids(&cgroup);
    assert!(
        before.len() >= 2,
        "the sleeper's sandbox and sleep in node 2's cgroup: {before:?}"
    );
    let t3 = Instant::now();
    let dir = format!("{}/", cluster.nodes()[1].dir().display());
    cluster.node_mut(1).kill_hard()?;
    let in_cgroup = cgroup_pids(&cgroup);
    assert!(
        in_cgroup.is_empty(),
        "node 2's containers after kill -9: {in_cgroup:?}"
    );
    let left: Vec<u32> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd).contains(&dir).then_some(pid)
        })
        .collect();
    assert!(left.is_empty(), "node 2's processes after kill -9: {left:?}");
    cluster
        .check_running()
        .context("nodes 1 and 3 and kube-proxy run on")?;
    assert!(cluster.nodes()[1].check_running().is_err());
    cluster.node_mut(1).restart().await?;
    eprintln!("node 2 killed and Ready again in {:.1?}", t3.elapsed());
    let logs = run_pod(
        &cluster,
        "after-restart",
        Some("hookfleet-node-2"),
        &tools.name,
        r#"grep 'Max open files' /proc/self/limits"#,
    )
    .await?;
    assert!(logs.contains("4096"), "{logs}");
    // The kubelet started the lost sleeper again: a new container, Ready.
    wait_for(
        "the sleeper running again on node 2",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            let running = cluster.check_running();
            let lost = lost.clone();
            async move {
                running?;
                let pod = pods.get("sleeper").await?;
                let new = container_id(&pod).is_some_and(|id| id != lost);
                let ready = pod
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                Ok((new && ready).then_some(()))
            }
        },
    )
    .await
    .with_context(|| describe(&cluster, "sleeper"))?;
    eprintln!(
        "the sleeper runs again on node 2 {:.1?} after the kill",
        t3.elapsed()
    );

    drop(sink);
    let t4 = Instant::now();
    drop(cluster);
    eprintln!("teardown in {:.1?}", t4.elapsed());
    assert_nothing_left();
    Ok(())
}

/// The pids in the cgroup root `name` (and below) of every cgroup v1 hierarchy.
fn cgroup_pids(name: &str) -> std::collections::BTreeSet<u32> {
    fn walk(dir: &std::path::Path, pids: &mut std::collections::BTreeSet<u32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), pids);
            }
        }
    }
    let mut pids = std::collections::BTreeSet::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        walk(&h.path().join(name), &mut pids);
    }
    pids
}
