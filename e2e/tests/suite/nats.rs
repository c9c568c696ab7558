//! Scenario `nats`: an Integration reading a NATS JetStream stream (`spec.source.nats`) instead of a RabbitMQ
//! queue, end to end. A nats-server with JetStream on the host address pods reach, the stream `E2E` on
//! `e2e.>` created by the test (the workers never create it), the server URL in a Secret; the workers create
//! the durable pull consumer (`queue`, topology managed). Expected: Ready with 2 consumers (the pull requests
//! of 2 idle workers waiting on the consumer, as the operator probes it); 3,000 messages published paced,
//! each with `Nats-Msg-Id` = its id (the worker's `webhook-id`), one worker SIGKILLed (on the local node; its
//! pod deleted without grace elsewhere) while they flow; every id delivered and signed, none lost, duplicates
//! counted (what the killed worker held comes back after `ackWait`); Ready with 2 consumers again after.
//!
//! Then Webhooks on the same stream: a second Integration `js-hooks` with `spec.webhooks` (its own durable
//! consumer on `e2e.hooks.>`), Webhook `good` on the sink and Webhook `bad` on a closed port. Expected: every
//! message reaches `good` once (the retries of `bad`, scheduled on JetStream, never bring a message back to
//! `good`), signed with its key; every `bad` copy dead-lettered after its 3 attempts, naming it; and the
//! Webhooks' statuses, which the operator folds from the reports stream, count both.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::{self, stream};
use hookfleet_crds::contract::headers::H_ID;
use hookfleet_e2e::messages::{self, Account};
use hookfleet_e2e::pods::{signal, worker_pids};
use hookfleet_e2e::process::wait_for;
use hookfleet_e2e::sink::Mode;
use hookfleet_testkit::NatsServer;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

use super::{Outcome, Stack, cond};

const NS: &str = "e2e-nats";
const NAME: &str = "js";
const STREAM: &str = "E2E";
/// The durable consumer the workers share (`spec.source.queue`: no `.` with `source.nats`).
const CONSUMER: &str = "e2e-nats";
/// The stream the workers create for the default dead-letter subject `hookfleet.dead.<consumer>`.
const DEAD_STREAM: &str = "e2e-nats-dead";
const MESSAGES: usize = 3000;
const PER_SECOND: usize = 600;

