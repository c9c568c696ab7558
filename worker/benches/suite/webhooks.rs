//! The `webhooks` section: many Webhooks (`HOOKFLEET_BENCH_WEBHOOKS`, 10,000) on one worker, the worker's
//! half of issue 24's "Scale", each figure beside the same run's single-destination or one-Webhook one.
//!
//! The fleet: Webhook `wh-i` (i = 0 … n-1) has the event prefixes `one.<i>.` (its own) and `ten.<i/10>.`
//! (shared by ten), its URL `/wh/wh-i` on one sink; the last tenth also has `matchHeaders`
//! `tenant: t-<i mod 10>`, so that in their groups of ten a header picks one. The figures:
//! - matching cost, in process: `Loaded::matching` (what the worker calls per message: the trie walk,
//!   the header checks through the message's AMQP headers, the matched Webhooks) of the snapshot of n
//!   against a snapshot of one Webhook matching every event, on the same event names; per kind of name
//!   and for the mix; blocks interleaved, medians;
//! - one worker draining `HOOKFLEET_BENCH_N` prefilled messages, each matching one Webhook, beside the
//!   same worker binary with `--destination-url` on the same messages and with a one-Webhook snapshot,
//!   back to back in each round; then `N/10` messages each matching ten (copies and messages a second);
//! - worker RSS idle with the n Webhooks loaded and its peak over those drains, beside the
//!   single-destination worker's;
//! - propagation: one Webhook's URL changed in the snapshot Secret (n entries) until the worker's next
//!   delivery for it reaches the new URL.
//!
//! The snapshot is a Secret in a local API server ([`ControlPlane`]: etcd and kube-apiserver), read by
//! the worker as the operator's fleet would have it (`--webhooks-secret`, `KUBECONFIG`).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hookfleet_crds::contract::webhooks::{Entry, SNAPSHOT_KEY, Snapshot};
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::control_plane::ControlPlane;
use hookfleet_testkit::sink::Sink;
use hookfleet_worker::message::header_str;
use hookfleet_worker::webhooks::Loaded;
use hookfleet_worker::webhooks::watch::Builder;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::report::{Row, Section, row};
use crate::{Cfg, Opts, OverRounds, Worker, load, measure, median, mib, verdict, wait_requests};

/// The Integration's namespace (the suite's workers run as `--integration bench/worker`).
const NS: &str = "bench";
const SECRET_MANY: &str = "bench-webhooks";
const SECRET_ONE: &str = "bench-webhook-one";
const SECRET_TEN: &str = "bench-webhooks-ten";
/// The header holding the event name (`--event-name-header`).
const EVENT: &str = "event";
/// The header the last tenth's `matchHeaders` compare.
const TENANT: &str = "tenant";
/// Spreads message j over the Webhooks (a prime: coprime with any count of the form 2^a 5^b).
const SPREAD: usize = 7919;

/// How a worker of this section reads its Webhooks.
#[derive(Clone)]
pub struct Mode {
    secret: String,
    pub kubeconfig: PathBuf,
}

impl Mode {
    pub fn args(&self) -> Vec<String> {
        ["--webhooks-secret", &self.secret, "--event-name-header", EVENT]
            .map(String::from)
            .to_vec()
    }
}

fn name(i: usize) -> String {
    format!("wh-{i:05}")
}

fn url(base: &str, hook: &str) -> String {
    format!("{base}/wh/{hook}")
}

/// Webhooks of `n` with `matchHeaders` (the last tenth).
fn with_headers(n: usize, i: usize) -> bool {
    i >= n - n / 10
}

/// Groups of ten without `matchHeaders` (the fan-out's).
fn plain_groups(n: usize) -> usize {
    (n - n / 10) / 10
}

