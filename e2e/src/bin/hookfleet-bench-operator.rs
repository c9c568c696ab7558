//! `hookfleet-bench-operator` (`make bench-operator`): the operator binary against the local control plane
//! (etcd, kube-apiserver, controller-manager, scheduler and kwok's fake node, so the workers' pods exist and
//! "run"; `HOOKFLEET_BENCH_OPERATOR_WORKLOADS=0`: API server only, no pods) with 100 and 1,000
//! Integrations, beside T₀, a bare client's server-side apply of the same child objects (docs/benchmarks.md).
//!
//! For each count: the Integrations (queues that do not exist yet, on a real RabbitMQ node) are created, the
//! operator is started, and the run measures the seconds until every Integration has a status (observed
//! generation; counted from one watch) against T₀ (the operator's own Deployments, PodDisruptionBudgets and
//! Services copied into another namespace with server-side apply at the operator's concurrency, 8); the
//! operator's RSS and CPU seconds; API writes and reconciles per resync at steady state (target 0 writes);
//! and the seconds from a change of one Integration's destination until its Deployment carries it.
//!
//! `HOOKFLEET_BENCH_OPERATOR_COUNTS` (`100,1000`; `100` with `HOOKFLEET_BENCH_QUICK=1`),
//! `HOOKFLEET_BENCH_OPERATOR_ROUNDS` (3, each on a fresh control plane, medians at the end; 1 with
//! `HOOKFLEET_BENCH_QUICK=1`), `HOOKFLEET_BENCH_OPERATOR_RESYNC` (seconds, 5),
//! `HOOKFLEET_BENCH_OPERATOR_BIN` (default: the release `hookfleet-operator` of this target directory, else
//! the one beside this binary).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use hookfleet_crds::Integration;
use hookfleet_e2e::process::{Process, free_port};
use hookfleet_e2e::{ControlPlane, RabbitMq};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

const CONCURRENCY: usize = 8;
const MANAGED: &str = "app.kubernetes.io/managed-by=hookfleet-operator";

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<String> = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .map(String::from)
                .collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// CPU time on this machine at one instant: the whole machine's (busy and total jiffies, from `/proc/stat`)
/// and that of each control-plane process by name, so an interval says whether the cores were full and who
/// filled them.
struct CpuSnapshot {
    busy: u64,
    total: u64,
    by_name: BTreeMap<&'static str, f64>,
}

/// The processes whose CPU seconds the bench reports (by `/proc/<pid>/comm`; the operator and the bench itself,
/// T₀'s client, by pid).
const CPU_NAMES: [&str; 5] = [
    "kube-apiserver",
    "etcd",
    "kube-controller",
    "kube-scheduler",
    "kwok",
];

