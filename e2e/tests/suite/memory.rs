//! Scenario `memory`: the memory a worker holds is bounded in bytes, shown under a real cgroup limit. An
//! Integration takes messages of up to 16 MiB (`source.maxMessageBytes`) and sets no memory, so the
//! operator renders the container's memory request = limit from `workers.inFlightBytes`
//! (`contract::memory`, 384 MiB with the defaults). One worker pod, whose container's memory cgroup
//! enforces that limit (read back from the node), delivers 100 messages of 16 MiB to a receiver failing
//! every other request (so both lanes hold messages and retry copies are published beside them); 3 of
//! 17 MiB are dead-lettered `too_large`. Expected: none lost, no OOM kill (no restart, no OOM in the
//! cgroup), the cgroup's peak usage below its limit.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hookfleet_crds::contract::memory;
use hookfleet_e2e::messages;
use hookfleet_e2e::sink::{Mode, Sink};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};

use hookfleet_e2e::pods::worker_pids;

use super::{Outcome, Stack};

const NS: &str = "e2e-memory";
const QUEUE: &str = "e2e.memory";
const MIB: usize = 1024 * 1024;
const LARGE: usize = 100;
const OVERSIZED: usize = 3;

/// The memory cgroup (v1) directory of process `pid`.
fn memory_cgroup(pid: i32) -> Result<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path = cgroups
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers.split(',').any(|c| c == "memory").then_some(path)
        })
        .context("no memory cgroup (cgroup v1) for the worker")?;
    Ok(PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')))
}

fn read_u64(dir: &std::path::Path, file: &str) -> Result<u64> {
    let text =
        std::fs::read_to_string(dir.join(file)).with_context(|| format!("{}", dir.join(file).display()))?;
    Ok(text.trim().parse()?)
}

