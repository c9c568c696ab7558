//! The `nats` section: the NATS JetStream source (`--nats-url`) against its own baseline, as the
//! throughput section does for RabbitMQ. A stream prefilled with `HOOKFLEET_BENCH_N` messages of the
//! smallest body size; **B**: a bare JetStream pull consumer (durable, explicit acks) that pulls in
//! batches of the prefetch and double-acks each message from its own task, as the worker does; **H**:
//! the bare client; **L = 1/(1/B + 1/H)**; hookfleet on NATS end to end, its ratio to L (target ≥ 0.9)
//! and its CPU-µs per message beside B's + H's. When the throughput section ran, its RabbitMQ row
//! (classic, same body, plain) is printed beside it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use hookfleet_testkit::NatsServer;
use hookfleet_testkit::sink::Sink;

use crate::report::{Section, row};
use crate::roles::{Child, Figures, env};
use crate::{Cfg, Found, Opts, Worker, bare_client, measure, measure_drain, median, size_name, verdict};

/// A stream `name` on `<name>.>` holding `n` messages `prefix-i` of `size` bytes (`Nats-Msg-Id` the
/// id), each confirmed by JetStream.
async fn prefill(nats: &NatsServer, name: &str, n: usize, size: usize) -> Result<()> {
    let js = jetstream::new(async_nats::connect(nats.url(0)).await?);
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.>")],
        ..Default::default()
    })
    .await?;
    let ids: Vec<usize> = (0..n).collect();
    for window in ids.chunks(1000) {
        let mut acks = Vec::with_capacity(window.len());
        for i in window {
            let id = format!("{name}-{i}");
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id.as_str());
            h.insert("Content-Type", "application/json");
            let body = crate::load::body(&id, size);
            acks.push(
                js.publish_with_headers(format!("{name}.created"), h, body.into())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    Ok(())
}

/// The child's side of B (`nats-consumer`): pulls `HF_BENCH_N` messages from the stream in batches of
/// `HF_BENCH_PREFETCH`, each double-acked from its own task.
pub async fn bare_consumer() -> Result<Figures> {
    let n: usize = env("HF_BENCH_N")?.parse()?;
    let batch: usize = env("HF_BENCH_PREFETCH")?.parse()?;
    let js = jetstream::new(async_nats::connect(env("HF_BENCH_URI")?).await?);
    let s = js.get_stream(env("HF_BENCH_QUEUE")?).await?;
    let c = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bare".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    std::fs::write(env("HF_BENCH_READY")?, "ready")?;
    let me = std::process::id();
    let mut acks = Vec::with_capacity(n);
    let mut start = None;
    let mut got = 0;
    while got < n {
        let mut b = c
            .batch()
            .max_messages(batch.min(n - got))
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        while let Some(m) = b.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            if start.is_none() {
                start = Some((Instant::now(), measure::cpu_time(me).unwrap_or_default()));
            }
            got += 1;
            acks.push(tokio::spawn(async move {
                m.double_ack().await.map_err(|e| e.to_string())
            }));
        }
    }
    for a in acks {
        a.await?.map_err(|e| anyhow::anyhow!(e))?;
    }
    let (t0, c0) = start.context("no message")?;
    let cpu = measure::cpu_time(me).unwrap_or_default().saturating_sub(c0);
    Ok(Figures {
        rate: n as f64 / t0.elapsed().as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        lat_ms: [f64::NAN; 3],
    })
}

/// The section: `cfg.rounds` rounds of B, H and hookfleet on NATS, back to back.
pub async fn section(cfg: &Cfg, found: &Found) -> Result<Section> {
    let nats = NatsServer::start().await?;
    let size = cfg.sizes[0];
    let (mut bs, mut hs, mut ls, mut rates, mut ratios, mut costs, mut cost_ratios, mut bare_cpus) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut duplicates = 0;
    for r in 1..=cfg.rounds {
        eprintln!(
            "bench: nats (round {r} of {}): bare JetStream consumer",
            cfg.rounds
        );
        let bare = format!("BARE{r}");
        prefill(&nats, &bare, cfg.n, size).await?;
        let b = Child::start(
            "nats-consumer",
            &[
                ("HF_BENCH_URI", nats.url(0)),
                ("HF_BENCH_QUEUE", bare),
                ("HF_BENCH_PREFETCH", cfg.prefetch.to_string()),
                ("HF_BENCH_N", cfg.n.to_string()),
            ],
        )
        .await?
        .figures(Duration::from_secs(600))
        .await?;
        eprintln!("bench: nats (round {r}): bare client");
        let h = bare_client(cfg, size).await?;
        eprintln!("bench: nats (round {r}): hookfleet");
        let stream = format!("HF{r}");
        prefill(&nats, &stream, cfg.n, size).await?;
        let sink = Sink::start_with(false).await?;
        let o = Opts {
            nats: Some((nats.url(0), stream)),
            ..Opts::default()
        };
        let w = Worker::start(cfg, "", "hooks", &sink.url(), &o).await?;
        let d = measure_drain(cfg, &w, &sink, &o).await?;
        let l = 1.0 / (1.0 / b.rate + 1.0 / h.rate);
        bs.push(b.rate);
        hs.push(h.rate);
        ls.push(l);
        rates.push(d.rate);
        ratios.push(d.rate / l);
        bare_cpus.push(b.cpu_us + h.cpu_us);
        costs.push(d.cpu_us);
        cost_ratios.push(d.cpu_us / (b.cpu_us + h.cpu_us));
        duplicates += d.duplicates;
    }
    let spread = |v: &[f64]| {
        if v.len() < 2 {
            return String::new();
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("; ratio {lo:.2}–{hi:.2} over {} rounds", v.len())
    };
    let (b, h, l) = (median(&bs), median(&hs), median(&ls));
    let what = size_name(size);
    let mut rows = vec![
        row(format!("B bare JetStream consumer, {what}"), format!("{b:.0}")),
        row(format!("H bare client, {what}"), format!("{h:.0}")),
        row(format!("L = 1/(1/B+1/H), {what}"), format!("{l:.0}")),
        row(
            format!("hookfleet on NATS, {what} (dups {duplicates}{})", spread(&ratios)),
            format!("{:.0}", median(&rates)),
        )
        .against(format!("L {l:.0}"), median(&ratios))
        .target(verdict(median(&ratios) >= 0.9, "≥ 0.90 L")),
        row(
            format!("hookfleet on NATS, CPU-µs per message{}", spread(&cost_ratios)),
            format!("{:.1}", median(&costs)),
        )
        .against(format!("B+H {:.1}", median(&bare_cpus)), median(&cost_ratios))
        .target(verdict(median(&cost_ratios) <= 1.25, "≤ 1.25×")),
    ];
    if found.drain_rate > 0.0 {
        rows.push(
            row(
                format!("hookfleet on RabbitMQ, classic {what} plain (throughput section)"),
                format!("{:.0}", found.drain_rate),
            )
            .against(format!("L {:.0}", found.limit), found.drain_rate / found.limit),
        );
    }
    Ok(Section {
        title: format!(
            "NATS JetStream source, msg/s ({} messages a run, concurrency {}, prefetch {}{})",
            cfg.n,
            cfg.concurrency,
            cfg.prefetch,
            if cfg.rounds > 1 {
                format!("; medians of {} rounds", cfg.rounds)
            } else {
                String::new()
            }
        ),
        rows,
    })
}
