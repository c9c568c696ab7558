//! `make bench-worker`: throughput of one worker against its baselines, measured in the same run on the
//! same machine: the broker alone (consume + ack, no HTTP), the sink alone (HTTP POSTs at the worker's
//! concurrency, no broker), and hookfleet end to end (broker → worker → sink, acked). Prints the three
//! side by side with ratios, the worker's attempt latency and its peak memory.
//!
//! `HOOKFLEET_BENCH_N` (default 20000) messages of 200 bytes; `HOOKFLEET_BENCH_CONCURRENCY` (default 128).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use futures::future::try_join_all;
use hookfleet_e2e::RabbitMq;
use hookfleet_e2e::process::{Process, free_port};
use hookfleet_e2e::sink::Sink;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

fn body(i: usize) -> Vec<u8> {
    let mut b = format!(r#"{{"id":"b-{i}","pad":""#).into_bytes();
    b.resize(198, b'x');
    b.extend_from_slice(b"\"}");
    b
}

async fn publish(conn: &Connection, queue: &str, prefix: &str, n: usize) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, FieldTable::default())
        .await?;
    for start in (0..n).step_by(1000) {
        let mut pending = Vec::new();
        for i in start..(start + 1000).min(n) {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("{prefix}-{i}").into());
            pending.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(i),
                    props,
                )
                .await?,
            );
        }
        try_join_all(pending).await?;
    }
    ch.close(200, "published".into()).await?;
    Ok(())
}

async fn raw_broker(rmq: &RabbitMq, n: usize) -> Result<f64> {
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    publish(&conn, "bench.raw", "raw", n).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            "bench.raw".into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Acks are sent from their own tasks, as the worker does, so the loop never waits on one: this is
    // the ceiling of a single consumer on this node, not of a sequential consume-then-ack loop.
    let start = Instant::now();
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        let d = consumer.next().await.expect("consumer ended")?;
        acks.push(tokio::spawn(
            async move { d.ack(BasicAckOptions::default()).await },
        ));
    }
    for a in acks {
        a.await??;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    conn.close(200, "done".into()).await?;
    Ok(rate)
}

async fn raw_sink(sink: &Sink, n: usize, concurrency: usize) -> Result<f64> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks = (0..concurrency).map(|_| {
        let client = client.clone();
        let next = next.clone();
        let url = sink.url();
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, reqwest::Error>(());
                }
                client
                    .post(&url)
                    .header("webhook-id", format!("sink-{i}"))
                    .header("content-type", "application/json")
                    .body(body(i))
                    .send()
                    .await?
                    .error_for_status()?;
            }
        })
    });
    for t in try_join_all(tasks).await? {
        t?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// (msgs/s, p50, p99 of attempt latency, peak RSS in KiB).
async fn hookfleet(
    rmq: &RabbitMq,
    sink: &Sink,
    n: usize,
    concurrency: usize,
) -> Result<(f64, f64, f64, u64)> {
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    publish(&conn, "bench.hf", "hf", n).await?;
    conn.close(200, "published".into()).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let args: Vec<String> = [
        "--amqp-uri",
        &rmq.amqp_uri(),
        "--queue",
        "bench.hf",
        "--destination-url",
        &sink.url(),
        "--allow-private-networks",
        // Like for like: the baseline consumes a classic queue, so hookfleet does too here.
        "--queue-type",
        "classic",
        "--concurrency",
        &concurrency.to_string(),
        "--prefetch",
        &(2 * concurrency).min(65535).to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--termination-log",
        &dir.path().join("termination-log").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let envs = [("HOOKFLEET_LOG".to_owned(), "warn".to_owned())];
    let worker = Process::spawn(
        "worker",
        Path::new(env!("CARGO_BIN_EXE_hookfleet-worker")),
        &args,
        &envs,
        &dir.path().join("worker.log"),
    )?;
    let start = Instant::now();
    let want: HashSet<String> = (0..n).map(|i| format!("hf-{i}")).collect();
    sink.wait_delivered(&want, Duration::from_secs(600)).await?;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let client = reqwest::Client::builder().no_proxy().build()?;
    let metrics = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let (p50, p99) = (quantile(&metrics, 0.5), quantile(&metrics, 0.99));
    let pid = worker.pid().unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    Ok((rate, p50, p99, rss))
}

/// A quantile of `hookfleet_delivery_duration_seconds` from its buckets (upper bound of the bucket).
fn quantile(metrics: &str, q: f64) -> f64 {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("hookfleet_delivery_duration_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|b| b.0)
        .unwrap_or(f64::NAN)
}

async fn run() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = env_usize("HOOKFLEET_BENCH_N", 20_000);
    let c = env_usize("HOOKFLEET_BENCH_CONCURRENCY", 128);
    eprintln!("bench: starting RabbitMQ, {n} messages of 200 bytes, concurrency {c}");
    let rmq = RabbitMq::start().await?;
    let broker = raw_broker(&rmq, n).await?;
    let sink = Sink::start_with(false).await?;
    let http = raw_sink(&sink, n, c).await?;
    let hf_sink = Sink::start_with(false).await?;
    let (hf, p50, p99, rss) = hookfleet(&rmq, &hf_sink, n, c).await?;
    // Every delivered id is accounted for, none twice.
    let delivered = hf_sink.delivered();
    let dups: usize = delivered.values().map(|v| v - 1).sum();

    println!();
    println!(
        "hookfleet worker throughput ({n} persistent 200-byte messages, concurrency {c}, {} cores)",
        cores()
    );
    println!("  {:<40} {:>12}", "baseline / run", "msgs/s");
    println!(
        "  {:<40} {:>12.0}",
        "raw broker consume+ack (lapin, prefetch 256)", broker
    );
    println!(
        "  {:<40} {:>12.0}",
        format!("raw sink HTTP POST ({c} concurrent)"),
        http
    );
    println!("  {:<40} {:>12.0}", "hookfleet end to end (broker→HTTP→ack)", hf);
    println!(
        "  hookfleet / broker = {:.2}   hookfleet / sink = {:.2}",
        hf / broker,
        hf / http
    );
    println!(
        "  attempt latency p50 ≤ {:.0} ms, p99 ≤ {:.0} ms (histogram buckets); worker peak RSS {} MiB; duplicates {dups}",
        p50 * 1000.0,
        p99 * 1000.0,
        rss / 1024
    );
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