fn entry(name: String, events: Vec<String>, headers: BTreeMap<String, String>, url: String) -> Entry {
    Entry {
        name,
        generation: 1,
        events,
        match_headers: headers,
        paused: false,
        destination: serde_json::from_value(serde_json::json!({ "url": url })).expect("a destination"),
        secrets: BTreeMap::new(),
        max_in_flight: None,
        rate_limit: None,
    }
}

/// The fleet of `n` Webhooks on the sink at `base` (`http://host:port`).
fn fleet(n: usize, base: &str) -> Snapshot {
    Snapshot {
        webhooks: (0..n)
            .map(|i| {
                let headers = if with_headers(n, i) {
                    BTreeMap::from([(TENANT.to_owned(), format!("t-{}", i % 10))])
                } else {
                    BTreeMap::new()
                };
                entry(
                    name(i),
                    vec![format!("one.{i:05}."), format!("ten.{:04}.", i / 10)],
                    headers,
                    url(base, &name(i)),
                )
            })
            .collect(),
    }
}

/// One Webhook matching every event: what a single destination is, as a snapshot.
fn one(base: &str) -> Snapshot {
    Snapshot {
        webhooks: vec![entry(
            "only".into(),
            vec![String::new()],
            BTreeMap::new(),
            url(base, "only"),
        )],
    }
}

/// Ten Webhooks matching every event: the fan-out to 10 without the other Webhooks.
fn ten(base: &str) -> Snapshot {
    Snapshot {
        webhooks: (0..10)
            .map(|i| entry(name(i), vec![String::new()], BTreeMap::new(), url(base, &name(i))))
            .collect(),
    }
}

/// A message: its id, event name and `tenant` header.
struct Msg {
    id: String,
    event: String,
    tenant: String,
}

/// `count` messages `prefix-j`, each matching exactly one of `n` Webhooks (`wh-(j·SPREAD mod n)`).
fn one_match(n: usize, count: usize, prefix: &str) -> Vec<Msg> {
    (0..count)
        .map(|j| {
            let i = (j * SPREAD) % n;
            Msg {
                id: format!("{prefix}-{j}"),
                event: format!("one.{i:05}.created"),
                tenant: format!("t-{}", i % 10),
            }
        })
        .collect()
}

/// `count` messages, each matching the ten Webhooks of a group without `matchHeaders`.
fn ten_match(n: usize, count: usize, prefix: &str) -> Vec<Msg> {
    (0..count)
        .map(|j| {
            let g = (j * SPREAD) % plain_groups(n);
            Msg {
                id: format!("{prefix}-{j}"),
                event: format!("ten.{g:04}.created"),
                tenant: "t-0".into(),
            }
        })
        .collect()
}

fn headers(m: &Msg) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(EVENT.into(), AMQPValue::LongString(m.event.as_str().into()));
    h.insert(TENANT.into(), AMQPValue::LongString(m.tenant.as_str().into()));
    h
}

/// Declares `queue` (classic, as the worker does) and publishes `msgs` persistent, `size`-byte bodies,
/// with confirms, 1,000 in flight at a time.
async fn publish(uri: &str, queue: &str, msgs: &[Msg], size: usize) -> Result<()> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    load::declare(&ch, queue, QueueType::Classic).await?;
    for window in msgs.chunks(1000) {
        send(&ch, queue, window, size).await?;
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

async fn send(ch: &Channel, queue: &str, msgs: &[Msg], size: usize) -> Result<()> {
    let bodies: Vec<Vec<u8>> = msgs.iter().map(|m| load::body(&m.id, size)).collect();
    let sends = msgs
        .iter()
        .zip(&bodies)
        .map(|(m, body)| {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(m.id.as_str().into())
                .with_content_type("application/json".into())
                .with_headers(headers(m));
            (props, body.as_slice())
        })
        .collect();
    hookfleet_testkit::messages::send_confirmed(ch, queue, sends).await
}

/// The local API server holding the snapshot Secrets.
struct Cluster {
    cp: ControlPlane,
    secrets: Api<Secret>,
}

impl Cluster {
    async fn start() -> Result<Self> {
        let cp = ControlPlane::start().await?;
        cp.create_namespace(NS).await?;
        let secrets = Api::namespaced(cp.client(), NS);
        Ok(Self { cp, secrets })
    }

    fn mode(&self, secret: &str) -> Mode {
        Mode {
            secret: secret.into(),
            kubeconfig: self.cp.kubeconfig().to_owned(),
        }
    }

    /// Creates or replaces Secret `name` holding `snap`.
    async fn put(&self, name: &str, snap: &Snapshot) -> Result<()> {
        let mut secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": NS},
        }))?;
        secret.data = Some(BTreeMap::from([(
            SNAPSHOT_KEY.to_owned(),
            ByteString(snap.encode()),
        )]));
        if self.secrets.get_opt(name).await?.is_some() {
            self.secrets
                .patch(name, &PatchParams::default(), &Patch::Merge(&secret))
                .await?;
        } else {
            self.secrets.create(&PostParams::default(), &secret).await?;
        }
        Ok(())
    }
}

