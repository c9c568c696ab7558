//! `make bench`: the worker against the machine's own limits, every figure beside a baseline measured in
//! the same run (docs/benchmarks.md says what each figure means and holds a committed run).
//!
//! Sections (`HOOKFLEET_BENCH_SECTIONS`, comma-separated, default all):
//! - `throughput`: bare consumer B, bare HTTP client H, the serial limit L = 1/(1/B + 1/H), and hookfleet end
//!   to end (persistent, ack after 2xx) for classic and quorum queues, 200 B and 8 KiB bodies, plain and
//!   signed + body template; CPU-µs per message of each (from `/proc/<pid>/stat`).
//! - `latency`: the rate the machine sustains end to end while it also publishes (the sweep's 100%), then
//!   publish → sink p50/p99/p99.9 with an open-loop publisher at fractions of it, beside the bare
//!   consumer's publish → consume at the same rate; a reference point at half the throughput section's
//!   drain rate; the SVG plot.
//! - `memory`: worker RSS idle and over a soak.
//! - `fd`: soft and hard limit 256, a sink that stalls every connection for a while.
//! - `load`: 5× a stated base rate over two workers, with the per-message account.
//! - `nats`: the NATS JetStream source: a bare JetStream pull consumer that only acks (B), the bare
//!   client (H), L = 1/(1/B + 1/H), and hookfleet on NATS end to end, beside the RabbitMQ rows.
//! - `webhooks`: many Webhooks (10,000) on one worker: matching cost per message beside one Webhook's,
//!   drain rate beside the single-destination worker's, fan-out to 10, RSS, and a change's propagation.
//!
//! `HOOKFLEET_BENCH_QUICK=1` makes every default small (a few minutes in all); each `HOOKFLEET_BENCH_*`
//! variable read below overrides one figure.

mod load;
mod measure;
mod nats;
mod report;
mod roles;
mod webhooks;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::messages;
use hookfleet_testkit::process::{Process, free_port};
use hookfleet_testkit::sink::{Mode, Sink};

use report::{Point, Section, row};
use roles::{Child, Figures};

const WORKER: &str = env!("CARGO_BIN_EXE_hookfleet-worker");

/// The worker binary: this build's, or `HOOKFLEET_BENCH_WORKER` (another build, e.g. an older commit's,
/// for a before/after table).
fn worker_bin() -> String {
    std::env::var("HOOKFLEET_BENCH_WORKER").unwrap_or_else(|_| WORKER.to_owned())
}
const TEMPLATE: &str = r#"{"id":{{ id|tojson }},"data":{{ pad|tojson }}}"#;

fn var<T: std::str::FromStr>(name: &str, quick: T, full: T, is_quick: bool) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if is_quick { quick } else { full })
}

fn list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Everything a run is told, from the environment.
struct Cfg {
    quick: bool,
    sections: HashSet<String>,
    /// Messages per throughput run.
    n: usize,
    /// Rounds of the throughput section (each baseline and drain again, back to back; medians).
    rounds: usize,
    concurrency: usize,
    prefetch: usize,
    sizes: Vec<usize>,
    queue_types: Vec<QueueType>,
    /// Offered loads of the latency sweep, as fractions of the sustained rate.
    loads: Vec<f64>,
    latency_secs: f64,
    soak_secs: f64,
    soak_rate: f64,
    fd_rate: f64,
    stall_secs: f64,
    base_rate: f64,
    load_secs: f64,
    /// Webhooks in the `webhooks` section's snapshot.
    webhooks: usize,
    /// Lookups per figure of the in-process matching cost.
    lookups: usize,
    /// Changes timed by the `webhooks` section's propagation.
    propagations: usize,
    out: PathBuf,
}

impl Cfg {
    fn from_env() -> Self {
        let q = std::env::var("HOOKFLEET_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let concurrency = var("HOOKFLEET_BENCH_CONCURRENCY", 128, 128, q);
        let loads_default = if q { "0.5,0.9" } else { "0.25,0.5,0.75,0.9,1.0" };
        Cfg {
            quick: q,
            sections: list(
                "HOOKFLEET_BENCH_SECTIONS",
                "throughput,latency,memory,fd,load,nats,webhooks",
            )
            .into_iter()
            .collect(),
            n: var("HOOKFLEET_BENCH_N", 5_000, 100_000, q),
            rounds: var("HOOKFLEET_BENCH_ROUNDS", 1, 3, q).max(1),
            concurrency,
            prefetch: var("HOOKFLEET_BENCH_PREFETCH", 2 * concurrency, 2 * concurrency, q).min(65_535),
            sizes: list("HOOKFLEET_BENCH_SIZES", "200,8192")
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            queue_types: list("HOOKFLEET_BENCH_QUEUE_TYPES", "classic,quorum")
                .iter()
                .filter_map(|s| match s.as_str() {
                    "classic" => Some(QueueType::Classic),
                    "quorum" => Some(QueueType::Quorum),
                    _ => None,
                })
                .collect(),
            loads: list("HOOKFLEET_BENCH_LOADS", loads_default)
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            latency_secs: var("HOOKFLEET_BENCH_LATENCY_SECS", 5.0, 20.0, q),
            soak_secs: var("HOOKFLEET_BENCH_SOAK_SECS", 20.0, 600.0, q),
            soak_rate: var("HOOKFLEET_BENCH_SOAK_RATE", 1000.0, 1000.0, q),
            fd_rate: var("HOOKFLEET_BENCH_FD_RATE", 1000.0, 1000.0, q),
            stall_secs: var("HOOKFLEET_BENCH_STALL_SECS", 5.0, 15.0, q),
            base_rate: var("HOOKFLEET_BENCH_BASE_RATE", 400.0, 400.0, q),
            load_secs: var("HOOKFLEET_BENCH_LOAD_SECS", 20.0, 300.0, q),
            // Whole groups of ten (the fan-out's).
            webhooks: var("HOOKFLEET_BENCH_WEBHOOKS", 10_000, 10_000, q).max(100) / 10 * 10,
            lookups: var("HOOKFLEET_BENCH_LOOKUPS", 200_000, 2_000_000, q).max(1_000),
            propagations: var("HOOKFLEET_BENCH_PROPAGATIONS", 10, 20, q).max(1),
            out: std::env::var_os("HOOKFLEET_BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")),
        }
    }