impl CpuSnapshot {
    fn take(operator: Option<u32>) -> Self {
        let (mut busy, mut total) = (0, 0);
        if let Some(line) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            // user nice system idle iowait irq softirq steal (guest time is inside user already).
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(8)
                .filter_map(|v| v.parse().ok())
                .collect();
            total = f.iter().sum();
            busy = total - f.get(3).copied().unwrap_or(0) - f.get(4).copied().unwrap_or(0);
        }
        let mut by_name = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let name = if Some(pid) == operator {
                Some("operator")
            } else if pid == std::process::id() {
                Some("this bench")
            } else {
                CPU_NAMES.iter().copied().find(|n| comm.trim() == *n)
            };
            if let Some(name) = name {
                *by_name.entry(name).or_insert(0.0) += cpu_secs(pid);
            }
        }
        CpuSnapshot { busy, total, by_name }
    }

    /// "1.93 of 2 cores busy; kube-apiserver 9.1 s, etcd 2.0 s, …" from `self` to `later`, over `secs`.
    fn until(&self, later: &CpuSnapshot, secs: f64) -> String {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let share = (later.busy - self.busy) as f64 / (later.total - self.total).max(1) as f64;
        let mut text = format!("{:.2} of {cores:.0} cores busy over {secs:.1} s", share * cores);
        let mut rest = (later.busy - self.busy) as f64 / 100.0;
        for (name, after) in &later.by_name {
            let used = after - self.by_name.get(name).copied().unwrap_or(0.0);
            rest -= used;
            text.push_str(&format!("; {name} {used:.1} s"));
        }
        text.push_str(&format!("; everything else {:.1} s", rest.max(0.0)));
        text
    }
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn rss_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Sum of a metric's samples (`name` followed by labels or a space).
async fn metric(port: u16, name: &str) -> Result<f64> {
    let text = reqwest_free_get(port).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// GET /metrics over a plain socket (this crate has no HTTP client).
async fn reqwest_free_get(port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The API server's request counter (`apiserver_request_total`, every client's), summed per verb and
/// resource (with its subresource): what a phase cost the API server, as the difference of two reads.
type Requests = BTreeMap<(String, String), f64>;

async fn api_requests(client: &Client) -> Result<Requests> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = Requests::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
        let resource = if sub.is_empty() {
            resource
        } else {
            format!("{resource}/{sub}")
        };
        *out.entry((verb, resource)).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// `after - before`, the writes (POST, PUT, PATCH, APPLY, DELETE, DELETECOLLECTION) per resource, largest
/// first, and their total.
fn writes_between(before: &Requests, after: &Requests) -> (f64, String) {
    let mut rows: Vec<(String, f64)> = Vec::new();
    for ((verb, resource), v) in after {
        if !matches!(
            verb.as_str(),
            "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION"
        ) {
            continue;
        }
        let d = v - before
            .get(&(verb.clone(), resource.clone()))
            .copied()
            .unwrap_or(0.0);
        if d >= 1.0 {
            rows.push((format!("{verb} {resource}"), d));
        }
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total = rows.iter().map(|r| r.1).sum();
    let text = rows
        .iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    (total, text)
}

/// Counts the Integrations with a status (an `observedGeneration`) from one watch, so that waiting for
/// them costs the API server one event per status write instead of a LIST of every Integration four
/// times a second: load on the machine while the operator is timed that T₀'s run does not have.
struct StatusCount {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusCount {
    async fn start(api: &Api<Integration>) -> Result<Self> {
        use kube::runtime::watcher::{self, Event};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let (api, seen) = (api.clone(), seen.clone());
            async move {
                let mut ready_tx = Some(ready_tx);
                let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
                while let Some(e) = events.next().await {
                    let (obj, deleted) = match e {
                        Ok(Event::Apply(o) | Event::InitApply(o)) => (o, false),
                        Ok(Event::Delete(o)) => (o, true),
                        Ok(Event::InitDone) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                            continue;
                        }
                        Ok(Event::Init) => continue,
                        Err(e) => {
                            eprintln!("bench-operator: Integration watch: {e} (it restarts)");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                    let name = obj.metadata.name.clone().unwrap_or_default();
                    let has = obj.status.as_ref().and_then(|s| s.observed_generation).is_some();
                    let mut seen = seen.lock().expect("not poisoned");
                    if has && !deleted {
                        seen.insert(name);
                    } else {
                        seen.remove(&name);
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), ready_rx)
            .await
            .context("the Integration watch did not list in 60 s")?
            .context("the Integration watch ended")?;
        Ok(Self { seen, task })
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("not poisoned").len()
    }
}

impl Drop for StatusCount {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies every `K` the operator made in `from` into `to` with server-side apply, `CONCURRENCY` at a time;
/// returns how many.
async fn copy_all<K>(client: &Client, from: &str, to: &str, strip: impl Fn(&mut K)) -> Result<usize>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let src: Api<K> = Api::namespaced(client.clone(), from);
    let dst: Api<K> = Api::namespaced(client.clone(), to);
    let items: Vec<K> = src.list(&ListParams::default().labels(MANAGED)).await?.items;
    let n = items.len();
    let objs: Vec<K> = items
        .into_iter()
        .map(|mut o| {
            let m = o.meta();
            let meta = ObjectMeta {
                name: m.name.clone(),
                namespace: Some(to.into()),
                labels: m.labels.clone(),
                annotations: m.annotations.clone(),
                ..Default::default()
            };
            *o.meta_mut() = meta;
            strip(&mut o);
            o
        })
        .collect();
    let pp = PatchParams::apply("bench-bare-client").force();
    futures::stream::iter(objs)
        .map(|o| {
            let (dst, pp) = (dst.clone(), pp.clone());
            async move {
                let name = o.meta().name.clone().unwrap_or_default();
                let mut v = serde_json::to_value(&o)?;
                v["apiVersion"] = K::api_version(&()).into();
                v["kind"] = K::kind(&()).into();
                if let Some(m) = v.as_object_mut() {
                    m.remove("status");
                }
                dst.patch(&name, &pp, &Patch::Apply(&v)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(n)
}

struct Figures {
    n: usize,
    converge: f64,
    t0: f64,
    children: usize,
    rss: f64,
    hwm: f64,
    cpu: f64,
    writes_per_resync: f64,
    reconciles_per_resync: f64,
    change: f64,
    pods_running: usize,
    pods: usize,
    /// Seconds from the operator's start until every fleet had all its workers ready (with pods).
    fleets_ready: Option<f64>,
    /// API writes (every client's: the operator's, and the controller-manager's, scheduler's and kwok's for
    /// the pods) while the operator converged, and during T₀: total and per verb and resource.
    op_writes: (f64, String),
    t0_writes: (f64, String),
    /// Until converged: reconciles started, and the seconds and count of those finished.
    reconciles: (f64, f64, f64),
    /// CPU while the operator converged and during T₀ ([`CpuSnapshot::until`]).
    op_cpu: String,
    t0_cpu: String,
}

async fn one(
    cp: &ControlPlane,
    rmq: &RabbitMq,
    bin: &Path,
    n: usize,
    resync: u64,
    workloads: bool,
) -> Result<Figures> {
    let client = cp.client();
    let ns = format!("op-{n}");
    let ns0 = format!("t0-{n}");
    cp.create_namespace(&ns).await?;
    cp.create_namespace(&ns0).await?;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "rabbitmq"},
        "stringData": {"uri": rmq.amqp_uri()},
    }))?;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await?;
    let api: Api<Integration> = Api::namespaced(client.clone(), &ns);
    eprintln!("bench-operator: creating {n} Integrations");
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let intg: Integration = serde_json::from_value(serde_json::json!({
                    "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
                    "metadata": {"name": format!("intg-{i}")},
                    "spec": {
                        "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": format!("q-{i}")},
                        "destination": {"url": "https://erp.example.com/hooks"},
                    }
                }))?;
                api.create(&PostParams::default(), &intg).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;

    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let args: Vec<String> = [
        "--no-leader-election",
        "--namespace",
        &ns,
        "--resync",
        &format!("{resync}s"),
        "--http-addr",
        &format!("127.0.0.1:{port}"),
        "--log-format",
        "text",
        "--worker-image",
        "ghcr.io/hookfleet/worker:bench",
    ]
    .map(String::from)
    .to_vec();
    let envs = vec![("KUBECONFIG".to_owned(), cp.kubeconfig().display().to_string())];
    let statuses = StatusCount::start(&api).await?;
    let requests_before = api_requests(&client).await?;
    let start = Instant::now();
    let op = Process::spawn("operator", bin, &args, &envs, &dir.path().join("operator.log"))?;
    let pid = op.pid().context("operator pid")?;
    let cpu_before = CpuSnapshot::take(Some(pid));
    eprintln!("bench-operator: operator started; waiting for {n} statuses");
    let mut last_report = Instant::now();
    let converge = loop {
        op.check_running().with_context(|| op.log_tail(20))?;
        let done = statuses.count();
        if done == n {
            break start.elapsed().as_secs_f64();
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "bench-operator: {done}/{n} with a status after {:.0} s",
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "{done} of {n} with a status after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let op_cpu = cpu_before.until(&CpuSnapshot::take(Some(pid)), converge);
    drop(statuses);
    let cpu = cpu_secs(pid);
    let op_writes = writes_between(&requests_before, &api_requests(&client).await?);
    let reconciles = (
        metric(port, "hookfleet_operator_reconciles_total").await?,
        metric(port, "hookfleet_operator_reconcile_duration_seconds_sum").await?,
        metric(port, "hookfleet_operator_reconcile_duration_seconds_count").await?,
    );

    // With pods: wait (up to 5 minutes) until every fleet has all its workers ready, so the steady state is
    // one.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let mut fleets_ready = None;
    if workloads {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(300) {
            let ready = deployments
                .list(&ListParams::default().labels(MANAGED))
                .await?
                .items
                .iter()
                .filter(|d| {
                    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0) == want
                })
                .count();
            if ready == n {
                fleets_ready = Some(start.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // Steady state: writes and reconciles over three resync periods, after one to settle.
    tokio::time::sleep(Duration::from_secs(resync)).await;
    let (w0, r0) = (
        metric(port, "hookfleet_operator_writes_total").await?,
        metric(port, "hookfleet_operator_reconciles_total").await?,
    );
    tokio::time::sleep(Duration::from_secs(3 * resync)).await;
    let (w1, r1) = (
        metric(port, "hookfleet_operator_writes_total").await?,
        metric(port, "hookfleet_operator_reconciles_total").await?,
    );
    let (rss, hwm) = (rss_mib(pid, "VmRSS"), rss_mib(pid, "VmHWM"));
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let pods_running = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    let pods = pods.len();

    // One change while all exist: the destination of intg-0, until its Deployment carries it.
    let url = "https://erp.example.com/changed";
    let t = Instant::now();
    api.patch(
        "intg-0",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"destination": {"url": url}}})),
    )
    .await?;
    let change = loop {
        let d = deployments.get("intg-0").await;
        if let Ok(d) = d
            && serde_json::to_string(&d.spec)?.contains(url)
        {
            break t.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "the change never reached the Deployment"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(op);

    eprintln!("bench-operator: T0, the same children by a bare client");
    let requests_before = api_requests(&client).await?;
    let cpu_before = CpuSnapshot::take(None);
    let t = Instant::now();
    let mut children = copy_all::<Deployment>(&client, &ns, &ns0, |_| {}).await?;
    children += copy_all::<PodDisruptionBudget>(&client, &ns, &ns0, |_| {}).await?;
    children += copy_all::<Service>(&client, &ns, &ns0, |s: &mut Service| {
        // An allocated address belongs to its Service; a headless one ("None", as the operator's are) stays
        // headless, so T₀ allocates no addresses the operator's Services never had.
        if let Some(spec) = s.spec.as_mut()
            && spec.cluster_ip.as_deref() != Some("None")
        {
            spec.cluster_ip = None;
            spec.cluster_ips = None;
        }
    })
    .await?;
    let t0 = t.elapsed().as_secs_f64();
    let t0_cpu = cpu_before.until(&CpuSnapshot::take(None), t0);
    let t0_writes = writes_between(&requests_before, &api_requests(&client).await?);
    Ok(Figures {
        op_cpu,
        t0_cpu,
        op_writes,
        t0_writes,
        reconciles,
        n,
        converge,
        t0,
        children,
        rss,
        hwm,
        cpu,
        writes_per_resync: (w1 - w0) / 3.0,
        reconciles_per_resync: (r1 - r0) / 3.0,
        change,
        pods_running,
        pods,
        fleets_ready,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    // On Ctrl-C the run is dropped, which stops the control plane, the broker and the operator.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    }
}

async fn run() -> Result<()> {
    let quick = std::env::var("HOOKFLEET_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let counts = env_list(
        "HOOKFLEET_BENCH_OPERATOR_COUNTS",
        if quick { "100" } else { "100,1000" },
    );
    let resync = env_list("HOOKFLEET_BENCH_OPERATOR_RESYNC", "5")
        .first()
        .copied()
        .unwrap_or(5) as u64;
    // The release build when there is one (`make bench-operator` builds it), else the one beside this binary.
    let exe = std::env::current_exe()?;
    let bin = std::env::var_os("HOOKFLEET_BENCH_OPERATOR_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let dir = exe.parent()?;
            [
                dir.join("../release/hookfleet-operator"),
                dir.join("hookfleet-operator"),
            ]
            .into_iter()
            .find(|p| p.exists())
        })
        .unwrap_or_else(|| exe.with_file_name("hookfleet-operator"));
    anyhow::ensure!(
        bin.exists(),
        "no operator binary at {} (cargo build -p hookfleet-operator)",
        bin.display()
    );
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // With kwok (a fake node with room for 5,000 pods, controller-manager and scheduler) the workers'
    // pods exist and run, and their status changes reach the operator as they would in a cluster.
    let workloads = std::env::var("HOOKFLEET_BENCH_OPERATOR_WORKLOADS").map_or(true, |v| v != "0");
    // Each round on a fresh control plane and broker: a second round in the same cluster would start with the
    // first one's thousands of objects (and kwok's room for pods filled).
    let rounds = env_list("HOOKFLEET_BENCH_OPERATOR_ROUNDS", if quick { "1" } else { "3" })
        .first()
        .copied()
        .unwrap_or(1)
        .max(1);
    let mut rows = Vec::new();
    for round in 1..=rounds {
        if rounds > 1 {
            eprintln!("bench-operator: round {round} of {rounds}");
        }
        let cp = if workloads {
            ControlPlane::start_with_workloads().await?
        } else {
            ControlPlane::start().await?
        };
        cp.install_crds().await?;
        let rmq = RabbitMq::start().await?;
        for &n in &counts {
            rows.push((round, one(&cp, &rmq, &bin, n, resync, workloads).await?));
        }
    }
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nOperator at scale ({}; etcd + kube-apiserver{}; resync {resync} s, concurrency {CONCURRENCY}); load average at start {}, at end {}",
        bin.display(),
        if workloads {
            " + controller-manager, scheduler, kwok (pods run)"
        } else {
            ", no nodes (no pods)"
        },
        load_start.split_whitespace().next().unwrap_or("?"),
        load_end.split_whitespace().next().unwrap_or("?")
    );
    let mut table: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (round, f) in &rows {
        let lines = table.entry(f.n).or_default();
        if rounds > 1 {
            lines.push(format!(" round {round} of {rounds}"));
        }
        lines.extend([
                format!(
                    "  all {} reconciled (a status each) in {:.1} s; T₀ (bare SSA of the same {} children) {:.1} s; ratio {:.2} (target ≤ 2)",
                    f.n,
                    f.converge,
                    f.children,
                    f.t0,
                    f.converge / f.t0
                ),
                format!(
                    "  operator RSS {:.1} MiB (peak {:.1} MiB, target ≤ 150 with 1,000); CPU {:.1} s until converged",
                    f.rss, f.hwm, f.cpu
                ),
                format!(
                    "  steady state per resync: {:.1} API writes (target 0), {:.0} reconciles; worker pods Running {} of {}",
                    f.writes_per_resync, f.reconciles_per_resync, f.pods_running, f.pods
                ),
                format!("  one Integration's change reached its Deployment in {:.2} s", f.change),
                format!(
                    "  API writes (all clients) until converged {:.0}: {}",
                    f.op_writes.0, f.op_writes.1
                ),
                format!(
                    "  reconciles until converged {:.0} ({:.1} per Integration), {:.1} ms each on average",
                    f.reconciles.0,
                    f.reconciles.0 / f.n as f64,
                    1e3 * f.reconciles.1 / f.reconciles.2.max(1.0)
                ),
                format!("  CPU until converged: {}", f.op_cpu),
                format!("  API writes (all clients) during T₀ {:.0}: {}", f.t0_writes.0, f.t0_writes.1),
                format!("  CPU during T₀: {}", f.t0_cpu),
                match (workloads, f.fleets_ready) {
                    (false, _) => "  no pods (API server only)".into(),
                    (true, Some(t)) => format!("  every fleet's workers ready {t:.1} s after the operator started"),
                    (true, None) => "  not every fleet's workers ready 300 s after convergence".into(),
                },
            ]);
    }
    if rounds > 1 {
        for (n, lines) in &mut table {
            let of_n: Vec<&Figures> = rows.iter().filter(|(_, f)| f.n == *n).map(|(_, f)| f).collect();
            let pick = |v: &dyn Fn(&Figures) -> f64| median(of_n.iter().map(|f| v(f)).collect());
            let ratios: Vec<f64> = of_n.iter().map(|f| f.converge / f.t0).collect();
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            lines.push(format!(
                " over {rounds} rounds (medians): all reconciled in {:.1} s; T₀ {:.1} s; ratio {:.2} (ratios {lo:.2}–{hi:.2}; target ≤ 2); operator RSS {:.1} MiB; {:.1} API writes per resync",
                pick(&|f| f.converge),
                pick(&|f| f.t0),
                median(ratios.clone()),
                pick(&|f| f.rss),
                pick(&|f| f.writes_per_resync),
            ));
        }
    }
    for (n, lines) in table {
        println!("{n} Integrations");
        for l in lines {
            println!("{l}");
        }
    }
    Ok(())
}
