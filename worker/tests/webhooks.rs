//! Many Webhooks on one fleet, on a real RabbitMQ node and a real API server: the worker reads the
//! snapshot Secret the operator would write (through `KUBECONFIG`, the one Secret by name), matches
//! each event by name prefix and headers, and delivers it once per matching Webhook, each with its own
//! `webhook-id`. Then: a kill -9 in the middle of fan-outs loses no (message, webhook) pair; a change
//! of the Secret reaches the worker within seconds without a restart; with the API server gone it goes
//! on delivering with its last snapshot; and it publishes reports for the Webhooks' status.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use hookfleet_crds::contract::webhooks::{Entry, Report, Snapshot, reports_queue};
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::control_plane::ControlPlane;
use hookfleet_testkit::process::wait_for;
use hookfleet_testkit::sink::{Mode, Sink};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const NS: &str = "fleet-ns";
const SECRET: &str = "fleet-webhooks";
const QUEUE: &str = "wh.q";
const CONCURRENCY: usize = 32;

/// (name, event prefixes, match headers) of one of the test's Webhooks.
type Hook = (&'static str, Vec<&'static str>, Vec<(&'static str, &'static str)>);

fn hooks() -> Vec<Hook> {
    vec![
        ("temp", vec!["temp"], vec![]),
        ("temperature", vec!["temperature"], vec![]),
        ("basement", vec!["temperature/basement"], vec![]),
        ("everything", vec![""], vec![]),
        ("hum", vec!["hum"], vec![]),
        ("high", vec!["high_temp"], vec![]),
        ("temp-or-hum", vec!["temp", "hum", "te"], vec![]),
        ("t", vec!["t"], vec![]),
        ("device", vec!["device/"], vec![]),
        ("nothing", vec!["zzz"], vec![]),
        ("temp-d1", vec!["temp"], vec![("device", "d-1")]),
        ("any-d2", vec![""], vec![("device", "d-2")]),
    ]
}

const EVENTS: &[&str] = &[
    "temp",
    "temperature",
    "temperature/basement",
    "high_temp",
    "humidity",
    "device/7/temp",
    "other",
    "te",
];

/// The oracle, written apart from the worker's trie: does `hook` match (event, device)?
fn matches(hook: &Hook, event: &str, device: &str) -> bool {
    hook.1.iter().any(|p| event.starts_with(p)) && hook.2.iter().all(|(k, v)| *k == "device" && *v == device)
}

fn snapshot(sinks: &HashMap<&str, Sink>, url_of: &HashMap<&str, String>) -> Snapshot {
    Snapshot {
        webhooks: hooks()
            .into_iter()
            .map(|(name, events, headers)| Entry {
                name: name.into(),
                generation: 1,
                events: events.iter().map(|s| s.to_string()).collect(),
                match_headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                paused: false,
                destination: serde_json::from_value(serde_json::json!({
                    "url": url_of.get(name).cloned().unwrap_or_else(|| sinks[name].url()),
                    "signing": {"secretRef": {"name": format!("{name}-key"), "key": "k"}},
                }))
                .unwrap(),
                secrets: BTreeMap::from([(format!("{name}-key/k"), format!("secret-of-{name}"))]),
                max_in_flight: None,
                rate_limit: None,
            })
            .collect(),
    }
}

/// Publishes one persistent message per (id, event, device) with confirms, the event name in header
/// `event`, the device in header `device`.
async fn publish_events(rmq: &RabbitMq, messages: &[(String, String, String)]) -> Result<()> {
    let conn = Connection::connect(&rmq.amqp_uri(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_work_queue(&ch, QUEUE, QueueType::Quorum).await?;
    let mut pending = Vec::new();
    for (id, event, device) in messages {
        let mut h = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
        h.insert("event".into(), s(event));
        h.insert("device".into(), s(device));
        let props = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(h);
        let body = format!(r#"{{"id":"{id}","event":"{event}"}}"#);
        pending.push(
            ch.basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?,
        );
    }
    for p in pending {
        p.await?;
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

/// `n` messages `prefix-i`, events and devices in turn.
fn messages(prefix: &str, n: usize, events: &[&str]) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-{i}"),
                events[i % events.len()].to_owned(),
                if i % 3 == 0 { "d-1" } else { "d-2" }.to_owned(),
            )
        })
        .collect()
}

/// Every (webhook-id) each Webhook should get for `msgs`, by Webhook.
fn expected(msgs: &[(String, String, String)]) -> HashMap<&'static str, HashSet<String>> {
    let mut want: HashMap<&str, HashSet<String>> = HashMap::new();
    for h in hooks() {
        let ids = msgs
            .iter()
            .filter(|(_, e, d)| matches(&h, e, d))
            .map(|(id, _, _)| format!("{id}:{}", h.0))
            .collect();
        want.insert(h.0, ids);
    }
    want
}

