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
//! **Many Webhooks** (docs/benchmarks.md, "Many Webhooks: the operator at 10,000"), on a control plane of its
//! own (etcd and kube-apiserver only: the workers' pods play no part) and a RabbitMQ node of its own: one
//! Integration with `spec.webhooks` and the operator running, then N Webhooks created (each its own event
//! prefix and destination host with a random path token; one in ten signed with its own key of one Secret),
//! 8 at a time. It measures the seconds from the first create until all N are Ready for their generation
//! (one watch) and until the snapshot Secret `fleet-webhooks` holds all N (one watch, each version decoded),
//! against T₀: a bare client's create of the same N Webhooks into another namespace plus one status write each
//! (merge patch, 8 at a time), after the operator is stopped; the snapshot's compressed and JSON size; the
//! operator's writes by kind, reconciles, CPU and peak RSS until then; at steady state without reports its RSS,
//! CPU and writes over a minute; then, with reports published as two workers would every 5 s (new deliveries
//! for a busy tenth, then for every Webhook; 65 s to settle, then a window), the Webhook status writes per
//! minute (`hookfleet_operator_writes_total{kind="WebhookStatus"}`) against the bound, 1 per 60 s per Webhook
//! whose counts change, and every other write; and, with the busy tenth reporting, the seconds from a change
//! of one Webhook's destination URL until the snapshot carries it, repeated every 3 s (p50, p99; target
//! p99 ≤ 5 s).
//!
//! `HOOKFLEET_BENCH_OPERATOR_COUNTS` (`100,1000`; `100` with `HOOKFLEET_BENCH_QUICK=1`; empty: no
//! Integrations part, e.g. to run the Webhooks part alone),
//! `HOOKFLEET_BENCH_OPERATOR_ROUNDS` (3, each on a fresh control plane, medians at the end; 1 with
//! `HOOKFLEET_BENCH_QUICK=1`), `HOOKFLEET_BENCH_OPERATOR_RESYNC` (seconds, 5),
//! `HOOKFLEET_BENCH_OPERATOR_BIN` (default: the release `hookfleet-operator` of this target directory, else
//! the one beside this binary); `HOOKFLEET_BENCH_OPERATOR_WEBHOOKS` (the Webhooks part's N: 10000; 1000 with
//! `HOOKFLEET_BENCH_QUICK=1`; 0 skips it), `HOOKFLEET_BENCH_OPERATOR_WEBHOOK_WINDOW` (seconds of each
//! status-write window: 120; 60 quick), `HOOKFLEET_BENCH_OPERATOR_WEBHOOK_CHANGES` (destination changes timed:
//! 20; 10 quick), `HOOKFLEET_BENCH_OPERATOR_LOG` (a path: the Webhooks part's operator log is copied there;
//! `RUST_LOG` reaches the operator, e.g. `info,hookfleet_operator=debug`).

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

/// The operator's flags in a bench: one instance (no election) watching `ns`, metrics on `port`.
fn operator_args(ns: &str, port: u16) -> Vec<String> {
    [
        "--no-leader-election",
        "--namespace",
        ns,
        "--http-addr",
        &format!("127.0.0.1:{port}"),
        "--log-format",
        "text",
        "--worker-image",
        "ghcr.io/hookfleet/worker:bench",
    ]
    .map(String::from)
    .to_vec()
}

/// Counts the objects of one kind that satisfy a test (an Integration with a status, a Ready Webhook) from
/// one watch, so that waiting for them costs the API server one event per status write instead of a LIST
/// of every object four times a second: load on the machine while the operator is timed that T₀'s run does
/// not have.
struct WatchCount {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WatchCount {
    /// Counts the Integrations of `api` with an `observedGeneration`.
    async fn statuses(api: &Api<Integration>) -> Result<Self> {
        Self::start(api, "Integration", |i: &Integration| {
            i.status.as_ref().and_then(|s| s.observed_generation).is_some()
        })
        .await
    }

