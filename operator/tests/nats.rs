//! The operator's JetStream probe (`source.nats`) against a real nats-server: what stands in for "consumers
//! attached" when JetStream counts none. Idle: the pull requests waiting, one per live puller. Busy: unknown.
//! A backlog nobody pulls: stalled, 0. And the problems: a missing consumer, a missing stream, servers that
//! do not answer (never showing the URL's password).
//!
//! Also a Webhooks fleet's report consumer on a NATS source: it folds the reports published to the fleet's
//! JetStream reports stream, acks them (work-queue retention: the stream empties), and stops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use hookfleet_crds::contract::webhooks::nats::{REPORTS_CONSUMER, reports_stream, reports_subject};
use hookfleet_crds::contract::webhooks::{Report, Tally};
use hookfleet_operator::fleets::{Fleets, ReportsFrom, nats_reports_stream_config};
use hookfleet_operator::nats::{Nats, Question};
use hookfleet_operator::status::{SourceObs, reason};
use hookfleet_testkit::NatsServer;
use hookfleet_testkit::process::wait_for;

fn question(urls: &str, stream: &str, consumer: &str) -> Question {
    Question {
        urls: urls.into(),
        credentials: None,
        token: None,
        stream: stream.into(),
        consumer: consumer.into(),
        worker_holds: 16,
    }
}

/// A puller as a worker is one: its own connection, one pull request of `batch` open at a time.
async fn puller(url: &str, batch: usize) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let consumer: jetstream::consumer::PullConsumer = js.get_consumer_from_stream("hooks", "ORDERS").await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut msgs) = consumer
                .batch()
                .max_messages(batch)
                .expires(Duration::from_secs(5))
                .messages()
                .await
            else {
                return;
            };
            while let Some(m) = msgs.next().await {
                if let Ok(m) = m {
                    let _ = m.double_ack().await;
                }
            }
        }
    }))
}