fn base(sink: &Sink) -> String {
    format!("http://{}", sink.addr())
}

// ---------------------------------------------------------------------------------------------------
// Matching cost, in process.

/// The kinds of event names looked up, each with its names (and their headers).
fn kinds(n: usize) -> Vec<(&'static str, Vec<(String, FieldTable)>)> {
    let first_headed = n - n / 10;
    let groups = plain_groups(n);
    let named = |event: String, tenant: String| {
        let m = Msg {
            id: String::new(),
            event,
            tenant,
        };
        let h = headers(&m);
        (m.event, h)
    };
    let k = 1000;
    vec![
        (
            "its own prefix, 1 match",
            (0..k)
                .map(|j| {
                    let i = (j * SPREAD) % first_headed;
                    named(format!("one.{i:05}.created"), format!("t-{}", i % 10))
                })
                .collect(),
        ),
        (
            "its own prefix and matchHeaders, 1 match",
            (0..k)
                .map(|j| {
                    let i = first_headed + (j * SPREAD) % (n / 10);
                    named(format!("one.{i:05}.created"), format!("t-{}", i % 10))
                })
                .collect(),
        ),
        (
            "a group's prefix, 10 matches",
            (0..k)
                .map(|j| named(format!("ten.{:04}.created", (j * SPREAD) % groups), "t-0".into()))
                .collect(),
        ),
        (
            "a group's prefix, matchHeaders pick 1 of 10",
            (0..k)
                .map(|j| {
                    let g = groups + (j * SPREAD) % (n / 100).max(1);
                    named(format!("ten.{g:04}.created"), format!("t-{}", j % 10))
                })
                .collect(),
        ),
        (
            "no Webhook's prefix, 0 matches",
            (0..k)
                .map(|j| named(format!("other.{j}.created"), "t-0".into()))
                .collect(),
        ),
    ]
}

/// ns per `Loaded::matching` over `names` in turn, `iters` lookups; and the Webhooks matched in all.
fn ns_per_lookup(loaded: &Loaded, names: &[(String, FieldTable)], iters: usize) -> (f64, usize) {
    let started = Instant::now();
    let mut matched = 0usize;
    for k in 0..iters {
        let (name, h) = &names[k % names.len()];
        matched += loaded.matching(name, |key| header_str(Some(h), key)).len();
    }
    let ns = started.elapsed().as_nanos() as f64 / iters as f64;
    (ns, std::hint::black_box(matched))
}

fn build(builder: &Builder, snap: &Snapshot, previous: Option<&Loaded>) -> (Loaded, Duration) {
    let started = Instant::now();
    let loaded = builder.build(snap, "1", previous);
    (loaded, started.elapsed())
}

