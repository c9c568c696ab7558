//! `spec.source.deletionPolicy` on the real API server and the real RabbitMQ (test consumers stand in for
//! workers still consuming), with the queue deletion timeout shortened to 20 s:
//!
//! - `Delete`: the finalizer is added; on deletion a queue with a consumer is not deleted (`QueuesDeleted`
//!   False `QueuesInUse`), and once it has none every queue the workers declare goes — the work queue, the
//!   dead-letter queue, the retry-ready queue, each delay queue of the ladder — and nothing else (an
//!   unrelated queue and a legacy `<queue>.retry.<ms>ms` queue stay); an Event counts the messages deleted
//!   with each queue; the Integration is gone.
//! - A dead-letter queue another Integration also declares is kept, with a `QueueShared` Warning.
//! - `Retain` (the default): no finalizer, the queue stays.
//! - `Delete` → `Retain`: the finalizer is removed; the Integration is deleted at once, its queue kept.
//! - The broker unreachable (the Secret names a closed port): `QueuesDeleted` False `BrokerUnreachable`,
//!   the Integration still there before the timeout, gone after it with a `QueuesLeftBehind` Warning naming
//!   the queues.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hookfleet_crds::Integration;
use hookfleet_crds::integration::condition::QUEUES_DELETED;
use hookfleet_crds::integration::finalizer;
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::{free_port, wait_for};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

const TIMEOUT: Duration = Duration::from_secs(20);

/// The queues the workers of an Integration on `queue` with `backoff.max: 200ms` declare: the ladder is
/// 100, 119, 141, 168 and 200 ms (`contract::queues::delay_ttls`), spelled out here on purpose.
fn topology(queue: &str, dead_letter: &str) -> Vec<String> {
    let mut v = vec![
        queue.to_owned(),
        dead_letter.to_owned(),
        format!("{queue}.retries"),
    ];
    for ms in [100, 119, 141, 168, 200] {
        v.push(format!("{queue}.delay.{ms}ms"));
    }
    v
}

fn integration(name: &str, queue: &str, secret: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({"metadata": {"name": name}, "spec": {
        "source": {"connectionSecretRef": {"name": secret, "key": "uri"}, "queue": queue},
        "destination": {"url": "https://erp.example.com/hooks"},
        "delivery": {"backoff": {"initial": "100ms", "max": "200ms"}},
        "workers": {"replicas": 2},
    }});
    hookfleet_testkit::merge_json(&mut body, extra);
    body
}

async fn declare(conn: &Connection, queue: &str) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, FieldTable::default())
        .await?;
    ch.close(200, "".into()).await?;
    Ok(())
}

/// Whether `queue` exists: a passive declare on a connection of its own (a 404 closes the channel, and a
/// closed channel's handle must not outlive its connection, see the operator's `broker`).
async fn exists(uri: &str, queue: &str) -> anyhow::Result<bool> {
    let conn = connect(uri).await?;
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    conn.close(200, "".into()).await?;
    Ok(found)
}

async fn publish(conn: &Connection, queue: &str, n: usize) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let batch: Vec<(String, String)> = (0..n)
        .map(|i| (format!("{queue}-{i}"), "{}".to_owned()))
        .collect();
    hookfleet_testkit::messages::publish_batch(&ch, queue, &batch).await?;
    Ok(())
}

async fn has_finalizer(api: &Api<Integration>, name: &str) -> anyhow::Result<bool> {
    Ok(api
        .get(name)
        .await?
        .finalizers()
        .iter()
        .any(|f| f == finalizer::QUEUES))
}