/// Probes until `want` holds (the server's view of a new pull request takes a round trip), at most 10 s.
async fn until(nats: &Nats, q: &Question, want: impl Fn(&SourceObs) -> bool) -> SourceObs {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let obs = nats.observe(q).await;
        if want(&obs) || Instant::now() > deadline {
            return obs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_consumer_is_observed_as_the_status_needs_it() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let url = server.url(0);
    let nats = Nats::with_stalled_after(Duration::from_secs(2));
    let q = question(&url, "ORDERS", "hooks");

    // No stream: the workers cannot create it, so it is the team's to fix.
    match nats.observe(&q).await {
        SourceObs::Problem { reason: r, message } => {
            assert_eq!(r, reason::QUEUES_MISSING, "{message}");
            assert!(message.contains("stream ORDERS does not exist"), "{message}");
        }
        other => panic!("a missing stream: {other:?}"),
    }
    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client);
    let stream = js
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await?;
    // No consumer yet: the workers create it (managed), as RabbitMQ's workers declare their queue.
    assert_eq!(nats.observe(&q).await, SourceObs::QueueMissing);
    stream
        .create_consumer(pull::Config {
            durable_name: Some("hooks".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;

    // Idle, nobody pulling: 0 pulling, and nothing pending.
    let obs = nats.observe(&q).await;
    assert_eq!(
        obs,
        SourceObs::Stream {
            pulling: Some(0),
            backlog: 0,
            stalled_secs: None
        }
    );

    // Three pullers, as three workers: three requests wait while the stream is idle; one goes, two remain.
    let mut pullers = Vec::new();
    for _ in 0..3 {
        pullers.push(puller(&url, 16).await?);
    }
    let three = |o: &SourceObs| matches!(o, SourceObs::Stream { pulling: Some(3), .. });
    let obs = until(&nats, &q, three).await;
    assert!(three(&obs), "three pullers: {obs:?}");
    // Messages arrive and are delivered and acked: idle again, still three.
    for i in 0..200 {
        js.publish(format!("orders.{i}"), "{}".into()).await?.await?;
    }
    let obs = until(&nats, &q, three).await;
    assert!(three(&obs), "three pullers after 200 messages: {obs:?}");
    pullers.pop().unwrap().abort();
    let two = |o: &SourceObs| matches!(o, SourceObs::Stream { pulling: Some(2), .. });
    // The aborted puller's request stays until it expires (5 s) or the server sees no interest.
    let obs = until(&nats, &q, two).await;
    assert!(two(&obs), "one puller gone: {obs:?}");
    for p in pullers.drain(..) {
        p.abort();
    }
    let none = |o: &SourceObs| matches!(o, SourceObs::Stream { pulling: Some(0), .. });
    let obs = until(&nats, &q, none).await;
    assert!(none(&obs), "every puller gone: {obs:?}");

    // Busy: messages held unacked by a puller and more pending, delivered a moment ago: the count is unknown.
    for i in 0..50 {
        js.publish(format!("orders.{i}"), "{}".into()).await?.await?;
    }
    let consumer: jetstream::consumer::PullConsumer = js.get_consumer_from_stream("hooks", "ORDERS").await?;
    let mut held = consumer.fetch().max_messages(5).messages().await?;
    let mut got = 0;
    while let Some(m) = held.next().await {
        m.map_err(|e| anyhow::anyhow!("{e}"))?;
        got += 1;
    }
    assert_eq!(got, 5);
    match nats.observe(&q).await {
        SourceObs::Stream {
            pulling: None,
            backlog: 45,
            stalled_secs: None,
        } => {}
        other => panic!("busy: {other:?}"),
    }
    // Nobody pulls the 45 pending for longer than the stall time, with room in the workers: 0 pulling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    match nats.observe(&q).await {
        SourceObs::Stream {
            pulling: Some(0),
            backlog: 45,
            stalled_secs: Some(s),
        } => assert!(s >= 2, "{s}"),
        other => panic!("stalled: {other:?}"),
    }
    // The same with every worker full (5 awaiting acks, each worker holds 5): not asked to pull, not stalled.
    let full = Question {
        worker_holds: 5,
        ..q.clone()
    };
    assert!(matches!(
        nats.observe(&full).await,
        SourceObs::Stream {
            pulling: None,
            stalled_secs: None,
            ..
        }
    ));

    // Servers that do not answer: unreachable, and the message never shows the URL's password.
    let port = server.port(0);
    drop(server);
    let gone = question(&format!("nats://user:s3cret@127.0.0.1:{port}"), "ORDERS", "hooks");
    match Nats::default().observe(&gone).await {
        SourceObs::Problem { reason: r, message } => {
            assert_eq!(r, reason::BROKER_UNREACHABLE);
            assert!(!message.contains("s3cret"), "{message}");
        }
        other => panic!("no server: {other:?}"),
    }
    // A URL that is not NATS's.
    match Nats::default()
        .observe(&question("amqp://h:5672", "ORDERS", "hooks"))
        .await
    {
        SourceObs::Problem { reason: r, message } => {
            assert_eq!(r, reason::INVALID_BROKER_URI);
            assert!(message.contains("nats:// or tls://"), "{message}");
        }
        other => panic!("an amqp URL: {other:?}"),
    }
    Ok(())
}

/// A report of worker `worker`: `delivered` deliveries to Webhook `acme`, and `failed` failures in a row.
fn report(worker: &str, delivered: u64, failed: u64) -> Report {
    Report {
        worker: worker.into(),
        at_ms: 1,
        webhooks: BTreeMap::from([(
            "acme".into(),
            Tally {
                generation: 1,
                delivered,
                failed,
                consecutive_failures: failed,
                ..Tally::default()
            },
        )]),
    }
}

/// The reports waiting on `stream` (not acked yet: work-queue retention removes a report once acked).
async fn waiting(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js.get_stream(stream).await?.get_info().await?.state.messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_consumer_folds_and_acks_the_reports_of_a_jetstream_fleet() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let server = NatsServer::start().await?;
    let url = server.url(0);
    let fleets = Fleets::default();
    let from = ReportsFrom::Nats {
        urls: url.clone(),
        credentials: None,
        token: None,
        consumer: "hooks".into(),
    };
    fleets.consume_from("ns/fleet", from.clone());

    // The workers create the reports stream as the operator does: whichever comes first creates it, the
    // other reads it (the same config twice is no conflict).
    let js = jetstream::new(async_nats::connect(&url).await?);
    js.get_or_create_stream(nats_reports_stream_config("hooks"))
        .await?;
    let name = reports_stream("hooks");
    let subject = reports_subject("hooks");
    for (worker, delivered, failed) in [("w1", 2, 0), ("w2", 3, 1)] {
        let body = serde_json::to_vec(&report(worker, delivered, failed))?;
        js.publish(subject.clone(), body.into()).await?.await?;
    }
    let f = &fleets;
    let agg = wait_for(
        "the reports folded",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move { Ok(f.aggregate("ns/fleet", "acme").filter(|a| a.delivered == 5)) },
    )
    .await?;
    assert_eq!((agg.failed, agg.generation), (1, 1), "{agg:?}");
    assert_eq!(agg.consecutive_failures(), 1, "w2's trailing failures");
    let (j, n) = (&js, name.as_str());
    wait_for(
        "the reports acked",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move { Ok((waiting(j, n).await? == 0).then_some(())) },
    )
    .await?;
    // The operator's durable consumer, reading the reports subject with explicit acks.
    let info = js
        .get_stream(&name)
        .await?
        .consumer_info(REPORTS_CONSUMER)
        .await?;
    assert_eq!(info.config.filter_subject, subject);
    assert_eq!(info.config.ack_policy, jetstream::consumer::AckPolicy::Explicit);
    // The stream as both sides create it: a work queue of at most REPORTS_MAX_LENGTH reports.
    let config = js.get_stream(&name).await?.get_info().await?.config;
    assert_eq!(config.retention, stream::RetentionPolicy::WorkQueue);
    assert_eq!(
        config.max_messages,
        nats_reports_stream_config("hooks").max_messages
    );

    // The same source again changes nothing. A report that does not read is acked and dropped.
    fleets.consume_from("ns/fleet", from);
    js.publish(subject.clone(), "not a report".into()).await?.await?;
    wait_for(
        "the unreadable report acked",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move { Ok((waiting(j, n).await? == 0).then_some(())) },
    )
    .await?;
    assert_eq!(fleets.aggregate("ns/fleet", "acme").map(|a| a.delivered), Some(5));

    // Stopped: the fleet is forgotten, and a report published afterwards stays on the stream, unacked, for
    // the next leader.
    fleets.stop("ns/fleet");
    assert!(fleets.aggregate("ns/fleet", "acme").is_none(), "forgotten");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = serde_json::to_vec(&report("w1", 1, 0))?;
    js.publish(subject.clone(), body.into()).await?.await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(waiting(&js, &name).await?, 1, "nobody consumes after stop");
    Ok(())
}
