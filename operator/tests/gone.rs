//! HTTP 410 from the destination, operator side, on the real API server: a worker that stopped with exit
//! code 5 (`contract::exit::DESTINATION_GONE`) turns the Integration Degraded `DestinationGone` with the URL
//! (userinfo redacted) and the time, scales the workers to 0 (messages wait in the queue), and is cleared by
//! the retry annotation or a new destination URL. The pod status is written the way the kubelet would.

mod common;

use std::time::Duration;

use common::*;
use hookfleet_crds::Integration;
use hookfleet_crds::contract::exit;
use hookfleet_crds::integration::annotation::RETRY_DESTINATION;
use hookfleet_crds::integration::condition::{DEGRADED, READY};
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};

/// Marks one running worker pod of `orders` as stopped with exit 5 at `finished`, as the kubelet reports
/// a container that exited and is waiting to restart.
async fn worker_exits_gone(cp: &ControlPlane, finished: &str) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    let pod = wait_for(
        "a running worker pod",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let pods = pods.clone();
            async move {
                Ok(pods
                    .list(&ListParams::default().labels("hookfleet.io/integration=orders"))
                    .await?
                    .items
                    .into_iter()
                    .find(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && p.status
                                .as_ref()
                                .and_then(|s| s.container_statuses.as_ref())
                                .is_some_and(|cs| !cs.is_empty())
                    }))
            }
        },
    )
    .await?;
    let name = pod.metadata.name.clone().unwrap();
    let status = serde_json::to_value(&pod.status)?;
    let mut cs = status["containerStatuses"].clone();
    for c in cs.as_array_mut().unwrap() {
        c["ready"] = false.into();
        c["started"] = false.into();
        c["restartCount"] = 1.into();
        c["state"] = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}});
        c["lastState"] = serde_json::json!({"terminated": {
            "exitCode": exit::DESTINATION_GONE, "reason": "Error",
            "message": "the destination answered 410 Gone; message handed back, stopping\n",
            "startedAt": "2026-01-01T00:00:00Z", "finishedAt": finished
        }});
    }
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"containerStatuses": cs}})),
    )
    .await?;
    Ok(name)
}

fn gone_metric(text: &str) -> Option<&str> {
    text.lines()
        .find(|l| {
            l.starts_with(r#"hookfleet_operator_integration_destination_gone{integration="default/orders"}"#)
        })
        .and_then(|l| l.rsplit(' ').next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_gone_scales_to_zero_until_retried_or_changed() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let Stack {
        cp,
        rmq: _rmq,
        conn,
        op,
    } = stack(&[]).await?;
    create_orders(&cp, "https://erp:s3cret@erp.example.com/hooks/orders", 2).await?;
    let chans = consumers(&conn, "orders", 2).await?;
    until(&cp, "orders", "Ready", 90, |i| cond(i, READY).0 == "True").await?;
    assert_eq!(gone_metric(&op.metrics.encode()), Some("0"));

    // A worker got 410 and stopped with exit 5.
    let pod = worker_exits_gone(&cp, "2026-11-25T10:00:00Z").await?;
    let i = until(&cp, "orders", "Degraded: DestinationGone", 30, |i| {
        cond(i, DEGRADED).1 == "DestinationGone"
    })
    .await?;
    let (status, reason, message) = cond(&i, DEGRADED);
    eprintln!("Degraded {status} {reason}: {message}");
    assert_eq!(status, "True");
    assert!(
        message.contains("https://***@erp.example.com/hooks/orders"),
        "names the URL: {message}"
    );
    assert!(!message.contains("s3cret"), "userinfo redacted: {message}");
    assert!(message.contains("2026-11-25T10:00:00Z"), "says when: {message}");
    assert!(
        message.contains(RETRY_DESTINATION),
        "says how to retry: {message}"
    );
    assert_eq!(cond(&i, READY), ("False", "DestinationGone", message));
    let gone = i
        .status
        .as_ref()
        .unwrap()
        .destination_gone
        .clone()
        .expect("status.destinationGone");
    assert_eq!(gone.url, "https://***@erp.example.com/hooks/orders");
    assert_eq!(gone.since.0.to_string(), "2026-11-25T10:00:00Z");
    assert_eq!(gone.retry_annotation, None);
    // Scaled to 0: messages wait in the queue, no worker hammers a gone endpoint.
    wait_replicas(&cp, 0).await?;
    assert_eq!(i.status.as_ref().unwrap().replicas, Some(0));
    assert_eq!(gone_metric(&op.metrics.encode()), Some("1"));
    eprintln!("pod {pod} exit 5 → Deployment at 0 replicas, destination_gone 1");

    // Steady: still gone after more reconciles (resync is 1 s), one Warning Event.
    let r0 = op.reconciles();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(op.reconciles() >= r0 + 2, "reconciled meanwhile");
    assert_eq!(replicas(&cp).await?, Some(0));
    let evs = events(&cp, "orders", Some("DestinationGone")).await?;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].type_.as_deref(), Some("Warning"));
    assert!(evs[0].series.is_none(), "published once: {:?}", evs[0].series);

    // The user asks for a retry: back to 2 workers, condition and metric cleared.
    let api: Api<Integration> = Api::namespaced(cp.client(), NS);
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {RETRY_DESTINATION: "1"}}})),
    )
    .await?;
    wait_replicas(&cp, 2).await?;
    let i = until(&cp, "orders", "no longer gone", 30, |i| {
        cond(i, DEGRADED).1 != "DestinationGone"
            && i.status.as_ref().is_some_and(|s| s.destination_gone.is_none())
    })
    .await?;
    eprintln!("after retry: Degraded {:?}", cond(&i, DEGRADED));
    assert_eq!(gone_metric(&op.metrics.encode()), Some("0"));

    // Gone again (a later exit 5 of a new worker), then the user points the Integration elsewhere.
    let later = k8s_openapi::jiff::Timestamp::now().to_string();
    let later = format!("{}Z", &later[..19]);
    worker_exits_gone(&cp, &later).await?;
    let i = until(&cp, "orders", "gone again", 30, |i| {
        cond(i, DEGRADED).1 == "DestinationGone"
    })
    .await?;
    assert_eq!(
        i.status
            .as_ref()
            .unwrap()
            .destination_gone
            .as_ref()
            .unwrap()
            .retry_annotation
            .as_deref(),
        Some("1")
    );
    wait_replicas(&cp, 0).await?;
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"spec": {"destination": {"url": "https://erp.example.com/v2/orders"}}}),
        ),
    )
    .await?;
    wait_replicas(&cp, 2).await?;
    let i = until(&cp, "orders", "cleared by the new URL", 30, |i| {
        cond(i, DEGRADED).1 != "DestinationGone"
            && i.status.as_ref().is_some_and(|s| s.destination_gone.is_none())
    })
    .await?;
    eprintln!("after the URL change: Degraded {:?}", cond(&i, DEGRADED));
    // Two transitions, two publications (kube's recorder folds a repeat of the same reason into the first
    // Event's series).
    let published: i32 = events(&cp, "orders", Some("DestinationGone"))
        .await?
        .iter()
        .map(|e| e.series.as_ref().map(|s| s.count).unwrap_or(1))
        .sum();
    assert_eq!(published, 2);
    drop(chans);
    op.task.abort();
    Ok(())
}