pub async fn nats(s: &Stack) -> Outcome {
    let server = NatsServer::start_on(s.host).await?;
    let url = server.url(0);
    let client = async_nats::connect(url.as_str()).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["e2e.>".into()],
        ..Default::default()
    })
    .await?;

    let api = s.namespace(NS, "").await?;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": "nats"}, "stringData": {"urls": url}}),
            )?,
        )
        .await?;
    let t0 = Instant::now();
    s.integration(
        &api,
        NAME,
        CONSUMER,
        serde_json::json!({"source": {
            "connectionSecretRef": {"name": "nats", "key": "urls"},
            "nats": {"stream": STREAM, "subjects": ["e2e.>"], "ackWait": "5s"},
        }}),
    )
    .await?;
    s.ready_with_consumers(&api, NAME, 2).await?;
    let ready_after = t0.elapsed();

    // What the status says while the messages flow and the worker dies: every distinct (Ready and its reason,
    // Degraded's reason, ready workers, consumers).
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (api, seen) = (api.clone(), seen.clone());
        AbortOnDrop(tokio::spawn(async move {
            loop {
                if let Ok(i) = api.get(NAME).await {
                    let (ready, reason, _) = cond(&i, "Ready");
                    let degraded = match cond(&i, "Degraded") {
                        ("True", r, _) => format!(" Degraded {r}"),
                        _ => String::new(),
                    };
                    let count = |n: Option<i32>| n.map_or("-".into(), |n| n.to_string());
                    let st = i.status.as_ref();
                    let now = format!(
                        "{ready} ({reason}{degraded}) {} ready {} consumers",
                        count(st.and_then(|st| st.ready_replicas)),
                        count(st.and_then(|st| st.consumers)),
                    );
                    let mut seen = seen.lock().expect("seen");
                    if seen.last() != Some(&now) {
                        seen.push(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }))
    };

    // Each request takes 50 ms, so every worker has deliveries in flight (and more held) when one dies.
    s.sink.set_mode(Mode::delayed(200, Duration::from_millis(50)));
    let ids = messages::ids("nats", MESSAGES);
    let t_publish = Instant::now();
    let publisher = publish(&js, "e2e.orders", &ids, PER_SECOND);
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        kill_one(s).await
    };
    let (published, killed) = tokio::join!(publisher, chaos);
    let result = async {
        published?;
        let published_in = t_publish.elapsed();
        let (what, killed_at) = killed?;
        let (account, all_in) = settle(s, &js, &ids, Duration::from_secs(120)).await?;
        let times = (published_in, all_in - killed_at, killed_at.elapsed());
        anyhow::Ok((account, what, times))
    }
    .await;
    s.sink.set_mode(Mode::ok());
    let (account, what, (published_in, all_delivered, quiet)) = result?;

    let t1 = Instant::now();
    let i = s.ready_with_consumers(&api, NAME, 2).await?;
    let ready_again = t1.elapsed();
    drop(watcher);
    let seen = seen.lock().expect("seen").clone();
    let transitions = seen.join(" → ");
    let backlog = i.status.as_ref().and_then(|st| st.backlog);
    ensure!(
        backlog == Some(0),
        "backlog {backlog:?} once everything is delivered"
    );
    let note = format!(
        "Ready with 2 consumers {ready_after:.1?} after apply; {MESSAGES} published at {PER_SECOND}/s \
         in {published_in:.1?}; {what}; every id delivered {all_delivered:.1?} after the kill, nothing \
         pending or unacked {quiet:.1?} after it; Ready with 2 consumers again {ready_again:.1?} later; \
         status meanwhile: {transitions}"
    );
    // The first Integration goes (its consumer on `e2e.>` would take the second part's messages too).
    api.delete(NAME, &DeleteParams::default()).await?;
    let hooks_note = webhooks_on_nats(s, &api, &js).await?;
    let note = format!("{note}. Webhooks on NATS: {hooks_note}");
    s.drop_namespace(NS).await;
    // The test's client goes before the server does (else it keeps reconnecting to nothing).
    drop(js);
    let _ = client.drain().await;
    drop(server);
    Ok((Some(account), note))
}

/// A task stopped when the scenario ends, also when it fails.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes one message per id to `subject` at `per_second` (batches every 100 ms), each with
/// `Nats-Msg-Id` = its id and a JSON body naming it, each confirmed by JetStream.
async fn publish(js: &jetstream::Context, subject: &str, ids: &[String], per_second: usize) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for chunk in ids.chunks((per_second / 10).max(1)) {
        tick.tick().await;
        let mut acks = Vec::with_capacity(chunk.len());
        for id in chunk {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id.as_str());
            h.insert("Content-Type", "application/json");
            acks.push(
                js.publish_with_headers(subject.to_owned(), h, messages::body(id).into())
                    .await?,
            );
        }
        for a in acks {
            let ack = a.await?;
            ensure!(!ack.duplicate, "JetStream took a message as a duplicate: {ack:?}");
        }
    }
    Ok(())
}

/// SIGKILL to one worker's process (the kubelet restarts its container in place), or on a cluster whose
/// processes the harness cannot see, the pod deleted with grace 0 (its ReplicaSet replaces it). Returns what
/// was done and when.
async fn kill_one(s: &Stack) -> Result<(String, Instant)> {
    let pods = s.running_pods(NS, NAME).await?;
    ensure!(pods.len() == 2, "{} running pods", pods.len());
    let api: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let name = pods[0].name_any();
    if !s.local() {
        let grace = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        api.delete(&name, &grace).await?;
        return Ok((format!("pod {name} deleted with grace 0"), Instant::now()));
    }
    let pid = *worker_pids(&pods[0])
        .first()
        .context("no worker process for the pod")?;
    signal(pid, nix::sys::signal::Signal::SIGKILL)?;
    let at = Instant::now();
    super::until_restarted(&api, &name).await?;
    Ok((
        format!(
            "SIGKILL to the worker of {name} 1.5 s into the stream (its container restarted after {:.1?})",
            at.elapsed()
        ),
        at,
    ))
}

