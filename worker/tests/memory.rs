//! Issue 24: the memory a worker holds is bounded in bytes, not only in messages. On a real RabbitMQ
//! node, with the real worker binary: 100 messages of 16 MiB (`--max-message-bytes` 16 MiB) and a
//! few of 17 MiB, to a destination that fails every other request (so both lanes, fresh messages and
//! retries, hold messages, and retry copies are published beside them). The large ones are all delivered, the oversized ones dead-lettered with reason
//! `too_large` (no request), none lost; the worker's peak RSS (VmHWM) stays below the memory the
//! operator renders for that spec (`contract::memory::worker_memory_bytes`, the same function).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use hookfleet_crds::contract::memory;
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::sink::{Mode, Sink};
use hookfleet_worker::message::{H_LAST_ERROR, header_str};
use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};

const MIB: usize = 1024 * 1024;

/// `VmHWM` (peak resident set) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// Publishes `ids` with a body of `size` bytes each, ten at a time with confirms (one body shared).
async fn publish_large(rmq: &RabbitMq, queue: &str, ids: &[String], size: usize) -> Result<()> {
    let body = vec![b'x'; size];
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_work_queue(&ch, queue, QueueType::Quorum).await?;
    for chunk in ids.chunks(10) {
        let batch: Vec<(&str, &[u8])> = chunk.iter().map(|id| (id.as_str(), body.as_slice())).collect();
        hookfleet_testkit::messages::publish_batch(&ch, queue, &batch).await?;
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_stay_under_the_rendered_memory_and_oversized_ones_are_dead_lettered() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 100;
    const OVERSIZED: usize = 3;
    let max = 16 * MIB;
    let (prefetch, in_flight) = (64u16, 128 * MIB as u64);
    let limit = memory::worker_memory_bytes(prefetch, max as u32, in_flight);
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start_with(false).await?;
    // Every other request fails (503): retries come back through the retry lane while fresh messages
    // arrive, so both lanes hold messages, and retry copies are published beside them.
    sink.set_mode(Mode::flaky(503, 1, Duration::from_millis(100)));
    let queue = "mem.q";
    let w = start_worker(
        &rmq,
        queue,
        &sink.url(),
        &[
            "--prefetch",
            &prefetch.to_string(),
            "--max-message-bytes",
            &max.to_string(),
            "--in-flight-bytes",
            &in_flight.to_string(),
            "--backoff-initial",
            "100ms",
            "--backoff-max",
            "200ms",
            "--max-attempts",
            // Every other request fails, whichever message it carries: with 10 attempts one message in
            // a thousand would spend them all.
            "60",
            "--circuit-breaker-threshold",
            "0",
        ],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    let idle = peak_rss(w.pid())?;

    let started = Instant::now();
    let large = ids("large", N);
    let oversized = ids("oversized", OVERSIZED);
    // The oversized ones among the first, so they are dead-lettered while large ones are in flight.
    publish_large(&rmq, queue, &oversized[..1], max + MIB).await?;
    publish_large(&rmq, queue, &large[..N / 2], max).await?;
    publish_large(&rmq, queue, &oversized[1..], max + MIB).await?;
    publish_large(&rmq, queue, &large[N / 2..], max).await?;
    let want: HashSet<String> = large.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let a = settled_accounting(&w).await?;
    let elapsed = started.elapsed();
    let peak = peak_rss(w.pid())?;

    let dead = drain(&rmq, &format!("{queue}.dead")).await?;
    let too_large: HashSet<String> = dead
        .iter()
        .filter(|d| header_str(Some(&d.headers), H_LAST_ERROR).as_deref() == Some("too_large"))
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(dead.len(), OVERSIZED, "only the oversized ones are dead letters");
    assert_eq!(too_large, oversized.iter().cloned().collect::<HashSet<_>>());
    let metrics = w.metrics().await?;
    let counted = metric(&metrics, "hookfleet_dead_letters_total{") as usize;
    assert_eq!(counted, OVERSIZED, "counted as dead letters (too_large)");
    assert_eq!(
        metric(
            &metrics,
            r#"hookfleet_dead_letters_total{integration="test/worker",reason="too_large"}"#
        ) as usize,
        OVERSIZED
    );
    let mut published = large.clone();
    published.extend(oversized.iter().cloned());
    let duplicates = account(&published, &sink.delivered(), &too_large)?;
    assert!(
        !sink.delivered().keys().any(|id| id.starts_with("oversized")),
        "no request for an oversized message"
    );
    assert_eq!(a.delivered as usize, N + duplicates);
    assert!(a.retried > 0.0, "the retry lane was used: {a:?}");
    assert_eq!(a.dead_lettered as usize, OVERSIZED);

    let held = memory::held_bytes(prefetch, max as u32, in_flight);
    println!(
        "memory: {N} x 16 MiB delivered, {OVERSIZED} x 17 MiB dead-lettered too_large, 0 lost, \
         {duplicates} duplicates, {} retried, in {:.1} s; lane prefetch {}; idle RSS {} MiB, peak RSS (VmHWM) {} MiB, \
         held bound {} MiB, rendered limit {} MiB; (peak - idle) / held = {:.2}",
        a.retried,
        elapsed.as_secs_f64(),
        memory::effective_prefetch(prefetch, max as u32, in_flight),
        idle / MIB as u64,
        peak / MIB as u64,
        held / MIB as u64,
        limit / MIB as u64,
        (peak - idle) as f64 / held as f64,
    );
    assert!(
        peak < limit,
        "peak RSS {} MiB is not below the rendered limit {} MiB",
        peak / MIB as u64,
        limit / MIB as u64
    );
    Ok(())
}
