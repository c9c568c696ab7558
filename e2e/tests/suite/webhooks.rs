//! Scenario `webhooks`: one Integration with 3 workers delivers 200 Webhooks on 200 paths of the sink, with
//! overlapping event prefixes and a few header filters, each signed with its own key. Through a worker kill,
//! each path receives exactly the (message, Webhook) pairs whose event name and headers match (none missing,
//! none extra, duplicates counted). Mid-stream a Webhook's URL and signing key change (nothing reaches the
//! old URL, nothing is signed only with the old key 5 s later), one Webhook is deleted (it receives nothing
//! 5 s later), and a paused one receives nothing until it resumes, then gets its messages. Last, the
//! propagation of Webhook changes to the fleet is measured: URL flips of a probe Webhook under a steady
//! stream of its events, change → first delivery at the new URL (`HOOKFLEET_E2E_PROPAGATION` changes,
//! 20 by default).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hookfleet_crds::Webhook;
use hookfleet_e2e::messages;
use hookfleet_e2e::process::wait_for;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

use hookfleet_e2e::pods::{signal, worker_pids};

use super::{Outcome, Stack};

const NS: &str = "e2e-webhooks";
const QUEUE: &str = "e2e.webhooks";
const WEBHOOKS: usize = 200;
/// Event names of the messages, in turn (`other` matches no Webhook).
const NAMES: [&str; 9] = [
    "temp",
    "temperature",
    "temperature/basement",
    "high_temp",
    "door/open",
    "door/closed",
    "battery/low",
    "other",
    "b",
];
/// Event prefixes of the Webhooks, in turn.
const PREFIXES: [&str; 8] = [
    "temp",
    "temperature",
    "temperature/base",
    "high",
    "door/",
    "door/open",
    "battery",
    "b",
];
/// The Webhooks the scenario changes: paused from the start, deleted, and given a new URL and key.
const PAUSED: usize = 3;
const DELETED: usize = 4;
const MOVED: usize = 5;

/// What Webhook `i` takes: (event prefixes, header matches).
fn filter(i: usize) -> (Vec<String>, BTreeMap<String, String>) {
    let mut events = vec![PREFIXES[i % PREFIXES.len()].to_owned()];
    if i.is_multiple_of(10) {
        // Overlaps its first prefix for some events: still one delivery per message.
        events.push("door/".into());
    }
    let mut headers = BTreeMap::new();
    if i % 25 == 7 {
        headers.insert("device-id".to_owned(), "dev-2".to_owned());
    }
    (events, headers)
}

/// Message `j`: its event name and device.
fn event(j: usize) -> (String, String) {
    (NAMES[j % NAMES.len()].to_owned(), format!("dev-{}", j % 4))
}

/// The reference rule (docs/webhooks.md): a name prefix and every header equal.
fn matches(i: usize, j: usize) -> bool {
    let (events, headers) = filter(i);
    let (name, device) = event(j);
    events.iter().any(|p| name.starts_with(p.as_str()))
        && headers.iter().all(|(k, v)| k == "device-id" && *v == device)
}

fn key(i: usize) -> String {
    format!("signing-key-of-w{i}")
}

const MOVED_KEY: &str = "signing-key-of-w5-after-rotation";

fn webhook(
    s: &Stack,
    name: &str,
    path: &str,
    events: &[String],
    headers: &BTreeMap<String, String>,
) -> Result<Webhook> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Webhook",
        "metadata": {"name": name},
        "spec": {
            "integration": "fleet",
            "events": events,
            "matchHeaders": headers,
            "destination": {
                "url": format!("{}/{path}", s.sink.url().trim_end_matches("/hook")),
                "signing": {"secretRef": {"name": "keys", "key": name}},
            },
        },
    }))?)
}

fn publish_batch(
    s: &Stack,
    range: std::ops::Range<usize>,
    per_second: u32,
) -> impl Future<Output = Result<()>> + '_ {
    let msgs: Vec<(String, Vec<(String, String)>)> = range
        .map(|j| {
            let (name, device) = event(j);
            (
                format!("wh-{j}"),
                vec![("x-event".to_owned(), name), ("device-id".to_owned(), device)],
            )
        })
        .collect();
    async move { messages::publish_with_headers(&s.rmq.amqp_uri(), QUEUE, &msgs, Some(per_second)).await }
}

