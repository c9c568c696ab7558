//! `kubectl hookfleet` on the real stack: the local API server with the CRDs, an Integration whose connection
//! Secret points at a real RabbitMQ node, and 300 dead letters in its dead-letter queue (200 with reason
//! `attempts_exhausted`, 50 of them copies for Webhook `acme`; 100 `too_large`), each with 5 attempts.
//!
//! - `status` lists the Integration;
//! - `replay --dry-run` counts 200 and moves nothing;
//! - a replay killed (SIGKILL) mid-way at 100/s loses nothing: every id is in the work queue or still in the
//!   dead-letter queue (at most one in both: confirmed but not yet acknowledged);
//! - finishing the replay puts the 200 into the work queue with their ids and Webhook kept, attempts and
//!   reasons gone; the 100 `too_large` stay dead.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use hookfleet_testkit::control_plane::ControlPlane;
use hookfleet_testkit::rabbitmq::RabbitMq;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const NS: &str = "team-a";
const QUEUE: &str = "orders";
const DEAD: &str = "orders.dead";

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Every message of `queue`, taken off it: id → headers (a duplicate id keeps the last, counted apart).
async fn drain(uri: &str, queue: &str) -> Result<(BTreeMap<String, FieldTable>, usize)> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let (mut out, mut duplicates) = (BTreeMap::new(), 0);
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let p = &m.delivery.properties;
        let id = p
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        if out.insert(id, p.headers().clone().unwrap_or_default()).is_some() {
            duplicates += 1;
        }
    }
    conn.close(200, "drained".into()).await?;
    Ok((out, duplicates))
}

fn plugin(cp: &ControlPlane, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kubectl-hookfleet"));
    c.env("KUBECONFIG", cp.kubeconfig()).args(args);
    c
}

fn run(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = plugin(cp, args).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "kubectl-hookfleet {}: {text}",
        args.join(" ")
    );
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_moves_exactly_the_selected_dead_letters_and_an_interrupted_one_loses_nothing() -> Result<()> {
    let cp = ControlPlane::start().await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    let rmq = RabbitMq::start().await?;
    let uri = rmq.amqp_uri();
    let secrets: Api<Secret> = Api::namespaced(cp.client(), NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "rabbitmq"}, "stringData": {"uri": uri}
            }))?,
        )
        .await?;
    let intg: hookfleet_crds::Integration = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
        "metadata": {"name": "orders"},
        "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": QUEUE},
            "destination": {"url": "https://erp.example.com/hooks/orders"}
        }
    }))?;
    Api::<hookfleet_crds::Integration>::namespaced(cp.client(), NS)
        .create(&PostParams::default(), &intg)
        .await?;

    // The queues, and 300 dead letters as the worker writes them.
    let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in [QUEUE, DEAD] {
        ch.queue_declare(q.into(), durable, FieldTable::default()).await?;
    }
    let mut reasons = HashMap::new();
    for i in 0..300 {
        let id = format!("d{i:03}");
        let reason = if i < 200 {
            "attempts_exhausted"
        } else {
            "too_large"
        };
        let mut h = FieldTable::default();
        h.insert("x-hookfleet-id".into(), text(&id));
        h.insert("x-hookfleet-attempts".into(), AMQPValue::LongLongInt(5));
        h.insert("x-hookfleet-dead-reason".into(), text(reason));
        if i < 50 {
            h.insert("x-hookfleet-webhook".into(), text("acme"));
        }
        reasons.insert(id.clone(), reason);
        ch.basic_publish(
            "".into(),
            DEAD.into(),
            BasicPublishOptions::default(),
            format!("{{\"id\":\"{id}\"}}").as_bytes(),
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2)
                .with_headers(h),
        )
        .await?
        .await?;
    }
    conn.close(200, "published".into()).await?;

    let status = run(&cp, &["status", "-n", NS])?;
    ensure!(status.contains("team-a/orders"), "status: {status}");

    let dry = run(
        &cp,
        &[
            "replay",
            "orders",
            "-n",
            NS,
            "--reason",
            "attempts_exhausted",
            "--dry-run",
        ],
    )?;
    ensure!(
        dry.contains("300 dead letters") && dry.contains("would replay 200"),
        "dry run: {dry}"
    );

    // Interrupted: SIGKILL about a second into a replay at 100/s.
    let mut child = plugin(
        &cp,
        &[
            "replay",
            "orders",
            "-n",
            NS,
            "--reason",
            "attempts_exhausted",
            "--rate",
            "100",
        ],
    )
    .stdout(std::process::Stdio::null())
    .spawn()?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    child.kill()?;
    child.wait()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (work, work_dups) = drain(&uri, QUEUE).await?;
    let (dead, _) = drain(&uri, DEAD).await?;
    let both = work.keys().filter(|id| dead.contains_key(*id)).count();
    let missing = reasons
        .keys()
        .filter(|id| !work.contains_key(*id) && !dead.contains_key(*id))
        .count();
    println!(
        "interrupted replay: {} in the work queue, {} still dead, {both} in both, {missing} missing",
        work.len(),
        dead.len()
    );
    ensure!(
        missing == 0,
        "{missing} dead letters lost by an interrupted replay"
    );
    ensure!(both <= 1 && work_dups == 0, "{both} ids in both queues");
    ensure!(
        !work.is_empty() && work.len() < 200,
        "the kill did not land mid-replay ({} replayed)",
        work.len()
    );
    // Put them back as they were for the rest: the replayed ones stay replayed (in the work queue).
    let interrupted = work.len();
    requeue(&uri, &work, QUEUE).await?;
    requeue(&uri, &dead, DEAD).await?;

    let done = run(
        &cp,
        &["replay", "orders", "-n", NS, "--reason", "attempts_exhausted"],
    )?;
    println!("{}", done.trim());
    let (work, work_dups) = drain(&uri, QUEUE).await?;
    let (dead, _) = drain(&uri, DEAD).await?;
    ensure!(work_dups == 0, "{work_dups} duplicates in the work queue");
    ensure!(
        work.len() == 200,
        "{} in the work queue, want the 200 attempts_exhausted",
        work.len()
    );
    ensure!(
        dead.len() == 100 && dead.keys().all(|id| reasons[id] == "too_large"),
        "{} left dead",
        dead.len()
    );
    for (id, h) in &work {
        ensure!(
            reasons[id] == "attempts_exhausted",
            "{id} should not have been replayed"
        );
        let keys: Vec<&str> = h.inner().keys().map(|k| k.as_str()).collect();
        ensure!(
            !keys.contains(&"x-hookfleet-attempts") && !keys.contains(&"x-hookfleet-dead-reason"),
            "{id} keeps its count: {keys:?}"
        );
        ensure!(keys.contains(&"x-hookfleet-id"), "{id} lost its id header");
        let n: usize = id[1..].parse()?;
        ensure!(
            keys.contains(&"x-hookfleet-webhook") == (n < 50),
            "{id}: the Webhook header {keys:?}"
        );
    }
    println!("replayed 200 of 300 (interrupted once after {interrupted}); 100 too_large left dead; 0 lost");
    Ok(())
}

/// Publishes `messages` (id → headers) back to `queue`.
async fn requeue(uri: &str, messages: &BTreeMap<String, FieldTable>, queue: &str) -> Result<()> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for (id, h) in messages {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            format!("{{\"id\":\"{id}\"}}").as_bytes(),
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2)
                .with_headers(h.clone()),
        )
        .await?
        .await?;
    }
    conn.close(200, "requeued".into()).await?;
    Ok(())
}