async fn until_finalizer(api: &Api<Integration>, name: &str, want: bool) -> anyhow::Result<()> {
    wait_for(
        &format!("{name}: finalizer present {want}"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move { Ok((has_finalizer(api, name).await? == want).then_some(())) },
    )
    .await
}

async fn until_gone(api: &Api<Integration>, name: &str, secs: u64) -> anyhow::Result<()> {
    wait_for(
        &format!("{name} deleted"),
        Duration::from_secs(secs),
        Duration::from_millis(100),
        || async move { Ok(api.get_opt(name).await?.is_none().then_some(())) },
    )
    .await
}

/// The notes of the Events about `name` with `reason`.
async fn notes(cp: &ControlPlane, name: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    Ok(events(cp, name, Some(reason))
        .await?
        .into_iter()
        .map(|e| format!("{} {}", e.type_.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_policy_deletes_or_keeps_the_queues_and_never_blocks_for_ever() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start_with_workloads().await?;
    cp.install_crds().await?;
    let rmq = hookfleet_testkit::RabbitMq::start().await?;
    let uri = rmq.amqp_uri();
    let conn = connect(&uri).await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()?);
    secret(&cp, "closed", &closed).await?;
    let mut config = config("solo");
    config.queue_deletion_timeout = TIMEOUT;
    let op = spawn(cp.client(), config);
    let api: Api<Integration> = Api::namespaced(cp.client(), NS);
    let policy = |p: &str| serde_json::json!({"spec": {"source": {"deletionPolicy": p}}});

    // The broker unreachable: deleted first, checked last (its timeout runs meanwhile).
    create(&cp, integration("lost", "lost", "closed", policy("Delete"))).await?;
    until_finalizer(&api, "lost", true).await?;
    api.delete("lost", &DeleteParams::default()).await?;
    let lost_deleted = Instant::now();

    // Retain, the default: no finalizer; deleted at once, its queue kept.
    let kept = create(
        &cp,
        integration("kept", "kept", "rabbitmq", serde_json::json!({})),
    )
    .await?;
    assert_eq!(
        serde_json::to_value(&kept.spec.source)?["deletionPolicy"],
        "Retain"
    );
    declare(&conn, "kept").await?;
    until(&cp, "kept", "reconciled", 30, |i| {
        i.status.as_ref().is_some_and(|s| s.observed_generation.is_some())
    })
    .await?;
    assert!(!has_finalizer(&api, "kept").await?);
    api.delete("kept", &DeleteParams::default()).await?;
    until_gone(&api, "kept", 10).await?;
    assert!(exists(&uri, "kept").await?, "Retain keeps the queue");

    // Delete → Retain: the finalizer goes; deleted at once, its queue kept.
    create(&cp, integration("switch", "switch", "rabbitmq", policy("Delete"))).await?;
    until_finalizer(&api, "switch", true).await?;
    declare(&conn, "switch").await?;
    api.patch("switch", &PatchParams::default(), &Patch::Merge(policy("Retain")))
        .await?;
    until_finalizer(&api, "switch", false).await?;
    api.delete("switch", &DeleteParams::default()).await?;
    until_gone(&api, "switch", 10).await?;
    assert!(exists(&uri, "switch").await?, "Retain keeps the queue");

    // Delete: two Integrations share a dead-letter queue; `orders` is deleted.
    let shared_dlq = serde_json::json!({"spec": {"delivery": {"deadLetter": {"queue": "common.dead"}}}});
    let mut orders_extra = policy("Delete");
    hookfleet_testkit::merge_json(&mut orders_extra, shared_dlq.clone());
    create(&cp, integration("orders", "orders", "rabbitmq", orders_extra)).await?;
    create(&cp, integration("refunds", "refunds", "rabbitmq", shared_dlq)).await?;
    until_finalizer(&api, "orders", true).await?;
    let orders = topology("orders", "common.dead");
    let others = ["orders.unrelated", "orders.retry.100ms", "refunds"].map(String::from);
    for q in orders.iter().chain(others.iter()) {
        declare(&conn, q).await?;
    }
    publish(&conn, "orders", 5).await?;
    publish(&conn, "orders.delay.200ms", 2).await?;
    // A consumer still attached (a worker that did not stop): that queue is not deleted under it.
    let consumer = consumers(&conn, "orders.retries", 1).await?;
    api.delete("orders", &DeleteParams::default()).await?;
    let i = until(&cp, "orders", "QueuesDeleted False QueuesInUse", 30, |i| {
        cond(i, QUEUES_DELETED).1 == "QueuesInUse"
    })
    .await?;
    let (status, reason, message) = cond(&i, QUEUES_DELETED);
    eprintln!("orders: QueuesDeleted {status} {reason}: {message}");
    assert_eq!(status, "False");
    assert!(message.contains("orders.retries (1 consumers)"), "{message}");
    assert!(i.metadata.deletion_timestamp.is_some());
    assert!(exists(&uri, "orders.retries").await?);
    drop(consumer);
    until_gone(&api, "orders", 30).await?;
    for q in &orders {
        if q == "common.dead" {
            continue;
        }
        assert!(!exists(&uri, q).await?, "{q} deleted");
    }
    for q in ["common.dead", "orders.unrelated", "orders.retry.100ms", "refunds"] {
        assert!(exists(&uri, q).await?, "{q} kept");
    }
    let deleted = notes(&cp, "orders", "QueuesDeleted").await?;
    eprintln!("orders: QueuesDeleted Events: {deleted:?}");
    assert!(
        deleted.iter().any(|n| n.starts_with("Normal ")
            && n.contains(
                "deleted 7 queues with 7 messages in them: orders (5), orders.delay.200ms (2); 5 queues empty"
            )),
        "{deleted:?}"
    );
    let shared = notes(&cp, "orders", "QueueShared").await?;
    eprintln!("orders: QueueShared Events: {shared:?}");
    assert!(
        shared.iter().any(|n| n.starts_with("Warning ")
            && n.contains("common.dead (also declared by Integration default/refunds)")),
        "{shared:?}"
    );
    assert!(notes(&cp, "orders", "QueuesLeftBehind").await?.is_empty());

    // The broker unreachable: a condition, still there before the timeout, gone after it with a Warning.
    let i = until(&cp, "lost", "QueuesDeleted False BrokerUnreachable", 30, |i| {
        cond(i, QUEUES_DELETED).1 == "BrokerUnreachable"
    })
    .await?;
    let (status, _, message) = cond(&i, QUEUES_DELETED);
    eprintln!("lost: QueuesDeleted {status} BrokerUnreachable: {message}");
    assert_eq!(status, "False");
    assert!(message.contains("is removed regardless"), "{message}");
    assert!(!message.contains("guest:guest"), "no credentials: {message}");
    let warned = notes(&cp, "lost", "BrokerUnreachable").await?;
    assert!(warned.iter().any(|n| n.starts_with("Warning ")), "{warned:?}");
    let before = lost_deleted.elapsed();
    if before < TIMEOUT - Duration::from_secs(3) {
        assert!(
            api.get_opt("lost").await?.is_some(),
            "still there before the timeout"
        );
    }
    until_gone(&api, "lost", TIMEOUT.as_secs() + 30).await?;
    let took = lost_deleted.elapsed();
    eprintln!("lost: gone {took:?} after its deletion (timeout {TIMEOUT:?})");
    assert!(
        took >= TIMEOUT - Duration::from_secs(2),
        "not before the timeout: {took:?}"
    );
    let left = notes(&cp, "lost", "QueuesLeftBehind").await?;
    eprintln!("lost: QueuesLeftBehind Events: {left:?}");
    assert!(
        left.iter()
            .any(|n| n.starts_with("Warning ")
                && n.contains("lost, lost.dead, lost.retries, lost.delay.100ms")),
        "{left:?}"
    );
    op.task.abort();
    Ok(())
}