fn start(rmq: &RabbitMq, cp_kubeconfig: &str, dir: &std::path::Path, name: &str) -> Result<Worker> {
    let integration = format!("{NS}/fleet");
    let w = WebhooksWorker {
        kubeconfig: cp_kubeconfig,
        integration: &integration,
        queue: QUEUE,
        secret: SECRET,
        unmatched: "ack",
        concurrency: CONCURRENCY,
        nofile: None,
    };
    spawn_webhooks_worker(rmq, &w, dir, name)
}

/// Per Webhook: ids delivered (2xx) with their counts.
fn delivered(sinks: &HashMap<&str, Sink>) -> HashMap<&'static str, HashMap<String, usize>> {
    hooks()
        .into_iter()
        .map(|(name, _, _)| (name, sinks[name].delivered()))
        .collect()
}

/// (missing, extra, duplicates) of `got` against `want`, over every Webhook.
fn account(
    want: &HashMap<&str, HashSet<String>>,
    got: &HashMap<&str, HashMap<String, usize>>,
) -> (usize, usize, usize) {
    let (mut missing, mut extra, mut dups) = (0, 0, 0);
    for (name, ids) in want {
        let g = &got[name];
        missing += ids.iter().filter(|i| !g.contains_key(*i)).count();
        extra += g.keys().filter(|i| !ids.contains(*i)).count();
        dups += g.values().map(|n| n - 1).sum::<usize>();
    }
    (missing, extra, dups)
}

async fn wait_all(
    sinks: &HashMap<&str, Sink>,
    want: &HashMap<&str, HashSet<String>>,
    timeout: Duration,
) -> Result<()> {
    wait_for(
        "every (message, webhook) delivered",
        timeout,
        Duration::from_millis(100),
        || async { Ok((account(want, &delivered(sinks)).0 == 0).then_some(())) },
    )
    .await
}

