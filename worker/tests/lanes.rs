//! The priority lane against a real RabbitMQ node: with 10,000 due retries waiting in the
//! retry-ready queue, fresh messages still flow at ≥ 50% of their unloaded rate, and every message
//! (fresh and retry) is delivered, none lost, the accounting exact.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use hookfleet_crds::integration::{QueueType, default_delivery_limit};
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::sink::{Mode, Sink};
use hookfleet_worker::worker::topology;
use lapin::options::QueueDeclareOptions;

const FRESH: usize = 2000;
const LATE: usize = 10_000;
/// A latency-bound destination: 40 ms per request, 16 in flight → about 400/s at most.
const SINK_DELAY: Duration = Duration::from_millis(40);
const WORKER_ARGS: &[&str] = &["--concurrency", "16", "--prefetch", "32"];

/// When the first request of an id starting with one of `prefixes` arrived (the worker's start-up,
/// declaring some fifty quorum queues, is not part of the rate).
fn first_hit(sink: &Sink, prefixes: &[&str]) -> Instant {
    sink.hits()
        .into_iter()
        .filter(|h| {
            h.id.as_deref()
                .is_some_and(|i| prefixes.iter().any(|p| i.starts_with(p)))
        })
        .map(|h| h.at)
        .min()
        .expect("a request arrived")
}

