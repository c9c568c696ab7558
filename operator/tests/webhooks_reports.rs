//! A fleet's report consumer against a real RabbitMQ node: it declares the reports queue as the workers do,
//! folds what is published to it, comes back by itself after the broker restarts, and leaves the queue when
//! stopped.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::connect;
use hookfleet_crds::contract::webhooks::{Report, Tally, reports_queue};
use hookfleet_operator::fleets::{Fleets, reports_queue_args};
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::wait_for;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

async fn publish(uri: &str, queue: &str, delivered: u64) -> anyhow::Result<()> {
    let conn = connect(uri).await?;
    let ch = conn.create_channel().await?;
    let report = Report {
        worker: "w1".into(),
        at_ms: 1,
        webhooks: BTreeMap::from([(
            "acme".into(),
            Tally {
                delivered,
                ..Tally::default()
            },
        )]),
    };
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&report)?,
        BasicProperties::default(),
    )
    .await?
    .await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}

async fn consumers(uri: &str, queue: &str) -> anyhow::Result<u32> {
    let conn = connect(uri).await?;
    let ch = conn.create_channel().await?;
    // Declared with the workers' arguments: a mismatch would close the channel with an error.
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            reports_queue_args(),
        )
        .await?;
    conn.close(200, "done".into()).await?;
    Ok(q.consumer_count())
}

async fn delivered(fleets: &Fleets, at_least: u64) -> anyhow::Result<()> {
    wait_for(
        "the report folded",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move {
            let d = fleets.aggregate("ns/fleet", "acme").map_or(0, |a| a.delivered);
            Ok((d >= at_least).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_consumer_folds_reconnects_and_stops() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let mut rmq = RabbitMq::start().await?;
    let uri = rmq.amqp_uri();
    let queue = reports_queue("fleet");
    let fleets = Fleets::default();
    fleets.consume("ns/fleet", &uri, &queue);
    let (u, q) = (&uri, &queue);
    wait_for(
        "the consumer",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move { Ok((consumers(u, q).await? == 1).then_some(())) },
    )
    .await?;
    publish(&uri, &queue, 3).await?;
    delivered(&fleets, 3).await?;
    // The same broker and queue again: the consumer is kept, not started twice.
    fleets.consume("ns/fleet", &uri, &queue);
    assert_eq!(consumers(&uri, &queue).await?, 1);

    rmq.restart().await?;
    wait_for(
        "the consumer back",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async move { Ok(consumers(u, q).await.ok().filter(|n| *n == 1).map(|_| ())) },
    )
    .await?;
    publish(&uri, &queue, 4).await?;
    delivered(&fleets, 7).await?;

    fleets.stop("ns/fleet");
    wait_for(
        "the consumer gone",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move { Ok((consumers(u, q).await? == 0).then_some(())) },
    )
    .await?;
    assert!(fleets.aggregate("ns/fleet", "acme").is_none(), "forgotten");
    // A queue declared by a worker with other arguments is consumed as it is.
    let conn = connect(&uri).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        "other.webhook-reports".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    conn.close(200, "done".into()).await?;
    fleets.consume("ns/other", &uri, "other.webhook-reports");
    wait_for(
        "the consumer on a queue of other arguments",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let conn = connect(u).await?;
            let ch = conn.create_channel().await?;
            let q = ch
                .queue_declare(
                    "other.webhook-reports".into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            conn.close(200, "done".into()).await?;
            Ok((q.consumer_count() == 1).then_some(()))
        },
    )
    .await?;
    fleets.close();
    Ok(())
}