/// Only the ids of `want` (a subset of everything published) from `got`.
fn restrict(
    got: HashMap<&'static str, HashMap<String, usize>>,
    prefix: &str,
) -> HashMap<&'static str, HashMap<String, usize>> {
    got.into_iter()
        .map(|(n, m)| {
            (
                n,
                m.into_iter().filter(|(id, _)| id.starts_with(prefix)).collect(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_fan_out_survive_kill_9_follow_the_secret_and_outlive_the_api_server() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let rmq = RabbitMq::start().await?;
    let cp = ControlPlane::start().await?;
    cp.create_namespace(NS).await?;
    let secrets: Api<Secret> = Api::namespaced(cp.client(), NS);
    let kubeconfig = cp.kubeconfig().display().to_string();
    let dir = tempfile::tempdir()?;
    let mut sinks = HashMap::new();
    for (name, _, _) in hooks() {
        sinks.insert(name, Sink::start().await?);
    }
    let mut url_of = HashMap::new();
    put_snapshot(&secrets, SECRET, &snapshot(&sinks, &url_of)).await?;
    eprintln!("webhooks: broker and API server up in {:?}", t0.elapsed());

    // 1. Matching: each Webhook gets exactly the ids whose event and device match.
    let first = messages("m", 240, EVENTS);
    publish_events(&rmq, &first).await?;
    let w = start(&rmq, &kubeconfig, dir.path(), "worker-a")?;
    w.wait_ready(true, Duration::from_secs(30)).await?;
    let want = expected(&first);
    let pairs: usize = want.values().map(HashSet::len).sum();
    wait_all(&sinks, &want, Duration::from_secs(30)).await?;
    // Let stragglers (an extra or a duplicate) arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (missing, extra, dups) = account(&want, &delivered(&sinks));
    assert_eq!((missing, extra), (0, 0), "none missing, none extra");
    assert!(want["nothing"].is_empty() && sinks["nothing"].requests() == 0);
    assert_eq!(want["everything"].len(), first.len());
    // Each request is signed with its own Webhook's secret, over its own webhook-id.
    for name in ["temp", "any-d2"] {
        let hit = sinks[name].hits().into_iter().next().context("a hit")?;
        hookfleet_testkit::messages::verify_signature(&hit, &format!("secret-of-{name}"))?;
        assert!(hookfleet_testkit::messages::verify_signature(&hit, "secret-of-temp-d1").is_err());
    }
    let m = w.metrics().await?;
    assert!(
        m.contains("hookfleet_webhooks_configured{integration=\"fleet-ns/fleet\"} 12"),
        "{m}"
    );
    eprintln!(
        "webhooks: {} messages × {} webhooks → {pairs} (message, webhook) pairs expected: 0 missing, {extra} extra, {dups} duplicates",
        first.len(),
        hooks().len()
    );

    // 2. kill -9 in the middle of fan-outs (a slow sink, every event matching several Webhooks).
    for s in sinks.values() {
        s.set_mode(Mode::delayed(200, Duration::from_millis(150)));
    }
    let crash = messages("k", 300, &["temperature/basement", "temp", "humidity"]);
    publish_events(&rmq, &crash).await?;
    let crash_want = expected(&crash);
    let crash_pairs: usize = crash_want.values().map(HashSet::len).sum();
    wait_for(
        "fan-outs under way",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let got: usize = restrict(delivered(&sinks), "k-").values().map(HashMap::len).sum();
            Ok((got >= crash_pairs / 4).then_some(()))
        },
    )
    .await?;
    // Mid fan-out, the fd budget of the concurrency holds: requests in flight are bounded by it, idle
    // connections shared out among the 12 hosts.
    let fds = w.open_fds().context("the worker's fds")?;
    let budget = 2 * CONCURRENCY + 64;
    assert!(fds <= budget, "{fds} open fds, budget {budget}");
    let mut w = w;
    w.process.kill();
    let before: usize = restrict(delivered(&sinks), "k-").values().map(HashMap::len).sum();
    for s in sinks.values() {
        s.set_mode(Mode::ok());
    }
    let w = start(&rmq, &kubeconfig, dir.path(), "worker-b")?;
    w.wait_ready(true, Duration::from_secs(30)).await?;
    wait_for(
        "every crash pair delivered",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { Ok((account(&crash_want, &restrict(delivered(&sinks), "k-")).0 == 0).then_some(())) },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (lost, extra, dups) = account(&crash_want, &restrict(delivered(&sinks), "k-"));
    assert_eq!((lost, extra), (0, 0));
    eprintln!(
        "webhooks kill -9: {} messages, {crash_pairs} (message, webhook) pairs, {before} delivered before the kill ({fds} fds open, budget {budget}); after the restart: {lost} lost, {extra} extra, {dups} duplicates (redelivered fan-outs)",
        crash.len()
    );

    // 3. A change of the Secret (a Webhook's URL) reaches the running worker.
    let moved = Sink::start().await?;
    url_of.insert("hum", moved.url());
    let changed = Instant::now();
    put_snapshot(&secrets, SECRET, &snapshot(&sinks, &url_of)).await?;
    let mut n = 0;
    let switched = wait_for(
        "hum delivered to its new URL",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            n += 1;
            let id = format!("s-{n}");
            let rmq = &rmq;
            let moved = &moved;
            async move {
                publish_events(rmq, &[(id, "humidity".into(), "d-2".into())]).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok((moved.requests() > 0).then(|| changed.elapsed()))
            }
        },
    )
    .await?;
    assert!(switched < Duration::from_secs(5), "{switched:?}");
    eprintln!("webhooks: a Webhook's new URL used {switched:?} after the Secret changed (no restart)");

    // 4. The API server gone: the worker goes on with its last snapshot.
    let stop = Instant::now();
    drop(cp);
    eprintln!("webhooks: API server stopped ({:?})", stop.elapsed());
    let after = messages("x", 60, EVENTS);
    publish_events(&rmq, &after).await?;
    let mut after_want = expected(&after);
    // "hum" now delivers to the moved sink.
    let hum = after_want.remove("hum").unwrap_or_default();
    after_want.insert("hum", HashSet::new());
    wait_for(
        "delivered without the API server",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let acct = account(&after_want, &restrict(delivered(&sinks), "x-"));
            let moved_got = moved.delivered();
            let moved_ok = hum.iter().all(|id| moved_got.contains_key(id));
            Ok((acct.0 == 0 && moved_ok).then_some(()))
        },
    )
    .await?;
    w.process.check_running()?;
    assert!(
        w.wait_ready(true, Duration::from_secs(1)).await.is_ok(),
        "still ready"
    );
    eprintln!(
        "webhooks: {} messages delivered on the last snapshot with the API server down",
        after.len()
    );

    // 5. Reports: the Webhooks this worker delivered to, as deltas.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reports = drain(&rmq, &reports_queue(QUEUE)).await?;
    assert!(!reports.is_empty(), "reports published");
    let mut delivered_reported: HashMap<String, u64> = HashMap::new();
    for r in &reports {
        let report: Report = serde_json::from_slice(&r.body)?;
        assert!(
            report.worker == "worker-a" || report.worker == "worker-b",
            "{}",
            report.worker
        );
        for (name, t) in report.webhooks {
            assert!(hooks().iter().any(|h| h.0 == name), "{name}");
            *delivered_reported.entry(name).or_default() += t.delivered;
        }
    }
    assert!(!delivered_reported.contains_key("nothing"));
    assert!(delivered_reported["everything"] > 0);
    eprintln!(
        "webhooks: {} reports; delivered per webhook as reported: {:?}; total {:?}",
        reports.len(),
        delivered_reported,
        t0.elapsed()
    );
    Ok(())
}
