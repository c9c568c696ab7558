//! Create → children and Ready; steady state makes zero writes; one missing consumer → Degraded; update →
//! the Deployment follows; missing Secret / refused login → condition, fixed → Ready; delete → GC.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hookfleet_crds::Integration;
use hookfleet_crds::integration::condition::{DEGRADED, READY};
use hookfleet_testkit::process::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

fn args(d: &Deployment) -> Vec<String> {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap()
}

fn rv<K: Resource>(o: &K) -> String {
    o.meta().resource_version.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_status_and_zero_write_steady_state() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let Stack { cp, rmq, conn, op } = stack(&[]).await?;

    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(cp.client(), NS);
    let services: Api<Service> = Api::namespaced(cp.client(), NS);
    let integrations: Api<Integration> = Api::namespaced(cp.client(), NS);

    // Create → children with the expected fields, owned by the Integration.
    let t0 = Instant::now();
    let intg = create_orders(&cp, "https://erp.example.com/hooks", 2).await?;
    let uid = intg.metadata.uid.clone().unwrap();
    let d = wait_exists(&deployments, "orders").await?;
    // The children are applied one after the other: wait for each, not just the first.
    let pdb = wait_exists(&pdbs, "orders").await?;
    let svc = wait_exists(&services, "orders-metrics").await?;
    for owners in [
        d.metadata.owner_references.clone(),
        pdb.metadata.owner_references.clone(),
        svc.metadata.owner_references.clone(),
    ] {
        let o = &owners.unwrap()[0];
        assert_eq!(
            (o.kind.as_str(), o.uid.as_str(), o.controller),
            ("Integration", uid.as_str(), Some(true))
        );
    }
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let a = args(&d);
    assert!(a.windows(2).any(|w| w == ["--queue", "orders"]), "{a:?}");
    let env = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap();
    let uri_env = env.iter().find(|e| e.name == "HOOKFLEET_AMQP_URI").unwrap();
    assert!(uri_env.value.is_none());
    assert_eq!(
        uri_env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "rabbitmq"
    );
    assert!(
        !serde_json::to_string(&d)?.contains("guest:guest"),
        "no secret value in the pod spec"
    );
    assert_eq!(
        pdb.spec.unwrap().min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    // Pods Ready (kwok) but nobody consumes → Degraded with the counts; one fewer consumer → still.
    let i = match until(&cp, "orders", "Degraded: 2 ready, 0 consumers", 90, |i| {
        cond(i, DEGRADED)
            .2
            .contains("2 worker pods are Ready but only 0 consumers")
    })
    .await
    {
        Ok(i) => i,
        Err(e) => {
            let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
            for p in pods.list(&ListParams::default()).await?.items {
                eprintln!(
                    "POD {:?} node={:?} status={}",
                    p.metadata.name,
                    p.spec.and_then(|s| s.node_name),
                    serde_json::to_string(&p.status)?
                );
            }
            let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cp.client());
            for n in nodes.list(&ListParams::default()).await?.items {
                eprintln!(
                    "NODE {:?} taints={:?} conds={}",
                    n.metadata.name,
                    n.spec.and_then(|s| s.taints),
                    serde_json::to_string(&n.status.and_then(|s| s.conditions))?
                );
            }
            return Err(e);
        }
    };
    assert_eq!(cond(&i, READY).1, "NotConsuming");
    let mut chans = consumers(&conn, "orders", 1).await?;
    let i = until(&cp, "orders", "Degraded: 2 ready, 1 consumer", 30, |i| {
        cond(i, DEGRADED)
            .2
            .contains("2 worker pods are Ready but only 1 consumers")
    })
    .await?;
    assert_eq!(cond(&i, DEGRADED).1, "NotConsuming");
    // /metrics shows what HookfleetConsumersBelowReadyWorkers compares (charts/hookfleet): 1 consumer < 2 ready.
    let metrics = http_get(op.http, "/metrics").await?;
    for series in [
        r#"hookfleet_operator_integration_ready_workers{integration="default/orders"} 2"#,
        r#"hookfleet_operator_integration_consumers{integration="default/orders"} 1"#,
        r#"hookfleet_operator_integration_condition{integration="default/orders",type="Degraded",status="True",reason="NotConsuming"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} missing in:\n{metrics}");
    }
    let degraded_since = i.condition(DEGRADED).unwrap().last_transition_time.clone();
    chans.extend(consumers(&conn, "orders", 1).await?);
    let i = until(&cp, "orders", "Ready", 30, |i| cond(i, READY).0 == "True").await?;
    let ready_after = t0.elapsed();
    let st = i.status.clone().unwrap();
    assert_eq!(
        (st.replicas, st.ready_replicas, st.consumers, st.backlog),
        (Some(2), Some(2), Some(2), Some(0))
    );
    assert_eq!(cond(&i, READY).1, "Consuming");
    assert_eq!(cond(&i, DEGRADED).0, "False");
    assert_ne!(
        i.condition(DEGRADED).unwrap().last_transition_time,
        degraded_since,
        "Degraded flipped"
    );
    assert_eq!(st.observed_generation, i.metadata.generation);
    let metrics = http_get(op.http, "/metrics").await?;
    assert!(
        metrics.contains(r#"hookfleet_operator_integration_consumers{integration="default/orders"} 2"#)
            && metrics.contains(
                r#"hookfleet_operator_integration_condition{integration="default/orders",type="Degraded",status="False",reason="AsExpected"} 1"#
            )
            && !metrics.contains(r#"reason="NotConsuming""#),
        "metrics do not follow the recovery:\n{metrics}"
    );
    eprintln!("create → Ready (pods ready, consumers attached) in {ready_after:?}");

    // Steady state: several reconciles, zero writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (
        rv(&integrations.get("orders").await?),
        rv(&deployments.get("orders").await?),
        rv(&pdbs.get("orders").await?),
        rv(&services.get("orders-metrics").await?),
    );
    let (w0, r0) = (op.metrics.total_writes(), op.reconciles());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = (
        rv(&integrations.get("orders").await?),
        rv(&deployments.get("orders").await?),
        rv(&pdbs.get("orders").await?),
        rv(&services.get("orders-metrics").await?),
    );
    let (w1, r1) = (op.metrics.total_writes(), op.reconciles());
    eprintln!("steady state: {} reconciles, {} writes", r1 - r0, w1 - w0);
    assert!(r1 - r0 >= 3, "expected periodic reconciles, got {}", r1 - r0);
    assert_eq!(before, after, "no object changed in a steady state");
    assert_eq!(w1, w0, "no writes in a steady state");
    assert!(op.metrics.applies_skipped.get() > 0);

    // Update replicas and fd limit → Deployment follows; observedGeneration catches up.
    let t1 = Instant::now();
    integrations
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"workers": {"replicas": 3, "fileDescriptorLimit": 65536}}}),
            ),
        )
        .await?;
    let d = wait_for(
        "Deployment follows",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let api = deployments.clone();
            async move {
                let d = api.get("orders").await?;
                let ok = d.spec.as_ref().unwrap().replicas == Some(3)
                    && args(&d).windows(2).any(|w| w == ["--fd-limit", "65536"]);
                Ok(ok.then_some(d))
            }
        },
    )
    .await?;
    eprintln!("spec update → Deployment in {:?}", t1.elapsed());
    assert_eq!(d.spec.unwrap().replicas, Some(3));
    chans.extend(consumers(&conn, "orders", 1).await?);
    let i = until(&cp, "orders", "Ready at generation 2 with 3 workers", 90, |i| {
        let st = i.status.clone().unwrap_or_default();
        cond(i, READY).0 == "True"
            && st.observed_generation == i.metadata.generation
            && st.ready_replicas == Some(3)
    })
    .await?;
    assert_eq!(i.metadata.generation, Some(2));
    eprintln!("spec update → Ready again in {:?}", t1.elapsed());

    // Missing Secret → condition naming it; wrong password → login refused; fixed → Ready.
    let mut pay = consumers(&conn, "payments", 2).await?;
    create(
        &cp,
        serde_json::json!({"metadata": {"name": "payments"}, "spec": {
            "source": {"connectionSecretRef": {"name": "payments-broker", "key": "uri"}, "queue": "payments"},
            "destination": {"url": "https://pay.example.com/hooks"}
        }}),
    )
    .await?;
    let i = until(&cp, "payments", "SecretNotFound", 30, |i| {
        cond(i, READY).1 == "SecretNotFound"
    })
    .await?;
    assert!(
        cond(&i, READY).2.contains("\"payments-broker\""),
        "{}",
        cond(&i, READY).2
    );
    assert_eq!(cond(&i, DEGRADED).1, cond(&i, READY).1);
    assert_eq!(cond(&i, DEGRADED).0, "True");
    assert!(
        deployments.get_opt("payments").await?.is_some(),
        "children are applied regardless"
    );
    let bad = rmq.amqp_uri().replace("guest:guest", "guest:wrong");
    secret(&cp, "payments-broker", &bad).await?;
    let i = until(&cp, "payments", "BrokerAuthFailed", 30, |i| {
        cond(i, READY).1 == "BrokerAuthFailed"
    })
    .await?;
    assert!(
        !cond(&i, READY).2.contains("wrong"),
        "the password never shows: {}",
        cond(&i, READY).2
    );
    let t2 = Instant::now();
    secret(&cp, "payments-broker", &rmq.amqp_uri()).await?;
    until(&cp, "payments", "payments Ready", 60, |i| {
        cond(i, READY).0 == "True"
    })
    .await?;
    eprintln!("Secret fixed → Ready in {:?}", t2.elapsed());
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cp.client(), NS);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("payments"))
        .filter_map(|e| e.reason)
        .collect();
    for r in ["SecretNotFound", "BrokerAuthFailed", "Recovered", "Consuming"] {
        assert_eq!(
            reasons.iter().filter(|x| *x == r).count(),
            1,
            "one {r} Event: {reasons:?}"
        );
    }
    pay.clear();

    // Operator endpoints.
    let m = http_get(op.http, "/metrics").await?;
    assert!(m.contains("hookfleet_operator_reconciles_total"), "{m}");
    assert!(m.contains("hookfleet_operator_leader 1"), "{m}");
    for path in ["/readyz", "/healthz"] {
        let r = http_get(op.http, path).await?;
        assert!(r.lines().next().unwrap_or("").contains(" 200 "), "{path}: {r}");
    }

    // Delete → children garbage-collected.
    integrations.delete("orders", &DeleteParams::foreground()).await?;
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    wait_for(
        "children GC'd",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let (d, p, s, pods) = (deployments.clone(), pdbs.clone(), services.clone(), pods.clone());
            async move {
                let gone = d.get_opt("orders").await?.is_none()
                    && p.get_opt("orders").await?.is_none()
                    && s.get_opt("orders-metrics").await?.is_none()
                    && pods
                        .list(&ListParams::default().labels("hookfleet.io/integration=orders"))
                        .await?
                        .items
                        .is_empty();
                Ok(gone.then_some(()))
            }
        },
    )
    .await?;
    assert!(!op.task.is_finished(), "the operator is still running");
    drop(chans);
    op.task.abort();
    Ok(())
}
