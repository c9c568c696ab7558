//! Shared by the worker's integration tests: a real RabbitMQ node from the harness, the harness's
//! webhook sink, and the real worker binary as a child process.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hookfleet_crds::contract::queues;
use hookfleet_crds::integration::{QueueType, default_delivery_limit};
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::{Process, free_port, wait_for};
use hookfleet_worker::worker::topology;
use lapin::options::{BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

pub const WORKER: &str = env!("CARGO_BIN_EXE_hookfleet-worker");

/// The worker binary [`start_worker`] runs: this build's, or `HOOKFLEET_TEST_WORKER_BIN` (to show that
/// a test fails on an older build).
pub fn worker_bin() -> PathBuf {
    std::env::var_os("HOOKFLEET_TEST_WORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(WORKER))
}

/// One broker-heavy test at a time per test binary: two cores, each test with its own node.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn init() {
    hookfleet_testkit::init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Ids `prefix-0 … prefix-(n-1)`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Declares `queue` exactly as a worker with the default `--queue-type` (quorum) and delivery limit
/// does, so a test may publish before the worker starts.
pub async fn declare_work_queue(ch: &lapin::Channel, queue: &str, queue_type: QueueType) -> Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let args = topology::work_queue_args(queue_type, &queues::dead_letter(queue), default_delivery_limit());
    ch.queue_declare(queue.into(), durable, args).await?;
    Ok(())
}

/// Declares `queue` (as the worker does by default: quorum) and publishes one persistent message per id, with
/// publisher confirms; returns once the broker confirmed them all.
pub async fn publish(rmq: &RabbitMq, queue: &str, ids: &[String]) -> Result<()> {
    let messages: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| {
            (
                id.clone(),
                format!(r#"{{"id":"{id}","data":{{"n":1}}}}"#).into_bytes(),
            )
        })
        .collect();
    publish_bodies(rmq, queue, &messages).await
}

/// Like [`publish`], to a queue that exists already (of whatever type), without declaring it.
pub async fn publish_existing(rmq: &RabbitMq, queue: &str, ids: &[String]) -> Result<()> {
    let messages: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (id.clone(), format!(r#"{{"id":"{id}"}}"#).into_bytes()))
        .collect();
    publish_to(rmq, queue, &messages, None).await
}

/// Like [`publish`], with a body of the caller's per id.
pub async fn publish_bodies(rmq: &RabbitMq, queue: &str, messages: &[(String, Vec<u8>)]) -> Result<()> {
    publish_to(rmq, queue, messages, Some(QueueType::Quorum)).await
}

/// Publishes with confirms, declaring `queue` first as a worker of `declare` type would.
pub async fn publish_to(
    rmq: &RabbitMq,
    queue: &str,
    messages: &[(String, Vec<u8>)],
    declare: Option<QueueType>,
) -> Result<()> {
    publish_uri(&rmq.amqp_uri(), queue, messages, declare).await
}

/// [`publish_to`] through the broker (node) at `uri`.
pub async fn publish_uri(
    uri: &str,
    queue: &str,
    messages: &[(String, Vec<u8>)],
    declare: Option<QueueType>,
) -> Result<()> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    if let Some(t) = declare {
        declare_work_queue(&ch, queue, t).await?;
    }
    for chunk in messages.chunks(500) {
        hookfleet_testkit::messages::publish_batch(&ch, queue, chunk).await?;
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

/// (ready, unacked, consumers) of a queue, from `rabbitmqctl list_queues`.
pub fn queue_stats(rmq: &RabbitMq, queue: &str) -> Result<(u64, u64, u64)> {
    let out = rmq.ctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
    ])?;
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 4 && f[0] == queue {
            return Ok((f[1].parse()?, f[2].parse()?, f[3].parse()?));
        }
    }
    anyhow::bail!("queue {queue} not in list_queues:\n{out}")
}

/// (ready messages, consumers) of `queue` from a passive declare, which asks the queue itself
/// (`list_queues` reports a quorum queue's counts only with the next statistics emission).
pub async fn queue_counts(rmq: &RabbitMq, queue: &str) -> Result<(u32, u32)> {
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    let _ = conn.close(200, "counted".into()).await;
    Ok((q.message_count(), q.consumer_count()))
}

/// Consumers attached to `queue`, from a passive declare (what the operator reads too).
pub async fn consumers(rmq: &RabbitMq, queue: &str) -> Result<u32> {
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    let _ = conn.close(200, "counted".into()).await;
    Ok(q.consumer_count())
}

/// Total ready + unacked messages over every queue whose name starts with `prefix`.
pub fn messages_under(rmq: &RabbitMq, prefix: &str) -> Result<u64> {
    let out = rmq.ctl(&["list_queues", "-q", "--no-table-headers", "name", "messages"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 2 && f[0].starts_with(prefix)).then(|| f[1].parse::<u64>().unwrap_or(0))
        })
        .sum())
}