fn matching(cfg: &Cfg) -> Result<Section> {
    let n = cfg.webhooks;
    let base = "http://127.0.0.1:9";
    let many_snap = fleet(n, base);
    // As the worker's watch builds them: one builder (its shared client) for every snapshot.
    let builder = Builder::new(true, cfg.concurrency, Default::default());
    let (single, built_one) = build(&builder, &one(base), None);
    let (many, built_many) = build(&builder, &many_snap, None);
    // A change of one entry, as a propagation rebuilds it (the others kept).
    let mut changed = many_snap.clone();
    changed.webhooks[n / 2].destination.url = url(base, "moved");
    let (again, rebuilt) = build(&builder, &changed, Some(&many));
    anyhow::ensure!(again.reused == n - 1, "{} of {n} reused", again.reused);
    let encoded = many_snap.encode();
    let started = Instant::now();
    let decoded = Snapshot::decode(&encoded).map_err(anyhow::Error::msg)?;
    let decode = started.elapsed();
    anyhow::ensure!(decoded.webhooks.len() == n);

    let kinds = kinds(n);
    let all: Vec<(String, FieldTable)> = kinds.iter().flat_map(|(_, v)| v.iter().cloned()).collect();
    // Blocks interleaved (each kind on n Webhooks, then on one), medians: the machine's drift hits both.
    let blocks = 10;
    let per_block = (cfg.lookups / blocks).max(100);
    let mut figures: Vec<(Vec<f64>, Vec<f64>, usize)> = vec![(Vec::new(), Vec::new(), 0); kinds.len() + 1];
    for _ in 0..blocks {
        for (k, names) in kinds.iter().map(|(_, v)| v).chain([&all]).enumerate() {
            let (ns_many, matched) = ns_per_lookup(&many, names, per_block);
            let (ns_one, _) = ns_per_lookup(&single, names, per_block);
            figures[k].0.push(ns_many);
            figures[k].1.push(ns_one);
            figures[k].2 = matched;
        }
    }
    let mut rows = Vec::new();
    let labels = kinds.iter().map(|(l, _)| *l).chain(["the mix of the five above"]);
    for ((many_ns, one_ns, matched), label) in figures.iter().zip(labels) {
        let (m, o) = (median(many_ns), median(one_ns));
        let per = *matched as f64 / per_block as f64;
        rows.push(
            row(
                format!("ns per message, {label} ({per:.1} matched on average)"),
                format!("{m:.0}"),
            )
            .against(format!("{o:.0}"), m / o)
            .target(verdict(m - o <= 2000.0, &format!("{:+.0} ns, ≤ +2000", m - o))),
        );
    }
    rows.push(
        row(
            format!("building the snapshot of {n} (targets, index), ms"),
            format!("{:.1}", built_many.as_secs_f64() * 1e3),
        )
        .against(
            format!("{:.2}", built_one.as_secs_f64() * 1e3),
            built_many.as_secs_f64() / built_one.as_secs_f64(),
        ),
    );
    rows.push(row(
        format!("  again with one entry changed ({} kept), ms", again.reused),
        format!("{:.1}", rebuilt.as_secs_f64() * 1e3),
    ));
    rows.push(row(
        format!(
            "  decoding it from the Secret ({} KiB gzip), ms",
            encoded.len() / 1024
        ),
        format!("{:.1}", decode.as_secs_f64() * 1e3),
    ));
    Ok(Section {
        title: format!(
            "Many Webhooks: matching cost per message in process (Loaded::matching with the message's AMQP headers; {n} Webhooks against one matching every event, same names; medians of {blocks} interleaved blocks of {per_block} lookups)"
        ),
        rows,
    })
}

// ---------------------------------------------------------------------------------------------------
// Drains, RSS, propagation: a worker process.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `--destination-url`, the one-match messages.
    Single,
    /// A snapshot of one Webhook matching every event, the one-match messages.
    One,
    /// The fleet, the one-match messages.
    Many,
    /// A snapshot of ten Webhooks matching every event, the ten-match messages.
    FanOutTen,
    /// The fleet, the ten-match messages (`N/10` of them).
    FanOut,
}

