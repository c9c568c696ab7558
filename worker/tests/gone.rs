//! 410 Gone against a real RabbitMQ node: the worker hands the message back, stops taking messages,
//! drains and exits 5 with a termination message naming the URL (userinfo redacted) and the time;
//! every message is still in the queue (none dead-lettered, none lost), and a worker started once the
//! destination is back delivers them all.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use hookfleet_crds::contract::exit;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::{free_port, wait_for};
use hookfleet_testkit::sink::{Mode, Sink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_hands_back_drains_and_exits_5_with_every_message_still_queued() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 50;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(410));
    let published = ids("gone", N);
    publish(&rmq, "gone.q", &published).await?;

    // Credentials in the URL must not reach the termination message.
    let url = sink.url().replace("http://", "http://hook-user:s3cret@");
    let mut args = base_args(&rmq, "gone.q", &url, free_port()?, dir.path());
    args.extend(["--concurrency", "4", "--prefetch", "8"].map(String::from));
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(worker_bin())
        .args(&args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .context("the worker did not exit after a 410")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(exit::DESTINATION_GONE), "{stderr}");
    let term = std::fs::read_to_string(dir.path().join("termination-log"))?;
    let want = format!(
        "destination gone: http://***@{}/hook answered 410 Gone at ",
        sink.addr()
    );
    assert!(term.starts_with(&want), "{term}");
    assert!(term.contains(" GMT;"), "the time: {term}");
    assert!(!term.contains("s3cret") && !term.contains("hook-user"), "{term}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert_eq!(term.lines().count(), 1, "{term}");
    let requests = sink.requests();
    assert!(
        (1..=4).contains(&requests),
        "at most the deliveries already in flight reach the endpoint: {requests}"
    );

    // Every message is back in the work queue; nothing dead-lettered, nothing waiting for a retry.
    let ready = wait_for(
        "messages requeued",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            let (ready, consumers) = queue_counts(&rmq, "gone.q").await?;
            Ok((ready as usize == N && consumers == 0).then_some(ready))
        },
    )
    .await?;
    assert_eq!(queue_counts(&rmq, "gone.q.dead").await?.0, 0);
    assert_eq!(queue_counts(&rmq, "gone.q.retries").await?.0, 0);
    assert_eq!(drain(&rmq, "gone.q.dead").await?.len(), 0);
    eprintln!(
        "gone: exit {} after {:?}, {requests} requests answered 410, {ready}/{N} messages back in the queue, 0 dead-lettered; termination message: {}",
        exit::DESTINATION_GONE,
        started.elapsed(),
        term.trim()
    );

    // The destination is back: a new worker delivers every message.
    sink.set_mode(Mode::ok());
    let w = start_worker(&rmq, "gone.q", &sink.url(), &[], &[], dir.path(), "worker-after").await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(30)).await?;
    account(&published, &sink.delivered(), &HashSet::new())?;
    let a = settled_accounting(&w).await?;
    assert_eq!(a.delivered, N as f64, "{a:?}");
    let m = w.metrics().await?;
    assert_eq!(metric(&m, "hookfleet_destination_gone{"), 0.0);
    Ok(())
}