/// A dead letter as read back from the queue.
#[derive(Debug)]
pub struct DeadLetter {
    pub id: String,
    pub headers: FieldTable,
    pub body: Vec<u8>,
}

/// Drains `queue` with basic.get (acking), returning each message's id and headers.
pub async fn drain(rmq: &RabbitMq, queue: &str) -> Result<Vec<DeadLetter>> {
    drain_uri(&rmq.amqp_uri(), queue).await
}

/// [`drain`] through the broker (node) at `uri`.
pub async fn drain_uri(uri: &str, queue: &str) -> Result<Vec<DeadLetter>> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let d = m.delivery;
        out.push(DeadLetter {
            id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            headers: d.properties.headers().clone().unwrap_or_default(),
            body: d.data,
        });
    }
    let _ = conn.close(200, "drained".into()).await;
    Ok(out)
}

/// A worker child process and its metrics port.
pub struct Worker {
    pub process: Process,
    pub metrics_port: u16,
    pub dir: PathBuf,
}

/// The flags every test worker gets: broker, queue, sink, loopback allowed, text logs.
pub fn base_args(rmq: &RabbitMq, queue: &str, url: &str, metrics_port: u16, dir: &Path) -> Vec<String> {
    base_args_uri(&rmq.amqp_uri(), queue, url, metrics_port, dir)
}

/// [`base_args`] with the broker given as its `--amqp-uri` value (one URI or several).
pub fn base_args_uri(amqp_uri: &str, queue: &str, url: &str, metrics_port: u16, dir: &Path) -> Vec<String> {
    base_args_source(&["--amqp-uri", amqp_uri], queue, url, metrics_port, dir)
}

/// [`base_args`] with the source given as its flags (`--amqp-uri …`, or `--nats-url … --nats-stream …`).
pub fn base_args_source(
    source: &[&str],
    queue: &str,
    url: &str,
    metrics_port: u16,
    dir: &Path,
) -> Vec<String> {
    source
        .iter()
        .copied()
        .chain([
            "--queue",
            queue,
            "--destination-url",
            url,
            "--allow-private-networks",
            "--log-format",
            "text",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--termination-log",
            &dir.join("termination-log").display().to_string(),
            "--integration",
            "test/worker",
        ])
        .map(|s| s.to_string())
        .collect()
}

/// Starts the worker binary (optionally under `prlimit`) and waits until it is ready (consuming).
pub async fn start_worker(
    rmq: &RabbitMq,
    queue: &str,
    url: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
    dir: &Path,
    log_name: &str,
) -> Result<Worker> {
    start_worker_uri(&rmq.amqp_uri(), queue, url, extra, envs, dir, log_name).await
}

/// [`start_worker`] with the broker given as its `--amqp-uri` value (one URI or several).
pub async fn start_worker_uri(
    amqp_uri: &str,
    queue: &str,
    url: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
    dir: &Path,
    log_name: &str,
) -> Result<Worker> {
    start_worker_source(&["--amqp-uri", amqp_uri], queue, url, extra, envs, dir, log_name).await
}

/// [`start_worker`] with the source given as its flags ([`base_args_source`]).
pub async fn start_worker_source(
    source: &[&str],
    queue: &str,
    url: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
    dir: &Path,
    log_name: &str,
) -> Result<Worker> {
    let port = free_port()?;
    let mut args = base_args_source(source, queue, url, port, dir);
    args.extend(extra.iter().map(|s| s.to_string()));
    let envs: Vec<(String, String)> = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let process = Process::spawn(
        log_name,
        &worker_bin(),
        &args,
        &envs,
        &dir.join(format!("{log_name}.log")),
    )?;
    let w = Worker {
        process,
        metrics_port: port,
        dir: dir.to_owned(),
    };
    w.wait_ready(true, Duration::from_secs(30)).await?;
    Ok(w)
}

/// The flags of the stalling-sink descriptor scenario (RabbitMQ's and NATS's): concurrency 96, a prefetch
/// beyond it, attempts of 1 s retried every 200 ms–1 s, and no circuit breaker, so that every attempt
/// really hits the stalling sink: that is the descriptor stress.
pub const STALLING_SINK_FLAGS: [&str; 14] = [
    "--concurrency",
    "96",
    "--prefetch",
    "200",
    "--timeout",
    "1s",
    "--backoff-initial",
    "200ms",
    "--backoff-max",
    "1s",
    "--max-attempts",
    "100",
    "--circuit-breaker-threshold",
    "0",
];