    fn on(&self, section: &str) -> bool {
        self.sections.contains(section)
    }
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(role) = roles::role() {
        return rt.block_on(roles::child(&role));
    }
    // On Ctrl-C the run is dropped, which stops the broker, the workers and the baselines.
    rt.block_on(async {
        tokio::select! {
            r = run() => r,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        }
    })
}

fn qt_name(t: QueueType) -> &'static str {
    match t {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    }
}

fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn verdict(ok: bool, target: &str) -> String {
    format!("{target} {}", if ok { "ok" } else { "MISSED" })
}

/// A worker child process with its metrics port.
struct Worker {
    process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

/// How a worker is started beyond the broker, queue and sink.
#[derive(Default, Clone)]
struct Opts {
    queue_type: Option<QueueType>,
    signed: bool,
    template: bool,
    extra: Vec<String>,
    /// Instead of the run's concurrency and prefetch.
    concurrency: Option<usize>,
    prefetch: Option<usize>,
    /// Soft and hard RLIMIT_NOFILE (through prlimit).
    nofile: Option<u64>,
    /// Many Webhooks instead of the one destination (the `url` is then not passed).
    webhooks: Option<webhooks::Mode>,
    /// A NATS JetStream source instead of RabbitMQ: (server URLs, stream); the queue names the
    /// durable consumer.
    nats: Option<(String, String)>,
}

impl Worker {
    async fn start(cfg: &Cfg, uri: &str, queue: &str, url: &str, o: &Opts) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut args: Vec<String> = match &o.nats {
            None => vec![
                "--amqp-uri".into(),
                uri.into(),
                "--queue-type".into(),
                qt_name(o.queue_type.unwrap_or(QueueType::Classic)).into(),
            ],
            Some((urls, stream)) => vec![
                "--nats-url".into(),
                urls.clone(),
                "--nats-stream".into(),
                stream.clone(),
            ],
        };
        args.extend([
            "--queue".into(),
            queue.into(),
            "--allow-private-networks".into(),
            "--concurrency".into(),
            o.concurrency.unwrap_or(cfg.concurrency).to_string(),
            "--prefetch".into(),
            o.prefetch.unwrap_or(cfg.prefetch).to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--termination-log".into(),
            dir.path().join("termination-log").display().to_string(),
            "--integration".into(),
            "bench/worker".into(),
        ]);
        let mut envs = vec![("HOOKFLEET_LOG".to_owned(), "warn".to_owned())];
        match &o.webhooks {
            None => args.extend(["--destination-url".into(), url.into()]),
            Some(m) => {
                args.extend(m.args());
                envs.push(("KUBECONFIG".into(), m.kubeconfig.display().to_string()));
            }
        }
        if o.template {
            args.extend(["--body-template".into(), TEMPLATE.into()]);
        }
        args.extend(o.extra.iter().cloned());
        if o.signed {
            let secret =
                base64::engine::general_purpose::STANDARD.encode(b"hookfleet-bench-signing-secret!!");
            envs.push(("HOOKFLEET_SIGNING_SECRET".into(), format!("whsec_{secret}")));
        }
        let (program, args) = match o.nofile {
            Some(n) => {
                let mut a = vec![format!("--nofile={n}:{n}"), "--".into(), worker_bin()];
                a.extend(args);
                (PathBuf::from("/usr/bin/prlimit"), a)
            }
            None => (PathBuf::from(worker_bin()), args),
        };
        let process = Process::spawn("worker", &program, &args, &envs, &dir.path().join("worker.log"))?;
        let w = Worker {
            process,
            port,
            _dir: dir,
        };
        Ok(w)
    }

    fn pid(&self) -> u32 {
        self.process.pid().unwrap_or(0)
    }

    async fn wait_ready(&self) -> Result<()> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.process
                .check_running()
                .with_context(|| self.process.log_tail(20))?;
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{}/readyz", self.port))
                .send()
                .await
                && r.status().as_u16() == 200
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "worker not ready after 30 s: {}",
                self.process.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most `timeout`, the worker alive meanwhile) for the sink's first request: CPU is counted
    /// from there on (startup and the broker connection are not per-message costs).
    async fn first_delivery(&self, sink: &Sink, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while sink.requests() == 0 {
            self.process
                .check_running()
                .with_context(|| self.process.log_tail(20))?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "no delivery in {timeout:?}: {}",
                self.process.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    fn cpu(&self) -> Duration {
        measure::cpu_time(self.pid()).unwrap_or_default()
    }

    fn kib(&self, key: &str) -> u64 {
        measure::status_kib(self.pid(), key).unwrap_or(0)
    }
}

/// Waits until the sink answered `n` requests 2xx (or more: duplicates), polling cheaply.
async fn wait_requests(sink: &Sink, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while (sink.requests() as usize) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} requests reached the sink in {timeout:?}",
            sink.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One hookfleet drain of a prefilled queue.
struct Drain {
    rate: f64,
    cpu_us: f64,
    hwm_kib: u64,
    duplicates: usize,
}

async fn hookfleet_drain(
    cfg: &Cfg,
    rmq: &RabbitMq,
    queue_type: QueueType,
    size: usize,
    o: &Opts,
    tag: &str,
) -> Result<Drain> {
    let queue = format!("bench.hf.{tag}");
    load::prefill(&rmq.amqp_uri(), &queue, queue_type, &queue, cfg.n, size).await?;
    let sink = Sink::start_with(false).await?;
    let o = Opts {
        queue_type: Some(queue_type),
        ..o.clone()
    };
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &sink.url(), &o).await?;
    measure_drain(cfg, &w, &sink, &o).await
}

