//! The baselines run as child processes of this same binary (`HOOKFLEET_BENCH_ROLE`), so that their CPU
//! time is read from `/proc/<pid>/stat` exactly as the worker's is, apart from the sink and the
//! publisher in the parent:
//! - `consumer` (B): a bare lapin consumer that only acks, each ack from its own task as the worker
//!   does, same queue, prefetch and persistence;
//! - `client` (H): a bare reqwest loop at the worker's concurrency against the same sink;
//! - `nats-consumer` (B of the `nats` section): a bare JetStream pull consumer that only acks, as the
//!   worker pulls and acks (`nats.rs`).
//!
//! A child writes `ready` into `HF_BENCH_READY` once consuming and one line of figures into
//! `HF_BENCH_RESULT` when done.
//!
//! One more role is not a baseline: `sink`, the latency section's webhook sink in a process of its own, so
//! that the arrival times it records are not delayed by the open-loop publisher sharing its runtime (the
//! bare consumer it is compared with also stamps arrivals in its own process). It writes its URL into
//! `HF_BENCH_READY`, and each request's id, wall-clock arrival (µs since the epoch) and status into
//! `HF_BENCH_RESULT` once `HF_BENCH_N` requests arrived.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures::StreamExt;
use futures::future::try_join_all;
use hookfleet_testkit::process::Process;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use crate::measure;

pub const ROLE: &str = "HOOKFLEET_BENCH_ROLE";

/// What a baseline child measured.
#[derive(Debug, Default, Clone, Copy)]
pub struct Figures {
    /// Messages (or requests) a second, first to last.
    pub rate: f64,
    /// CPU-µs of the child per message over the same span.
    pub cpu_us: f64,
    /// Publish → consume latency quantiles in ms (consumer with stamped messages; else NaN).
    pub lat_ms: [f64; 3],
}

pub fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} unset"))
}

fn write_result(f: &Figures) -> Result<()> {
    let line = format!(
        "{} {} {} {} {}\n",
        f.rate, f.cpu_us, f.lat_ms[0], f.lat_ms[1], f.lat_ms[2]
    );
    std::fs::write(env("HF_BENCH_RESULT")?, line)?;
    Ok(())
}

/// The child's side: runs the role named by [`ROLE`].
pub async fn child(role: &str) -> Result<()> {
    let f = match role {
        "consumer" => consumer().await?,
        "client" => client().await?,
        "nats-consumer" => crate::nats::bare_consumer().await?,
        "sink" => return sink().await,
        other => anyhow::bail!("unknown {ROLE} {other}"),
    };
    write_result(&f)
}

async fn consumer() -> Result<Figures> {
    let n: usize = env("HF_BENCH_N")?.parse()?;
    let prefetch: u16 = env("HF_BENCH_PREFETCH")?.parse()?;
    let conn = Connection::connect(&env("HF_BENCH_URI")?, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            env("HF_BENCH_QUEUE")?.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    std::fs::write(env("HF_BENCH_READY")?, "ready")?;
    let me = std::process::id();
    let mut acks = Vec::with_capacity(n);
    let mut lat = Vec::new();
    let mut start = None;
    for _ in 0..n {
        let d = consumer.next().await.context("consumer ended")??;
        if start.is_none() {
            start = Some((Instant::now(), measure::cpu_time(me).unwrap_or_default()));
        }
        if let Some(sent) = d.properties.timestamp() {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as f64;
            lat.push((now - *sent as f64) / 1000.0);
        }
        acks.push(tokio::spawn(
            async move { d.ack(BasicAckOptions::default()).await },
        ));
    }
    for a in acks {
        a.await??;
    }
    let (t0, c0) = start.unwrap_or((Instant::now(), Duration::ZERO));
    let cpu = measure::cpu_time(me).unwrap_or_default().saturating_sub(c0);
    let _ = conn.close(200, "done".into()).await;
    Ok(Figures {
        rate: n as f64 / t0.elapsed().as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        lat_ms: measure::p50_p99_p999(lat),
    })
}

async fn client() -> Result<Figures> {
    let n: usize = env("HF_BENCH_N")?.parse()?;
    let concurrency: usize = env("HF_BENCH_CONCURRENCY")?.parse()?;
    let size: usize = env("HF_BENCH_SIZE")?.parse()?;
    let url = env("HF_BENCH_URL")?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    std::fs::write(env("HF_BENCH_READY")?, "ready")?;
    let me = std::process::id();
    let c0 = measure::cpu_time(me).unwrap_or_default();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks = (0..concurrency).map(|_| {
        let (http, next, url) = (http.clone(), next.clone(), url.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, reqwest::Error>(());
                }
                let id = format!("client-{i}");
                http.post(&url)
                    .header("webhook-id", &id)
                    .header("content-type", "application/json")
                    .body(crate::load::body(&id, size))
                    .send()
                    .await?
                    .error_for_status()?;
            }
        })
    });
    for t in try_join_all(tasks).await? {
        t?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = measure::cpu_time(me).unwrap_or_default().saturating_sub(c0);
    Ok(Figures {
        rate: n as f64 / secs,
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        lat_ms: [f64::NAN; 3],
    })
}