/// Waits until every id reached the sink (2xx) or the dead-letter stream (at most `timeout`), then until the
/// consumer has nothing pending or unacked (what the killed worker held comes back after `ackWait` and is
/// delivered again: counted as duplicates), accounts for them, and checks the signature of every delivery.
/// Returns the account and when every id had arrived.
async fn settle(
    s: &Stack,
    js: &jetstream::Context,
    ids: &[String],
    timeout: Duration,
) -> Result<(Account, Instant)> {
    let want: HashSet<String> = ids.iter().cloned().collect();
    let t0 = Instant::now();
    loop {
        let delivered = s.delivered(&want);
        if want.iter().all(|id| delivered.contains_key(id)) {
            break;
        }
        let dead = dead_letters(js).await?;
        if want
            .iter()
            .all(|id| delivered.contains_key(id) || dead.contains(id))
            || t0.elapsed() > timeout
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_in = Instant::now();
    wait_for(
        "the consumer to have nothing pending or unacked",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let info = js.get_stream(STREAM).await?.consumer_info(CONSUMER).await?;
            Ok((info.num_pending == 0 && info.num_ack_pending == 0).then_some(()))
        },
    )
    .await?;
    let dead = dead_letters(js).await?;
    let account = messages::account(ids, &s.delivered(&want), &dead)?;
    s.verify_signatures(ids)?;
    if account.lost > 0 {
        let delivered = s.delivered(&want);
        let missing: BTreeSet<&String> = ids
            .iter()
            .filter(|id| !delivered.contains_key(*id) && !dead.contains(*id))
            .take(5)
            .collect();
        bail!("{account}; e.g. never delivered: {missing:?}");
    }
    Ok((account, all_in))
}

/// The `x-hookfleet-id` of every message in the dead-letter stream (none when it does not exist yet).
async fn dead_letters(js: &jetstream::Context) -> Result<HashSet<String>> {
    Ok(hookfleet_testkit::nats::stream_headers(js, DEAD_STREAM)
        .await?
        .iter()
        .filter_map(|h| h.get(H_ID).map(|v| v.as_str().to_owned()))
        .collect())
}

const HOOKS: &str = "js-hooks";
const HOOKS_CONSUMER: &str = "e2e-nats-hooks";
const HOOKS_MESSAGES: usize = 200;