/// The drain of `cfg.n` prefilled messages by the started worker `w` into `sink`: the rate from the
/// first arrival to the last, the worker's CPU-µs per message, its peak RSS, the duplicates.
async fn measure_drain(cfg: &Cfg, w: &Worker, sink: &Sink, o: &Opts) -> Result<Drain> {
    w.first_delivery(sink, Duration::from_secs(30)).await?;
    let c0 = w.cpu();
    wait_requests(sink, cfg.n, Duration::from_secs(600)).await?;
    let c1 = w.cpu();
    let hits = sink.hits();
    let first = hits.iter().map(|h| h.at).min().context("no hits")?;
    let last = hits.iter().map(|h| h.at).max().context("no hits")?;
    let unique: HashSet<&str> = hits.iter().filter_map(|h| h.id.as_deref()).collect();
    anyhow::ensure!(
        unique.len() == cfg.n,
        "{} distinct ids of {}",
        unique.len(),
        cfg.n
    );
    if o.signed {
        // The sink keeps no bodies here (it would cost the sink more than in the plain runs): the
        // signature is checked by the worker's tests; here only that one was sent.
        anyhow::ensure!(
            hits[0]
                .headers
                .get("webhook-signature")
                .is_some_and(|s| s.starts_with("v1,")),
            "no webhook-signature on a signed run"
        );
    }
    Ok(Drain {
        rate: (cfg.n - 1) as f64 / (last - first).as_secs_f64(),
        cpu_us: (c1 - c0).as_secs_f64() * 1e6 / cfg.n as f64,
        hwm_kib: w.kib("VmHWM"),
        duplicates: hits.len() - unique.len(),
    })
}

async fn bare_consumer(
    cfg: &Cfg,
    rmq: &RabbitMq,
    queue_type: QueueType,
    size: usize,
    tag: &str,
) -> Result<Figures> {
    let queue = format!("bench.bare.{tag}");
    load::prefill(&rmq.amqp_uri(), &queue, queue_type, &queue, cfg.n, size).await?;
    let child = Child::start(
        "consumer",
        &[
            ("HF_BENCH_URI", rmq.amqp_uri()),
            ("HF_BENCH_QUEUE", queue),
            ("HF_BENCH_PREFETCH", cfg.prefetch.to_string()),
            ("HF_BENCH_N", cfg.n.to_string()),
        ],
    )
    .await?;
    child.figures(Duration::from_secs(600)).await
}

async fn bare_client(cfg: &Cfg, size: usize) -> Result<Figures> {
    let sink = Sink::start_with(false).await?;
    let child = Child::start(
        "client",
        &[
            ("HF_BENCH_URL", sink.url()),
            ("HF_BENCH_N", cfg.n.to_string()),
            ("HF_BENCH_CONCURRENCY", cfg.concurrency.to_string()),
            ("HF_BENCH_SIZE", size.to_string()),
        ],
    )
    .await?;
    child.figures(Duration::from_secs(600)).await
}

/// What later sections take from the throughput section.
#[derive(Default)]
struct Found {
    /// hookfleet's drain rate of a prefilled queue, classic, smallest body, plain (0 when the
    /// throughput section did not run): the latency section's reference point is half of it.
    drain_rate: f64,
    limit: f64,
    bare_cpu: f64,
    peak_hwm_kib: u64,
}

/// The median of `v` (the mean of the middle two for an even count); NaN for none.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A figure over the rounds: the median of each, and of the per-round ratios (each ratio is taken
/// within one round, side by side, before the median).
struct OverRounds {
    values: Vec<f64>,
    ratios: Vec<f64>,
}

impl OverRounds {
    fn value(&self) -> f64 {
        median(&self.values)
    }

    fn ratio(&self) -> f64 {
        median(&self.ratios)
    }

    /// `sep` then "ratio 1.10–1.31 over 3 rounds" (nothing for one round).
    fn spread(&self, sep: &str) -> String {
        if self.ratios.len() < 2 {
            return String::new();
        }
        let lo = self.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{sep}ratio {lo:.2}–{hi:.2} over {} rounds", self.ratios.len())
    }
}

/// One round of one queue type and body size: the baselines and each variant's drain, back to back.
struct Round {
    b: Figures,
    h: Figures,
    drains: Vec<Drain>,
}

impl Round {
    fn limit(&self) -> f64 {
        1.0 / (1.0 / self.b.rate + 1.0 / self.h.rate)
    }

    fn bare_cpu(&self) -> f64 {
        self.b.cpu_us + self.h.cpu_us
    }
}

