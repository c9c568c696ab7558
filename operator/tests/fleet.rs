//! Autoscaling from the broker backlog; leader election and failover; restart mid-reconcile.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hookfleet_crds::Integration;
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::wait_for;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;

async fn replicas(api: &Api<Deployment>, name: &str) -> anyhow::Result<Option<i32>> {
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|d| d.spec.and_then(|s| s.replicas)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_scales_up_at_most_doubling_and_down_after_the_window() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start_with_workloads().await?;
    cp.install_crds().await?;
    let rmq = hookfleet_testkit::RabbitMq::start().await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;
    let conn = connect(&rmq.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("jobs".into(), durable, FieldTable::default())
        .await?;
    for i in 0..50 {
        ch.basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await?;
    }
    let _op = spawn(cp.client(), config("solo"));
    create(
        &cp,
        serde_json::json!({"metadata": {"name": "jobs"}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "jobs"},
            "destination": {"url": "https://jobs.example.com/hooks"},
            "workers": {"autoscale": {"min": 1, "max": 6, "targetBacklogPerReplica": 10, "scaleDownStabilization": "4s"}}
        }}),
    )
    .await?;

    // Backlog 50, 10 per worker → 5 workers, reached by at most doubling per step.
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    let t0 = Instant::now();
    let mut seen: Vec<(Duration, i32)> = Vec::new();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Some(r) = replicas(&deployments, "jobs").await?
            && seen.last().map(|s| s.1) != Some(r)
        {
            seen.push((t0.elapsed(), r));
            if r == 5 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("scale-up steps: {seen:?}");
    let steps: Vec<i32> = seen.iter().map(|s| s.1).collect();
    assert_eq!(steps.last(), Some(&5), "{steps:?}");
    assert!(steps[0] <= 2, "first step from min 1 at most doubles: {steps:?}");
    for w in steps.windows(2) {
        assert!(w[1] <= w[0] * 2 && w[1] > w[0], "steps at most double: {steps:?}");
    }
    assert!(steps.len() >= 3, "several rate-limited steps: {steps:?}");
    // Status catches up with the Deployment (one reconcile later at most).
    until(&cp, "jobs", "backlog 50 and 5 replicas in status", 20, |i| {
        let st = i.status.clone().unwrap_or_default();
        st.backlog == Some(50) && st.replicas == Some(5)
    })
    .await?;

    // Drain → scale down to min, but only after the 4 s window.
    ch.queue_purge("jobs".into(), QueuePurgeOptions::default())
        .await?;
    let purged = Instant::now();
    let mut held_until = Duration::ZERO;
    loop {
        let r = replicas(&deployments, "jobs").await?;
        if r == Some(5) {
            held_until = purged.elapsed();
        }
        if r == Some(1) {
            break;
        }
        assert!(
            purged.elapsed() < Duration::from_secs(60),
            "no scale down within 60 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down_after = purged.elapsed();
    eprintln!("drained: held 5 for {held_until:?}, at 1 after {down_after:?}");
    assert!(
        down_after >= Duration::from_secs(4),
        "scaled down before the window: {down_after:?}"
    );
    assert!(held_until >= Duration::from_millis(3500), "held {held_until:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_failover_and_restart_mid_reconcile() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start_with_workloads().await?;
    cp.install_crds().await?;
    let rmq = hookfleet_testkit::RabbitMq::start().await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;

    let a = spawn(cp.client(), config("op-a"));
    let b = spawn(cp.client(), config("op-b"));
    let (leader, standby, standby_id) = wait_for(
        "one leader",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let (la, lb) = (a.leader(), b.leader());
            async move {
                assert!(!(la && lb), "two leaders at once");
                Ok((la || lb).then_some(()))
            }
        },
    )
    .await
    .map(|()| {
        if a.leader() {
            (a, b, "op-b")
        } else {
            (b, a, "op-a")
        }
    })?;

    create(
        &cp,
        serde_json::json!({"metadata": {"name": "ha"}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "ha"},
            "destination": {"url": "https://ha.example.com/hooks"}
        }}),
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    until(&cp, "ha", "status from the leader", 30, |i| i.status.is_some()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(leader.reconciles() > 0);
    assert_eq!(standby.reconciles(), 0, "the standby does not reconcile");
    assert!(!standby.leader());

    // Kill the leader (no lease release, as with kill -9): the standby takes over after the lease expires.
    leader.task.abort();
    let killed = Instant::now();
    wait_for(
        "standby takes over",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let l = standby.leader();
            async move { Ok(l.then_some(())) }
        },
    )
    .await?;
    eprintln!("failover after a crash: {:?}", killed.elapsed());
    let integrations: Api<Integration> = Api::namespaced(cp.client(), NS);
    integrations
        .patch(
            "ha",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"workers": {"replicas": 3}}})),
        )
        .await?;
    wait_for(
        "new leader applies",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let api = deployments.clone();
            async move { Ok((replicas(&api, "ha").await? == Some(3)).then_some(())) }
        },
    )
    .await?;

    // Restart mid-reconcile: kill the leader just after a create, start it again.
    create(
        &cp,
        serde_json::json!({"metadata": {"name": "second"}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "second"},
            "destination": {"url": "https://second.example.com/hooks"},
            "workers": {"replicas": 2}
        }}),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(40)).await;
    standby.task.abort();
    let restarted = spawn(cp.client(), config(standby_id));
    let t = Instant::now();
    let i = until(&cp, "second", "converged after restart", 60, |i| {
        let st = i.status.clone().unwrap_or_default();
        st.observed_generation == i.metadata.generation && st.ready_replicas == Some(2)
    })
    .await?;
    eprintln!("restart mid-reconcile → converged in {:?}", t.elapsed());
    assert!(restarted.leader());
    assert_eq!(i.status.unwrap().replicas, Some(2));
    // No duplicates, no orphans.
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=hookfleet-operator");
    let names = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v
    };
    let ds = deployments
        .list(&managed)
        .await?
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names(ds), ["ha", "second"]);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(cp.client(), NS);
    let ps = pdbs
        .list(&managed)
        .await?
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names(ps), ["ha", "second"]);
    let svcs: Api<Service> = Api::namespaced(cp.client(), NS);
    let ss = svcs
        .list(&managed)
        .await?
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names(ss), ["ha-metrics", "second-metrics"]);
    let rs: Api<ReplicaSet> = Api::namespaced(cp.client(), NS);
    let second_rs = rs
        .list(&ListParams::default().labels("hookfleet.io/integration=second"))
        .await?
        .items
        .len();
    assert_eq!(
        second_rs, 1,
        "one ReplicaSet: the pod template did not change across the restart"
    );
    assert_eq!(replicas(&deployments, "ha").await?, Some(3));
    restarted.task.abort();
    Ok(())
}