    /// Counts the Webhooks of `api` that are Ready for their current generation.
    async fn ready_webhooks(api: &Api<hookfleet_crds::Webhook>) -> Result<Self> {
        Self::start(api, "Webhook", webhook_ready).await
    }

    async fn start<K>(api: &Api<K>, kind: &'static str, counts: fn(&K) -> bool) -> Result<Self>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
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
                            eprintln!("bench-operator: {kind} watch: {e} (it restarts)");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                    let name = obj.meta().name.clone().unwrap_or_default();
                    let mut seen = seen.lock().expect("not poisoned");
                    if counts(&obj) && !deleted {
                        seen.insert(name);
                    } else {
                        seen.remove(&name);
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), ready_rx)
            .await
            .with_context(|| format!("the {kind} watch did not list in 60 s"))?
            .with_context(|| format!("the {kind} watch ended"))?;
        Ok(Self { seen, task })
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("not poisoned").len()
    }
}

impl Drop for WatchCount {
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
    let mut args = operator_args(&ns, port);
    args.extend(["--resync".to_owned(), format!("{resync}s")]);
    let envs = vec![("KUBECONFIG".to_owned(), cp.kubeconfig().display().to_string())];
    let statuses = WatchCount::statuses(&api).await?;
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
    let webhooks = env_list(
        "HOOKFLEET_BENCH_OPERATOR_WEBHOOKS",
        if quick { "1000" } else { "10000" },
    )
    .first()
    .copied()
    .unwrap_or(0);
    let window = env_secs(
        "HOOKFLEET_BENCH_OPERATOR_WEBHOOK_WINDOW",
        if quick { 60 } else { 120 },
    );
    let changes = env_secs(
        "HOOKFLEET_BENCH_OPERATOR_WEBHOOK_CHANGES",
        if quick { 10 } else { 20 },
    ) as usize;
    let mut rows = Vec::new();
    let rounds = if counts.is_empty() { 0 } else { rounds };
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
    let many = if webhooks > 0 {
        eprintln!("bench-operator: many Webhooks: {webhooks} on one Integration");
        let rmq = RabbitMq::start().await?;
        Some(webhooks_part(&rmq, &bin, webhooks, window, changes.max(1)).await?)
    } else {
        None
    };
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    if rows.is_empty() {
        println!(
            "\nOperator at scale ({}); load average at start {}, at end {}",
            bin.display(),
            load_start.split_whitespace().next().unwrap_or("?"),
            load_end.split_whitespace().next().unwrap_or("?")
        );
    } else {
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
    }
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
    if let Some(f) = &many {
        print_webhooks(f);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Many Webhooks on one Integration (docs/benchmarks.md, "Many Webhooks: the operator at 10,000").

/// The namespace of the Webhooks part, and the one its bare-client baseline writes into (not watched by the
/// operator).
const WH_NS: &str = "wh";
const WH_T0_NS: &str = "wh-t0";
/// The Integration whose fleet the Webhooks name, and its source queue.
const FLEET: &str = "fleet";
const FLEET_QUEUE: &str = "device-events";
/// One Webhook in this many references its own signing key (a key of one shared Secret, `signing`).
const SIGNED_EVERY: usize = 10;
/// The workers whose reports the bench publishes, each every `REPORT_EVERY` (the worker's interval).
const REPORT_WORKERS: usize = 2;
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Reports run this long before a status-write window opens: longer than the 60 s between two count-only
/// writes of one Webhook, so every changing Webhook had its first write (which may come at once) before it
/// and the window sees the steady cadence.
const PHASE_SETTLE: Duration = Duration::from_secs(65);

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// `len` random characters of `alphabet` (tokens in the URLs, signing secrets: what does not compress).
fn random_text(len: usize, alphabet: &[u8]) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// Webhook `i` of the fleet: its own event prefix and destination (a host per tenant, a random path token);
/// one in [`SIGNED_EVERY`] signed with its own key.
fn webhook_object(i: usize, token: &str) -> Result<hookfleet_crds::Webhook> {
    let mut destination = serde_json::json!({
        "url": format!("https://hooks.tenant-{i:05}.example.com/in/{token}"),
    });
    if i.is_multiple_of(SIGNED_EVERY) {
        destination["signing"] =
            serde_json::json!({"secretRef": {"name": "signing", "key": format!("t-{i:05}")}});
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Webhook",
        "metadata": {"name": format!("wh-{i:05}")},
        "spec": {
            "integration": FLEET,
            "events": [format!("tenant-{i:05}/")],
            "destination": destination,
        }
    }))?)
}

