//! The chaos soak (`make chaos`, `hookfleet-chaos`): steady load for [`Options::minutes`] on 3 real nodes and a
//! 3-node RabbitMQ cluster ([`stack`]), faults at random times from a seeded RNG, one at a time, each followed
//! by a wait for the stack to be healthy again ([`faults`]); a publisher with confirms that survives broker
//! nodes going away ([`load`]); pages from a live Prometheus with the chart's rules ([`pages`]); and at the
//! end a per-id account and a report ([`report`]).
//!
//! The seed fixes the sequence of fault kinds and the gaps between them (one RNG) and, separately, the
//! choices within a fault (which pod, node or broker node, how long: another RNG from the same seed). The
//! faults' start times still depend on how long each recovery took, and a victim is drawn from the pods that
//! exist then.

pub mod faults;
pub mod load;
pub mod pages;
pub mod report;
pub mod stack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;

use faults::Kind;
use pages::mmss;
use report::secs;
use stack::{QUEUE, Stack, say};

/// The knobs (`HOOKFLEET_CHAOS_*`).
#[derive(Clone, Debug)]
pub struct Options {
    /// Minutes of load and faults (`HOOKFLEET_CHAOS_MINUTES`, 30).
    pub minutes: f64,
    /// `HOOKFLEET_CHAOS_SEED`; from the clock by default.
    pub seed: u64,
    /// Messages per second (`HOOKFLEET_CHAOS_RATE`, 50).
    pub rate: f64,
    /// Longest wait for the backlog to settle after the load (`HOOKFLEET_CHAOS_SETTLE_SECS`, 600).
    pub settle: Duration,
    /// Longest wait for the stack to be healthy after a fault (300 s).
    pub recovery: Duration,
}

impl Options {
    pub fn from_env() -> Result<Self> {
        fn var<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("{name}={v} is not a number")),
                Err(_) => Ok(None),
            }
        }
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Ok(Self {
            minutes: var("HOOKFLEET_CHAOS_MINUTES")?.unwrap_or(30.0),
            seed: var("HOOKFLEET_CHAOS_SEED")?.unwrap_or(clock),
            rate: var("HOOKFLEET_CHAOS_RATE")?.unwrap_or(50.0),
            settle: Duration::from_secs(var("HOOKFLEET_CHAOS_SETTLE_SECS")?.unwrap_or(600)),
            recovery: Duration::from_secs(300),
        })
    }
}

/// One injected fault.
struct Injected {
    kind: Kind,
    at: Duration,
    detail: String,
    /// Healthy again this long after the fault's end (`Err`: not within [`Options::recovery`]).
    recovered: Result<Duration, String>,
}

/// What became of the run: the number of ids lost (0 is the target).
pub struct Outcome {
    pub lost: usize,
}