async fn throughput(cfg: &Cfg, rmq: &RabbitMq, found: &mut Found) -> Result<(Section, Section)> {
    let mut tput = Vec::new();
    let mut cpu = Vec::new();
    let variants = [
        ("plain", Opts::default()),
        (
            "signed+template",
            Opts {
                signed: true,
                template: true,
                ..Opts::default()
            },
        ),
    ];
    for &qt in &cfg.queue_types {
        for &size in &cfg.sizes {
            let what = format!("{} {}", qt_name(qt), size_name(size));
            let mut rounds = Vec::new();
            for r in 1..=cfg.rounds {
                let of = if cfg.rounds > 1 {
                    format!(" (round {r} of {})", cfg.rounds)
                } else {
                    String::new()
                };
                let tag = format!("{}.{size}.r{r}", qt_name(qt));
                eprintln!("bench: throughput {what}{of}: bare consumer");
                let b = bare_consumer(cfg, rmq, qt, size, &tag).await?;
                eprintln!("bench: throughput {what}{of}: bare client");
                let h = bare_client(cfg, size).await?;
                let mut drains = Vec::new();
                for (name, o) in &variants {
                    eprintln!("bench: throughput {what}{of}: hookfleet {name}");
                    drains.push(hookfleet_drain(cfg, rmq, qt, size, o, &format!("{tag}.{name}")).await?);
                }
                rounds.push(Round { b, h, drains });
            }
            let over = |value: &dyn Fn(&Round) -> f64, base: &dyn Fn(&Round) -> f64| OverRounds {
                values: rounds.iter().map(value).collect(),
                ratios: rounds.iter().map(|r| value(r) / base(r)).collect(),
            };
            let b = median(&rounds.iter().map(|r| r.b.rate).collect::<Vec<_>>());
            let h = median(&rounds.iter().map(|r| r.h.rate).collect::<Vec<_>>());
            let l = median(&rounds.iter().map(Round::limit).collect::<Vec<_>>());
            let bare_cpu = median(&rounds.iter().map(Round::bare_cpu).collect::<Vec<_>>());
            let b_cpu = median(&rounds.iter().map(|r| r.b.cpu_us).collect::<Vec<_>>());
            let h_cpu = median(&rounds.iter().map(|r| r.h.cpu_us).collect::<Vec<_>>());
            tput.push(row(format!("B bare consumer, {what}"), format!("{b:.0}")));
            tput.push(row(
                format!("H bare client, {}", size_name(size)),
                format!("{h:.0}"),
            ));
            tput.push(row(format!("L = 1/(1/B+1/H), {what}"), format!("{l:.0}")));
            cpu.push(
                row(
                    format!("bare consumer + bare client, {what}"),
                    format!("{bare_cpu:.1}"),
                )
                .against(format!("{b_cpu:.1} + {h_cpu:.1}"), 1.0),
            );
            for (i, (name, _)) in variants.iter().enumerate() {
                let duplicates: usize = rounds.iter().map(|r| r.drains[i].duplicates).sum();
                for r in &rounds {
                    found.peak_hwm_kib = found.peak_hwm_kib.max(r.drains[i].hwm_kib);
                }
                let rate = over(&|r| r.drains[i].rate, &Round::limit);
                let against_b = over(&|r| r.drains[i].rate, &|r| r.b.rate);
                let cost = over(&|r| r.drains[i].cpu_us, &Round::bare_cpu);
                if qt == QueueType::Classic && size == cfg.sizes[0] && *name == "plain" {
                    found.drain_rate = rate.value();
                    found.limit = l;
                    found.bare_cpu = bare_cpu;
                }
                tput.push(
                    row(
                        format!(
                            "hookfleet {name}, {what} (dups {duplicates}{})",
                            rate.spread("; ")
                        ),
                        format!("{:.0}", rate.value()),
                    )
                    .against(format!("L {l:.0}"), rate.ratio())
                    .target(verdict(rate.ratio() >= 0.9, "≥ 0.90 L")),
                );
                tput.push(
                    row("  same, against B", format!("{:.0}", against_b.value()))
                        .against(format!("B {b:.0}"), against_b.ratio()),
                );
                cpu.push(
                    row(
                        format!(
                            "hookfleet worker {name}, {what}{}",
                            match cost.spread("") {
                                r if r.is_empty() => r,
                                r => format!(" ({r})"),
                            }
                        ),
                        format!("{:.1}", cost.value()),
                    )
                    .against(format!("{bare_cpu:.1}"), cost.ratio())
                    .target(verdict(cost.ratio() <= 1.25, "≤ 1.25×")),
                );
            }
        }
    }
    let rounds = if cfg.rounds > 1 {
        format!(
            "; medians of {} rounds, each ratio taken within its round",
            cfg.rounds
        )
    } else {
        String::new()
    };
    Ok((
        Section {
            title: format!(
                "Throughput, msg/s ({} persistent messages a run, concurrency {}, prefetch {}{rounds})",
                cfg.n, cfg.concurrency, cfg.prefetch
            ),
            rows: tput,
        },
        Section {
            title: format!(
                "CPU-µs per delivered message (utime+stime of the process, from first to last delivery{rounds})"
            ),
            rows: cpu,
        },
    ))
}

/// When each published id first got a 2xx at the sink (`None`: never); `arrivals` are
/// `(id, status, when)`.
fn first_arrivals<'a>(
    arrivals: impl IntoIterator<Item = (&'a str, u16, Instant)>,
    p: &load::Published,
) -> Vec<Option<Instant>> {
    let mut first: Vec<Option<Instant>> = vec![None; p.due.len()];
    for (id, status, at) in arrivals {
        if let Some(i) = p.index(id)
            && (200..300).contains(&status)
            && first[i].is_none_or(|t| at < t)
        {
            first[i] = Some(at);
        }
    }
    first
}

/// Latencies (ms) of the messages that arrived, each from `from[i]` (its due time, or when it was
/// sent).
fn latencies_ms(first: &[Option<Instant>], from: &[Instant]) -> Vec<f64> {
    first
        .iter()
        .zip(from)
        .filter_map(|(a, d)| Some(a.as_ref()?.saturating_duration_since(*d).as_secs_f64() * 1e3))
        .collect()
}

/// Latencies from the due times of the requests an in-process sink recorded.
fn sink_latencies(sink: &Sink, p: &load::Published) -> Vec<f64> {
    let hits = sink.hits();
    let first = first_arrivals(
        hits.iter()
            .filter_map(|h| Some((h.id.as_deref()?, h.status, h.at))),
        p,
    );
    latencies_ms(&first, &p.due)
}

fn ms3(v: [f64; 3]) -> String {
    format!("{:.1}/{:.1}/{:.1}", v[0], v[1], v[2])
}

/// The rate the machine sustains end to end while it also publishes: one worker (classic, the
/// smallest body, plain) draining a queue that a closed-loop publisher ([`load::flat_out`]) fills at
/// the same time with 3 × `HOOKFLEET_BENCH_N` messages (at least 50,000). Counted at the sink over the
/// publishing's last four fifths (the first fifth is the warm-up). Returns (delivered msg/s, published
/// msg/s); with the worker keeping up the two agree.
async fn sustained_round(cfg: &Cfg, rmq: &RabbitMq, tag: &str) -> Result<(f64, f64)> {
    let size = cfg.sizes[0];
    let queue = format!("bench.sustain.{tag}");
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Classic, &queue, 0, size).await?;
    let n = (cfg.n * 3).max(50_000);
    let sink = Child::start("sink", &[("HF_BENCH_N", n.to_string())]).await?;
    let url = sink.ready_text()?;
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &url, &Opts::default()).await?;
    w.wait_ready().await?;
    let (start, end) = load::flat_out(&rmq.amqp_uri(), &queue, &queue, n, size).await?;
    let arrivals = sink.arrivals(Duration::from_secs(300)).await?;
    drop(w);
    let from = start + (end - start) / 5;
    let within = arrivals.iter().filter(|a| a.at >= from && a.at <= end).count();
    Ok((
        within as f64 / (end - from).as_secs_f64(),
        n as f64 / (end - start).as_secs_f64(),
    ))
}

