//! A fleet-wide rate limit against a real RabbitMQ node with two workers: each takes half of
//! `--rate-limit` (the consumers on the work queue, read from the broker), together they stay at the
//! fleet's limit, and when one stops the other takes the whole limit, without a restart.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::wait_for;
use hookfleet_testkit::sink::Sink;

const LIMIT: f64 = 20.0;
const ARGS: &[&str] = &[
    "--rate-limit",
    "20",
    "--rate-limit-burst",
    "1",
    "--rate-limit-scope",
    "fleet",
];

async fn wait_share(w: &Worker, want: f64) -> Result<()> {
    wait_for(
        "rate-limit share",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || async {
            let m = w.metrics().await?;
            Ok((metric(&m, "hookfleet_rate_limit_per_second{") == want).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_fleet_limit() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 200;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    publish(&rmq, "fr.q", &[]).await?;
    let a = start_worker(&rmq, "fr.q", &sink.url(), ARGS, &[], dir.path(), "worker-a").await?;
    let mut b = start_worker(&rmq, "fr.q", &sink.url(), ARGS, &[], dir.path(), "worker-b").await?;
    assert_eq!(consumers(&rmq, "fr.q").await?, 2);
    wait_share(&a, LIMIT / 2.0).await?;
    wait_share(&b, LIMIT / 2.0).await?;

    let published = ids("fr", N);
    publish(&rmq, "fr.q", &published).await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let hits: Vec<Instant> = sink.hits().iter().map(|h| h.at).collect();
    let first = *hits.iter().min().unwrap();
    let last = *hits.iter().max().unwrap();
    // N requests, the first free (burst 1 each): N − 2 intervals at the fleet's rate.
    let rate = (N - 2) as f64 / last.duration_since(first).as_secs_f64();
    let delivered = |m: &str| {
        metric(
            m,
            "hookfleet_messages_settled_total{integration=\"test/worker\",fate=\"delivered\"}",
        )
    };
    let (da, db) = (delivered(&a.metrics().await?), delivered(&b.metrics().await?));
    eprintln!(
        "fleet rate limit {LIMIT}/s over 2 workers: {rate:.1} req/s measured ({N} msgs; worker a delivered {da}, b {db})"
    );
    assert!(
        rate > LIMIT * 0.8 && rate < LIMIT * 1.2,
        "fleet rate {rate:.1}/s, limit {LIMIT}/s"
    );
    assert!(da > 0.0 && db > 0.0, "both workers delivered");
    account(&published, &sink.delivered(), &HashSet::new())?;
    settled_accounting(&a).await?;
    settled_accounting(&b).await?;

    // One worker leaves: the other takes the whole limit.
    b.process.stop(Duration::from_secs(10));
    wait_share(&a, LIMIT).await?;
    eprintln!("fleet rate limit: after worker b stopped, worker a's share is {LIMIT}/s");
    Ok(())
}