/// Starts the worker with `args` under `prlimit --nofile=<nofile>:<nofile>` (soft and hard limit), its
/// metrics on `metrics_port` (which `args` name), and waits until it is ready.
pub async fn start_worker_limited(
    nofile: u64,
    args: Vec<String>,
    metrics_port: u16,
    dir: &Path,
) -> Result<Worker> {
    let mut argv = vec![
        format!("--nofile={nofile}:{nofile}"),
        "--".into(),
        worker_bin().display().to_string(),
    ];
    argv.extend(args);
    let process = Process::spawn(
        "worker",
        Path::new("/usr/bin/prlimit"),
        &argv,
        &[],
        &dir.join("worker.log"),
    )?;
    let w = Worker {
        process,
        metrics_port,
        dir: dir.to_owned(),
    };
    w.wait_ready(true, Duration::from_secs(30)).await?;
    Ok(w)
}

/// How to start a worker with Webhooks ([`spawn_webhooks_worker`]).
pub struct WebhooksWorker<'a> {
    /// Where the worker reads its snapshot Secret (the API server's).
    pub kubeconfig: &'a str,
    /// `namespace/name` of the Integration: the Secret's namespace, and the metrics' label.
    pub integration: &'a str,
    pub queue: &'a str,
    pub secret: &'a str,
    /// `--unmatched`: `ack` or `deadLetter`.
    pub unmatched: &'a str,
    pub concurrency: usize,
    /// Run under `prlimit --nofile=N:N`.
    pub nofile: Option<u64>,
}

/// Spawns the worker binary with Webhooks (event names in header `event`, backoff 200 ms to 1 s) as
/// `name` (its `HOSTNAME`, as in a pod), without waiting: it consumes once its snapshot is loaded.
pub fn spawn_webhooks_worker(rmq: &RabbitMq, w: &WebhooksWorker, dir: &Path, name: &str) -> Result<Worker> {
    spawn_webhooks_worker_source(&["--amqp-uri".into(), rmq.amqp_uri()], w, dir, name, &[])
}