pub async fn webhooks(s: &Stack) -> Outcome {
    let api = s.namespace(NS, "").await?;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NS);
    let mut keys: BTreeMap<String, String> = (0..WEBHOOKS).map(|i| (format!("w{i}"), key(i))).collect();
    keys.insert("probe".into(), "probe-key".into());
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "keys"}, "stringData": keys}))?,
        )
        .await?;
    let hooks: Api<Webhook> = Api::namespaced(s.client.clone(), NS);
    for i in 0..WEBHOOKS {
        let (events, headers) = filter(i);
        let name = format!("w{i}");
        let mut w = webhook(s, &name, &format!("wh/{name}"), &events, &headers)?;
        w.spec.paused = i == PAUSED;
        hooks.create(&PostParams::default(), &w).await?;
    }
    let probe = webhook(s, "probe", "wh/probe-0", &["probe".into()], &BTreeMap::new())?;
    hooks.create(&PostParams::default(), &probe).await?;

    let mut intg = serde_json::json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
        "metadata": {"name": "fleet"},
        "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": QUEUE},
            "webhooks": {"eventNameHeader": "x-event", "allowPrivateNetworks": true},
            "delivery": {"concurrency": 64, "backoff": {"initial": "200ms", "max": "2s"}},
            "workers": {"replicas": 3, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}},
        },
    });
    let t0 = Instant::now();
    api.create(&PostParams::default(), &serde_json::from_value(intg.take())?)
        .await?;
    s.ready_with_consumers(&api, "fleet", 3).await?;
    let ready_after = t0.elapsed();
    let w0 = wait_for(
        "w0 Ready with its host in status",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let hooks = hooks.clone();
            async move {
                let w = hooks.get("w0").await?;
                let ready = w.condition("Ready").is_some_and(|c| c.status == "True");
                Ok((ready && w.status.as_ref().is_some_and(|s| s.destination_host.is_some())).then_some(w))
            }
        },
    )
    .await?;
    // Its status may trail w0's: a Webhook's state is written at most once per 10 s, and a pass writes a
    // bounded number of statuses (`reconcile/webhook_status.rs`), so one written before the Integration existed
    // (`IntegrationNotFound`) can still show that when w0 turns Ready.
    wait_for(
        &format!("w{PAUSED} Ready=False reason Paused"),
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            let hooks = hooks.clone();
            async move {
                let paused = hooks.get(&format!("w{PAUSED}")).await?;
                Ok(paused
                    .condition("Ready")
                    .is_some_and(|c| c.status == "False" && c.reason == "Paused")
                    .then_some(()))
            }
        },
    )
    .await?;
    let table = s.kubectl(&["get", "webhooks", "-n", NS])?;
    let header = table.lines().next().unwrap_or_default().to_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("w0 "))
        .context("no row for w0")?
        .to_owned();
    ensure!(
        row.contains("fleet") && row.contains("True") && w0.status.is_some(),
        "kubectl get webhooks:\n{table}"
    );
    let intg = api.get("fleet").await?;
    let counts = intg.status.as_ref().and_then(|s| s.webhooks.clone());
    ensure!(
        counts
            .as_ref()
            .is_some_and(|c| c.total == WEBHOOKS as i32 + 1 && c.paused == 1),
        "the Integration counts its Webhooks: {counts:?}"
    );

    // Phase A, through a worker kill: 135 messages at 60/s, SIGKILL to one worker after 1 s.
    let half = NAMES.len() * 15;
    let publisher = publish_batch(s, 0..half, 60);
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !s.local() {
            return anyhow::Ok("no kill (not the local node)".to_owned());
        }
        let pods = s.running_pods(NS, "fleet").await?;
        let pid = *worker_pids(pods.first().context("no worker pod")?)
            .first()
            .context("no worker process")?;
        signal(pid, nix::sys::signal::Signal::SIGKILL)?;
        Ok(format!("SIGKILL to the worker of {}", pods[0].name_any()))
    };
    let (published, killed) = tokio::join!(publisher, chaos);
    published?;
    let killed = killed?;

    // The moves: w5 to a new URL and key, w4 deleted.
    let mut keys_patch = BTreeMap::new();
    keys_patch.insert("w5-new", MOVED_KEY);
    secrets
        .patch(
            "keys",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": keys_patch})),
        )
        .await?;
    let moved_url = format!("{}/wh/w5-new", s.sink.url().trim_end_matches("/hook"));
    hooks
        .patch(
            &format!("w{MOVED}"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"destination": {
                "url": moved_url,
                "signing": {"secretRef": {"name": "keys", "key": "w5-new"}},
            }}})),
        )
        .await?;
    let moved_at = Instant::now();
    hooks
        .delete(&format!("w{DELETED}"), &DeleteParams::default())
        .await?;
    let deleted_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Phase B: the rest, after the changes took effect.
    publish_batch(s, half..2 * half, 60).await?;

    // Everything but the paused Webhook's pairs, then resume it.
    let expected = |i: usize, range: std::ops::Range<usize>| -> Vec<String> {
        range
            .filter(|&j| matches(i, j))
            .map(|j| format!("wh-{j}:w{i}"))
            .collect()
    };
    let mut want: Vec<String> = Vec::new();
    for i in (0..WEBHOOKS).filter(|&i| i != PAUSED && i != DELETED) {
        want.extend(expected(i, 0..2 * half));
    }
    let unmatched = (0..2 * half)
        .filter(|&j| (0..WEBHOOKS).all(|i| !matches(i, j)))
        .count();
    let paused_pairs = expected(PAUSED, 0..2 * half);
    let deliveries = |want: &[String]| -> HashMap<String, usize> {
        let set: HashSet<&String> = want.iter().collect();
        let mut n = HashMap::new();
        for h in s.sink.hits() {
            if let Some(id) = h.id.filter(|id| set.contains(id))
                && h.status / 100 == 2
            {
                *n.entry(id).or_insert(0) += 1;
            }
        }
        n
    };
    wait_for(
        "every matching pair delivered",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || {
            let (got, n) = (deliveries(&want).len(), want.len());
            async move {
                if got == n {
                    Ok(Some(()))
                } else {
                    anyhow::bail!("{got} of {n} pairs delivered")
                }
            }
        },
    )
    .await?;
    let before_resume: Vec<_> = s
        .sink
        .hits()
        .into_iter()
        .filter(|h| h.path == format!("/wh/w{PAUSED}"))
        .collect();
    ensure!(
        before_resume.is_empty(),
        "{} deliveries to the paused Webhook",
        before_resume.len()
    );
    hooks
        .patch(
            &format!("w{PAUSED}"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"paused": false}})),
        )
        .await?;
    let resumed_at = Instant::now();
    want.extend(paused_pairs.iter().cloned());
    wait_for(
        "the resumed Webhook's messages delivered",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let got = deliveries(&paused_pairs).len();
            let n = paused_pairs.len();
            async move {
                if got == n {
                    Ok(Some(()))
                } else {
                    anyhow::bail!("{got} of {n}")
                }
            }
        },
    )
    .await?;
    let resume_took = resumed_at.elapsed();

    // Every hit at this scenario's paths (`/wh/…`; the sink serves the other scenarios too): the right
    // path, the right key, no pair that should not be there.
    let want_set: HashSet<&String> = want.iter().collect();
    let mut extra = Vec::new();
    let (mut old_url_late, mut deleted_late, mut old_key_late) = (0, 0, 0);
    let grace = Duration::from_secs(5);
    for h in s.sink.hits().into_iter().filter(|h| h.path.starts_with("/wh/")) {
        let Some(id) = h.id.clone() else { continue };
        let Some((_, w)) = id.rsplit_once(':') else {
            extra.push(id);
            continue;
        };
        if w == "probe" {
            continue;
        }
        let i: usize = w.trim_start_matches('w').parse().unwrap_or(usize::MAX);
        if i == DELETED {
            if h.at > deleted_at + grace {
                deleted_late += 1;
            }
            if !expected(DELETED, 0..half).contains(&id) {
                extra.push(id);
            }
            continue;
        }
        if !want_set.contains(&id) {
            extra.push(id);
            continue;
        }
        let path_ok = h.path == format!("/wh/w{i}") || (i == MOVED && h.path == "/wh/w5-new");
        ensure!(path_ok, "{id} arrived at {}", h.path);
        if i == MOVED && h.at > moved_at + grace {
            if h.path != "/wh/w5-new" {
                old_url_late += 1;
            }
            if messages::verify_signature(&h, MOVED_KEY).is_err() {
                old_key_late += 1;
            }
        } else if i == MOVED {
            ensure!(
                messages::verify_with_any(&h, &[&key(MOVED), MOVED_KEY]).is_some(),
                "{id}: signed with neither key"
            );
        } else {
            messages::verify_signature(&h, &key(i)).with_context(|| format!("{id} at {}", h.path))?;
        }
    }
    ensure!(
        extra.is_empty(),
        "{} pairs that do not match: {:?}",
        extra.len(),
        &extra[..extra.len().min(5)]
    );
    ensure!(
        old_url_late == 0,
        "{old_url_late} deliveries to w5's old URL 5 s after the change"
    );
    ensure!(
        old_key_late == 0,
        "{old_key_late} deliveries to w5 without the new key 5 s after the change"
    );
    ensure!(
        deleted_late == 0,
        "{deleted_late} deliveries to w4 5 s after its deletion"
    );
    let account = messages::account(&want, &deliveries(&want), &HashSet::new())?;

    let (p50, p99, n) = propagation(s, &hooks).await?;
    let note = format!(
        "{} Webhooks, {} messages ({unmatched} unmatched) → {} pairs; Ready with 3 consumers {ready_after:.1?} \
         after apply; {killed}; w5 moved (URL + key), w4 deleted, w3 paused: 0 late; w3 resumed → its {} \
         delivered in {resume_took:.1?}; propagation over {n} changes p50 {p50:.2?} p99 {p99:.2?}; \
         `kubectl get webhooks`: {} | {}",
        WEBHOOKS + 1,
        2 * half,
        want.len(),
        paused_pairs.len(),
        header.split_whitespace().collect::<Vec<_>>().join(" "),
        row.split_whitespace().collect::<Vec<_>>().join(" "),
    );
    s.drop_namespace(NS).await;
    Ok((Some(account), note))
}

