//! `spec.suspend` on the real API server (kwok runs the pods; test consumers stand in for the workers on the
//! real RabbitMQ): the worker Deployment goes to 0 and its PodDisruptionBudget to `minAvailable: 0`, the
//! messages published meanwhile wait in the queue and the status counts them, conditions `Suspended`
//! True / Ready False `Suspended` / Degraded False, one Normal Event each way and no `NotReady` Warning,
//! `hookfleet_operator_integration_suspended` 1 then 0. The scale subresource (`kubectl scale`) changes
//! `spec.workers.replicas` without fighting the suspend: the fleet comes back at that count on unsuspend. A
//! suspend with a spec the workers would refuse still stops the fleet (through the Deployment's scale).

mod common;

use std::time::Duration;

use common::*;
use hookfleet_crds::Integration;
use hookfleet_crds::integration::condition::{DEGRADED, READY, SUSPENDED};
use hookfleet_testkit::ControlPlane;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};

async fn min_available(cp: &ControlPlane) -> anyhow::Result<Option<IntOrString>> {
    let api: Api<PodDisruptionBudget> = Api::namespaced(cp.client(), NS);
    Ok(api.get("orders").await?.spec.and_then(|s| s.min_available))
}

fn suspended_metric(text: &str) -> Option<&str> {
    text.lines()
        .find(|l| l.starts_with(r#"hookfleet_operator_integration_suspended{integration="default/orders"}"#))
        .and_then(|l| l.rsplit(' ').next())
}

async fn set_suspend(api: &Api<Integration>, suspend: bool) -> anyhow::Result<()> {
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"suspend": suspend}})),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_scales_to_zero_keeps_the_messages_and_comes_back() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let Stack {
        cp,
        rmq: _rmq,
        conn,
        op,
    } = stack(&[]).await?;
    create_orders(&cp, "https://erp.example.com/hooks/orders", 2).await?;
    let api: Api<Integration> = Api::namespaced(cp.client(), NS);
    assert!(!api.get("orders").await?.spec.suspend, "defaults to false");
    let chans = consumers(&conn, "orders", 2).await?;
    until(&cp, "orders", "Ready", 90, |i| cond(i, READY).0 == "True").await?;
    assert_eq!(suspended_metric(&op.metrics.encode()), Some("0"));
    assert_eq!(min_available(&cp).await?, Some(IntOrString::Int(1)));

    // Suspend: the Deployment goes to 0, its budget asks for none.
    set_suspend(&api, true).await?;
    wait_replicas(&cp, 0).await?;
    assert_eq!(min_available(&cp).await?, Some(IntOrString::Int(0)));
    // The workers stop consuming (here: the test's consumers go away); messages published now wait.
    drop(chans);
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let batch: Vec<(String, String)> = (0..7).map(|i| (format!("m{i}"), "{}".to_owned())).collect();
    hookfleet_testkit::messages::publish_batch(&ch, "orders", &batch).await?;
    let i = until(&cp, "orders", "Suspended with a backlog of 7", 30, |i| {
        cond(i, SUSPENDED).0 == "True"
            && i.status
                .as_ref()
                .is_some_and(|s| s.backlog == Some(7) && s.consumers == Some(0))
    })
    .await?;
    let (status, reason, message) = cond(&i, SUSPENDED);
    eprintln!("Suspended {status} {reason}: {message}");
    assert_eq!(reason, "SuspendedBySpec");
    assert!(
        message.contains("messages wait in queue orders (backlog 7)"),
        "{message}"
    );
    assert_eq!(cond(&i, READY).0, "False");
    assert_eq!(cond(&i, READY).1, "Suspended");
    assert_eq!(cond(&i, DEGRADED).0, "False", "{:?}", cond(&i, DEGRADED));
    assert_eq!(i.status.as_ref().unwrap().replicas, Some(0));
    assert_eq!(suspended_metric(&op.metrics.encode()), Some("1"));

    // `kubectl scale` while suspended: the spec changes, the Deployment stays at 0 across reconciles.
    let r0 = op.reconciles();
    api.patch_scale(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(op.reconciles() >= r0 + 2, "reconciled meanwhile");
    let i = api.get("orders").await?;
    assert_eq!(i.spec.workers.replicas, Some(3));
    assert_eq!(replicas(&cp).await?, Some(0));
    let scale = api.get_scale("orders").await?;
    assert_eq!(
        scale.status.map(|s| s.replicas),
        Some(0),
        "the scale says what runs"
    );
    assert_eq!(cond(&i, SUSPENDED).0, "True");
    // One Normal Event, no NotReady Warning for a fleet stopped on purpose.
    let evs = events(&cp, "orders", Some("Suspended")).await?;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].type_.as_deref(), Some("Normal"));
    assert!(events(&cp, "orders", Some("NotReady")).await?.is_empty());

    // Unsuspend: back at the scaled count, the messages delivered by the workers that return.
    set_suspend(&api, false).await?;
    wait_replicas(&cp, 3).await?;
    assert_eq!(min_available(&cp).await?, Some(IntOrString::Int(2)));
    let chans = consumers(&conn, "orders", 3).await?;
    let i = until(&cp, "orders", "Ready again", 90, |i| {
        cond(i, READY).0 == "True" && i.condition(SUSPENDED).is_none()
    })
    .await?;
    eprintln!("after unsuspend: Ready {:?}", cond(&i, READY));
    assert_eq!(suspended_metric(&op.metrics.encode()), Some("0"));
    let evs = events(&cp, "orders", Some("Unsuspended")).await?;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].type_.as_deref(), Some("Normal"));

    // A suspend with a spec the workers would refuse (a template that does not parse): the spec is not
    // rolled out, but the running Deployment is scaled to 0 all the same, and Degraded says both.
    let broken = serde_json::json!({"spec": {"suspend": true,
        "destination": {"body": {"template": "{{ data | tojson "}}}});
    api.patch("orders", &PatchParams::default(), &Patch::Merge(broken))
        .await?;
    wait_replicas(&cp, 0).await?;
    let i = until(&cp, "orders", "Suspended with an invalid spec", 30, |i| {
        cond(i, SUSPENDED).0 == "True" && cond(i, DEGRADED).1 == "InvalidSpec"
    })
    .await?;
    let (_, _, message) = cond(&i, DEGRADED);
    eprintln!("suspended, invalid spec: Degraded InvalidSpec: {message}");
    assert!(message.contains("the workers are scaled to 0"), "{message}");
    assert_eq!(cond(&i, READY).1, "Suspended");
    assert_eq!(suspended_metric(&op.metrics.encode()), Some("1"));
    // Fixed and unsuspended: the spec's own count again.
    let fixed = serde_json::json!({"spec": {"suspend": false, "destination": {"body": null}}});
    api.patch("orders", &PatchParams::default(), &Patch::Merge(fixed))
        .await?;
    wait_replicas(&cp, 3).await?;
    drop(chans);
    op.task.abort();
    Ok(())
}