/// One latency point's measurement: hookfleet, then the bare consumer, at the same offered rate.
struct LatencyRound {
    hf: [f64; 3],
    /// hookfleet's latencies from when each message was sent, not due: without the publisher's lag.
    hf_sent: [f64; 3],
    bare: [f64; 3],
    /// p99 of the publisher's lag (ms) in hookfleet's run and in the bare consumer's.
    lag_p99: f64,
    bare_lag_p99: f64,
    cpu_us: f64,
    bare_cpu_us: f64,
    delivered: f64,
    max_lag: f64,
}

async fn latency_round(cfg: &Cfg, rmq: &RabbitMq, rate: f64, tag: &str) -> Result<LatencyRound> {
    let size = cfg.sizes[0];
    let queue = format!("bench.lat.{tag}");
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Classic, &queue, 0, size).await?;
    let n = (rate * cfg.latency_secs).round() as usize;
    // The sink in a process of its own (see `roles`), as the bare consumer is.
    let sink = Child::start("sink", &[("HF_BENCH_N", n.to_string())]).await?;
    let url = sink.ready_text()?;
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &url, &Opts::default()).await?;
    w.wait_ready().await?;
    let c0 = w.cpu();
    let p = load::open_loop(
        &rmq.amqp_uri(),
        &queue,
        &queue,
        size,
        rate,
        cfg.latency_secs,
        false,
    )
    .await?;
    anyhow::ensure!(p.confirmed == n, "{} of {n} publishes confirmed", p.confirmed);
    let arrivals = sink.arrivals(Duration::from_secs(120)).await?;
    let cpu_us = (w.cpu() - c0).as_secs_f64() * 1e6 / p.confirmed as f64;
    let first = first_arrivals(arrivals.iter().map(|a| (a.id.as_str(), a.status, a.at)), &p);
    let lat = latencies_ms(&first, &p.due);
    let hf_sent = measure::p50_p99_p999(latencies_ms(&first, &p.sent));
    anyhow::ensure!(
        lat.len() == p.confirmed,
        "{} of {} delivered",
        lat.len(),
        p.confirmed
    );
    let span = arrivals
        .iter()
        .map(|a| a.at)
        .max()
        .zip(arrivals.iter().map(|a| a.at).min());
    let delivered = span.map_or(0.0, |(b, a)| (p.confirmed - 1) as f64 / (b - a).as_secs_f64());
    let hf = measure::p50_p99_p999(lat);
    drop(w);

    eprintln!("bench: latency {tag} ({rate:.0} msg/s), bare consumer");
    let queue = format!("bench.latbare.{tag}");
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Classic, &queue, 0, size).await?;
    let child = Child::start(
        "consumer",
        &[
            ("HF_BENCH_URI", rmq.amqp_uri()),
            ("HF_BENCH_QUEUE", queue.clone()),
            ("HF_BENCH_PREFETCH", cfg.prefetch.to_string()),
            ("HF_BENCH_N", n.to_string()),
        ],
    )
    .await?;
    let pb = load::open_loop(
        &rmq.amqp_uri(),
        &queue,
        &queue,
        size,
        rate,
        cfg.latency_secs,
        true,
    )
    .await?;
    anyhow::ensure!(
        pb.refused.is_empty(),
        "broker refused {} messages",
        pb.refused.len()
    );
    let bare = child.figures(Duration::from_secs(120)).await?;
    Ok(LatencyRound {
        hf,
        hf_sent,
        bare: bare.lat_ms,
        lag_p99: measure::p50_p99_p999(p.lags_ms())[1],
        bare_lag_p99: measure::p50_p99_p999(pb.lags_ms())[1],
        cpu_us,
        bare_cpu_us: bare.cpu_us,
        delivered,
        max_lag: p.max_lag(),
    })
}

/// The latency sweep's 100 %: `HOOKFLEET_BENCH_MAX_RATE` when it is set, else the median over the rounds
/// of [`sustained_round`]. Pushes its row (beside the drain rate when the throughput section measured one).
async fn full_rate(cfg: &Cfg, rmq: &RabbitMq, found: &Found, rows: &mut Vec<report::Row>) -> Result<f64> {
    if let Ok(v) = std::env::var("HOOKFLEET_BENCH_MAX_RATE") {
        let rate = v
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)
            .with_context(|| format!("HOOKFLEET_BENCH_MAX_RATE={v:?}: not a rate in msg/s above 0"))?;
        rows.push(row(
            "the sweep's 100%, from HOOKFLEET_BENCH_MAX_RATE",
            format!("{rate:.0}"),
        ));
        return Ok(rate);
    }
    let mut rounds = Vec::new();
    for r in 1..=cfg.rounds {
        eprintln!("bench: latency, the sustained rate, round {r} of {}", cfg.rounds);
        rounds.push(sustained_round(cfg, rmq, &r.to_string()).await?);
    }
    let delivered = median(&rounds.iter().map(|r| r.0).collect::<Vec<_>>());
    let published = median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>());
    let mut sustained = row(
        format!(
            "the sweep's 100%: sustained end to end while publishing, msg/s delivered (published {published:.0})"
        ),
        format!("{delivered:.0}"),
    );
    if found.drain_rate > 0.0 {
        sustained = sustained.against(
            format!("drain {:.0}", found.drain_rate),
            delivered / found.drain_rate,
        );
    }
    rows.push(sustained);
    Ok(delivered)
}

