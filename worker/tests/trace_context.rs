//! W3C Trace Context from the message to the webhook request, with a real RabbitMQ node, the harness's sink
//! and the real worker binary: a message's `traceparent` and `tracestate` AMQP headers (long string or byte
//! array; RabbitMQ refuses short strings in tables) arrive as HTTP headers of the same names when valid, on the first attempt and on
//! its retry, on a signed single destination and on each Webhook of a fan-out (signatures verify); invalid
//! ones are dropped, and every message is delivered all the same.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use hookfleet_crds::contract::webhooks::{Entry, Snapshot};
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::control_plane::ControlPlane;
use hookfleet_testkit::messages::{send_confirmed, verify_signature};
use hookfleet_testkit::sink::{Hit, Mode, Sink};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TP2: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
/// A `traceparent` set in the destination's headers: the message's own, when valid, replaces it.
const CONFIGURED: &str = "00-11111111111111111111111111111111-2222222222222222-01";
const STATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// (id, AMQP headers, the traceparent and tracestate the request must carry).
type Case = (
    &'static str,
    Vec<(&'static str, AMQPValue)>,
    Option<&'static str>,
    Option<&'static str>,
);

fn cases() -> Vec<Case> {
    let long_state: &'static str = Box::leak(
        (0..6)
            .map(|i| format!("k{i}={}", "v".repeat(100)))
            .collect::<Vec<_>>()
            .join(",")
            .into_boxed_str(),
    );
    vec![
        (
            "tc-valid",
            vec![("traceparent", long(TP)), ("tracestate", long(STATE))],
            Some(TP),
            Some(STATE),
        ),
        (
            "tc-bytes",
            vec![(
                "traceparent",
                AMQPValue::ByteArray(ByteArray::from(TP2.as_bytes().to_vec())),
            )],
            Some(TP2),
            None,
        ),
        (
            "tc-bad-state",
            vec![("traceparent", long(TP2)), ("tracestate", long("Rojo=1"))],
            Some(TP2),
            None,
        ),
        (
            "tc-state-too-long",
            vec![("traceparent", long(TP)), ("tracestate", long(long_state))],
            Some(TP),
            None,
        ),
        (
            "tc-zero-trace-id",
            vec![
                (
                    "traceparent",
                    long("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
                ),
                ("tracestate", long(STATE)),
            ],
            None,
            None,
        ),
        (
            "tc-uppercase",
            vec![(
                "traceparent",
                long("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"),
            )],
            None,
            None,
        ),
        (
            "tc-integer",
            vec![("traceparent", AMQPValue::LongLongInt(7))],
            None,
            None,
        ),
        ("tc-state-alone", vec![("tracestate", long(STATE))], None, None),
        ("tc-none", vec![], None, None),
    ]
}

async fn publish_cases(rmq: &RabbitMq, queue: &str, event_header: bool) -> Result<()> {
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_work_queue(&ch, queue, QueueType::Quorum).await?;
    let cases = cases();
    let bodies: Vec<Vec<u8>> = cases
        .iter()
        .map(|(id, ..)| format!(r#"{{"id":"{id}"}}"#).into_bytes())
        .collect();
    let sends = cases
        .iter()
        .zip(&bodies)
        .map(|((id, headers, ..), body)| {
            let mut h = FieldTable::default();
            for (k, v) in headers {
                h.insert(ShortString::from(*k), v.clone());
            }
            if event_header {
                h.insert("event".into(), long("order/created"));
            }
            let props = BasicProperties::default()
                .with_message_id((*id).into())
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(h);
            (props, body.as_slice())
        })
        .collect();
    send_confirmed(&ch, queue, sends).await?;
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

/// Checks every hit of `hits` (the id, with `suffix`, names its case) against what its case expects;
/// `configured` is the destination's own `traceparent` header, sent when the message has no valid one.
fn check(hits: &[Hit], suffix: &str, configured: Option<&str>) -> Result<usize> {
    let want: HashMap<String, (Option<&str>, Option<&str>)> = cases()
        .into_iter()
        .map(|(id, _, tp, ts)| (format!("{id}{suffix}"), (tp, ts)))
        .collect();
    for hit in hits {
        let id = hit.id.as_deref().context("webhook-id")?;
        let (tp, ts) = want.get(id).with_context(|| format!("unexpected id {id}"))?;
        let got = |h: &str| hit.headers.get(h).map(String::as_str);
        assert_eq!(
            got("traceparent"),
            tp.or(configured),
            "{id} (status {})",
            hit.status
        );
        assert_eq!(got("tracestate"), *ts, "{id} (status {})", hit.status);
    }
    Ok(hits.len())
}

/// Single destination, signed: the first attempts fail (503), so each message also arrives on its retry,
/// from a delay queue; both carry the trace context, and the signature verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_the_destination_first_attempt_and_retry() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(503));
    publish_cases(&rmq, "tc.q", false).await?;
    let secret = "whsec_c2VjcmV0LWZvci10ZXN0cw==";
    let _w = start_worker(
        &rmq,
        "tc.q",
        &sink.url(),
        &[
            "--backoff-initial",
            "200ms",
            "--backoff-jitter",
            "none",
            "--circuit-breaker-threshold",
            "0",
            // A configured header of the same name yields to the message's own.
            "--header",
            &format!("traceparent: {CONFIGURED}"),
        ],
        &[("HOOKFLEET_SIGNING_SECRET", secret)],
        dir.path(),
        "worker",
    )
    .await?;
    let n = cases().len();
    hookfleet_testkit::process::wait_for(
        "every message attempted once",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok((sink.requests() >= n as u64).then_some(())) },
    )
    .await?;
    sink.set_mode(Mode::ok());
    let want: HashSet<String> = cases().iter().map(|(id, ..)| id.to_string()).collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;

    let hits = sink.hits();
    let failed = hits.iter().filter(|h| h.status == 503).count();
    let delivered = hits.iter().filter(|h| h.status == 200).count();
    assert!(
        failed >= n && delivered >= n,
        "{failed} failed, {delivered} delivered"
    );
    check(&hits, "", Some(CONFIGURED))?;
    for hit in &hits {
        verify_signature(hit, secret)?;
    }
    eprintln!("trace context: {n} messages, {failed} failed attempts and {delivered} deliveries checked");
    Ok(())
}

/// Webhooks: the same cases fanned out to two Webhooks, each signing with its own key: every copy carries
/// the trace context of its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_every_webhook_of_a_fan_out() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const NS: &str = "tc-ns";
    const SECRET: &str = "tc-webhooks";
    let rmq = RabbitMq::start().await?;
    let cp = ControlPlane::start().await?;
    cp.create_namespace(NS).await?;
    let secrets: Api<Secret> = Api::namespaced(cp.client(), NS);
    let dir = tempfile::tempdir()?;
    let sinks: BTreeMap<&str, Sink> =
        BTreeMap::from([("a", Sink::start().await?), ("b", Sink::start().await?)]);
    let snap = Snapshot {
        webhooks: sinks
            .iter()
            .map(|(name, sink)| Entry {
                name: (*name).into(),
                generation: 1,
                events: vec!["order".into()],
                match_headers: BTreeMap::new(),
                paused: false,
                destination: serde_json::from_value(serde_json::json!({
                    "url": sink.url(),
                    "signing": {"secretRef": {"name": format!("{name}-key"), "key": "k"}},
                }))
                .unwrap(),
                secrets: BTreeMap::from([(format!("{name}-key/k"), format!("secret-of-{name}"))]),
                max_in_flight: None,
                rate_limit: None,
            })
            .collect(),
    };
    put_snapshot(&secrets, SECRET, &snap).await?;
    publish_cases(&rmq, "tc.wh.q", true).await?;
    let kubeconfig = cp.kubeconfig().display().to_string();
    let w = WebhooksWorker {
        kubeconfig: &kubeconfig,
        integration: &format!("{NS}/fleet"),
        queue: "tc.wh.q",
        secret: SECRET,
        unmatched: "ack",
        concurrency: 8,
        nofile: None,
    };
    let worker = spawn_webhooks_worker(&rmq, &w, dir.path(), "worker-wh")?;
    worker.wait_ready(true, Duration::from_secs(30)).await?;
    for (name, sink) in &sinks {
        let want: HashSet<String> = cases().iter().map(|(id, ..)| format!("{id}:{name}")).collect();
        sink.wait_delivered(&want, Duration::from_secs(60)).await?;
        let hits = sink.hits();
        let checked = check(&hits, &format!(":{name}"), None)?;
        for hit in &hits {
            verify_signature(hit, &format!("secret-of-{name}"))?;
        }
        eprintln!("webhook {name}: {checked} requests checked");
    }
    Ok(())
}