/// One drain of a prefilled queue.
struct Run {
    /// Messages a second, first to last arrival at the sink.
    msgs: f64,
    /// Requests a second likewise.
    copies: f64,
    /// Worker CPU-µs per message, from the first delivery to the last.
    cpu_us: f64,
    hwm_kib: u64,
    /// The median of its RSS sampled every 100 ms while it drained.
    rss_kib: u64,
}

async fn drain(cfg: &Cfg, rmq: &RabbitMq, api: &Cluster, kind: Kind, tag: &str) -> Result<Run> {
    let n = cfg.webhooks;
    let queue = format!("bench.wh.{tag}");
    let (msgs, per) = match kind {
        Kind::FanOut | Kind::FanOutTen => (ten_match(n, (cfg.n / 10).max(1), &queue), 10),
        _ => (one_match(n, cfg.n, &queue), 1),
    };
    publish(&rmq.amqp_uri(), &queue, &msgs, cfg.sizes[0]).await?;
    let sink = Sink::start_with(false).await?;
    let webhooks = match kind {
        Kind::Single => None,
        Kind::One => {
            api.put(SECRET_ONE, &one(&base(&sink))).await?;
            Some(api.mode(SECRET_ONE))
        }
        Kind::FanOutTen => {
            api.put(SECRET_TEN, &ten(&base(&sink))).await?;
            Some(api.mode(SECRET_TEN))
        }
        Kind::Many | Kind::FanOut => {
            api.put(SECRET_MANY, &fleet(n, &base(&sink))).await?;
            Some(api.mode(SECRET_MANY))
        }
    };
    let o = Opts {
        webhooks,
        ..Opts::default()
    };
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &url(&base(&sink), "single"), &o).await?;
    w.first_delivery(&sink, Duration::from_secs(60)).await?;
    let c0 = w.cpu();
    let copies = msgs.len() * per;
    // RSS every 100 ms while it drains (its peak is VmHWM; this says whether it plateaus).
    let mut rss = Vec::new();
    let sampled = async {
        loop {
            rss.push(w.kib("VmRSS"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = wait_requests(&sink, copies, Duration::from_secs(600)) => r?,
        _ = sampled => unreachable!(),
    }
    let c1 = w.cpu();
    let hits = sink.hits();
    let first = hits.iter().map(|h| h.at).min().context("no hits")?;
    let last = hits.iter().map(|h| h.at).max().context("no hits")?;
    let ids: HashSet<&str> = hits.iter().filter_map(|h| h.id.as_deref()).collect();
    anyhow::ensure!(
        ids.len() == copies,
        "{} distinct webhook-ids of {copies}",
        ids.len()
    );
    // Each copy at its own Webhook's URL, and that Webhook one the message matches.
    let wrong = hits
        .iter()
        .filter(|h| {
            let Some(id) = h.id.as_deref() else {
                return true;
            };
            match kind {
                Kind::Single => h.path != "/wh/single",
                Kind::One => h.path != "/wh/only",
                Kind::Many | Kind::FanOut | Kind::FanOutTen => {
                    let Some((msg, hook)) = id.split_once(':') else {
                        return true;
                    };
                    let j: usize = msg
                        .rsplit('-')
                        .next()
                        .and_then(|j| j.parse().ok())
                        .unwrap_or(usize::MAX);
                    let i: usize = hook
                        .strip_prefix("wh-")
                        .and_then(|i| i.parse().ok())
                        .unwrap_or(usize::MAX);
                    let meant = match kind {
                        Kind::Many => i == (j * SPREAD) % n,
                        Kind::FanOutTen => i < 10,
                        _ => i / 10 == (j * SPREAD) % plain_groups(n),
                    };
                    !meant || h.path != format!("/wh/{hook}")
                }
            }
        })
        .count();
    anyhow::ensure!(
        wrong == 0,
        "{wrong} requests at a Webhook the message does not match"
    );
    let span = (last - first).as_secs_f64();
    Ok(Run {
        msgs: (copies - 1) as f64 / span / per as f64,
        copies: (copies - 1) as f64 / span,
        cpu_us: (c1 - c0).as_secs_f64() * 1e6 / msgs.len() as f64,
        hwm_kib: w.kib("VmHWM"),
        rss_kib: median(&rss.iter().map(|&k| k as f64).collect::<Vec<_>>()) as u64,
    })
}

/// RSS of a ready worker on an empty queue, 2 s after it is ready, and its peak so far (VmHWM).
async fn idle_rss(cfg: &Cfg, rmq: &RabbitMq, api: &Cluster, many: bool) -> Result<(u64, u64)> {
    let queue = format!("bench.wh.idle.{many}");
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Classic, &queue, 0, 0).await?;
    let sink = Sink::start_with(false).await?;
    let webhooks = if many {
        api.put(SECRET_MANY, &fleet(cfg.webhooks, &base(&sink))).await?;
        Some(api.mode(SECRET_MANY))
    } else {
        None
    };
    let o = Opts {
        webhooks,
        ..Opts::default()
    };
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &url(&base(&sink), "single"), &o).await?;
    w.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((w.kib("VmRSS"), w.kib("VmHWM")))
}