/// One offered rate, `cfg.rounds` times: its rows (p50/p99/p99.9, the same from the send, the worker's
/// CPU) and its point for the plot. With `target`, the p99 verdict: most rounds within their own bound.
async fn latency_point(
    cfg: &Cfg,
    rmq: &RabbitMq,
    rate: f64,
    label: &str,
    tag: &str,
    target: bool,
    rows: &mut Vec<report::Row>,
) -> Result<Point> {
    let mut rounds = Vec::new();
    for r in 1..=cfg.rounds {
        eprintln!(
            "bench: latency at {label} ({rate:.0} msg/s), round {r} of {}, hookfleet",
            cfg.rounds
        );
        rounds.push(latency_round(cfg, rmq, rate, &format!("{tag}.r{r}")).await?);
    }
    let q = |f: &dyn Fn(&LatencyRound) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let hf = [q(&|r| r.hf[0]), q(&|r| r.hf[1]), q(&|r| r.hf[2])];
    let bare = [q(&|r| r.bare[0]), q(&|r| r.bare[1]), q(&|r| r.bare[2])];
    let p99 = OverRounds {
        values: rounds.iter().map(|r| r.hf[1]).collect(),
        ratios: rounds.iter().map(|r| r.hf[1] / r.bare[1]).collect(),
    };
    let cost = OverRounds {
        values: rounds.iter().map(|r| r.cpu_us).collect(),
        ratios: rounds.iter().map(|r| r.cpu_us / r.bare_cpu_us).collect(),
    };
    let max_lag = rounds.iter().map(|r| r.max_lag).fold(0.0, f64::max);
    let mut row_ = row(
        format!(
            "p50/p99/p99.9 ms at {label} = {rate:.0} msg/s (publisher lag ≤ {:.0} ms{})",
            max_lag * 1e3,
            p99.spread("; ")
        ),
        ms3(hf),
    )
    .against(ms3(bare), p99.ratio());
    if target {
        // Each round against its own bare p99; the verdict on the median round.
        let ok = rounds
            .iter()
            .filter(|r| r.hf[1] <= 5.0f64.max(2.0 * r.bare[1]))
            .count();
        let bound = 5.0f64.max(2.0 * bare[1]);
        row_ = row_.target(verdict(
            2 * ok > rounds.len(),
            &format!("p99 ≤ {bound:.1} ms ({ok} of {} rounds)", rounds.len()),
        ));
    }
    rows.push(row_);
    // The same arrivals from when each message was sent: what is left once the publisher's own
    // lag (it shares the cores with everything it measures) is taken out.
    rows.push(
        row(
            format!(
                "  from the send, not the due time (publisher lag p99 {:.1} ms; in the bare run {:.1} ms)",
                q(&|r| r.lag_p99),
                q(&|r| r.bare_lag_p99)
            ),
            ms3([q(&|r| r.hf_sent[0]), q(&|r| r.hf_sent[1]), q(&|r| r.hf_sent[2])]),
        )
        .against(ms3(bare), q(&|r| r.hf_sent[1] / r.bare[1])),
    );
    rows.push(
        row(
            format!("  worker CPU-µs/msg at {label}"),
            format!("{:.1}", cost.value()),
        )
        .against(format!("{:.1}", q(&|r| r.bare_cpu_us)), cost.ratio()),
    );
    Ok(Point {
        offered: rate,
        delivered: q(&|r| r.delivered),
        hf_ms: hf,
        bare_ms: bare,
    })
}

/// The latency section: the sweep's 100 % ([`full_rate`]), each of `cfg.loads` of it, and, when the
/// throughput section measured the drain rate, a reference point at half of that (no target: the 50 %
/// of the suite before 2026-12-05, which asked more of the machine than it sustains with its publisher).
/// Returns the section, the sweep's points and its 100 %.
async fn latency(cfg: &Cfg, rmq: &RabbitMq, found: &Found) -> Result<(Section, Vec<Point>, f64)> {
    let mut rows = Vec::new();
    let full = full_rate(cfg, rmq, found, &mut rows).await?;
    let mut points = Vec::new();
    for (k, &f) in cfg.loads.iter().enumerate() {
        let label = format!("{}%", (f * 100.0).round());
        let target = (f - 0.5).abs() < 1e-9;
        points.push(latency_point(cfg, rmq, f * full, &label, &k.to_string(), target, &mut rows).await?);
    }
    if found.drain_rate > 0.0 && std::env::var_os("HOOKFLEET_BENCH_MAX_RATE").is_none() {
        latency_point(
            cfg,
            rmq,
            0.5 * found.drain_rate,
            "50% of the drain rate (reference, no target)",
            "drain",
            false,
            &mut rows,
        )
        .await?;
    }
    let rounds = if cfg.rounds > 1 {
        format!(", medians of {} rounds", cfg.rounds)
    } else {
        String::new()
    };
    Ok((
        Section {
            title: format!(
                "Latency publish → sink (bare: publish → consume), open-loop publisher, {} B bodies, classic queue, {} s a point{rounds}; 100% = the rate sustained end to end while publishing; ratio = p99 / bare p99; CPU baseline = bare consumer's",
                cfg.sizes[0], cfg.latency_secs
            ),
            rows,
        },
        points,
        full,
    ))
}

