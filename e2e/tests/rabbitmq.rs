//! The throwaway RabbitMQ node works for real: a published message is consumed and acked, and a node
//! restart keeps durable queues and persistent messages.

use std::time::Duration;

use futures::StreamExt;
use hookfleet_e2e::RabbitMq;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_is_consumed_and_acked_and_survives_a_restart() -> anyhow::Result<()> {
    hookfleet_e2e::init_tracing();
    let mut rmq = RabbitMq::start().await?;

    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("e2e.q".into(), durable, FieldTable::default())
        .await?;
    let persistent = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id("m-1".into());
    let confirm = ch
        .basic_publish(
            "".into(),
            "e2e.q".into(),
            BasicPublishOptions::default(),
            b"hello",
            persistent.clone(),
        )
        .await?
        .await?;
    assert!(
        confirm.is_ack(),
        "broker did not confirm the publish: {confirm:?}"
    );

    let mut consumer = ch
        .basic_consume(
            "e2e.q".into(),
            "t".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await?
        .expect("consumer stream ended")?;
    assert_eq!(&delivery.data[..], b"hello");
    assert_eq!(
        delivery.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("m-1")
    );
    delivery.ack(BasicAckOptions::default()).await?;

    // Acked means gone: a passive declare reports an empty queue (our consumer is still attached).
    let q = ch
        .queue_declare(
            "e2e.q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(q.message_count(), 0, "the acked message is still in the queue");
    assert_eq!(q.consumer_count(), 1);

    // A persistent message published before a restart is still there after it.
    ch.basic_publish(
        "".into(),
        "e2e.q".into(),
        BasicPublishOptions::default(),
        b"kept",
        persistent,
    )
    .await?
    .await?;
    conn.close(200, "bye".into()).await?;
    rmq.restart().await?;

    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            "e2e.q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(
        q.message_count(),
        1,
        "the persistent message did not survive the restart"
    );
    Ok(())
}

/// The 3-node cluster harness: the nodes join, a quorum queue has a member on each with its leader on the
/// node it was declared on; a kill -9 of the leader's node leaves no process of it behind and another
/// node takes over; started again, the node is back in the cluster and in the queue; on drop nothing is
/// left (processes, directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_survives_losing_its_leader() -> anyhow::Result<()> {
    hookfleet_e2e::init_tracing();
    let t0 = std::time::Instant::now();
    let mut cluster = hookfleet_e2e::RabbitCluster::start(3).await?;
    let started = t0.elapsed();
    let all: Vec<String> = {
        let mut v: Vec<String> = (0..3).map(|i| cluster.nodename(i).to_owned()).collect();
        v.sort();
        v
    };
    for i in 0..3 {
        assert_eq!(cluster.running_nodes(i)?, all, "as node {i} sees it");
    }
    // Declared through node 1: its leader is there (the default leader locator is client-local).
    let conn = Connection::connect(&cluster.amqp_uri(1), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("cluster.q".into(), durable, args).await?;
    let _ = conn.close(200, "declared".into()).await;
    let q = cluster.quorum_queue("cluster.q")?;
    assert_eq!(q.leader, cluster.nodename(1), "{q:?}");
    assert_eq!(q.members, all, "{q:?}");

    let beam = hookfleet_e2e::rabbitmq::vm_pids(cluster.nodename(1));
    assert_eq!(beam.len(), 1, "one VM for node 1: {beam:?}");
    cluster.kill_node(1)?;
    assert!(hookfleet_e2e::rabbitmq::vm_pids(cluster.nodename(1)).is_empty());
    let new_leader = hookfleet_e2e::process::wait_for(
        "a new leader",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let q = cluster.quorum_queue("cluster.q");
            let killed = cluster.nodename(1).to_owned();
            async move {
                let q = q?;
                Ok((!q.leader.is_empty() && q.leader != killed).then_some(q.leader))
            }
        },
    )
    .await?;

    cluster.restart_node(1).await?;
    for i in 0..3 {
        assert_eq!(
            cluster.running_nodes(i)?,
            all,
            "after the restart, as node {i} sees it"
        );
    }
    let q = hookfleet_e2e::process::wait_for(
        "the queue's members online",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let q = cluster.quorum_queue("cluster.q");
            let all = all.clone();
            async move {
                let q = q?;
                Ok((q.online == all).then_some(q))
            }
        },
    )
    .await?;
    eprintln!(
        "cluster: started in {started:?}; leader {} killed, new leader {new_leader}; restarted: {q:?}",
        cluster.nodename(1)
    );

    let dir = cluster.dir().to_owned();
    let names: Vec<String> = all.clone();
    drop(cluster);
    for name in &names {
        let left = hookfleet_e2e::rabbitmq::vm_pids(name);
        assert!(left.is_empty(), "{name} left behind: {left:?}");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}
