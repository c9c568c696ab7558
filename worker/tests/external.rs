//! `--topology external` on a real RabbitMQ node and the real worker binary, as a new user meets it: the
//! publisher declared the work queue first (a durable quorum queue with no other arguments, which a managed
//! worker refuses with exit 4), and the worker runs as a broker user with **no `configure` permission**
//! (read on the Integration's queues, write on the default exchange).
//!
//! 1. Nothing but the work queue exists: the worker exits 6 (`QUEUES_MISSING`) and its termination message
//!    names every missing queue (the dead-letter, retry-ready and delay queues), not the work queue.
//! 2. The queue owner declares those: the worker consumes the work queue as it is, delivers every message
//!    (failed first attempts come back through the delay and retry-ready queues), declares nothing (the
//!    broker's queue list and the work queue's arguments are unchanged), and dead-letters a message the
//!    broker has redelivered `--delivery-limit` times (its `x-delivery-count`) unattempted, with reason
//!    `delivery_limit`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use hookfleet_crds::contract::{exit, headers, queues};
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::sink::{Mode, Sink};
use hookfleet_worker::worker::topology;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

const QUEUE: &str = "ext.orders";
const WRITE: &str = r"^amq\.default$";
const READ: &str = r"^ext\.orders(\..*)?$";
/// The worker's flags besides the broker, queue and sink: external, a delivery limit of 2, short backoff.
const EXTERNAL: [&str; 8] = [
    "--topology",
    "external",
    "--delivery-limit",
    "2",
    "--backoff-initial",
    "200ms",
    "--backoff-max",
    "1s",
];

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    t
}