async fn memory(cfg: &Cfg, rmq: &RabbitMq, found: &Found) -> Result<Section> {
    let mut rows = Vec::new();
    let size = cfg.sizes[0];
    let queue = "bench.soak".to_owned();
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Classic, &queue, 0, size).await?;
    let sink = Sink::start_with(false).await?;
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &sink.url(), &Opts::default()).await?;
    w.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = w.kib("VmRSS");
    rows.push(
        row("worker RSS idle (ready, 2 s after start)", mib(idle))
            .target(verdict(idle <= 30 * 1024, "≤ 30 MiB")),
    );
    if found.peak_hwm_kib > 0 {
        rows.push(row(
            "worker peak RSS over the throughput runs (VmHWM)",
            mib(found.peak_hwm_kib),
        ));
    }
    eprintln!("bench: soak at {} msg/s for {} s", cfg.soak_rate, cfg.soak_secs);
    let uri = rmq.amqp_uri();
    let (rate, secs) = (cfg.soak_rate, cfg.soak_secs);
    let publisher = tokio::spawn({
        let queue = queue.clone();
        async move { load::open_loop(&uri, &queue, &queue, size, rate, secs, false).await }
    });
    let mut samples = Vec::new();
    let start = Instant::now();
    while !publisher.is_finished() {
        samples.push((start.elapsed().as_secs_f64(), w.kib("VmRSS")));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let p = publisher.await??;
    wait_requests(&sink, p.confirmed, Duration::from_secs(120)).await?;
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let tenth = samples.len() / 10;
    let avg = |s: &[(f64, u64)]| s.iter().map(|x| x.1 as f64).sum::<f64>() / s.len().max(1) as f64;
    let early = avg(&samples[tenth.min(samples.len())..(2 * tenth).max(tenth + 1).min(samples.len())]);
    let late = avg(&samples[samples.len() - tenth.max(1).min(samples.len())..]);
    rows.push(row(
        format!("worker RSS over a {secs:.0} s soak at {rate:.0} msg/s: max"),
        mib(max),
    ));
    rows.push(
        row(
            "  soak: last tenth's mean against the second tenth's",
            mib(late as u64),
        )
        .against(mib(early as u64), late / early),
    );
    rows.push(row(
        "  bound: prefetch × body (messages held at most)",
        format!("{:.2} MiB", (cfg.prefetch * size) as f64 / 1048576.0),
    ));
    Ok(Section {
        title: "Memory (VmRSS of the worker process)".into(),
        rows,
    })
}