/// Webhooks on the NATS source (the module's second part): returns the scenario note's part.
async fn webhooks_on_nats(
    s: &Stack,
    api: &Api<hookfleet_crds::Integration>,
    js: &jetstream::Context,
) -> Result<String> {
    use hookfleet_crds::Webhook;
    use hookfleet_crds::contract::webhooks::H_WEBHOOK;

    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": "keys"}, "stringData": {"good": "key-of-good", "bad": "key-of-bad"}}),
            )?,
        )
        .await?;
    let hooks: Api<Webhook> = Api::namespaced(s.client.clone(), NS);
    let sink = s.sink.url();
    let sink = sink.trim_end_matches("/hook");
    // Nothing listens on port 1 of the host: every attempt is refused at once.
    let closed = format!("http://{}:1", s.host);
    for (name, base) in [("good", sink), ("bad", closed.as_str())] {
        let w: Webhook = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Webhook",
            "metadata": {"name": name},
            "spec": {
                "integration": HOOKS,
                "events": ["e2e.hooks."],
                "destination": {
                    "url": format!("{base}/wh/{name}"),
                    "signing": {"secretRef": {"name": "keys", "key": name}},
                },
            },
        }))?;
        hooks.create(&PostParams::default(), &w).await?;
    }
    let t0 = Instant::now();
    let intg: hookfleet_crds::Integration = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
        "metadata": {"name": HOOKS},
        "spec": {
            "source": {
                "connectionSecretRef": {"name": "nats", "key": "urls"}, "queue": HOOKS_CONSUMER,
                "nats": {"stream": STREAM, "subjects": ["e2e.hooks.>"], "ackWait": "5s"},
            },
            "webhooks": {"allowPrivateNetworks": true},
            "delivery": {"maxAttempts": 3, "backoff": {"initial": "200ms", "max": "1s"},
                         "circuitBreaker": {"failureThreshold": 0}},
            "workers": {"replicas": 2, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}},
        },
    }))?;
    api.create(&PostParams::default(), &intg).await?;
    s.ready_with_consumers(api, HOOKS, 2).await?;
    let ready_after = t0.elapsed();

    s.sink.set_mode(Mode::ok());
    let ids = messages::ids("nats-hooks", HOOKS_MESSAGES);
    let t_publish = Instant::now();
    publish(js, "e2e.hooks.orders", &ids, 2000).await?;
    let good: HashSet<String> = ids.iter().map(|id| format!("{id}:good")).collect();
    let dead_stream = format!("{HOOKS_CONSUMER}-dead");
    let dead = wait_for(
        "every good copy delivered and every bad copy dead-lettered",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || async {
            let delivered = s.delivered(&good);
            let dead = hookfleet_testkit::nats::stream_headers(js, &dead_stream).await?;
            let bad: HashSet<String> = dead
                .iter()
                .filter(|h| h.get(H_WEBHOOK).map(|v| v.as_str()) == Some("bad"))
                .filter_map(|h| h.get(H_ID).map(|v| v.as_str().to_owned()))
                .collect();
            Ok((delivered.len() == good.len() && bad.len() == HOOKS_MESSAGES).then_some(dead))
        },
    )
    .await?;
    let settled_in = t_publish.elapsed();
    let delivered = s.delivered(&good);
    let dups: usize = delivered.values().map(|n| n - 1).sum();
    ensure!(
        dups == 0,
        "{dups} duplicates at good: another Webhook's retry brought a message back to it"
    );
    for hit in s.sink.hits().iter().filter(|h| h.path == "/wh/good") {
        messages::verify_signature(hit, "key-of-good")?;
    }
    for h in &dead {
        ensure!(
            h.get(H_WEBHOOK).map(|v| v.as_str()) == Some("bad"),
            "a dead letter not for bad: {h:?}"
        );
        ensure!(
            h.get(hookfleet_crds::contract::headers::H_ATTEMPTS)
                .map(|v| v.as_str())
                == Some("3"),
            "a bad copy dead-lettered after other than 3 attempts: {h:?}"
        );
    }
    // The statuses, from the reports the workers publish on the reports stream and the operator folds.
    let n = HOOKS_MESSAGES as i64;
    let (g, b) = wait_for(
        "the Webhooks' statuses to count the deliveries and the dead letters",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let hooks = hooks.clone();
            async move {
                let g = hooks.get("good").await?.status.unwrap_or_default();
                let b = hooks.get("bad").await?.status.unwrap_or_default();
                Ok((g.delivered == n && b.dead_lettered == n).then_some((g, b)))
            }
        },
    )
    .await?;
    ensure!(b.delivered == 0 && b.failed >= n, "bad: {b:?}");
    let retry = js
        .get_stream(format!("{HOOKS_CONSUMER}-retry"))
        .await?
        .info()
        .await?
        .state
        .messages;
    Ok(format!(
        "Ready with 2 consumers {ready_after:.1?} after apply; {HOOKS_MESSAGES} messages: good got each once \
         (0 duplicates, signed), bad's {} copies dead-lettered after 3 attempts each, all within \
         {settled_in:.1?} of the publish; statuses good delivered {}, bad failed {} and dead-lettered {} \
         ({} copies left on the retry stream)",
        dead.len(),
        g.delivered,
        b.failed,
        b.dead_lettered,
        retry
    ))
}