/// `oom_kill` of `memory.oom_control` (kernels since 4.13), when present.
fn oom_kills(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(dir.join("memory.oom_control"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

fn restarts_and_last(pod: &Pod) -> (i32, String) {
    let c = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first());
    let restarts = c.map_or(0, |c| c.restart_count);
    let last = c
        .and_then(|c| c.last_state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map(|t| format!("{} (exit {})", t.reason.clone().unwrap_or_default(), t.exit_code))
        .unwrap_or_else(|| "none".into());
    (restarts, last)
}

async fn publish_large(s: &Stack, ids: &[String], size: usize) -> Result<()> {
    let body = vec![b'x'; size];
    let conn = Connection::connect(&s.rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for chunk in ids.chunks(10) {
        let batch: Vec<(&str, &[u8])> = chunk.iter().map(|id| (id.as_str(), body.as_slice())).collect();
        messages::publish_batch(&ch, QUEUE, &batch).await?;
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

pub async fn memory(s: &Stack) -> Outcome {
    let api = s.namespace(NS, "").await?;
    // A receiver of its own that keeps no bodies (1.6 GB would sit in this process), failing every
    // other request.
    let sink = Sink::start_on(s.host, false).await?;
    sink.set_mode(Mode::flaky(503, 1, Duration::from_millis(100)));
    let max = 16 * MIB;
    s.integration(
        &api,
        "large",
        QUEUE,
        serde_json::json!({
            "source": {"maxMessageBytes": max},
            "destination": {"url": format!("{}/hooks/large", sink.url().trim_end_matches('/'))},
            // Every other request fails, whichever message it carries: with the default 10 attempts
            // one message in a thousand would spend them all (a dead letter, not a loss, but not the
            // point here), so many attempts.
            "delivery": {"backoff": {"initial": "100ms", "max": "200ms"}, "maxAttempts": 60},
            // No memory set: the operator renders it.
            "workers": {"replicas": 1, "resources": null},
        }),
    )
    .await?;
    s.ready_with_consumers(&api, "large", 1).await?;
    let pod = s
        .running_pods(NS, "large")
        .await?
        .into_iter()
        .next()
        .context("no worker pod")?;
    let container = &pod.spec.as_ref().context("pod spec")?.containers[0];
    let resources = container.resources.as_ref().context("no resources rendered")?;
    let limit_q = resources
        .limits
        .as_ref()
        .and_then(|l| l.get("memory"))
        .context("no memory limit rendered")?
        .0
        .clone();
    // What the contract renders for this spec (source.prefetch 64, workers.inFlightBytes 128 MiB: defaults).
    let (prefetch, in_flight) = (64, 128 * MIB as u64);
    let want_q = memory::worker_memory_quantity(prefetch, max as u32, in_flight);
    let limit = memory::worker_memory_bytes(prefetch, max as u32, in_flight);
    ensure!(
        limit_q == want_q,
        "rendered memory limit {limit_q}, the contract says {want_q}"
    );
    let request_q = resources
        .requests
        .as_ref()
        .and_then(|r| r.get("memory"))
        .map(|q| q.0.clone());
    ensure!(
        request_q.as_deref() == Some(limit_q.as_str()),
        "memory request {request_q:?} ≠ limit {limit_q}"
    );
    let cgroup = if s.local() {
        let pid = *worker_pids(&pod)
            .first()
            .context("no worker process for the pod")?;
        let dir = memory_cgroup(pid)?;
        let enforced = read_u64(&dir, "memory.limit_in_bytes")?;
        ensure!(
            enforced == limit,
            "the container's cgroup enforces {enforced} bytes, the pod asks for {limit} ({limit_q})"
        );
        Some(dir)
    } else {
        None
    };

    let large = messages::ids("large", LARGE);
    let oversized = messages::ids("oversized", OVERSIZED);
    let t0 = Instant::now();
    // The oversized ones among the first, so they are dead-lettered while large ones are in flight.
    publish_large(s, &oversized[..1], max + MIB).await?;
    publish_large(s, &large[..LARGE / 2], max).await?;
    publish_large(s, &oversized[1..], max + MIB).await?;
    publish_large(s, &large[LARGE / 2..], max).await?;
    let want: HashSet<String> = large.iter().cloned().collect();
    if let Err(e) = sink.wait_delivered(&want, Duration::from_secs(300)).await {
        let dead = messages::drain_ids(&s.rmq.amqp_uri(), &format!("{QUEUE}.dead")).await?;
        anyhow::bail!("{e:#}; in the dead-letter queue: {dead:?}");
    }
    let took = t0.elapsed();
    // The oversized ones went to the dead-letter queue with reason too_large, without a request.
    let dead = messages::drain_ids(&s.rmq.amqp_uri(), &format!("{QUEUE}.dead")).await?;
    let oversized_set: HashSet<String> = oversized.iter().cloned().collect();
    ensure!(
        dead == oversized_set,
        "dead letters {dead:?}, want the oversized ones"
    );
    ensure!(
        !sink.delivered().keys().any(|id| id.starts_with("oversized")),
        "a request for an oversized message"
    );
    let mut published = large.clone();
    published.extend(oversized.iter().cloned());
    let account = messages::account(&published, &sink.delivered(), &dead)?;
    ensure!(account.lost == 0, "lost: {account}");

    let pod: Pod = kube::Api::namespaced(s.client.clone(), NS)
        .get(&pod.name_any())
        .await?;
    let (restarts, last) = restarts_and_last(&pod);
    ensure!(
        restarts == 0,
        "the worker restarted {restarts} times (last: {last})"
    );
    let mib = |b: u64| b as f64 / MIB as f64;
    let peak = match &cgroup {
        Some(dir) => {
            let peak = read_u64(dir, "memory.max_usage_in_bytes")?;
            let failcnt = read_u64(dir, "memory.failcnt")?;
            let ooms = oom_kills(dir);
            ensure!(
                ooms.unwrap_or(0) == 0,
                "OOM kills in the container's cgroup: {ooms:?}"
            );
            ensure!(peak < limit, "cgroup peak {peak} ≥ limit {limit}");
            format!(
                "cgroup peak {:.0} MiB of its {:.0} MiB limit ({:.0} %), failcnt {failcnt}, oom_kill {}",
                mib(peak),
                mib(limit),
                100.0 * peak as f64 / limit as f64,
                ooms.map_or("n/a".into(), |n| n.to_string())
            )
        }
        None => format!("limit {limit_q} (cgroup not readable on a remote cluster)"),
    };
    drop(sink);
    s.drop_namespace(NS).await;
    Ok((
        Some(account),
        format!(
            "{LARGE} × 16 MiB delivered in {took:.1?}, {OVERSIZED} × 17 MiB dead-lettered too_large; \
             rendered memory request = limit = {limit_q}; {peak}; restarts 0"
        ),
    ))
}