async fn fd_pressure(cfg: &Cfg, rmq: &RabbitMq) -> Result<Section> {
    let size = cfg.sizes[0];
    let queue = "bench.fd".to_owned();
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Classic, &queue, 0, size).await?;
    let sink = Arc::new(Sink::start_with(false).await?);
    let o = Opts {
        nofile: Some(256),
        concurrency: Some(96),
        prefetch: Some(192),
        extra: [
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
        ]
        .map(String::from)
        .to_vec(),
        ..Opts::default()
    };
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &sink.url(), &o).await?;
    w.wait_ready().await?;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", w.pid()))?;
    anyhow::ensure!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("256")),
        "the worker's fd limit is not 256: {limits}"
    );
    let pre = 5.0;
    let stall = cfg.stall_secs;
    let post = stall.max(10.0);
    let (uri, rate) = (rmq.amqp_uri(), cfg.fd_rate);
    eprintln!("bench: fd pressure: {rate} msg/s, the sink stalls for {stall} s after {pre} s");
    let publisher = tokio::spawn({
        let queue = queue.clone();
        async move { load::open_loop(&uri, &queue, &queue, size, rate, pre + stall + post, false).await }
    });
    let start = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let (mut peak, mut stalled, mut recovered) = (0usize, false, None);
    let mut crashed = false;
    while !publisher.is_finished() {
        let t = start.elapsed().as_secs_f64();
        if !stalled && t >= pre {
            sink.set_mode(Mode::Stall);
            stalled = true;
        }
        if stalled && recovered.is_none() && t >= pre + stall {
            sink.set_mode(Mode::ok());
            recovered = Some(t);
        }
        if w.process.check_running().is_err() {
            crashed = true;
            break;
        }
        peak = peak.max(measure::open_fds(w.pid()).unwrap_or(0));
        samples.push((t, sink.requests()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sink.set_mode(Mode::ok());
    anyhow::ensure!(
        !crashed,
        "the worker died under fd pressure: {}",
        w.process.log_tail(20)
    );
    let p = publisher.await??;
    let at = |t: f64| samples.iter().take_while(|s| s.0 <= t).last().map_or(0, |s| s.1) as f64;
    let before = (at(pre) - at(1.0)) / (pre - 1.0);
    let recovered = recovered.unwrap_or(pre + stall);
    let back = samples
        .iter()
        // A window reaching back into the stall only undercounts: the figure errs long.
        .filter(|s| s.0 >= recovered + 0.1)
        .find(|s| s.1 as f64 - at(s.0 - 1.0) >= 0.9 * before)
        .map(|s| s.0 - recovered);
    let wait = wait_requests(&sink, p.confirmed, Duration::from_secs(180)).await;
    peak = peak.max(measure::open_fds(w.pid()).unwrap_or(0));
    let dead = messages::drain_ids(&rmq.amqp_uri(), &format!("{queue}.dead")).await?;
    let account = messages::account(&p.ids(), &sink.delivered(), &dead)?;
    let alive = w.process.check_running().is_ok();
    let mut rows = vec![
        row(
            "peak open fds of the worker (soft = hard limit 256)",
            peak.to_string(),
        )
        .against("256", peak as f64 / 256.0)
        .target(verdict(peak < 256, "< 256")),
        row("worker alive after the stall", if alive { "yes" } else { "no" }).target(verdict(alive, "yes")),
        row("published / delivered / dead-lettered / lost / dups", {
            let a = &account;
            format!(
                "{}/{}/{}/{}/{}",
                a.published, a.delivered, a.dead_lettered, a.lost, a.duplicates
            )
        })
        .target(verdict(account.lost == 0 && wait.is_ok(), "lost 0")),
        row(
            format!("seconds after recovery until ≥ 90% of the pre-stall {before:.0} msg/s"),
            back.map_or("never".into(), |s| format!("{s:.1}")),
        ),
    ];
    if let Err(e) = wait {
        rows.push(row("  not all delivered", e.to_string()));
    }
    Ok(Section {
        title: format!(
            "fd pressure: open-loop {rate:.0} msg/s, sink stalls every connection for {stall:.0} s (concurrency 96, timeout 1 s, breaker off)"
        ),
        rows,
    })
}

async fn five_x(cfg: &Cfg, rmq: &RabbitMq) -> Result<Section> {
    let size = cfg.sizes[0];
    let queue = "bench.5x".to_owned();
    let rate = 5.0 * cfg.base_rate;
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Quorum, &queue, 0, size).await?;
    let sink = Sink::start_with(false).await?;
    let o = Opts {
        queue_type: Some(QueueType::Quorum),
        ..Opts::default()
    };
    let workers = [
        Worker::start(cfg, &rmq.amqp_uri(), &queue, &sink.url(), &o).await?,
        Worker::start(cfg, &rmq.amqp_uri(), &queue, &sink.url(), &o).await?,
    ];
    for w in &workers {
        w.wait_ready().await?;
    }
    eprintln!(
        "bench: 5× load: {rate} msg/s for {} s over 2 workers (quorum)",
        cfg.load_secs
    );
    let p = load::open_loop(&rmq.amqp_uri(), &queue, &queue, size, rate, cfg.load_secs, false).await?;
    let wait = wait_requests(&sink, p.confirmed, Duration::from_secs(300)).await;
    let dead = messages::drain_ids(&rmq.amqp_uri(), &format!("{queue}.dead")).await?;
    let account = messages::account(&p.ids(), &sink.delivered(), &dead)?;
    let lat = measure::p50_p99_p999(sink_latencies(&sink, &p));
    let alive = workers.iter().all(|w| w.process.check_running().is_ok());
    let rss: Vec<String> = workers.iter().map(|w| mib(w.kib("VmHWM"))).collect();
    let mut rows = vec![
        row(
            "published / delivered / dead-lettered / lost / dups",
            format!(
                "{}/{}/{}/{}/{}",
                account.published, account.delivered, account.dead_lettered, account.lost, account.duplicates
            ),
        )
        .target(verdict(
            account.lost == 0 && account.published == account.delivered + account.dead_lettered,
            "published = delivered + dead, lost 0",
        )),
        row(
            "refused by the broker (not counted as published)",
            p.refused.len().to_string(),
        ),
        row(
            format!(
                "latency p50/p99/p99.9 ms (publisher lag ≤ {:.0} ms)",
                p.max_lag() * 1e3
            ),
            ms3(lat),
        ),
        row(
            "workers alive; peak RSS each",
            format!("{}; {}", if alive { "yes" } else { "no" }, rss.join(", ")),
        ),
    ];
    if let Err(e) = wait {
        rows.push(row("  not all delivered", e.to_string()));
    }
    Ok(Section {
        title: format!(
            "5× load: {rate:.0} msg/s = 5 × base {:.0} msg/s for {:.0} s over 2 workers, quorum queue, {size} B",
            cfg.base_rate, cfg.load_secs
        ),
        rows,
    })
}

/// A section that failed still leaves the others' figures in the table, with its error.
fn or_failed(title: &str, r: Result<Section>) -> Section {
    r.unwrap_or_else(|e| {
        eprintln!("bench: {title} failed: {e:#}");
        Section {
            title: format!("{title}: FAILED"),
            rows: vec![row("error", format!("{e:#}"))],
        }
    })
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn run() -> Result<()> {
    let cfg = Cfg::from_env();
    let load_start = measure::loadavg();
    let started = now_utc();
    let rev = git_rev();
    let t0 = Instant::now();
    eprintln!(
        "bench: {} run, sections {:?}; starting RabbitMQ",
        if cfg.quick { "quick" } else { "full" },
        cfg.sections
    );
    let rmq = RabbitMq::start().await?;
    let mut found = Found::default();
    let mut sections = Vec::new();
    if cfg.on("throughput") {
        let (t, c) = throughput(&cfg, &rmq, &mut found).await?;
        sections.push(t);
        sections.push(c);
    }
    let (mut points, mut full) = (Vec::new(), 0.0);
    if cfg.on("latency") {
        let (s, p, f) = latency(&cfg, &rmq, &found).await?;
        sections.push(s);
        (points, full) = (p, f);
    }
    if cfg.on("memory") {
        sections.push(or_failed("Memory", memory(&cfg, &rmq, &found).await));
    }
    if cfg.on("fd") {
        sections.push(or_failed("fd pressure", fd_pressure(&cfg, &rmq).await));
    }
    if cfg.on("load") {
        sections.push(or_failed("5× load", five_x(&cfg, &rmq).await));
    }
    if cfg.on("nats") {
        sections.push(or_failed(
            "NATS JetStream source",
            nats::section(&cfg, &found).await,
        ));
    }
    if cfg.on("webhooks") {
        match webhooks::sections(&cfg, &rmq).await {
            Ok(s) => sections.extend(s),
            Err(e) => sections.push(or_failed("Many Webhooks", Err(e))),
        }
    }
    drop(rmq);
    let mut header = vec![format!(
        "hookfleet bench ({} run), {started}, {}, git {}",
        if cfg.quick { "quick" } else { "full" },
        measure::machine(),
        rev
    )];
    if std::env::var_os("HOOKFLEET_BENCH_WORKER").is_some() {
        header.push(format!(
            "worker binary: {} (HOOKFLEET_BENCH_WORKER)",
            worker_bin()
        ));
    }
    header.extend([

        format!(
            "load average (1 min) at start {load_start}, at end {}; {:.0} s in all; broker, worker, sink and publisher share these cores",
            measure::loadavg(),
            t0.elapsed().as_secs_f64()
        ),
    ]);
    let table = report::table(&header, &sections);
    println!("\n{table}");
    std::fs::create_dir_all(&cfg.out)?;
    std::fs::write(cfg.out.join("bench.txt"), &table)?;
    if !points.is_empty() {
        let svg = report::svg(
            &points,
            &[
                (found.limit, "L"),
                (found.drain_rate, "drain"),
                (full, "sustained (100%)"),
            ],
            &format!(
                "hookfleet worker, classic queue, {} B: delivered and latency vs offered load ({started})",
                cfg.sizes[0]
            ),
        );
        std::fs::write(cfg.out.join("bench.svg"), svg)?;
    }
    eprintln!("bench: table and plot in {}", cfg.out.display());
    Ok(())
}
