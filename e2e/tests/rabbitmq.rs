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
