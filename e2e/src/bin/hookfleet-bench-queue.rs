//! `hookfleet-bench-queue`: kube-runtime's controller queue on its own, without an API server, to show how
//! first reconciles fare when the resync requeues of the objects already reconciled ask for more than the
//! concurrency can serve (docs/benchmarks.md, "Operator at scale").
//!
//! `N` objects (ConfigMaps in an in-memory store) are triggered once at start, as a controller's initial
//! list does; the reconciler counts the call, waits `RECONCILE_MS` (the API calls of a real reconcile) and
//! requeues after `RESYNC_MS`, through `kube::runtime::applier` with `CONCURRENCY`, the operator's own
//! machinery. After `SECS` it prints how many objects were never reconciled, and how the reconciles were
//! spread. Each figure by variable: `HOOKFLEET_QUEUE_N` (1000), `HOOKFLEET_QUEUE_CONCURRENCY` (8),
//! `HOOKFLEET_QUEUE_RECONCILE_MS` (20), `HOOKFLEET_QUEUE_RESYNC_MS` (1000), `HOOKFLEET_QUEUE_SECS` (30).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use kube::runtime::controller::{Action, Config};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{applier, watcher};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Seen {
    /// Reconciles of each object, and when its first one started (from the start).
    calls: HashMap<String, (u64, Duration)>,
}

#[tokio::main]
async fn main() {
    let n = env("HOOKFLEET_QUEUE_N", 1000) as usize;
    let concurrency = env("HOOKFLEET_QUEUE_CONCURRENCY", 8) as u16;
    let work = Duration::from_millis(env("HOOKFLEET_QUEUE_RECONCILE_MS", 20));
    let resync = Duration::from_millis(env("HOOKFLEET_QUEUE_RESYNC_MS", 1000));
    let secs = env("HOOKFLEET_QUEUE_SECS", 30);

    let (store, mut writer) = reflector::store::<ConfigMap>();
    writer.apply_watcher_event(&watcher::Event::Init);
    let mut refs = Vec::with_capacity(n);
    for i in 0..n {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("integration-{i}")),
                namespace: Some("bench".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        refs.push(ObjectRef::from_obj(&cm));
        writer.apply_watcher_event(&watcher::Event::InitApply(cm));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);

    let start = Instant::now();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let queue =
        futures::stream::iter(refs.into_iter().map(Ok::<_, Infallible>)).chain(futures::stream::pending());
    let reconcile = |obj: Arc<ConfigMap>, seen: Arc<Mutex<Seen>>| {
        Box::pin(async move {
            let name = obj.metadata.name.clone().unwrap_or_default();
            seen.lock()
                .expect("lock")
                .calls
                .entry(name)
                .or_insert((0, start.elapsed()))
                .0 += 1;
            tokio::time::sleep(work).await;
            Ok::<_, std::io::Error>(Action::requeue(resync))
        })
    };
    let run = applier(
        reconcile,
        |_, _, _| Action::requeue(resync),
        seen.clone(),
        store,
        queue,
        Config::default().concurrency(concurrency),
    )
    .for_each(|_| async {});
    let _ = tokio::time::timeout(Duration::from_secs(secs), run).await;

    let seen = seen.lock().expect("lock");
    let total: u64 = seen.calls.values().map(|c| c.0).sum();
    let mut counts: Vec<u64> = seen.calls.values().map(|c| c.0).collect();
    counts.sort_unstable();
    let never = n - seen.calls.len();
    let last_first = seen.calls.values().map(|c| c.1).max().unwrap_or_default();
    let capacity = f64::from(concurrency) / work.as_secs_f64();
    let demand = n as f64 / resync.as_secs_f64();
    println!(
        "{n} objects, concurrency {concurrency}, {} ms a reconcile (capacity ≈ {capacity:.0}/s), resync {} ms (demand {demand:.0}/s), {secs} s",
        work.as_millis(),
        resync.as_millis()
    );
    println!(
        "reconciles {total} ({:.0}/s); objects never reconciled {never}; last first reconcile at {:.1} s",
        total as f64 / secs as f64,
        last_first.as_secs_f64()
    );
    if let (Some(min), Some(max)) = (counts.first(), counts.last()) {
        println!(
            "reconciles per reconciled object: min {min}, median {}, max {max}",
            counts[counts.len() / 2]
        );
    }
}
