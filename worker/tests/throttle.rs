//! The adaptive throttle against a real RabbitMQ node: an endpoint that fails 2 of every 3 requests
//! (never 20 in a row, so the circuit breaker stays closed) gets fewer requests in flight within a few
//! windows; once it recovers the throttle opens up again, and every message is delivered, none lost.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::wait_for;
use hookfleet_testkit::sink::{Mode, Sink};

const DELAY: Duration = Duration::from_millis(100);

async fn limit(w: &Worker) -> Result<f64> {
    Ok(metric(&w.metrics().await?, "hookfleet_throttle_limit{"))
}

async fn wait_limit(w: &Worker, what: &str, ok: impl Fn(f64) -> bool) -> Result<()> {
    wait_for(
        what,
        Duration::from_secs(40),
        Duration::from_millis(100),
        || async { Ok(ok(limit(w).await?).then_some(())) },
    )
    .await
}

/// Requests per second the sink saw in the `span` before now.
fn recent_rate(sink: &Sink, span: Duration) -> f64 {
    let since = Instant::now() - span;
    sink.hits().iter().filter(|h| h.at >= since).count() as f64 / span.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_outnumbering_successes_throttle_the_worker_down_and_recovery_opens_it() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 600;
    const MORE: usize = 1500;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start_with(false).await?;
    sink.set_mode(Mode::flaky(503, 2, DELAY));
    let published = ids("thr", N);
    publish(&rmq, "thr.q", &published).await?;
    let w = start_worker(
        &rmq,
        "thr.q",
        &sink.url(),
        &[
            "--concurrency",
            "20",
            "--adaptive-throttle",
            "--adaptive-throttle-min",
            "2",
            "--adaptive-throttle-window",
            "1s",
            "--backoff-initial",
            "200ms",
            "--backoff-max",
            "1s",
            "--max-attempts",
            "100",
        ],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    assert_eq!(limit(&w).await?, 20.0, "starts wide open");
    let started = Instant::now();
    wait_limit(&w, "throttled down to the minimum", |l| l == 2.0).await?;
    let took = started.elapsed();
    // A full window at the minimum: at most 2 in flight × 10 requests/s each.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let throttled = recent_rate(&sink, Duration::from_secs(2));
    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, "hookfleet_circuit_open{"),
        0.0,
        "the breaker never opened"
    );
    assert!(
        throttled <= 26.0,
        "throttled rate {throttled:.1}/s with 2 in flight at 100 ms"
    );

    // The endpoint recovers: with traffic to measure (a quiet window changes nothing) the limit
    // climbs back, +2 a window, and everything is delivered.
    sink.set_mode(Mode::delayed(200, DELAY));
    let more = ids("thr-more", MORE);
    publish(&rmq, "thr.q", &more).await?;
    let published: Vec<String> = published.into_iter().chain(more).collect();
    let recovering = Instant::now();
    wait_limit(&w, "opened up again", |l| l == 20.0).await?;
    let reopened = recovering.elapsed();
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let dups = account(&published, &sink.delivered(), &HashSet::new())?;
    let a = settled_accounting(&w).await?;
    assert_eq!(a.dead_lettered, 0.0, "{a:?}");
    eprintln!(
        "adaptive throttle: 2 of 3 requests failing, limit 20 → 2 in {took:?}, {throttled:.1} req/s at the minimum \
         (100 ms endpoint), breaker closed throughout; back to 20 {reopened:?} after recovery; all {} delivered, \
         duplicates={dups}; accounting {a:?}",
        N + MORE
    );
    Ok(())
}