/// [`spawn_webhooks_worker`] with the source given as its flags, and `extra` flags after the others.
pub fn spawn_webhooks_worker_source(
    source: &[String],
    w: &WebhooksWorker,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> Result<Worker> {
    let port = free_port()?;
    let (program, mut args) = match w.nofile {
        Some(n) => (
            PathBuf::from("/usr/bin/prlimit"),
            vec![
                format!("--nofile={n}:{n}"),
                "--".into(),
                worker_bin().display().to_string(),
            ],
        ),
        None => (worker_bin(), Vec::new()),
    };
    args.extend(source.iter().cloned());
    args.extend(
        [
            "--queue",
            w.queue,
            "--webhooks-secret",
            w.secret,
            "--integration",
            w.integration,
            "--event-name-header",
            "event",
            "--unmatched",
            w.unmatched,
            "--allow-private-networks",
            "--concurrency",
            &w.concurrency.to_string(),
            "--backoff-initial",
            "200ms",
            "--backoff-max",
            "1s",
            "--log-format",
            "text",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--termination-log",
            &dir.join(format!("{name}.termination-log")).display().to_string(),
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let envs = vec![
        ("KUBECONFIG".to_owned(), w.kubeconfig.to_owned()),
        ("HOSTNAME".to_owned(), name.to_owned()),
    ];
    let process = Process::spawn(name, &program, &args, &envs, &dir.join(format!("{name}.log")))?;
    Ok(Worker {
        process,
        metrics_port: port,
        dir: dir.to_owned(),
    })
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.process.pid().expect("running")
    }

    /// Waits for `/readyz` to say `ready`.
    pub async fn wait_ready(&self, ready: bool, timeout: Duration) -> Result<()> {
        let port = self.metrics_port;
        let what = if ready { "worker ready" } else { "worker not ready" };
        wait_for(what, timeout, Duration::from_millis(100), || {
            let running = self.process.check_running();
            async move {
                running?;
                let code = http_get(port, "/readyz").await.map(|(c, _)| c).unwrap_or(0);
                Ok(((code == 200) == ready && code != 0).then_some(()))
            }
        })
        .await
        .with_context(|| format!("worker log:\n{}", self.process.log_tail(30)))
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(http_get(self.metrics_port, "/metrics").await?.1)
    }

    /// Open descriptors of the worker process.
    pub fn open_fds(&self) -> Option<usize> {
        Some(
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .ok()?
                .count(),
        )
    }
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let resp = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// The value of a metric line that starts with `prefix` (labels included), summed over matches.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The worker's message accounting from `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Accounting {
    pub consumed: f64,
    pub delivered: f64,
    pub retried: f64,
    pub dead_lettered: f64,
    pub handed_back: f64,
    pub unsettled: f64,
}

/// Reads the accounting and checks the invariant consumed = delivered + retried + dead-lettered +
/// handed back + unsettled, and that nothing is left unsettled (call it once the worker is idle).
pub fn accounting(metrics: &str) -> Result<Accounting> {
    let fate = |f: &str| {
        metric(
            metrics,
            &format!("hookfleet_messages_settled_total{{integration=\"test/worker\",fate=\"{f}\"}}"),
        )
    };
    let a = Accounting {
        consumed: metric(metrics, "hookfleet_messages_consumed_total{"),
        delivered: fate("delivered"),
        retried: fate("retried"),
        dead_lettered: fate("dead_lettered"),
        handed_back: fate("handed_back"),
        unsettled: metric(metrics, "hookfleet_messages_unsettled{"),
    };
    anyhow::ensure!(a.consumed > 0.0, "nothing consumed: {a:?}");
    anyhow::ensure!(
        a.consumed == a.delivered + a.retried + a.dead_lettered + a.handed_back + a.unsettled,
        "accounting does not add up: {a:?}"
    );
    anyhow::ensure!(
        a.unsettled == 0.0,
        "messages left unsettled on an idle worker: {a:?}"
    );
    Ok(a)
}

/// Waits until the worker is idle (nothing unsettled, the queue and delay queues empty) and checks
/// its accounting.
pub async fn settled_accounting(w: &Worker) -> Result<Accounting> {
    let mut last = Err(anyhow::anyhow!("not read"));
    for _ in 0..100 {
        let m = w.metrics().await?;
        last = accounting(&m);
        if last.is_ok() {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Every published id reached the sink (2xx) at least once or sits in `dead`; none vanished; and the
/// sink saw no id that was never published. Returns the number of duplicate deliveries.
pub fn account(
    published: &[String],
    delivered: &HashMap<String, usize>,
    dead: &HashSet<String>,
) -> Result<usize> {
    let a = hookfleet_testkit::messages::account(published, delivered, dead)?;
    if a.lost > 0 {
        let some: Vec<&String> = published
            .iter()
            .filter(|id| !delivered.contains_key(*id) && !dead.contains(*id))
            .take(5)
            .collect();
        anyhow::bail!("{} ids vanished, e.g. {some:?}", a.lost);
    }
    Ok(a.duplicates)
}

/// One row of the fault-scenario table (docs/faults.md), from a test's own per-id accounting:
/// `delivered` ids reached the sink with a 2xx at least once, `dead_lettered` ids (not delivered) sit in
/// the dead-letter queue, `held` ids are still in a broker queue when the test ends (counted, not lost),
/// `lost = N − delivered − dead_lettered − held`, and `duplicates` are the 2xx deliveries beyond the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRow {
    pub n: usize,
    pub delivered: usize,
    pub dead_lettered: usize,
    pub held: usize,
    pub duplicates: usize,
    pub lost: usize,
}

/// Computes the row for `published`, prints it as one `fault-table:` line and returns it.
pub fn fault_table(
    scenario: &str,
    published: &[String],
    delivered: &HashMap<String, usize>,
    dead: &HashSet<String>,
    held: usize,
) -> FaultRow {
    let ids: HashSet<&String> = published.iter().collect();
    let delivered_ids = ids.iter().filter(|id| delivered.contains_key(**id)).count();
    let dead_only = ids
        .iter()
        .filter(|id| !delivered.contains_key(**id) && dead.contains(**id))
        .count();
    let duplicates = ids
        .iter()
        .filter_map(|id| delivered.get(*id))
        .map(|n| n.saturating_sub(1))
        .sum();
    let row = FaultRow {
        n: ids.len(),
        delivered: delivered_ids,
        dead_lettered: dead_only,
        held,
        duplicates,
        lost: ids.len().saturating_sub(delivered_ids + dead_only + held),
    };
    let held = if row.held > 0 {
        format!(" held={}", row.held)
    } else {
        String::new()
    };
    eprintln!(
        "fault-table: {scenario} N={} delivered={} dead_lettered={} duplicates={} lost={}{held}",
        row.n, row.delivered, row.dead_lettered, row.duplicates, row.lost
    );
    row
}

/// Writes `snap` to the snapshot Secret `name` of `api`'s namespace, as the operator would (created or
/// patched).
pub async fn put_snapshot(
    api: &kube::Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
    snap: &hookfleet_crds::contract::webhooks::Snapshot,
) -> Result<()> {
    use kube::api::{Patch, PatchParams, PostParams};
    let mut secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    secret.data = Some(std::collections::BTreeMap::from([(
        hookfleet_crds::contract::webhooks::SNAPSHOT_KEY.to_owned(),
        k8s_openapi::ByteString(snap.encode()),
    )]));
    if api.get_opt(name).await?.is_some() {
        api.patch(name, &PatchParams::default(), &Patch::Merge(&secret))
            .await?;
    } else {
        api.create(&PostParams::default(), &secret).await?;
    }
    Ok(())
}
