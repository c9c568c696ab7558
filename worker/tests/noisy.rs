//! Noisy neighbours (issue 24), on a real RabbitMQ node and a real API server: 1,000 Webhooks on one
//! Integration of two worker processes, an open-loop stream of events spread evenly over them (each
//! event matches exactly one Webhook). Three receivers misbehave: one hangs for 30 s and then
//! recovers, one answers 503 until the stream ends, one answers 410 (this test plays the operator's
//! part: it pauses that Webhook in the snapshot after its first 410, and resumes it once the stream
//! is over). The same stream is run twice at the same time, each on its own queue, snapshot Secret,
//! workers and receivers: a baseline where the three receivers answer 200, and the noisy run (side by
//! side, so that the shared machine's other load weighs on both alike). For the other 997 Webhooks the
//! noisy run must keep ≥ 90 % of the baseline's delivered rate and at most twice its publish → arrival
//! p99; every worker stays below 80 % of its descriptor limit (started under
//! `prlimit --nofile=256:256`); no (message, Webhook) pair is lost, and the bad three's messages are
//! each accounted: delivered after recovery, kept while paused (then delivered on resume), or
//! dead-lettered with a reason.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use hookfleet_crds::contract::queues;
use hookfleet_crds::contract::webhooks::{Entry, Snapshot};
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::control_plane::ControlPlane;
use hookfleet_testkit::process::wait_for;
use hookfleet_testkit::sink::{Mode, Sink};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const NS: &str = "noisy-ns";
/// Webhooks on the fleet.
const HOOKS: usize = 1_000;
/// Events per second, spread evenly over the Webhooks (message `i` is for Webhook `i % HOOKS`).
const RATE: usize = 300;
/// How long the stream runs: it covers the 30 s hang with a margin on both sides.
const STREAM: Duration = Duration::from_secs(36);
/// The hanging receiver stalls from this point of the stream…
const STALL_FROM: Duration = Duration::from_secs(2);
/// …for this long, then answers 200 again.
const STALL_FOR: Duration = Duration::from_secs(30);
/// Per worker: requests in flight for all Webhooks together (each Webhook's cap is half of it).
const CONCURRENCY: usize = 32;
/// The descriptor limit each worker runs under (soft = hard).
const NOFILE: u64 = 256;
const WORKERS: usize = 2;

/// The bad three (by index): the one that hangs, the one that answers 503, the one that answers 410.
const HANG: usize = 100;
const UNAVAILABLE: usize = 200;
const GONE: usize = 300;
const BAD: [usize; 3] = [HANG, UNAVAILABLE, GONE];

fn hook_name(i: usize) -> String {
    format!("c{i:04}")
}

fn entry(i: usize, url: &str, paused: bool) -> Entry {
    let name = hook_name(i);
    Entry {
        name: name.clone(),
        generation: 1,
        events: vec![format!("{name}/")],
        match_headers: BTreeMap::new(),
        paused,
        destination: serde_json::from_value(serde_json::json!({"url": url})).unwrap(),
        secrets: BTreeMap::new(),
        max_in_flight: None,
        rate_limit: None,
    }
}

/// The fleet's sinks: one shared by the good Webhooks (each on its own path), one per bad Webhook.
struct Sinks {
    good: Sink,
    bad: HashMap<usize, Sink>,
}

impl Sinks {
    async fn start() -> Result<Self> {
        let good = Sink::start_with(false).await?;
        let mut bad = HashMap::new();
        for i in BAD {
            bad.insert(i, Sink::start_with(false).await?);
        }
        Ok(Self { good, bad })
    }

    fn url(&self, i: usize) -> String {
        let base = match self.bad.get(&i) {
            Some(s) => s.url(),
            None => self.good.url(),
        };
        base.replace("/hook", &format!("/wh/{}", hook_name(i)))
    }

    fn snapshot(&self, gone_paused: bool) -> Snapshot {
        Snapshot {
            webhooks: (0..HOOKS)
                .map(|i| entry(i, &self.url(i), gone_paused && i == GONE))
                .collect(),
        }
    }
}