/// Seconds from each change of one Webhook's URL in the Secret (patched with the whole snapshot, as the
/// operator writes it) until the worker's first delivery to the new URL; probes (a message for that
/// Webhook) every 20 ms.
async fn propagation(cfg: &Cfg, rmq: &RabbitMq, api: &Cluster) -> Result<(Vec<f64>, Duration)> {
    let n = cfg.webhooks;
    let queue = "bench.wh.propagation".to_owned();
    load::prefill(&rmq.amqp_uri(), &queue, QueueType::Classic, &queue, 0, 0).await?;
    let sink = Sink::start_with(false).await?;
    let mut snap = fleet(n, &base(&sink));
    api.put(SECRET_MANY, &snap).await?;
    let o = Opts {
        webhooks: Some(api.mode(SECRET_MANY)),
        ..Opts::default()
    };
    let w = Worker::start(cfg, &rmq.amqp_uri(), &queue, &url(&base(&sink), "single"), &o).await?;
    w.wait_ready().await?;
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut seconds = Vec::new();
    let mut patch_took = Duration::ZERO;
    for k in 0..cfg.propagations {
        let i = (k * SPREAD + 17) % (n - n / 10);
        let moved = format!("moved-{k}");
        snap.webhooks[i].destination.url = url(&base(&sink), &moved);
        snap.webhooks[i].generation += 1;
        let path = format!("/wh/{moved}");
        let changed = Instant::now();
        api.put(SECRET_MANY, &snap).await?;
        patch_took = patch_took.max(changed.elapsed());
        let mut probe = 0;
        let arrived = loop {
            w.process
                .check_running()
                .with_context(|| w.process.log_tail(20))?;
            if let Some(at) = sink.hits().iter().find(|h| h.path == path).map(|h| h.at) {
                break at;
            }
            anyhow::ensure!(
                changed.elapsed() < Duration::from_secs(60),
                "webhook {} not at its new URL 60 s after the change",
                name(i)
            );
            let m = Msg {
                id: format!("p{k}-{probe}"),
                event: format!("one.{i:05}.probe"),
                tenant: "t-0".into(),
            };
            probe += 1;
            send(&ch, &queue, std::slice::from_ref(&m), 200).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        seconds.push(arrived.saturating_duration_since(changed).as_secs_f64());
    }
    let _ = conn.close(200, "done".into()).await;
    Ok((seconds, patch_took))
}

pub async fn sections(cfg: &Cfg, rmq: &RabbitMq) -> Result<Vec<Section>> {
    let n = cfg.webhooks;
    eprintln!("bench: webhooks: matching cost in process ({n} Webhooks against one)");
    let mut out = vec![crate::or_failed("Many Webhooks: matching cost", matching(cfg))];
    eprintln!("bench: webhooks: starting the local API server");
    let api = Cluster::start().await?;

    let mut rows: Vec<Row> = Vec::new();
    let kinds = [Kind::Single, Kind::One, Kind::Many, Kind::FanOutTen, Kind::FanOut];
    let mut rounds: Vec<Vec<Run>> = Vec::new();
    for r in 1..=cfg.rounds {
        let mut round = Vec::new();
        for kind in kinds {
            eprintln!("bench: webhooks: drain {kind:?}, round {r} of {}", cfg.rounds);
            round.push(drain(cfg, rmq, &api, kind, &format!("{kind:?}.r{r}").to_lowercase()).await?);
        }
        rounds.push(round);
    }
    let over = |k: usize, f: &dyn Fn(&Run) -> f64, base: usize| OverRounds {
        values: rounds.iter().map(|r| f(&r[k])).collect(),
        ratios: rounds.iter().map(|r| f(&r[k]) / f(&r[base])).collect(),
    };
    let single = median(&rounds.iter().map(|r| r[0].msgs).collect::<Vec<_>>());
    rows.push(row(
        "single destination (--destination-url), msg/s",
        format!("{single:.0}"),
    ));
    let one_ = over(1, &|r| r.msgs, 0);
    rows.push(
        row(
            format!("one Webhook matching every event, msg/s{}", one_.spread("; ")),
            format!("{:.0}", one_.value()),
        )
        .against(format!("single {single:.0}"), one_.ratio()),
    );
    let many = over(2, &|r| r.msgs, 0);
    rows.push(
        row(
            format!(
                "{n} Webhooks, each message matching one, msg/s{}",
                many.spread("; ")
            ),
            format!("{:.0}", many.value()),
        )
        .against(format!("single {single:.0}"), many.ratio())
        .target(verdict(many.ratio() >= 0.9, "≥ 0.90 single")),
    );
    let against_one = over(2, &|r| r.msgs, 1);
    rows.push(
        row(
            "  same, against one Webhook",
            format!("{:.0}", against_one.value()),
        )
        .against(format!("one {:.0}", one_.value()), against_one.ratio()),
    );
    let ten_ = median(&rounds.iter().map(|r| r[3].copies).collect::<Vec<_>>());
    rows.push(
        row(
            format!(
                "fan-out to 10 with a snapshot of 10 ({} messages), copies delivered/s",
                (cfg.n / 10).max(1)
            ),
            format!("{ten_:.0}"),
        )
        .against(format!("single {single:.0}"), ten_ / single),
    );
    let fan = over(4, &|r| r.copies, 3);
    rows.push(
        row(
            format!(
                "fan-out to 10 among {n} Webhooks, copies delivered/s{}",
                fan.spread("; ")
            ),
            format!("{:.0}", fan.value()),
        )
        .against(format!("10 only {ten_:.0}"), fan.ratio()),
    );
    let fan_msgs = over(4, &|r| r.msgs, 0);
    rows.push(
        row("  same, messages/s", format!("{:.0}", fan_msgs.value()))
            .against(format!("single {single:.0}"), fan_msgs.ratio()),
    );
    let cpu_single = median(&rounds.iter().map(|r| r[0].cpu_us).collect::<Vec<_>>());
    for (k, label) in [
        (1, "one Webhook"),
        (2, "n Webhooks, 1 match"),
        (3, "fan-out to 10 with a snapshot of 10, per message"),
        (4, "fan-out to 10 among n Webhooks, per message"),
    ] {
        let c = over(k, &|r| r.cpu_us, 0);
        rows.push(
            row(
                format!(
                    "worker CPU-µs per message, {}",
                    label.replace("n Webhooks", &format!("{n} Webhooks"))
                ),
                format!("{:.1}", c.value()),
            )
            .against(format!("single {cpu_single:.1}"), c.ratio()),
        );
    }
    let rounds_note = if cfg.rounds > 1 {
        format!("; medians of {} rounds, each ratio within its round", cfg.rounds)
    } else {
        String::new()
    };
    out.push(Section {
        title: format!(
            "Many Webhooks: one worker draining {} prefilled persistent messages ({} B, classic, concurrency {}), the same binary with one --destination-url first in each round{rounds_note}",
            cfg.n, cfg.sizes[0], cfg.concurrency
        ),
        rows,
    });

    eprintln!("bench: webhooks: idle RSS");
    let mut rss = Vec::new();
    let (idle_many, loaded_peak) = idle_rss(cfg, rmq, &api, true).await?;
    let (idle_single, started_peak) = idle_rss(cfg, rmq, &api, false).await?;
    rss.push(
        row(
            format!("worker RSS idle with {n} Webhooks loaded (ready, 2 s after)"),
            mib(idle_many),
        )
        .against(
            format!("single {}", mib(idle_single)),
            idle_many as f64 / idle_single as f64,
        )
        .target(verdict(idle_many <= 64 * 1024, "≤ 64 MiB")),
    );
    rss.push(
        row(
            "  its peak so far (VmHWM: loading the snapshot)",
            mib(loaded_peak),
        )
        .against(
            format!("single {}", mib(started_peak)),
            loaded_peak as f64 / started_peak as f64,
        ),
    );
    let peak = |k: usize| rounds.iter().map(|r| r[k].hwm_kib).max().unwrap_or(0);
    let plateau = |k: usize| median(&rounds.iter().map(|r| r[k].rss_kib as f64).collect::<Vec<_>>()) as u64;
    for (k, base, what) in [
        (2, 0, format!("{n} Webhooks, each message matching one")),
        (4, 3, format!("fan-out to 10 among {n} Webhooks")),
        (3, 0, "fan-out to 10 with a snapshot of 10".to_owned()),
    ] {
        let against = if base == 0 { "single" } else { "10 only" };
        let mut r = row(
            format!("worker peak RSS (VmHWM) over the drains, {what}"),
            mib(peak(k)),
        )
        .against(
            format!("{against} {}", mib(peak(base))),
            peak(k) as f64 / peak(base) as f64,
        );
        if k != 3 {
            r = r.target(verdict(peak(k) <= 64 * 1024, "≤ 64 MiB"));
        }
        rss.push(r);
        rss.push(
            row(
                "  its RSS while draining, median of 100 ms samples",
                mib(plateau(k)),
            )
            .against(
                format!("{against} {}", mib(plateau(base))),
                plateau(k) as f64 / plateau(base) as f64,
            ),
        );
    }

    eprintln!("bench: webhooks: propagation, {} changes", cfg.propagations);
    match propagation(cfg, rmq, &api).await {
        Ok((mut s, patch)) => {
            s.sort_by(f64::total_cmp);
            let (p50, p99) = (measure::quantile(&s, 0.5), measure::quantile(&s, 0.99));
            rss.push(
                row(
                    format!(
                        "propagation: one Webhook's URL changed among {n}, s to its first delivery there, p50/p99 of {} (max {:.2})",
                        s.len(),
                        s.last().copied().unwrap_or(f64::NAN)
                    ),
                    format!("{p50:.2}/{p99:.2}"),
                )
                .target(verdict(p99 <= 5.0, "p99 ≤ 5 s")),
            );
            rss.push(row(
                "  of which the bench's own patch of the Secret at most, s",
                format!("{:.2}", patch.as_secs_f64()),
            ));
        }
        Err(e) => rss.push(row("propagation: FAILED", format!("{e:#}"))),
    }
    out.push(Section {
        title: format!(
            "Many Webhooks: worker RSS (VmRSS, VmHWM) beside the single-destination worker's; propagation of a change through the snapshot Secret ({n} entries)"
        ),
        rows: rss,
    });
    drop(api);
    Ok(out)
}