/// Runs the soak and prints its report.
pub async fn run(o: &Options) -> Result<Outcome> {
    say(&format!(
        "seed {} (HOOKFLEET_CHAOS_SEED={} repeats the fault sequence), {} minutes, {} messages/s",
        o.seed, o.seed, o.minutes, o.rate
    ));
    let t_setup = Instant::now();
    let mut s = Stack::start().await?;
    let prom = Arc::new(pages::start(&s.client, s.dir.path()).await?);
    say(&format!(
        "stack and Prometheus ready in {:.1?}",
        t_setup.elapsed()
    ));

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(Mutex::new(load::Published::default()));
    let uris: Vec<String> = (0..s.rabbit.len()).map(|i| s.rabbit.amqp_uri(i)).collect();
    let publisher = tokio::spawn(load::run(
        uris.clone(),
        QUEUE.to_owned(),
        o.rate,
        published.clone(),
        stop.clone(),
        o.settle,
    ));
    let seen = Arc::new(Mutex::new(pages::Seen::default()));
    let pages_stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(pages::watch(
        prom.clone(),
        s.client.clone(),
        t0,
        seen.clone(),
        pages_stop.clone(),
    ));
    let progress = tokio::spawn(progress(t0, published.clone(), s.sink.clone()));

    say(&format!("workers on {}", s.placement().await?));
    let mut schedule = faults::Schedule::new(StdRng::seed_from_u64(o.seed));
    let mut choices = StdRng::seed_from_u64(o.seed ^ 0x9e37_79b9_7f4a_7c15);
    let end = Duration::from_secs_f64(o.minutes * 60.0);
    let mut injected: Vec<Injected> = Vec::new();
    loop {
        let (kind, gap) = schedule.next_fault();
        if t0.elapsed() + gap >= end {
            break;
        }
        tokio::time::sleep(gap).await;
        let at = t0.elapsed();
        say(&format!("[{}] fault {}: …", mmss(at), kind.name()));
        let log = |line: &str| say(&format!("[{}]   {line}", mmss(t0.elapsed())));
        let detail = match faults::inject(&mut s, kind, &mut choices, &log).await {
            Ok(d) => d,
            Err(e) => format!("FAILED: {e:#}"),
        };
        let recovered = s.wait_healthy(o.recovery).await.map_err(|e| format!("{e:#}"));
        say(&format!(
            "[{}] fault {}: {detail}; {}; workers on {}",
            mmss(t0.elapsed()),
            kind.name(),
            match &recovered {
                Ok(d) => format!("healthy again in {:.1?}", d),
                Err(e) => format!("NOT healthy again: {e}"),
            },
            s.placement().await.unwrap_or_else(|e| format!("? ({e:#})"))
        ));
        injected.push(Injected {
            kind,
            at,
            detail,
            recovered,
        });
    }
    if let Some(left) = end.checked_sub(t0.elapsed()) {
        tokio::time::sleep(left).await;
    }
    stop.store(true, Ordering::SeqCst);
    let load_ended = t0.elapsed();
    say(&format!(
        "[{}] load stopped; waiting for the publisher's last confirms",
        mmss(load_ended)
    ));
    let unconfirmed = publisher.await.context("the publisher task")?;

    // Settle: every confirmed id delivered or dead-lettered, or the time is up.
    let (sent, confirmed_ids) = {
        let p = published.lock().unwrap();
        let pending: HashSet<&String> = unconfirmed.iter().collect();
        let confirmed: Vec<String> = p
            .sent
            .iter()
            .map(|(id, _)| id)
            .filter(|id| !pending.contains(id))
            .cloned()
            .collect();
        (p.sent_at(), confirmed)
    };
    let want: HashSet<&String> = confirmed_ids.iter().collect();
    let mut dead: HashSet<String> = HashSet::new();
    let settle_from = Instant::now();
    let settled = loop {
        if let Ok(d) = stack::drain_dead(&s.broker_uris_up()).await {
            dead.extend(d);
        }
        let delivered = s.sink.delivered();
        let open = want
            .iter()
            .filter(|id| !delivered.contains_key(**id) && !dead.contains(**id))
            .count();
        if open == 0 || settle_from.elapsed() > o.settle {
            let settled = settle_from.elapsed();
            say(&format!(
                "[{}] settled in {settled:.1?}: {open} confirmed ids neither delivered nor dead-lettered",
                mmss(t0.elapsed()),
            ));
            break settled;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    progress.abort();
    pages_stop.store(true, Ordering::SeqCst);
    // One last look at the alerts after the settle.
    let _ = tokio::time::timeout(pages::POLL * 2, watcher).await;
    let up = match pages::targets_up(&prom).await {
        Ok(by_job) => by_job
            .iter()
            .map(|(job, (up, all))| format!("{job} {up}/{all}"))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("? ({e:#})"),
    };
    let held: Vec<(String, u64)> = s
        .held()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();

    // The account, by id.
    let delivered_counts: HashMap<String, usize> = s.sink.delivered();
    let hits = s.sink.hits();
    let mut first_ok: HashMap<String, Instant> = HashMap::new();
    for h in hits.iter().filter(|h| (200..300).contains(&h.status)) {
        if let Some(id) = &h.id {
            first_ok.entry(id.clone()).or_insert(h.at);
        }
    }
    let account = crate::messages::account(&confirmed_ids, &delivered_counts, &dead)?;
    let held_total: u64 = held.iter().map(|(_, n)| n).sum();
    let missing: Vec<&String> = confirmed_ids
        .iter()
        .filter(|id| !delivered_counts.contains_key(*id) && !dead.contains(*id))
        .collect();
    let lost = missing.len().saturating_sub(held_total as usize);
    let attempts = hits.len();

    // The report.
    let p = published.lock().unwrap();
    println!("\n==== hookfleet chaos soak: report ====");
    println!(
        "seed {}; load at {}/s for {} ({} asked) over 3 nodes and a 3-node RabbitMQ cluster; settled in {}",
        o.seed,
        o.rate,
        mmss(load_ended),
        mmss(end),
        secs(settled)
    );
    println!("\nfaults injected: {}", injected.len());
    let mut by_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    for f in &injected {
        *by_kind.entry(f.kind).or_default() += 1;
    }
    for k in Kind::ALL {
        println!("  {:<26} {}", k.name(), by_kind.get(&k).copied().unwrap_or(0));
    }
    println!("\n  {:>6}  {:<26} {:<14} detail", "at", "fault", "healthy after");
    for f in &injected {
        println!(
            "  {:>6}  {:<26} {:<14} {}",
            mmss(f.at),
            f.kind.name(),
            match &f.recovered {
                Ok(d) => secs(*d),
                Err(_) => "NOT".into(),
            },
            f.detail
        );
        if let Err(e) = &f.recovered {
            println!("  {:>6}  {:<26} {:<14} {e}", "", "", "");
        }
    }
    println!("\nmessages (per id):");
    println!("  published (confirmed)   {}", account.published);
    println!(
        "  publisher re-sends      {} ({} reconnects)",
        p.resends, p.reconnects
    );
    println!("  never confirmed         {}", unconfirmed.len());
    println!("  delivered               {}", account.delivered);
    println!("  dead-lettered           {}", account.dead_lettered);
    println!("  held in queues          {held_total} {held:?}");
    println!("  lost                    {lost}");
    println!("  duplicates              {}", account.duplicates);
    println!("  sink requests           {attempts} (all answers)");
    if !missing.is_empty() {
        println!(
            "  neither delivered nor dead-lettered: {} (first: {:?})",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    println!("\nlatency, publish → first 2xx, by minute of publishing:");
    println!(
        "  {:>6} {:>9} {:>8} {:>8} {:>8}",
        "minute", "delivered", "p50", "p99", "max"
    );
    for m in report::per_minute(t0, &sent, &first_ok) {
        println!(
            "  {:>6} {:>9} {:>8} {:>8} {:>8}",
            m.minute,
            m.delivered,
            secs(m.p50),
            secs(m.p99),
            secs(m.max)
        );
    }
    let seen = seen.lock().unwrap().clone();
    println!(
        "\npages fired (severity=page, chart defaults; polled every {:?}): {}",
        pages::POLL,
        seen.pages.len()
    );
    for pg in &seen.pages {
        println!(
            "  {} {} {{{}}} active since {}, resolved {}",
            mmss(pg.fired),
            pg.alert,
            pg.labels,
            pg.active_at,
            pg.resolved.map_or("no (still firing at the end)".into(), mmss)
        );
    }
    let pending: Vec<String> = seen
        .pending
        .iter()
        .map(|(a, (first, polls))| format!("{a} (first {}, in {polls} polls)", mmss(*first)))
        .collect();
    println!(
        "  page alerts seen pending: {}",
        if pending.is_empty() {
            "none".into()
        } else {
            pending.join(", ")
        }
    );
    println!(
        "  Prometheus: alert polls answered {}, failed {}; targets up at the end: {up}",
        seen.polls.0, seen.polls.1
    );
    drop(p);
    if lost > 0 || std::env::var_os("HOOKFLEET_CHAOS_KEEP").is_some() {
        let to = std::env::temp_dir().join(format!("hookfleet-chaos-{}", o.seed));
        match s.keep_evidence(&to) {
            Ok(()) => println!(
                "\nevidence (broker logs and data, pod logs, queues) kept in {}",
                to.display()
            ),
            Err(e) => println!("\nkeeping evidence failed: {e:#}"),
        }
    }
    println!("\nresult: {}", if lost == 0 { "0 lost" } else { "LOST MESSAGES" });
    if let Err(e) = s.cluster.check_running() {
        println!("note: {e:#}");
    }
    Ok(Outcome { lost })
}

/// A line every 30 s: published, confirmed, delivered, and how many confirmed ids are still out.
async fn progress(t0: Instant, published: Arc<Mutex<load::Published>>, sink: Arc<crate::sink::Sink>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let delivered = sink.delivered();
        let p = published.lock().unwrap();
        let out = p
            .sent
            .iter()
            .filter(|(id, _)| !delivered.contains_key(id))
            .count();
        say(&format!(
            "[{}] sent {} confirmed {} re-sent {} delivered {} outstanding {}{}",
            mmss(t0.elapsed()),
            p.sent.len(),
            p.confirmed,
            p.resends,
            delivered.len(),
            out,
            p.last_error
                .as_ref()
                .map(|e| format!(" (publisher's last error: {e})"))
                .unwrap_or_default()
        ));
    }
}