/// Written by renaming a finished file, so the parent never reads half of it.
fn write_atomic(path: &str, text: &str) -> Result<()> {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn sink() -> Result<()> {
    let n: usize = env("HF_BENCH_N")?.parse()?;
    let sink = hookfleet_testkit::sink::Sink::start_with(false).await?;
    // Arrivals are stamped with the monotonic clock; one anchor turns them into wall-clock times.
    let (anchor, wall) = (Instant::now(), SystemTime::now().duration_since(UNIX_EPOCH)?);
    write_atomic(&env("HF_BENCH_READY")?, &sink.url())?;
    while (sink.requests() as usize) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = String::with_capacity(n * 40);
    for h in sink.hits() {
        let at = wall + h.at.saturating_duration_since(anchor);
        out.push_str(&format!(
            "{} {} {}\n",
            h.id.as_deref().unwrap_or("-"),
            at.as_micros(),
            h.status
        ));
    }
    write_atomic(&env("HF_BENCH_RESULT")?, &out)
}

/// A request as the `sink` child saw it.
pub struct Arrival {
    pub id: String,
    /// The child's wall-clock arrival time, on this process's monotonic clock.
    pub at: Instant,
    pub status: u16,
}

/// A running baseline child (stopped when dropped).
pub struct Child {
    process: Process,
    result: PathBuf,
    _dir: tempfile::TempDir,
}

impl Child {
    /// Starts this binary as `role` with `vars`, and waits until it is ready.
    pub async fn start(role: &str, vars: &[(&str, String)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ready = dir.path().join("ready");
        let result = dir.path().join("result");
        let mut envs: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        envs.push((ROLE.into(), role.into()));
        envs.push(("HF_BENCH_READY".into(), ready.display().to_string()));
        envs.push(("HF_BENCH_RESULT".into(), result.display().to_string()));
        let process = Process::spawn(
            role,
            &std::env::current_exe()?,
            &[],
            &envs,
            &dir.path().join(format!("{role}.log")),
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            anyhow::ensure!(
                !process.exited() && Instant::now() < deadline,
                "{role} never got ready: {}",
                process.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            process,
            result,
            _dir: dir,
        })
    }

    /// What the child wrote into its ready file (the `sink` role's URL).
    pub fn ready_text(&self) -> Result<String> {
        let ready = self.result.with_file_name("ready");
        Ok(std::fs::read_to_string(ready)?)
    }

    /// Waits for the `sink` child's arrivals.
    pub async fn arrivals(self, timeout: Duration) -> Result<Vec<Arrival>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = std::fs::read_to_string(&self.result) {
                // One anchor turns the child's wall-clock times into this process's `Instant`s, the clock
                // the publisher's due times are on.
                let (now, wall) = (Instant::now(), SystemTime::now());
                let instant = |at: SystemTime| match wall.duration_since(at) {
                    Ok(before) => now - before,
                    Err(after) => now + after.duration(),
                };
                return s
                    .lines()
                    .map(|l| {
                        let mut f = l.split(' ');
                        let (id, at, status) = (f.next(), f.next(), f.next());
                        let at: u64 = at.context("no time")?.parse()?;
                        Ok(Arrival {
                            id: id.context("no id")?.to_owned(),
                            at: instant(UNIX_EPOCH + Duration::from_micros(at)),
                            status: status.context("no status")?.parse()?,
                        })
                    })
                    .collect();
            }
            anyhow::ensure!(
                !self.process.exited() && Instant::now() < deadline,
                "the sink gave no arrivals: {}",
                self.process.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the child's figures.
    pub async fn figures(self, timeout: Duration) -> Result<Figures> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = std::fs::read_to_string(&self.result)
                && s.ends_with('\n')
            {
                let v: Vec<f64> = s
                    .split_whitespace()
                    .map(|x| x.parse().unwrap_or(f64::NAN))
                    .collect();
                anyhow::ensure!(v.len() == 5, "bad result line {s:?}");
                return Ok(Figures {
                    rate: v[0],
                    cpu_us: v[1],
                    lat_ms: [v[2], v[3], v[4]],
                });
            }
            anyhow::ensure!(
                !self.process.exited() && Instant::now() < deadline,
                "baseline gave no figures: {}",
                self.process.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether this process is a baseline child.
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}