/// Messages per second of the ids starting with `prefix` (2xx answers), from `from` to the last one.
fn rate(sink: &Sink, prefix: &str, from: Instant) -> (usize, f64) {
    let hits: Vec<Instant> = sink
        .hits()
        .into_iter()
        .filter(|h| (200..300).contains(&h.status) && h.id.as_deref().is_some_and(|i| i.starts_with(prefix)))
        .map(|h| h.at)
        .collect();
    let last = hits.iter().max().copied().unwrap_or(from);
    (
        hits.len(),
        hits.len() as f64 / last.duration_since(from).as_secs_f64(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_traffic_keeps_half_its_rate_behind_10000_due_retries() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start_with(false).await?;
    sink.set_mode(Mode::delayed(200, SINK_DELAY));

    // Unloaded: FRESH messages waiting in the work queue, nothing else.
    let unloaded_ids = ids("unloaded", FRESH);
    publish(&rmq, "ln1.q", &unloaded_ids).await?;
    let mut w = start_worker(
        &rmq,
        "ln1.q",
        &sink.url(),
        WORKER_ARGS,
        &[],
        dir.path(),
        "worker-1",
    )
    .await?;
    let want: HashSet<String> = unloaded_ids.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let (n, unloaded) = rate(&sink, "unloaded-", first_hit(&sink, &["unloaded-"]));
    assert_eq!(n, FRESH);
    settled_accounting(&w).await?;
    w.process.stop(Duration::from_secs(10));

    // Loaded: the same fresh traffic while LATE retries are due in the retry-ready queue (the state
    // after a long outage of the destination: every delay over at once).
    {
        let conn = lapin::Connection::connect(&rmq.amqp_uri(), Default::default()).await?;
        let ch = conn.create_channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        declare_work_queue(&ch, "ln2.q", QueueType::Quorum).await?;
        let args =
            topology::retry_ready_queue_args(QueueType::Quorum, "ln2.q.dead", default_delivery_limit());
        ch.queue_declare("ln2.q.retries".into(), durable, args).await?;
        let _ = conn.close(200, "declared".into()).await;
    }
    let late_ids = ids("late", LATE);
    publish_existing(&rmq, "ln2.q.retries", &late_ids).await?;
    let fresh_ids = ids("fresh", FRESH);
    publish_existing(&rmq, "ln2.q", &fresh_ids).await?;
    assert_eq!(queue_counts(&rmq, "ln2.q.retries").await?.0 as usize, LATE);

    let w = start_worker(
        &rmq,
        "ln2.q",
        &sink.url(),
        WORKER_ARGS,
        &[],
        dir.path(),
        "worker-2",
    )
    .await?;
    let want: HashSet<String> = fresh_ids.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let from = first_hit(&sink, &["fresh-", "late-"]);
    let (n, loaded) = rate(&sink, "fresh-", from);
    assert_eq!(n, FRESH);
    let fresh_done = sink
        .hits()
        .into_iter()
        .filter(|h| h.id.as_deref().is_some_and(|i| i.starts_with("fresh-")))
        .map(|h| h.at)
        .max()
        .expect("fresh hits");
    let late_meanwhile = sink
        .hits()
        .iter()
        .filter(|h| h.at <= fresh_done && h.id.as_deref().is_some_and(|i| i.starts_with("late-")))
        .count();
    assert!(late_meanwhile > 0, "the retry lane ran alongside");

    // Then every retry is delivered too: none lost, the accounting exact.
    let all: Vec<String> = fresh_ids.iter().chain(late_ids.iter()).cloned().collect();
    let want: HashSet<String> = all.iter().cloned().collect();
    let drained = Instant::now();
    sink.wait_delivered(&want, Duration::from_secs(240)).await?;
    let delivered: std::collections::HashMap<String, usize> = sink
        .delivered()
        .into_iter()
        .filter(|(id, _)| !id.starts_with("unloaded-"))
        .collect();
    let dups = account(&all, &delivered, &HashSet::new())?;
    let a = settled_accounting(&w).await?;
    assert_eq!(a.delivered as usize, FRESH + LATE, "{a:?}");
    assert_eq!(queue_counts(&rmq, "ln2.q").await?.0, 0);
    assert_eq!(queue_counts(&rmq, "ln2.q.retries").await?.0, 0);
    assert_eq!(
        consumers(&rmq, "ln2.q").await?,
        1,
        "one consumer on the work queue per worker"
    );
    eprintln!(
        "priority lane: the remaining retries drained in {:?}; duplicates={dups}; accounting {a:?}",
        drained.elapsed()
    );

    // Unloaded again, on the same (now idle) worker: the machine is shared, so the higher of the two
    // unloaded rates is the one compared.
    let again = ids("again", FRESH);
    publish_existing(&rmq, "ln2.q", &again).await?;
    let want: HashSet<String> = again.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let (_, unloaded_after) = rate(&sink, "again-", first_hit(&sink, &["again-"]));
    let ratio = loaded / unloaded.max(unloaded_after);
    eprintln!(
        "priority lane: unloaded {unloaded:.0} and {unloaded_after:.0} fresh msg/s (before, after); with {LATE} \
         due retries {loaded:.0} fresh msg/s: ratio {ratio:.2} to the higher; {late_meanwhile} retries delivered \
         meanwhile"
    );
    assert!(ratio >= 0.5, "fresh traffic starved by retries: ratio {ratio:.2}");
    Ok(())
}

/// An upgrade from a version without lanes: the old delay queues (`<queue>.retry.<ms>ms`, dead-lettering
/// into the work queue) exist and hold retries. The new worker declares its own ladder beside them (no
/// `PRECONDITION_FAILED`), and the old retries come back through the work queue and are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_leaves_the_old_delay_queues_draining_into_the_work_queue() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 20;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    // The topology of the previous version: work queue, and a delay queue back into it.
    {
        let conn = lapin::Connection::connect(&rmq.amqp_uri(), Default::default()).await?;
        let ch = conn.create_channel().await?;
        declare_work_queue(&ch, "up.q", QueueType::Quorum).await?;
        let old = topology::delay_queue_args(QueueType::Quorum, "up.q", Duration::from_secs(2));
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare("up.q.retry.2000ms".into(), durable, old).await?;
        let _ = conn.close(200, "declared".into()).await;
    }
    let old_retries = ids("old-retry", N);
    publish_existing(&rmq, "up.q.retry.2000ms", &old_retries).await?;
    let fresh = ids("up-fresh", N);
    publish_existing(&rmq, "up.q", &fresh).await?;

    let w = start_worker(&rmq, "up.q", &sink.url(), &[], &[], dir.path(), "worker").await?;
    let all: Vec<String> = fresh.iter().chain(old_retries.iter()).cloned().collect();
    let want: HashSet<String> = all.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dups = account(&all, &sink.delivered(), &HashSet::new())?;
    let a = settled_accounting(&w).await?;
    assert_eq!(a.delivered as usize, 2 * N, "{a:?}");
    assert_eq!(
        queue_counts(&rmq, "up.q.retry.2000ms").await?.0,
        0,
        "the old delay queue drained"
    );
    w.process.check_running()?;
    eprintln!(
        "upgrade: {N} retries in an old delay queue and {N} fresh messages, all delivered by the new worker \
         beside its new ladder (no PRECONDITION_FAILED), duplicates={dups}"
    );
    Ok(())
}