/// Creates `objs` in `ns`, `CONCURRENCY` at a time.
async fn create_webhooks(client: &Client, ns: &str, objs: &[hookfleet_crds::Webhook]) -> Result<()> {
    let api: Api<hookfleet_crds::Webhook> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(objs.iter().cloned())
        .map(|w| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &w).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Whether a Webhook reports Ready=True for its current generation.
fn webhook_ready(w: &hookfleet_crds::Webhook) -> bool {
    w.status.as_ref().is_some_and(|s| {
        s.observed_generation == w.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The snapshot Secret as one watch sees it: each version decoded, with when it arrived, its compressed and
/// JSON sizes; and how many versions arrived.
#[derive(Clone)]
struct SnapshotSeen {
    at: Instant,
    compressed: usize,
    json: usize,
    snapshot: std::sync::Arc<hookfleet_crds::contract::webhooks::Snapshot>,
    versions: u64,
}

struct SnapshotWatch {
    rx: tokio::sync::watch::Receiver<Option<SnapshotSeen>>,
    task: tokio::task::JoinHandle<()>,
}

impl SnapshotWatch {
    fn start(client: &Client, ns: &str, secret: &str) -> Self {
        use hookfleet_crds::contract::webhooks::{SNAPSHOT_KEY, Snapshot};
        use kube::runtime::watcher::{self, Event};
        let (tx, rx) = tokio::sync::watch::channel(None);
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let config = watcher::Config::default().fields(&format!("metadata.name={secret}"));
        let task = tokio::spawn(async move {
            let mut versions = 0;
            let mut events = std::pin::pin!(watcher::watcher(api, config));
            while let Some(e) = events.next().await {
                let s = match e {
                    Ok(Event::Apply(s) | Event::InitApply(s)) => s,
                    Ok(_) => continue,
                    Err(e) => {
                        eprintln!("bench-operator: snapshot Secret watch: {e} (it restarts)");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let at = Instant::now();
                versions += 1;
                let Some(bytes) = s.data.as_ref().and_then(|d| d.get(SNAPSHOT_KEY)) else {
                    continue;
                };
                match Snapshot::decode(&bytes.0) {
                    Ok(snapshot) => {
                        let json = serde_json::to_vec(&snapshot).map_or(0, |j| j.len());
                        let _ = tx.send(Some(SnapshotSeen {
                            at,
                            compressed: bytes.0.len(),
                            json,
                            snapshot: std::sync::Arc::new(snapshot),
                            versions,
                        }));
                    }
                    Err(e) => eprintln!("bench-operator: the snapshot does not decode: {e}"),
                }
            }
        });
        Self { rx, task }
    }

    fn latest(&self) -> Option<SnapshotSeen> {
        self.rx.borrow().clone()
    }

    /// Waits (up to `limit`) for a snapshot for which `done` holds; returns it.
    async fn until(
        &mut self,
        limit: Duration,
        what: &str,
        done: impl Fn(&hookfleet_crds::contract::webhooks::Snapshot) -> bool,
    ) -> Result<SnapshotSeen> {
        let seen = tokio::time::timeout(
            limit,
            self.rx
                .wait_for(|s| s.as_ref().is_some_and(|s| done(&s.snapshot))),
        )
        .await
        .with_context(|| format!("{what}: not within {limit:?}"))?
        .context("the snapshot watch ended")?;
        Ok(seen.clone().expect("checked"))
    }
}

impl Drop for SnapshotWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The operator's writes (`hookfleet_operator_writes_total`) by kind.
async fn writes_by_kind(port: u16) -> Result<BTreeMap<String, f64>> {
    let text = reqwest_free_get(port).await?;
    let mut out = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("hookfleet_operator_writes_total{"))
    {
        let kind = l
            .split("kind=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *out.entry(kind.to_owned()).or_default() += v;
        }
    }
    Ok(out)
}

/// `after - before` per kind ("WebhookStatus 1234, Secret 2"), and the difference of one kind.
fn kind_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let rows: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d >= 1.0).then(|| format!("{k} {d:.0}"))
        })
        .collect();
    if rows.is_empty() {
        "none".into()
    } else {
        rows.join(", ")
    }
}

fn delta_of(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, kind: &str) -> f64 {
    after.get(kind).copied().unwrap_or(0.0) - before.get(kind).copied().unwrap_or(0.0)
}

/// Publishes what `REPORT_WORKERS` workers would report, each every [`REPORT_EVERY`] (staggered): a tally
/// with new deliveries for each of the first `busy` Webhooks (0: the reports are empty and not sent).
struct Reporter {
    busy: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    published: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    async fn start(uri: &str, names: Vec<String>) -> Result<Self> {
        use hookfleet_crds::contract::webhooks::{
            REPORTS_MAX_LENGTH, REPORTS_TTL_MS, Report, Tally, reports_queue,
        };
        use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};
        use std::sync::atomic::Ordering;
        let conn = lapin::Connection::connect(
            uri,
            lapin::ConnectionProperties::default().with_connection_name("bench-reports".into()),
        )
        .await?;
        let ch = conn.create_channel().await?;
        let queue = reports_queue(FLEET_QUEUE);
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(REPORTS_MAX_LENGTH));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(REPORTS_TTL_MS));
        ch.queue_declare(
            queue.clone().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn({
            let (busy, published) = (busy.clone(), published.clone());
            async move {
                let _conn = conn;
                let mut tick = tokio::time::interval(REPORT_EVERY / REPORT_WORKERS as u32);
                let mut turn = 0usize;
                loop {
                    tick.tick().await;
                    turn += 1;
                    let n = busy.load(Ordering::Relaxed).min(names.len());
                    if n == 0 {
                        continue;
                    }
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    let report = Report {
                        worker: format!("bench-worker-{}", turn % REPORT_WORKERS),
                        at_ms: now_ms,
                        webhooks: names[..n]
                            .iter()
                            .map(|name| {
                                (
                                    name.clone(),
                                    Tally {
                                        generation: 1,
                                        delivered: 3,
                                        last_success_ms: Some(now_ms),
                                        ..Tally::default()
                                    },
                                )
                            })
                            .collect(),
                    };
                    let body = serde_json::to_vec(&report).expect("a report serializes");
                    let sent = ch
                        .basic_publish(
                            "".into(),
                            queue.clone().into(),
                            BasicPublishOptions::default(),
                            &body,
                            lapin::BasicProperties::default(),
                        )
                        .await;
                    match sent {
                        Ok(_) => {
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => eprintln!("bench-operator: publishing a report: {e}"),
                    }
                }
            }
        });
        Ok(Self {
            busy,
            published,
            task,
        })
    }

    fn set_busy(&self, n: usize) {
        self.busy.store(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One status-write phase: the reports cover `busy` Webhooks with new counts for `secs`.
struct Phase {
    label: String,
    busy: usize,
    secs: f64,
    status_writes: f64,
    other_writes: String,
    reports: u64,
    cpu: f64,
    rss: f64,
}

impl Phase {
    fn per_min(&self) -> f64 {
        self.status_writes * 60.0 / self.secs.max(1e-9)
    }
    /// The designed bound: ≤ 1 write per 60 s per Webhook whose counts alone change.
    fn bound_per_min(&self) -> f64 {
        self.busy as f64
    }
}

struct WebhookFigures {
    n: usize,
    signed: usize,
    /// From the first create: the last create answered, all Ready (one watch), the snapshot held all.
    created: f64,
    ready: f64,
    snapshot_full: f64,
    /// The bare client: the same creates, then one status write each (merge patch, `CONCURRENCY` at a time).
    t0_create: f64,
    t0_status: f64,
    /// The snapshot at `n`: compressed (the Secret's value) and JSON bytes.
    compressed: usize,
    json: usize,
    /// Snapshot versions the watch saw until full; the operator's writes until all Ready, by kind.
    snapshot_versions: u64,
    fill_writes: String,
    fill_reconciles: f64,
    fill_cpu: f64,
    /// Peak RSS (VmHWM) once all were Ready.
    fill_hwm: f64,
    fill_machine: String,
    /// Steady state without reports: RSS, peak RSS, CPU seconds per minute, writes per minute.
    rss: f64,
    hwm: f64,
    idle_cpu_per_min: f64,
    idle_writes: String,
    phases: Vec<Phase>,
    /// Seconds from a changed destination URL to the snapshot carrying it.
    propagation: Vec<f64>,
    integration_conditions: String,
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    hookfleet_e2e::stats::nearest_rank(&v, p / 100.0).unwrap_or(0.0)
}

/// The Webhooks part, on its own control plane (API server only: the workers' pods play no part, their
/// reports are published by the bench).
async fn webhooks_part(
    rmq: &RabbitMq,
    bin: &Path,
    n: usize,
    window: u64,
    changes: usize,
) -> Result<WebhookFigures> {
    let cp = ControlPlane::start().await?;
    cp.install_crds().await?;
    let client = cp.client();
    cp.create_namespace(WH_NS).await?;
    cp.create_namespace(WH_T0_NS).await?;
    let signed: Vec<usize> = (0..n).filter(|i| i.is_multiple_of(SIGNED_EVERY)).collect();
    let whsec = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let keys: BTreeMap<String, String> = signed
        .iter()
        .map(|i| (format!("t-{i:05}"), format!("whsec_{}", random_text(32, whsec))))
        .collect();
    for ns in [WH_NS, WH_T0_NS] {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        for s in [
            serde_json::json!({"metadata": {"name": "rabbitmq"}, "stringData": {"uri": rmq.amqp_uri()}}),
            serde_json::json!({"metadata": {"name": "signing"}, "stringData": keys}),
        ] {
            secrets
                .create(&PostParams::default(), &serde_json::from_value(s)?)
                .await?;
        }
    }
    let intg: Integration = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
        "metadata": {"name": FLEET},
        "spec": {
            "source": {
                "connectionSecretRef": {"name": "rabbitmq", "key": "uri"},
                "queue": FLEET_QUEUE,
                "bindings": [{"exchange": "events", "routingKey": "#"}],
            },
            "webhooks": {"eventNameHeader": "x-event", "unmatched": "ack"},
            "delivery": {"concurrency": 64},
            "workers": {"replicas": 2},
        }
    }))?;
    let intgs: Api<Integration> = Api::namespaced(client.clone(), WH_NS);
    intgs.create(&PostParams::default(), &intg).await?;
    let hex = b"0123456789abcdef";
    let objs: Vec<hookfleet_crds::Webhook> = (0..n)
        .map(|i| webhook_object(i, &random_text(16, hex)))
        .collect::<Result<_>>()?;

    // The operator, on the Integration alone first: its empty snapshot exists before the first create.
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let args = operator_args(WH_NS, port);
    let envs = vec![("KUBECONFIG".to_owned(), cp.kubeconfig().display().to_string())];
    let log = dir.path().join("operator.log");
    let op = Process::spawn("operator", bin, &args, &envs, &log)?;
    let keep_log = std::env::var_os("HOOKFLEET_BENCH_OPERATOR_LOG").map(PathBuf::from);
    let uri = rmq.amqp_uri();
    let result = webhooks_measure(
        &cp,
        &client,
        &op,
        port,
        n,
        &objs,
        window,
        changes,
        signed.len(),
        &uri,
    )
    .await;
    if let Some(to) = keep_log {
        let _ = std::fs::copy(&log, &to);
        eprintln!("bench-operator: the operator's log is in {}", to.display());
    }
    let mut f = match result {
        Ok(f) => f,
        Err(e) => return Err(e.context(op.log_tail(30))),
    };
    drop(op);

    // The baseline: the same objects by a bare client into a namespace no operator watches, then one
    // status write each, as the operator's first (Ready) status.
    eprintln!("bench-operator: Webhooks T0, the same {n} creates and status writes by a bare client");
    let t = Instant::now();
    create_webhooks(&client, WH_T0_NS, &objs).await?;
    f.t0_create = t.elapsed().as_secs_f64();
    let api: Api<hookfleet_crds::Webhook> = Api::namespaced(client.clone(), WH_T0_NS);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let t = Instant::now();
    futures::stream::iter(objs.iter())
        .map(|w| {
            let api = api.clone();
            let name = w.metadata.name.clone().unwrap_or_default();
            let host = w.spec.destination.url.split('/').nth(2).unwrap_or("").to_owned();
            let now = now.clone();
            async move {
                let body = serde_json::json!({"status": {
                    "observedGeneration": 1,
                    "destinationHost": host,
                    "conditions": [
                        {"type": "Ready", "status": "True", "reason": "Delivering", "observedGeneration": 1,
                         "message": "in the fleet's configuration; no failure since the last delivery",
                         "lastTransitionTime": now},
                        {"type": "Paused", "status": "False", "reason": "Active", "observedGeneration": 1,
                         "message": "delivering when events match", "lastTransitionTime": now},
                    ],
                    "delivered": 0, "failed": 0, "deadLettered": 0, "consecutiveFailures": 0,
                }});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    f.t0_status = t.elapsed().as_secs_f64();
    Ok(f)
}

#[allow(clippy::too_many_arguments)]
async fn webhooks_measure(
    cp: &ControlPlane,
    client: &Client,
    op: &Process,
    port: u16,
    n: usize,
    objs: &[hookfleet_crds::Webhook],
    window: u64,
    changes: usize,
    signed: usize,
    uri: &str,
) -> Result<WebhookFigures> {
    use hookfleet_crds::contract::webhooks::snapshot_secret;
    let pid = op.pid().context("operator pid")?;
    let mut snapshots = SnapshotWatch::start(client, WH_NS, &snapshot_secret(FLEET));
    snapshots
        .until(Duration::from_secs(120), "the empty snapshot", |_| true)
        .await
        .with_context(|| op.log_tail(20))?;
    let webhooks: Api<hookfleet_crds::Webhook> = Api::namespaced(client.clone(), WH_NS);
    let ready = WatchCount::ready_webhooks(&webhooks).await?;
    let writes_before = writes_by_kind(port).await?;
    let reconciles_before = metric(port, "hookfleet_operator_reconciles_total").await?;
    let cpu_before = cpu_secs(pid);
    let machine_before = CpuSnapshot::take(Some(pid));

    eprintln!("bench-operator: creating {n} Webhooks on Integration {FLEET}");
    let start = Instant::now();
    let creating = create_webhooks(client, WH_NS, objs);
    let mut creating = std::pin::pin!(creating);
    let mut created = None;
    let mut snapshot_full = None;
    let mut last_report = Instant::now();
    let ready_at = loop {
        if created.is_none() {
            tokio::select! {
                r = &mut creating => {
                    r?;
                    created = Some(start.elapsed().as_secs_f64());
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        op.check_running().with_context(|| op.log_tail(20))?;
        cp.check_running()?;
        if snapshot_full.is_none()
            && let Some(s) = snapshots.latest()
            && s.snapshot.webhooks.len() == n
        {
            snapshot_full = Some(s.at.duration_since(start).as_secs_f64());
        }
        let done = ready.count();
        if done == n && created.is_some() {
            break start.elapsed().as_secs_f64();
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "bench-operator: {done}/{n} Ready, {} in the snapshot after {:.0} s",
                snapshots.latest().map_or(0, |s| s.snapshot.webhooks.len()),
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(1800),
            "{done} of {n} Ready after 1800 s"
        );
    };
    let full = snapshots
        .until(Duration::from_secs(600), "the snapshot with every Webhook", |s| {
            s.webhooks.len() == n
        })
        .await
        .with_context(|| op.log_tail(20))?;
    let snapshot_full = snapshot_full.unwrap_or_else(|| full.at.duration_since(start).as_secs_f64());
    let fill_machine = machine_before.until(&CpuSnapshot::take(Some(pid)), ready_at);
    let fill_cpu = cpu_secs(pid) - cpu_before;
    let fill_hwm = rss_mib(pid, "VmHWM");
    let fill_writes = kind_delta(&writes_before, &writes_by_kind(port).await?);
    let fill_reconciles = metric(port, "hookfleet_operator_reconciles_total").await? - reconciles_before;
    drop(ready);
    let integration_conditions = Api::<Integration>::namespaced(client.clone(), WH_NS)
        .get(FLEET)
        .await?
        .status
        .map(|s| {
            s.conditions
                .iter()
                .map(|c| format!("{}={} ({})", c.type_, c.status, c.reason))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();

    // Steady state without reports: settle, then a window.
    eprintln!("bench-operator: {n} Webhooks Ready; steady state without reports");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (w0, c0) = (writes_by_kind(port).await?, cpu_secs(pid));
    let idle = Duration::from_secs(window.min(60));
    tokio::time::sleep(idle).await;
    let (w1, c1) = (writes_by_kind(port).await?, cpu_secs(pid));
    let idle_writes = kind_delta(&w0, &w1);
    let idle_cpu_per_min = (c1 - c0) * 60.0 / idle.as_secs_f64();
    let rss = rss_mib(pid, "VmRSS");

    // Status writes with the workers' reports: a busy tenth, then every Webhook.
    let names: Vec<String> = objs.iter().filter_map(|w| w.metadata.name.clone()).collect();
    let reporter = Reporter::start(uri, names).await?;
    let mut phases = Vec::new();
    for (label, busy) in [
        ("a busy tenth (counts change)", (n / 10).max(1)),
        ("every Webhook (counts change)", n),
    ] {
        eprintln!(
            "bench-operator: reports for {busy} Webhooks for {window} s (after {} s to settle)",
            PHASE_SETTLE.as_secs()
        );
        reporter.set_busy(busy);
        tokio::time::sleep(PHASE_SETTLE).await;
        let (w0, c0, p0) = (
            writes_by_kind(port).await?,
            cpu_secs(pid),
            reporter.published.load(std::sync::atomic::Ordering::Relaxed),
        );
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(window)).await;
        let secs = t.elapsed().as_secs_f64();
        let w1 = writes_by_kind(port).await?;
        let mut other = w1.clone();
        other.remove("WebhookStatus");
        phases.push(Phase {
            label: label.into(),
            busy,
            secs,
            status_writes: delta_of(&w0, &w1, "WebhookStatus"),
            other_writes: kind_delta(&w0, &other),
            reports: reporter.published.load(std::sync::atomic::Ordering::Relaxed) - p0,
            cpu: (cpu_secs(pid) - c0) * 60.0 / secs,
            rss: rss_mib(pid, "VmRSS"),
        });
        op.check_running().with_context(|| op.log_tail(20))?;
    }

    // Propagation while all exist (and a busy tenth reports): one Webhook's destination at a time.
    reporter.set_busy((n / 10).max(1));
    eprintln!("bench-operator: {changes} destination changes, one every 3 s");
    let mut propagation = Vec::new();
    for k in 0..changes {
        let i = (k * 7919 + 13) % n;
        let name = format!("wh-{i:05}");
        let url = format!(
            "https://moved-{k}.tenant-{i:05}.example.com/in/{}",
            random_text(16, b"0123456789abcdef")
        );
        let t = Instant::now();
        webhooks
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"destination": {"url": url}}})),
            )
            .await?;
        let seen = snapshots
            .until(
                Duration::from_secs(120),
                "a changed destination in the snapshot",
                |s| {
                    s.webhooks
                        .binary_search_by(|e| e.name.as_str().cmp(&name))
                        .is_ok_and(|at| s.webhooks[at].destination.url == url)
                },
            )
            .await
            .with_context(|| op.log_tail(20))?;
        propagation.push(seen.at.saturating_duration_since(t).as_secs_f64());
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    drop(reporter);
    let hwm = rss_mib(pid, "VmHWM");
    Ok(WebhookFigures {
        n,
        signed,
        created: created.unwrap_or(ready_at),
        ready: ready_at,
        snapshot_full,
        t0_create: 0.0,
        t0_status: 0.0,
        compressed: full.compressed,
        json: full.json,
        snapshot_versions: full.versions,
        fill_writes,
        fill_reconciles,
        fill_cpu,
        fill_hwm,
        fill_machine,
        rss,
        hwm,
        idle_cpu_per_min,
        idle_writes,
        phases,
        propagation,
        integration_conditions,
    })
}

fn print_webhooks(f: &WebhookFigures) {
    let t0 = f.t0_create + f.t0_status;
    println!(
        "\nMany Webhooks: {} on one Integration ({} signed with their own key; API server only, reports published by the bench)",
        f.n, f.signed
    );
    println!(
        "  all {} Ready (one watch) {:.1} s after the first create; the last create answered at {:.1} s; T₀ (bare creates {:.1} s + one status write each {:.1} s) {:.1} s; ratio {:.2}",
        f.n,
        f.ready,
        f.created,
        f.t0_create,
        f.t0_status,
        t0,
        f.ready / t0.max(1e-9)
    );
    println!(
        "  the snapshot held all {} {:.1} s after the first create (ratio to T₀ {:.2}); {} versions of it seen until then",
        f.n,
        f.snapshot_full,
        f.snapshot_full / t0.max(1e-9),
        f.snapshot_versions
    );
    println!(
        "  snapshot at {}: {:.1} KiB compressed ({:.0} B per entry; ceiling 900 KiB: room for about {:.0}), {:.1} KiB of JSON",
        f.n,
        f.compressed as f64 / 1024.0,
        f.compressed as f64 / f.n as f64,
        900.0 * 1024.0 / (f.compressed as f64 / f.n as f64),
        f.json as f64 / 1024.0
    );
    println!(
        "  until all Ready: operator writes {}; {:.0} reconciles; operator CPU {:.1} s, peak RSS {:.1} MiB; {}",
        f.fill_writes, f.fill_reconciles, f.fill_cpu, f.fill_hwm, f.fill_machine
    );
    println!("  the Integration's conditions: {}", f.integration_conditions);
    println!(
        "  steady state, no reports: operator RSS {:.1} MiB; CPU {:.2} s per minute; writes {}",
        f.rss, f.idle_cpu_per_min, f.idle_writes
    );
    for p in &f.phases {
        println!(
            "  reports for {} ({}): {:.0} Webhook status writes per minute (bound ≤ {:.0}: 1 per 60 s per Webhook whose counts change; one write per changing Webhook every {:.0} s) over {:.0} s, {} reports; other writes {}; operator CPU {:.1} s per minute, RSS {:.1} MiB",
            p.busy,
            p.label,
            p.per_min(),
            p.bound_per_min(),
            p.busy as f64 * 60.0 / p.per_min().max(1e-9),
            p.secs,
            p.reports,
            p.other_writes,
            p.cpu,
            p.rss
        );
    }
    println!("  operator peak RSS (VmHWM) {:.1} MiB over the whole part", f.hwm);
    println!(
        "  one destination change until the snapshot carries it ({} changes, a busy tenth reporting): p50 {:.2} s, p99 {:.2} s, max {:.2} s (target p99 ≤ 5 s)",
        f.propagation.len(),
        percentile(f.propagation.clone(), 50.0),
        percentile(f.propagation.clone(), 99.0),
        f.propagation.iter().copied().fold(0.0, f64::max)
    );
}
