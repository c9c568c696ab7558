//! Auto-pause, against a real API server and a real RabbitMQ: failing reports for one Webhook (published
//! straight to the fleet's reports queue, as the workers do) pause it with reason `Failing` once they
//! are enough and span long enough, a report of kind `gone` (a 410) pauses another with reason `Gone`,
//! and a third Webhook is left alone. Each pause: `Paused=True`/`Ready=False` with the reason, one Event,
//! the metric, and the snapshot entry `paused` (its copies wait on the retry path). The annotation
//! `hookfleet.io/resume` resumes one; the other stays paused across an operator restart and resumes when
//! `spec.paused` is set and cleared. A Webhook's limits above the Integration's are refused, naming the
//! field; those below reach the snapshot entry.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use hookfleet_crds::Webhook;
use hookfleet_crds::contract::webhooks::{FailureNote, Report, Tally, reports_queue};
use hookfleet_crds::webhook::{RESUME_ANNOTATION, reason};
use hookfleet_operator::metrics::PausedLabels;
use hookfleet_testkit::process::wait_for;
use hookfleet_testkit::{ControlPlane, RabbitMq};
use kube::api::{Api, Patch, PatchParams};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;

fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

fn failure(at_ms: i64, status: u16, kind: &str, consecutive: u64) -> Tally {
    Tally {
        generation: 1,
        failed: 1,
        last_failure: Some(FailureNote {
            at_ms,
            status: Some(status),
            kind: kind.into(),
            excerpt: None,
        }),
        consecutive_failures: consecutive,
        ..Tally::default()
    }
}