/// `rabbitmqctl list_queues name arguments`, sorted: what exists and how it was declared.
fn queue_list(rmq: &RabbitMq) -> Result<Vec<String>> {
    let out = rmq.ctl(&["list_queues", "-q", "--no-table-headers", "name", "arguments"])?;
    let mut lines: Vec<String> = out
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_topology_checks_consumes_as_declared_and_keeps_the_delivery_limit_itself() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let sink = Sink::start().await?;
    let dir = tempfile::tempdir()?;
    rmq.ctl(&["add_user", "ext", "ext"])?;
    rmq.ctl(&["set_permissions", "-p", "/", "ext", "^$", WRITE, READ])?;
    let uri = rmq.amqp_uri().replacen("guest:guest", "ext:ext", 1);
    ensure!(uri.contains("ext:ext@"), "user URI: {uri}");

    // The publisher's own declaration: durable, quorum, nothing else.
    let admin = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = admin.create_channel().await?;
    ch.queue_declare(QUEUE.into(), durable(), quorum()).await?;
    // A poison message, first in the queue: the broker redelivers it twice (its consumer's channel closes with it unacked),
    // so its x-delivery-count reaches the limit of 2.
    publish_existing(&rmq, QUEUE, &["poison".to_owned()]).await?;
    for _ in 0..2 {
        let c = admin.create_channel().await?;
        let mut taken = 0;
        while let Some(m) = c
            .basic_get(QUEUE.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            taken += 1;
            if m.delivery.properties.message_id().as_ref().map(|s| s.as_str()) == Some("poison") {
                break;
            }
        }
        ensure!(taken > 0, "nothing to take from {QUEUE}");
        c.close(200, "crash".into()).await?;
    }
    let ids = ids("ext", 60);
    publish_existing(&rmq, QUEUE, &ids).await?;

    // 1. Only the work queue exists: exit 6, naming what is missing.
    let url = format!("{}/hooks", sink.url().trim_end_matches('/'));
    let port = hookfleet_testkit::process::free_port()?;
    let mut args = base_args_uri(&uri, QUEUE, &url, port, dir.path());
    args.extend(EXTERNAL.iter().map(|a| a.to_string()));
    let out = tokio::process::Command::new(worker_bin())
        .args(&args)
        .output()
        .await?;
    let term = std::fs::read_to_string(dir.path().join("termination-log")).unwrap_or_default();
    ensure!(
        out.status.code() == Some(exit::QUEUES_MISSING),
        "exit {:?}, want {}: {}",
        out.status.code(),
        exit::QUEUES_MISSING,
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = term
        .split_once("declares none: ")
        .and_then(|(_, rest)| rest.split_once("; declare them"))
        .map(|(names, _)| names.split(", ").map(str::to_owned).collect::<Vec<_>>())
        .with_context(|| format!("termination message: {term}"))?;
    ensure!(
        !listed.contains(&QUEUE.to_owned()),
        "the work queue exists: {listed:?}"
    );
    let dead = queues::dead_letter(QUEUE);
    let ready = queues::retry_ready(QUEUE);
    ensure!(listed.contains(&dead) && listed.contains(&ready), "{listed:?}");
    let delays: Vec<&String> = listed
        .iter()
        .filter(|q| q.starts_with(&format!("{QUEUE}.delay.")))
        .collect();
    ensure!(!delays.is_empty(), "no delay queue named: {listed:?}");
    println!(
        "1. nothing declared: exit 6, {} missing queues named ({} delay queues)",
        listed.len(),
        delays.len()
    );

    // 2. The owner declares them (docs/worker.md, "Queues declared elsewhere").
    ch.queue_declare(dead.as_str().into(), durable(), quorum())
        .await?;
    ch.queue_declare(ready.as_str().into(), durable(), quorum())
        .await?;
    for d in &delays {
        let ms: u64 = d
            .trim_start_matches(&format!("{QUEUE}.delay."))
            .trim_end_matches("ms")
            .parse()
            .with_context(|| format!("delay queue name {d}"))?;
        let args = topology::delay_queue_args(QueueType::Quorum, &ready, Duration::from_millis(ms));
        ch.queue_declare(d.as_str().into(), durable(), args).await?;
    }
    let before = queue_list(&rmq)?;

    // Every other request fails once: retries take the owner's delay and retry-ready queues.
    sink.set_mode(Mode::flaky(503, 1, Duration::ZERO));
    let w = start_worker_uri(&uri, QUEUE, &url, &EXTERNAL, &[], dir.path(), "external").await?;
    let want: HashSet<String> = ids.iter().cloned().collect();
    if let Err(e) = sink.wait_delivered(&want, Duration::from_secs(60)).await {
        anyhow::bail!("{e:#}\nworker log:\n{}", w.process.log_tail(40));
    }
    let mut dead_letters = Vec::new();
    for _ in 0..40 {
        dead_letters.extend(drain(&rmq, &dead).await?);
        if !dead_letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(
        dead_letters.len() == 1 && dead_letters[0].id == "poison",
        "dead letters: {:?}",
        dead_letters.iter().map(|d| &d.id).collect::<Vec<_>>()
    );
    let header = |name: &str| match dead_letters[0].headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => format!("{other:?}"),
    };
    let (reason, detail) = (header(headers::H_LAST_ERROR), header(headers::H_DEAD_REASON));
    ensure!(reason == "delivery_limit", "dead-letter reason {reason}");
    ensure!(detail.contains("x-delivery-count"), "dead-letter detail {detail}");
    ensure!(
        !sink.attempts().contains_key("poison"),
        "the poison message was attempted"
    );
    let retried = sink
        .attempts()
        .iter()
        .filter(|(id, a)| want.contains(*id) && a.len() >= 2)
        .count();
    ensure!(retried >= 10, "only {retried} of 60 took the retry path");
    let after = queue_list(&rmq)?;
    ensure!(
        before == after,
        "the worker changed the topology:\nbefore {before:?}\nafter {after:?}"
    );
    println!(
        "2. declared by the owner: 60 delivered ({retried} after a retry through its queues), the poison message \
         dead-lettered unattempted (delivery_limit), {} queues unchanged, no configure permission",
        after.len()
    );
    drop(w);
    let _ = admin.close(200, "done".into()).await;
    Ok(())
}