/// URL flips of the probe Webhook while its events stream at 50/s: change → first delivery at the new URL.
async fn propagation(s: &Stack, hooks: &Api<Webhook>) -> Result<(Duration, Duration, usize)> {
    let n: usize = std::env::var("HOOKFLEET_E2E_PROPAGATION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let stop = tokio::sync::watch::channel(false);
    let mut stopped = stop.1.clone();
    let uri = s.rmq.amqp_uri();
    let stream = tokio::spawn(async move {
        let mut j = 0usize;
        while !*stopped.borrow() {
            let batch: Vec<(String, Vec<(String, String)>)> = (j..j + 5)
                .map(|k| {
                    (
                        format!("probe-{k}"),
                        vec![("x-event".to_owned(), "probe".to_owned())],
                    )
                })
                .collect();
            j += 5;
            messages::publish_with_headers(&uri, QUEUE, &batch, None).await?;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stopped.changed() => {}
            }
        }
        anyhow::Ok(())
    });
    let base = s.sink.url().trim_end_matches("/hook").to_owned();
    let mut took = Vec::with_capacity(n);
    for k in 1..=n {
        let path = format!("/wh/probe-{k}");
        hooks
            .patch(
                "probe",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"destination": {"url": format!("{base}{path}")}}})),
            )
            .await?;
        let at = Instant::now();
        let first = wait_for(
            "a delivery at the probe's new URL",
            Duration::from_secs(30),
            Duration::from_millis(25),
            || {
                let first = s.sink.hits().into_iter().find(|h| h.path == path).map(|h| h.at);
                async move { Ok(first) }
            },
        )
        .await?;
        took.push(first.saturating_duration_since(at));
    }
    let _ = stop.0.send(true);
    stream.await??;
    took.sort();
    let pct = |p: f64| took[((took.len() as f64 * p).ceil() as usize).clamp(1, took.len()) - 1];
    Ok((pct(0.5), pct(0.99), took.len()))
}