/// The (status, reason) of condition `t`.
fn cond_of(w: &Webhook, t: &str) -> (String, String) {
    w.condition(t)
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

async fn webhook_until(
    api: &Api<Webhook>,
    name: &str,
    what: &str,
    f: impl Fn(&Webhook) -> bool,
) -> anyhow::Result<Webhook> {
    let f = &f;
    wait_for(
        what,
        Duration::from_secs(40),
        Duration::from_millis(200),
        || async move {
            let w = api.get(name).await?;
            if f(&w) {
                Ok(Some(w))
            } else {
                anyhow::bail!("status now: {}", serde_json::to_string(&w.status)?)
            }
        },
    )
    .await
}

async fn entry_paused_until(cp: &ControlPlane, name: &str, paused: bool) -> anyhow::Result<()> {
    wait_for(
        &format!("{name}'s snapshot entry paused={paused}"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let s = snapshot(cp, "fleet").await?;
            Ok(s.and_then(|s| {
                s.webhooks
                    .iter()
                    .find(|e| e.name == name)
                    .filter(|e| e.paused == paused)
                    .map(|_| ())
            }))
        },
    )
    .await
}

fn paused_metric(op: &Running, reason: &str) -> i64 {
    op.metrics
        .integrations
        .webhooks_paused
        .get_or_create(&PausedLabels {
            integration: format!("{NS}/fleet"),
            reason: reason.into(),
        })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_gone_webhooks_are_paused_kept_and_resumed() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let (cp, rmq) = tokio::try_join!(ControlPlane::start(), RabbitMq::start())?;
    cp.install_crds().await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;
    let op = spawn(cp.client(), config("autopause-1"));
    create(
        &cp,
        serde_json::json!({"metadata": {"name": "fleet"}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "events"},
            "webhooks": {"perWebhook": {
                "maxInFlight": 8,
                "rateLimit": {"perSecond": 100},
                "autoPause": {"consecutiveFailures": 3, "after": "2s"},
            }},
        }}),
    )
    .await?;
    let hook = |name: &str, limits: serde_json::Value| {
        serde_json::json!({"metadata": {"name": name}, "spec": {
            "integration": "fleet", "events": [name],
            "destination": {"url": format!("https://{name}.example.com/h")},
            "limits": limits,
        }})
    };
    for name in ["flaky", "dead"] {
        create_webhook(&cp, hook(name, serde_json::json!({}))).await?;
    }
    create_webhook(
        &cp,
        hook(
            "fine",
            serde_json::json!({"maxInFlight": 2, "rateLimit": {"perSecond": 5}}),
        ),
    )
    .await?;
    create_webhook(&cp, hook("greedy", serde_json::json!({"maxInFlight": 64}))).await?;
    let api: Api<Webhook> = Api::namespaced(cp.client(), NS);

    // Limits: lowered ones reach the entry, a raised one is refused naming the field.
    let greedy = webhook_until(&api, "greedy", "greedy refused", |w| {
        cond_of(w, "Ready").1 == reason::INVALID_SPEC
    })
    .await?;
    let msg = &greedy.condition("Ready").unwrap().message;
    assert!(msg.contains("spec.limits.maxInFlight"), "{msg}");
    let snap = wait_for(
        "the snapshot of three",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok(snapshot(&cp, "fleet").await?.filter(|s| s.webhooks.len() == 3)) },
    )
    .await?;
    let entries: BTreeMap<_, _> = snap.webhooks.iter().map(|e| (e.name.as_str(), e)).collect();
    assert_eq!(entries["fine"].max_in_flight, Some(2));
    assert_eq!(
        entries["fine"].rate_limit.map(|r| (r.per_second, r.burst())),
        Some((5, 5))
    );
    assert_eq!(
        entries["flaky"].max_in_flight,
        Some(8),
        "the Integration's default"
    );
    assert!(entries.values().all(|e| !e.paused));

    // The operator consumes the reports queue.
    let conn = connect(&rmq.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    let queue = reports_queue("events");
    until_consumed(&ch, &queue).await?;
    let publish = |r: Report| {
        let ch = &ch;
        let queue = &queue;
        async move {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&r)?,
                BasicProperties::default(),
            )
            .await?
            .await?;
            anyhow::Ok(())
        }
    };
    let report = |worker: &str, at: i64, webhooks: Vec<(&str, Tally)>| Report {
        worker: worker.into(),
        at_ms: at,
        webhooks: webhooks.into_iter().map(|(n, t)| (n.to_owned(), t)).collect(),
    };

    // Two failures of flaky: too few, not paused.
    let t0 = now_ms();
    publish(report(
        "w1",
        t0,
        vec![("flaky", failure(t0 - 5_000, 503, "http_status", 2))],
    ))
    .await?;
    webhook_until(&api, "flaky", "flaky failing", |w| {
        cond_of(w, "Ready").1 == reason::FAILING
            && w.status.as_ref().is_some_and(|s| s.consecutive_failures == 2)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let w = api.get("flaky").await?;
    assert_eq!(cond_of(&w, "Paused"), ("False".into(), "Active".into()));
    // Four in a row over 5 s (at two workers), and a 410 from dead; fine delivers.
    let t1 = now_ms();
    let ok = Tally {
        generation: 1,
        delivered: 3,
        last_success_ms: Some(t1),
        ..Tally::default()
    };
    publish(report(
        "w2",
        t1,
        vec![
            ("flaky", failure(t1, 503, "http_status", 2)),
            ("dead", failure(t1, 410, "gone", 1)),
            ("fine", ok),
        ],
    ))
    .await?;
    let flaky = webhook_until(&api, "flaky", "flaky paused Failing", |w| {
        cond_of(w, "Paused") == ("True".into(), reason::FAILING.into())
    })
    .await?;
    assert_eq!(cond_of(&flaky, "Ready"), ("False".into(), reason::FAILING.into()));
    let auto = flaky.status.as_ref().unwrap().auto_paused.clone().unwrap();
    assert!(
        auto.message.contains("4 delivery attempts failed in a row"),
        "{}",
        auto.message
    );
    let dead = webhook_until(&api, "dead", "dead paused Gone", |w| {
        cond_of(w, "Paused") == ("True".into(), reason::GONE.into())
    })
    .await?;
    assert_eq!(cond_of(&dead, "Ready"), ("False".into(), reason::GONE.into()));
    let fine = api.get("fine").await?;
    assert_eq!(cond_of(&fine, "Paused"), ("False".into(), "Active".into()));
    entry_paused_until(&cp, "flaky", true).await?;
    entry_paused_until(&cp, "dead", true).await?;
    let s = snapshot(&cp, "fleet").await?.unwrap();
    assert!(!s.webhooks.iter().find(|e| e.name == "fine").unwrap().paused);
    assert_eq!(
        (
            paused_metric(&op, reason::FAILING),
            paused_metric(&op, reason::GONE)
        ),
        (1, 1)
    );
    let evs = wait_for(
        "one Event per pause",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let f = events(&cp, "flaky", Some("PausedFailing")).await?;
            let d = events(&cp, "dead", Some("PausedGone")).await?;
            Ok((!f.is_empty() && !d.is_empty()).then_some((f, d)))
        },
    )
    .await?;
    // More failing reports while paused: still one Event.
    let t2 = now_ms();
    publish(report(
        "w1",
        t2,
        vec![("flaky", failure(t2, 503, "http_status", 3))],
    ))
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        events(&cp, "flaky", Some("PausedFailing")).await?.len(),
        evs.0.len()
    );
    assert_eq!(evs.0.len(), 1);
    assert_eq!(evs.1.len(), 1);

    // The annotation resumes flaky (its value recorded), and its entry is delivered again.
    let pp = PatchParams::default();
    api.patch(
        "flaky",
        &pp,
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {RESUME_ANNOTATION: "1"}}})),
    )
    .await?;
    let flaky = webhook_until(&api, "flaky", "flaky resumed", |w| {
        cond_of(w, "Paused").0 == "False"
    })
    .await?;
    let st = flaky.status.as_ref().unwrap();
    assert_eq!(st.resume_seen.as_deref(), Some("1"));
    assert!(st.auto_paused.is_none() && st.resumed_at.is_some());
    entry_paused_until(&cp, "flaky", false).await?;
    wait_for(
        "the Resumed Event",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async { Ok((!events(&cp, "flaky", Some("Resumed")).await?.is_empty()).then_some(())) },
    )
    .await?;

    // An operator restart: dead stays paused (read back from its status).
    op.task.abort();
    let op2 = spawn(cp.client(), config("autopause-2"));
    wait_for(
        "the new leader",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { Ok(op2.leader().then_some(())) },
    )
    .await?;
    wait_for(
        "the new leader's metric",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async { Ok((paused_metric(&op2, reason::GONE) == 1).then_some(())) },
    )
    .await?;
    let dead = api.get("dead").await?;
    assert_eq!(cond_of(&dead, "Paused"), ("True".into(), reason::GONE.into()));
    entry_paused_until(&cp, "dead", true).await?;

    // spec.paused set: the user's pause takes over; cleared: delivering again.
    for paused in [true, false] {
        api.patch(
            "dead",
            &pp,
            &Patch::Merge(serde_json::json!({"spec": {"paused": paused}})),
        )
        .await?;
        let want = if paused {
            ("True".to_owned(), reason::PAUSED.to_owned())
        } else {
            ("False".to_owned(), "Active".to_owned())
        };
        let w = webhook_until(&api, "dead", "dead's pause follows spec.paused", |w| {
            cond_of(w, "Paused") == want
        })
        .await?;
        assert!(w.status.as_ref().unwrap().auto_paused.is_none());
        entry_paused_until(&cp, "dead", paused).await?;
    }
    assert_eq!(paused_metric(&op2, reason::GONE), 0);
    let _ = ch.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
