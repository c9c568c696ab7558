//! A worker pod in a crash loop (exit 3, the fd-limit line in its termination message) on the real API server:
//! Degraded quoting the message, one Warning Event, and Ready again once the pod recovers. Then a generic
//! crash loop over several restarts: Degraded steady, also while the container runs between back-offs.

mod common;

use std::time::Duration;

use common::*;
use hookfleet_crds::Integration;
use hookfleet_crds::integration::condition::{DEGRADED, READY};
use hookfleet_testkit::process::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};

/// What the worker writes to its termination log when the fd limit cannot be met (docs/worker.md).
const FD_LINE: &str = "file-descriptor limit too low: RLIMIT_NOFILE is 256 (hard limit 256, --fd-limit asked for \
                       1048576) but --concurrency 128 needs 320 (128 in flight + 128 idle pooled + 64 reserve); \
                       raise the pod's nofile limit or lower --concurrency";

/// `status` of a pod as the kubelet reports a crash-looping worker.
fn crash_looping(status: &serde_json::Value) -> serde_json::Value {
    let mut conditions = status["conditions"].clone();
    for c in conditions.as_array_mut().unwrap() {
        if c["type"] == "Ready" || c["type"] == "ContainersReady" {
            c["status"] = "False".into();
            c["reason"] = "ContainersNotReady".into();
            c["message"] = "containers with unready status: [worker]".into();
        }
    }
    let mut cs = status["containerStatuses"].clone();
    for c in cs.as_array_mut().unwrap() {
        c["ready"] = false.into();
        c["started"] = false.into();
        c["restartCount"] = 5.into();
        c["state"] = serde_json::json!({"waiting": {
            "reason": "CrashLoopBackOff",
            "message": "back-off 2m40s restarting failed container=worker"
        }});
        c["lastState"] = serde_json::json!({"terminated": {
            "exitCode": 3, "reason": "Error", "message": format!("{FD_LINE}\n"),
            "startedAt": "2025-01-01T00:00:00Z", "finishedAt": "2025-01-01T00:00:01Z"
        }});
    }
    serde_json::json!({"status": {"conditions": conditions, "containerStatuses": cs}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_looping_worker_degrades_quoting_the_termination_message() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let Stack {
        cp,
        rmq: _rmq,
        conn,
        op,
    } = stack(&[]).await?;
    create_orders(&cp, "https://erp.example.com/hooks", 2).await?;
    let _chans = consumers(&conn, "orders", 2).await?;
    until(&cp, "orders", "Ready", 90, |i| cond(i, READY).0 == "True").await?;

    // One worker crash-loops: status subresource, as the kubelet would write it.
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    let pod = pods
        .list(&ListParams::default().labels("hookfleet.io/integration=orders"))
        .await?
        .items
        .into_iter()
        .next()
        .expect("a worker pod");
    let name = pod.metadata.name.clone().unwrap();
    let original = serde_json::to_value(&pod.status)?;
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(crash_looping(&original)),
    )
    .await?;

    let i = until(&cp, "orders", "Degraded: fd limit", 30, |i| {
        cond(i, DEGRADED).0 == "True"
    })
    .await?;
    let (_, reason, message) = cond(&i, DEGRADED);
    eprintln!("Degraded {reason}: {message}");
    assert_eq!(reason, "FileDescriptorLimitNotMet");
    assert!(message.contains(&name), "names the pod: {message}");
    assert!(
        message.contains(&format!("\"{FD_LINE}\"")),
        "quotes the termination message: {message}"
    );
    assert_eq!(cond(&i, READY), ("False", reason, message));

    // The Event once, also after more reconciles (resync is 1 s here).
    let r0 = op.reconciles();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(op.reconciles() >= r0 + 2, "reconciled meanwhile");
    let evs = events(&cp, "orders", Some("FileDescriptorLimitNotMet")).await?;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].type_.as_deref(), Some("Warning"));
    assert!(evs[0].series.is_none(), "published once: {:?}", evs[0].series);
    assert!(
        evs[0].note.as_deref().unwrap_or("").contains(FD_LINE),
        "{:?}",
        evs[0].note
    );
    let i = until(&cp, "orders", "still Degraded", 5, |i| {
        cond(i, DEGRADED).0 == "True"
    })
    .await?;
    assert_eq!(cond(&i, DEGRADED).1, "FileDescriptorLimitNotMet");

    // The pod recovers → Ready again, one Recovered Event.
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(ready_again(&original)),
    )
    .await?;
    let i = until(&cp, "orders", "Ready again", 30, |i| {
        cond(i, READY).0 == "True" && cond(i, DEGRADED).0 == "False"
    })
    .await?;
    assert_eq!(cond(&i, READY).1, "Consuming");
    let recovered = wait_for(
        "Recovered Event",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let cp = &cp;
            async move {
                let evs = events(cp, "orders", Some("Recovered")).await?;
                Ok((!evs.is_empty()).then_some(evs))
            }
        },
    )
    .await?;
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(
        events(&cp, "orders", Some("FileDescriptorLimitNotMet"))
            .await?
            .len(),
        1
    );

    // A generic crash loop, as the kubelet reports it over several restarts: back-off, then a few
    // seconds running but not Ready, then back-off again. The Integration stays Degraded/CrashLooping
    // throughout (no Recovered flap in the seconds it runs), with one Event, until Ready again.
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let sampler = {
        let (api, samples) = (Api::<Integration>::namespaced(cp.client(), NS), samples.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(i) = api.get("orders").await {
                    let (st, reason, _) = cond(&i, DEGRADED);
                    samples.lock().unwrap().push((st.to_owned(), reason.to_owned()));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    for restart in 1..=3 {
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(crash_cycle(&original, restart, true)),
        )
        .await?;
        if restart == 1 {
            until(&cp, "orders", "Degraded: CrashLooping", 30, |i| {
                cond(i, DEGRADED).1 == "CrashLooping"
            })
            .await?;
        }
        // Longer than a resync (1 s here): the operator reconciles in each state.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(crash_cycle(&original, restart, false)),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    sampler.abort();
    let samples = samples.lock().unwrap().clone();
    let from = samples
        .iter()
        .position(|(_, r)| r == "CrashLooping")
        .expect("sampled CrashLooping");
    let after = &samples[from..];
    assert!(after.len() >= 50, "sampled over ~15 s: {}", after.len());
    assert!(
        after.iter().all(|(st, r)| st == "True" && r == "CrashLooping"),
        "Degraded steady over 3 restarts: {after:?}"
    );
    assert_eq!(
        events(&cp, "orders", Some("CrashLooping")).await?.len(),
        1,
        "one Event"
    );
    assert_eq!(
        events(&cp, "orders", Some("Recovered")).await?.len(),
        1,
        "no Recovered flap"
    );
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(ready_again(&original)),
    )
    .await?;
    until(&cp, "orders", "Ready after the crash loop", 30, |i| {
        cond(i, READY).0 == "True" && cond(i, DEGRADED).0 == "False"
    })
    .await?;
    op.task.abort();
    Ok(())
}

/// `status` of the worker running Ready again, as it was before its trouble (`original`).
fn ready_again(original: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({"status": {
        "conditions": original["conditions"],
        "containerStatuses": original["containerStatuses"],
    }})
}

/// `status` of a worker in a generic crash loop (exit 1, a panic) at its `restart`th restart: in
/// back-off (`waiting: CrashLoopBackOff`), or running again but not Ready yet.
fn crash_cycle(status: &serde_json::Value, restart: i32, backing_off: bool) -> serde_json::Value {
    let mut v = crash_looping(status);
    for c in v["status"]["containerStatuses"].as_array_mut().unwrap() {
        c["restartCount"] = (if backing_off { restart - 1 } else { restart }).into();
        c["lastState"] = serde_json::json!({"terminated": {
            "exitCode": 1, "reason": "Error", "message": "panicked at worker/src/main.rs:10: boom\n",
            "startedAt": "2025-01-01T00:00:00Z", "finishedAt": "2025-01-01T00:00:01Z"
        }});
        c["state"] = if backing_off {
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container=worker"}})
        } else {
            c["started"] = true.into();
            serde_json::json!({"running": {"startedAt": "2025-01-01T00:00:02Z"}})
        };
    }
    v
}