/// A fleet worker under `prlimit --nofile=NOFILE:NOFILE`.
fn start(
    rmq: &RabbitMq,
    kubeconfig: &str,
    queue: &str,
    secret: &str,
    dir: &Path,
    name: &str,
) -> Result<Worker> {
    let integration = format!("{NS}/fleet");
    let w = WebhooksWorker {
        kubeconfig,
        integration: &integration,
        queue,
        secret,
        unmatched: "deadLetter",
        concurrency: CONCURRENCY,
        nofile: Some(NOFILE),
    };
    spawn_webhooks_worker(rmq, &w, dir, name)
}

/// The soft `Max open files` of a process.
fn soft_nofile(pid: u32) -> Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no Max open files line")?;
    Ok(line.split_whitespace().nth(3).context("no soft limit")?.parse()?)
}

/// `HOOKFLEET_NOISY_BAD_PERCENT`: the share of the stream (in %) sent to the bad three (in turn) instead
/// of spread, to load them harder than the issue's 0.1 % each (0 by default: the even spread alone).
fn bad_percent() -> usize {
    std::env::var("HOOKFLEET_NOISY_BAD_PERCENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(100)
}

/// The messages of one run: id, Webhook index, when it was handed to the broker.
struct Published {
    sent: Vec<(String, usize, Instant)>,
    start: Instant,
    end: Instant,
    /// How far the publisher fell behind its schedule at worst.
    lag: Duration,
}

/// Publishes `RATE` persistent messages a second for `STREAM`, with confirms (awaited at the end, so
/// the stream is open loop), message `i` with the event `c{i % HOOKS}/e`. `at` is called with the
/// elapsed stream time before each tick (the noisy run's schedule of the hanging receiver). With
/// [`bad_percent`], that share goes to the bad three instead.
async fn stream(
    rmq: &RabbitMq,
    queue: &str,
    prefix: &str,
    mut at: impl FnMut(Duration),
) -> Result<Published> {
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_work_queue(&ch, queue, QueueType::Quorum).await?;
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = RATE / 100;
    let ticks = (STREAM.as_millis() / TICK.as_millis()) as usize;
    let bad_percent = bad_percent();
    let mut sent = Vec::with_capacity(ticks * per_tick);
    let mut pending = Vec::with_capacity(ticks * per_tick);
    let mut lag = Duration::ZERO;
    let start = Instant::now();
    for t in 0..ticks {
        let due = start + TICK * t as u32;
        tokio::time::sleep_until(due.into()).await;
        lag = lag.max(due.elapsed());
        at(start.elapsed());
        for _ in 0..per_tick {
            let n = sent.len();
            // Every 100 messages, the first `bad_percent` go to the bad three in turn (none by default).
            let hook = if n % 100 < bad_percent {
                BAD[(n / 100 * bad_percent + n % 100) % BAD.len()]
            } else {
                n % HOOKS
            };
            let id = format!("{prefix}-{n}");
            let event = format!("{}/e", hook_name(hook));
            let mut h = FieldTable::default();
            h.insert(
                "event".into(),
                AMQPValue::LongString(LongString::from(event.as_bytes().to_vec())),
            );
            let props = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(h);
            let body = format!(r#"{{"id":"{id}","event":"{event}"}}"#);
            let now = Instant::now();
            pending.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await?,
            );
            sent.push((id, hook, now));
        }
    }
    let end = Instant::now();
    for p in pending {
        anyhow::ensure!(p.await?.is_ack(), "a publish was not confirmed");
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(Published {
        sent,
        start,
        end,
        lag,
    })
}

/// Samples each worker's open descriptors every 200 ms until `stop`; returns the peak per worker.
fn sample_fds(pids: Vec<u32>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<usize>> {
    tokio::spawn(async move {
        let mut peak = vec![0; pids.len()];
        while !stop.load(Ordering::SeqCst) {
            for (p, pid) in peak.iter_mut().zip(&pids) {
                if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    *p = (*p).max(d.count());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        peak
    })
}

/// The sum of the metric lines that start with `prefix` and contain every one of `with`.
fn metric_with(text: &str, prefix: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One run's figures.
#[derive(Debug, Default, Clone)]
struct Figures {
    /// The 997's (message, Webhook) pairs delivered within the stream's window, per second.
    rate: f64,
    /// Publish → first 2xx arrival of the 997's pairs.
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Per worker: (peak open descriptors, soft limit).
    fds: Vec<(usize, u64)>,
    published: usize,
    /// The 997's pairs: lost, duplicates, misrouted (arrived at another Webhook's path).
    good_pairs: usize,
    good_lost: usize,
    good_dups: usize,
    misrouted: usize,
    /// The bad three's pairs by category.
    bad: Vec<BadRow>,
    /// Deferred deliveries by reason, both workers (`hookfleet_deliveries_total{result="deferred"}`).
    deferred: BTreeMap<&'static str, f64>,
    publisher_lag: Duration,
    wall: Duration,
}

#[derive(Debug, Default, Clone)]
struct BadRow {
    name: String,
    kind: &'static str,
    pairs: usize,
    /// Delivered while it was healthy (before the trouble, or in the baseline).
    delivered_before: usize,
    /// Delivered after it recovered (or on resume).
    delivered_after: usize,
    /// Not delivered before the resume: its copies waited on the retry path (the 410's).
    kept_while_paused: usize,
    dead_lettered: usize,
    dead_reasons: BTreeMap<String, usize>,
    lost: usize,
    requests: u64,
    /// The most connections the worker(s) held open to its receiver at once.
    peak_connections: usize,
}

/// Each id's first 2xx arrival at `sink`.
fn first_2xx(sink: &Sink) -> HashMap<String, Instant> {
    let mut first: HashMap<String, Instant> = HashMap::new();
    for h in sink.hits() {
        if let Some(id) = h.id
            && (200..300).contains(&h.status)
        {
            let e = first.entry(id).or_insert(h.at);
            *e = (*e).min(h.at);
        }
    }
    first
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    hookfleet_testkit::stats::nearest_rank(sorted, q).unwrap_or_default()
}

fn header_text(h: &FieldTable, name: &str) -> Option<String> {
    match h.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// One run: a fresh queue and snapshot Secret, two workers, the stream; `noisy` makes the bad three
/// misbehave (otherwise they answer 200 like the others).
async fn run(rmq: &RabbitMq, cp: &ControlPlane, dir: &Path, label: &str, noisy: bool) -> Result<Figures> {
    let t0 = Instant::now();
    let queue = format!("noisy-{label}.q");
    let secret = format!("noisy-{label}-webhooks");
    let secrets: Api<Secret> = Api::namespaced(cp.client(), NS);
    let kubeconfig = cp.kubeconfig().display().to_string();
    let sinks = Sinks::start().await?;
    put_snapshot(&secrets, &secret, &sinks.snapshot(false)).await?;
    if noisy {
        sinks.bad[&UNAVAILABLE].set_mode(Mode::status(503));
        sinks.bad[&GONE].set_mode(Mode::status(410));
    }
    let mut workers = Vec::new();
    for k in 0..WORKERS {
        workers.push(start(
            rmq,
            &kubeconfig,
            &queue,
            &secret,
            dir,
            &format!("{label}-worker-{k}"),
        )?);
    }
    for w in &workers {
        w.wait_ready(true, Duration::from_secs(60)).await?;
    }
    let pids: Vec<u32> = workers.iter().map(Worker::pid).collect();
    let limits: Vec<u64> = pids.iter().map(|p| soft_nofile(*p)).collect::<Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let fd_peaks = sample_fds(pids, stop.clone());

    // Playing the operator for the 410: it pauses that Webhook in the snapshot on its first 410 (the
    // stream's tick notes when the 410 sink saw its first request).
    let first_gone: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop_pauser = Arc::new(AtomicBool::new(false));
    let pauser = noisy.then(|| {
        let snap = sinks.snapshot(true);
        let (secrets, secret, first_gone) = (secrets.clone(), secret.clone(), first_gone.clone());
        let stop = stop_pauser.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if first_gone.lock().unwrap().is_some() {
                    put_snapshot(&secrets, &secret, &snap).await?;
                    return Ok::<_, anyhow::Error>(Some(Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(None)
        })
    });

    let hang = &sinks.bad[&HANG];
    let gone_sink = &sinks.bad[&GONE];
    let (mut stalled, mut recovered) = (None, None);
    let published = stream(rmq, &queue, label, |elapsed| {
        if !noisy {
            return;
        }
        if stalled.is_none() && elapsed >= STALL_FROM {
            hang.set_mode(Mode::Stall);
            stalled = Some(Instant::now());
        }
        if recovered.is_none() && elapsed >= STALL_FROM + STALL_FOR {
            hang.set_mode(Mode::ok());
            recovered = Some(Instant::now());
        }
        let mut p = first_gone.lock().unwrap();
        if p.is_none() && gone_sink.requests() > 0 {
            *p = Some(Instant::now());
        }
    })
    .await?;
    if noisy {
        // Should the stream end before the hang's 30 s were up (it does not), keep them.
        if let Some(s) = stalled
            && recovered.is_none()
        {
            tokio::time::sleep_until((s + STALL_FOR).into()).await;
            hang.set_mode(Mode::ok());
            recovered = Some(Instant::now());
        }
    }
    let n = published.sent.len();
    let good_want: HashMap<String, usize> = published
        .sent
        .iter()
        .filter(|(_, h, _)| !BAD.contains(h))
        .map(|(id, h, _)| (format!("{id}:{}", hook_name(*h)), *h))
        .collect();

    // The 997 are delivered.
    sinks
        .good
        .wait_delivered(&good_want.keys().cloned().collect(), Duration::from_secs(60))
        .await
        .context("the 997's pairs")?;

    // While the 503 still fails and the 410's Webhook is paused, the workers' per-Webhook series name
    // the Webhooks in trouble and none of the 997 (bounded cardinality: at most 20 listed each).
    if noisy {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut listed = std::collections::BTreeSet::new();
        for w in &workers {
            let text = w.metrics().await?;
            let names: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("hookfleet_webhook_state{"))
                .filter_map(|l| l.split("webhook=\"").nth(1)?.split('"').next().map(str::to_owned))
                .collect();
            let own: std::collections::BTreeSet<&String> = names.iter().collect();
            assert!(
                own.len() <= 20,
                "at most 20 Webhooks with series of their own: {own:?}"
            );
            assert_eq!(
                metric_with(&text, "hookfleet_webhooks_in_state{", &["state=\"paused\""]),
                1.0,
                "the paused 410 counted"
            );
            listed.extend(names);
        }
        let bad: std::collections::BTreeSet<String> = BAD.iter().map(|i| hook_name(*i)).collect();
        assert!(
            listed.is_subset(&bad),
            "series only for Webhooks in trouble: {listed:?}"
        );
        assert!(
            listed.contains(&hook_name(UNAVAILABLE)) && listed.contains(&hook_name(GONE)),
            "{listed:?}"
        );
        println!("noisy-series: Webhooks with series of their own: {listed:?}");
    }

    // The bad three recover (the 503 at the end of the stream, the 410 on resume).
    let bad_requests_before: HashMap<usize, u64> =
        BAD.iter().map(|i| (*i, sinks.bad[i].requests())).collect();
    let mut paused = None;
    if let Some(p) = pauser {
        stop_pauser.store(true, Ordering::SeqCst);
        paused = p.await??;
    }
    let resumed = Instant::now();
    if noisy {
        sinks.bad[&UNAVAILABLE].set_mode(Mode::ok());
        gone_sink.set_mode(Mode::ok());
        put_snapshot(&secrets, &secret, &sinks.snapshot(false)).await?;
    }
    let dead_queue = queues::dead_letter(&queue);
    let bad_ids = |i: usize| -> Vec<String> {
        published
            .sent
            .iter()
            .filter(|(_, h, _)| *h == i)
            .map(|(id, h, _)| format!("{id}:{}", hook_name(*h)))
            .collect()
    };
    wait_for(
        "the bad three's pairs delivered or dead-lettered",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async {
            let dead = queue_counts(rmq, &dead_queue).await?.0 as usize;
            let undelivered: usize = BAD
                .iter()
                .map(|i| {
                    let got = sinks.bad[i].delivered();
                    bad_ids(*i).iter().filter(|id| !got.contains_key(*id)).count()
                })
                .sum();
            Ok((undelivered <= dead).then_some(()))
        },
    )
    .await?;
    stop.store(true, Ordering::SeqCst);
    let peaks = fd_peaks.await?;
    // Stragglers (duplicates) before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The 997: every pair delivered, on its own path; duplicates counted; publish → arrival.
    let sent_at: HashMap<&str, Instant> = published
        .sent
        .iter()
        .map(|(id, _, t)| (id.as_str(), *t))
        .collect();
    let mut first: HashMap<String, Instant> = HashMap::new();
    let mut misrouted = 0;
    for h in sinks.good.hits() {
        let Some(wid) = h.id else { continue };
        let Some(&hook) = good_want.get(&wid) else {
            misrouted += 1;
            continue;
        };
        if h.path != format!("/wh/{}", hook_name(hook)) {
            misrouted += 1;
        }
        if (200..300).contains(&h.status) {
            let e = first.entry(wid).or_insert(h.at);
            *e = (*e).min(h.at);
        }
    }
    let delivered = sinks.good.delivered();
    let good_lost = good_want.keys().filter(|k| !delivered.contains_key(*k)).count();
    let good_dups: usize = delivered.values().map(|c| c - 1).sum();
    let mut latencies: Vec<Duration> = first
        .iter()
        .map(|(wid, at)| {
            let id = wid.split(':').next().unwrap_or_default();
            at.saturating_duration_since(sent_at[id])
        })
        .collect();
    latencies.sort();
    // Where the slowest 1 % sit in the stream (by publish second), for the log.
    let slow_from = percentile(&latencies, 0.99);
    let mut slow_by_second: BTreeMap<u64, usize> = BTreeMap::new();
    for (wid, at) in &first {
        let id = wid.split(':').next().unwrap_or_default();
        if at.saturating_duration_since(sent_at[id]) >= slow_from {
            *slow_by_second
                .entry((sent_at[id] - published.start).as_secs())
                .or_default() += 1;
        }
    }
    eprintln!(
        "noisy {label}: the slowest 1 % (≥ {slow_from:?}) by publish second of the stream: {slow_by_second:?}"
    );
    let window = published.end - published.start;
    let in_window = first.values().filter(|at| **at <= published.end).count();

    // Dead letters: only the bad three's, each naming its Webhook and a reason.
    let dead = drain(rmq, &dead_queue).await?;
    let mut dead_by: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for d in &dead {
        let hook = header_text(&d.headers, "x-hookfleet-webhook").unwrap_or_default();
        let reason = header_text(&d.headers, "x-hookfleet-dead-reason").unwrap_or_default();
        dead_by
            .entry(hook.clone())
            .or_default()
            .push((format!("{}:{hook}", d.id), reason));
    }
    let mut bad = Vec::new();
    for i in BAD {
        let name = hook_name(i);
        let kind = match i {
            HANG => "hangs 30 s",
            UNAVAILABLE => "503",
            _ => "410",
        };
        let ids = bad_ids(i);
        let got = first_2xx(&sinks.bad[&i]);
        let dead: HashMap<String, String> = dead_by.remove(&name).unwrap_or_default().into_iter().collect();
        let mut reasons = BTreeMap::new();
        for r in dead.values() {
            *reasons.entry(r.clone()).or_insert(0) += 1;
        }
        // When its trouble began (never, in the baseline).
        let trouble = match (noisy, i) {
            (false, _) => None,
            (true, HANG) => stalled,
            (true, _) => Some(published.start),
        };
        let delivered_at: Vec<Instant> = ids.iter().filter_map(|id| got.get(id).copied()).collect();
        let before = delivered_at
            .iter()
            .filter(|at| trouble.is_none_or(|t| **at < t))
            .count();
        let dead_only = ids
            .iter()
            .filter(|id| !got.contains_key(*id) && dead.contains_key(*id))
            .count();
        bad.push(BadRow {
            name,
            kind,
            pairs: ids.len(),
            delivered_before: before,
            delivered_after: delivered_at.len() - before,
            kept_while_paused: if noisy && i == GONE {
                delivered_at.iter().filter(|at| **at >= resumed).count()
            } else {
                0
            },
            dead_lettered: dead_only,
            dead_reasons: reasons,
            lost: ids.len() - delivered_at.len() - dead_only,
            requests: sinks.bad[&i].requests(),
            peak_connections: sinks.bad[&i].open_connections().1,
        });
    }
    anyhow::ensure!(
        dead_by.is_empty(),
        "dead letters of other Webhooks: {:?}",
        dead_by.keys().collect::<Vec<_>>()
    );

    // Each worker's own accounting adds up, nothing left unsettled.
    let mut deferred = BTreeMap::new();
    for w in &workers {
        w.process.check_running()?;
        let m = w.metrics().await?;
        let consumed = metric(&m, "hookfleet_messages_consumed_total{");
        let settled = metric(&m, "hookfleet_messages_settled_total{");
        let unsettled = metric(&m, "hookfleet_messages_unsettled{");
        anyhow::ensure!(
            consumed > 0.0 && unsettled == 0.0 && consumed == settled,
            "worker accounting: consumed {consumed}, settled {settled}, unsettled {unsettled}"
        );
        for reason in ["throttled", "rate_limited", "circuit_open", "paused", "gone"] {
            *deferred.entry(reason).or_insert(0.0) += metric_with(
                &m,
                "hookfleet_deliveries_total{",
                &["result=\"deferred\"", &format!("reason=\"{reason}\"")],
            );
        }
    }
    let figures = Figures {
        rate: in_window as f64 / window.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        fds: peaks.into_iter().zip(limits).collect(),
        published: n,
        good_pairs: good_want.len(),
        good_lost,
        good_dups,
        misrouted,
        bad,
        deferred,
        publisher_lag: published.lag,
        wall: t0.elapsed(),
    };
    if noisy {
        eprintln!(
            "noisy {label}: hang {:?} → {:?}; 410 Webhook paused {:?} after the stream began; bad sinks' requests before recovery/resume {:?}; resumed {:?} after the stream ended",
            stalled.map(|s| s - published.start),
            recovered.map(|r| r - published.start),
            paused.map(|p| p - published.start),
            bad_requests_before,
            resumed - published.end,
        );
    }
    for mut w in workers {
        w.process.stop(Duration::from_secs(10));
    }
    Ok(figures)
}

fn print_table(a: &Figures, b: &Figures) {
    let row = |what: &str, x: String, y: String| eprintln!("noisy-table: | {what} | {x} | {y} |");
    eprintln!(
        "noisy-table: | the 997 other Webhooks | baseline (bad three answer 200) | noisy (hang 30 s, 503, 410) |"
    );
    eprintln!("noisy-table: | --- | --- | --- |");
    row(
        &format!(
            "messages published ({RATE}/s for {STREAM:?}, 1 Webhook each; {} % to the bad three, the rest spread)",
            bad_percent()
        ),
        a.published.to_string(),
        b.published.to_string(),
    );
    row(
        "delivered rate within the stream (pairs/s)",
        format!("{:.1}", a.rate),
        format!("{:.1} ({:.3} of baseline)", b.rate, b.rate / a.rate),
    );
    row(
        "publish → arrival p50",
        format!("{:.1?}", a.p50),
        format!("{:.1?}", b.p50),
    );
    row(
        "publish → arrival p99",
        format!("{:.1?}", a.p99),
        format!(
            "{:.1?} ({:.2}× baseline)",
            b.p99,
            b.p99.as_secs_f64() / a.p99.as_secs_f64()
        ),
    );
    row(
        "publish → arrival max",
        format!("{:.1?}", a.max),
        format!("{:.1?}", b.max),
    );
    let fds = |f: &Figures| {
        f.fds
            .iter()
            .map(|(p, l)| format!("{p}/{l}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    row("peak open fds / limit, per worker", fds(a), fds(b));
    let acct = |f: &Figures| {
        format!(
            "{} pairs: {} lost, {} duplicates, {} misrouted",
            f.good_pairs, f.good_lost, f.good_dups, f.misrouted
        )
    };
    row("accounting", acct(a), acct(b));
    let deferred = |f: &Figures| {
        f.deferred
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    row("deferred deliveries (all Webhooks)", deferred(a), deferred(b));
    row(
        "publisher lag at worst",
        format!("{:.1?}", a.publisher_lag),
        format!("{:.1?}", b.publisher_lag),
    );
    row(
        "run wall time",
        format!("{:.1?}", a.wall),
        format!("{:.1?}", b.wall),
    );
    eprintln!("noisy-table:");
    eprintln!(
        "noisy-table: | bad Webhook (noisy run) | pairs | delivered before | delivered after recovery/resume | of which kept while paused | dead-lettered (reason) | lost | requests answered | peak connections |"
    );
    eprintln!("noisy-table: | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &b.bad {
        eprintln!(
            "noisy-table: | {} ({}) | {} | {} | {} | {} | {} {:?} | {} | {} | {} |",
            r.name,
            r.kind,
            r.pairs,
            r.delivered_before,
            r.delivered_after,
            r.kept_while_paused,
            r.dead_lettered,
            r.dead_reasons,
            r.lost,
            r.requests,
            r.peak_connections
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noisy_neighbours_997_webhooks_unharmed_by_a_hanging_a_503_and_a_410_receiver() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let rmq = RabbitMq::start().await?;
    let cp = ControlPlane::start().await?;
    cp.create_namespace(NS).await?;
    let tmp = tempfile::tempdir()?;
    // HOOKFLEET_NOISY_KEEP=1 keeps the workers' logs (the path is printed).
    let (dir, _tmp) = if std::env::var_os("HOOKFLEET_NOISY_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("noisy: workers' logs kept in {}", kept.display());
        (kept, None)
    } else {
        (tmp.path().to_owned(), Some(tmp))
    };
    eprintln!("noisy: broker and API server up in {:?}", t0.elapsed());

    // Both runs at once, on the same broker and API server: the machine's other load (other tests,
    // builds) then weighs on both alike, and the comparison is of the three receivers alone.
    let (a, b) = tokio::join!(run(&rmq, &cp, &dir, "a", false), run(&rmq, &cp, &dir, "b", true));
    let (a, b) = (a.context("the baseline run")?, b.context("the noisy run")?);
    print_table(&a, &b);
    eprintln!("noisy: total {:?}", t0.elapsed());

    for (f, what) in [(&a, "baseline"), (&b, "noisy")] {
        assert_eq!(
            (f.good_lost, f.misrouted),
            (0, 0),
            "{what}: 997's pairs lost / misrouted"
        );
        for (peak, limit) in &f.fds {
            assert_eq!(*limit, NOFILE, "{what}: the worker runs under its limit");
            assert!(
                (*peak as f64) < 0.8 * *limit as f64,
                "{what}: a worker's open fds peaked at {peak} of {limit}"
            );
        }
        for r in &f.bad {
            assert_eq!(r.lost, 0, "{what}: {} lost pairs", r.name);
        }
    }
    // The baseline: all three healthy, delivered like the others.
    for r in &a.bad {
        assert_eq!(
            (r.delivered_before, r.dead_lettered),
            (r.pairs, 0),
            "baseline {}",
            r.name
        );
    }
    assert!(
        b.rate >= 0.9 * a.rate,
        "delivered rate {:.1}/s < 90 % of baseline {:.1}/s",
        b.rate,
        a.rate
    );
    assert!(b.p99 <= 2 * a.p99, "p99 {:?} > 2 × baseline {:?}", b.p99, a.p99);
    // The bad three were really bad, and each pair is accounted for.
    let by = |i: usize| b.bad.iter().find(|r| r.name == hook_name(i)).expect("row");
    let hang = by(HANG);
    assert!(
        hang.delivered_after > 0,
        "the hanging receiver had messages during its hang: {hang:?}"
    );
    assert_eq!(hang.dead_lettered, 0, "{hang:?}");
    let unavailable = by(UNAVAILABLE);
    assert_eq!(unavailable.delivered_before, 0, "{unavailable:?}");
    assert!(
        unavailable.dead_reasons.keys().all(|r| !r.is_empty()),
        "{unavailable:?}"
    );
    let gone = by(GONE);
    assert_eq!(
        (gone.delivered_before, gone.dead_lettered, gone.kept_while_paused),
        (0, 0, gone.pairs),
        "the 410's pairs are all kept while paused and delivered on resume: {gone:?}"
    );
    assert!(
        b.deferred.get("gone").copied().unwrap_or(0.0) >= 1.0,
        "{:?}",
        b.deferred
    );
    Ok(())
}
