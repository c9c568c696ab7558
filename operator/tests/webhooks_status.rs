//! Webhook status from the workers' reports, against a real API server and a real RabbitMQ: 200 Webhooks
//! kept busy for a minute by reports published straight to the fleet's reports queue (ten "workers", one
//! report a second each, every Webhook in every report; a tenth of the Webhooks flip between failing and
//! delivering every second). A watch of the Webhooks counts the operator's status writes (MODIFIED
//! events): at most one per 10 s per Webhook. Then every status shows the reported counts, and the
//! flipping ones their last failure.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use futures::{StreamExt, TryStreamExt};
use hookfleet_crds::Webhook;
use hookfleet_crds::contract::webhooks::{FailureNote, Report, Tally, reports_queue};
use hookfleet_crds::webhook::reason;
use hookfleet_testkit::process::wait_for;
use hookfleet_testkit::{ControlPlane, RabbitMq};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;

const WEBHOOKS: usize = 200;
const WORKERS: usize = 10;
const SECONDS: u64 = 60;

fn name(i: usize) -> String {
    format!("w{i:03}")
}

/// Every tenth Webhook flips: a failure at odd seconds, a delivery at even ones.
fn flips(i: usize) -> bool {
    i.is_multiple_of(10)
}

fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

fn report(worker: usize, tick: u64) -> Report {
    let at = now_ms();
    let webhooks = (0..WEBHOOKS)
        .map(|i| {
            let t = if flips(i) && tick % 2 == 1 {
                Tally {
                    generation: 1,
                    failed: 1,
                    last_failure: Some(FailureNote {
                        at_ms: at,
                        status: Some(503),
                        kind: "http_status".into(),
                        excerpt: Some(format!("busy {tick}")),
                    }),
                    consecutive_failures: 1,
                    ..Tally::default()
                }
            } else {
                Tally {
                    generation: 1,
                    delivered: 2,
                    last_success_ms: Some(at),
                    ..Tally::default()
                }
            };
            (name(i), t)
        })
        .collect();
    Report {
        worker: format!("worker-{worker}"),
        at_ms: at,
        webhooks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_come_from_aggregates_at_a_bounded_rate() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let (cp, rmq) = tokio::try_join!(ControlPlane::start(), RabbitMq::start())?;
    cp.install_crds().await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;
    let mut cfg = config("reports");
    // Counts-only changes every 20 s instead of the default 60 s, so the final counts show within the
    // test's time; the cadence asserted (state changes, at most once per 10 s) is the default.
    cfg.webhook_counts_every = Duration::from_secs(20);
    let state_every = cfg.webhook_status_every;
    let op = spawn(cp.client(), cfg);
    fleet(&cp, "busy", "busy").await?;
    for i in 0..WEBHOOKS {
        create_webhook(
            &cp,
            serde_json::json!({"metadata": {"name": name(i)}, "spec": {
                "integration": "busy", "events": [format!("e{i}")],
                "destination": {"url": format!("https://u:p@customer-{i}.example.com/hooks")},
            }}),
        )
        .await?;
    }
    let api: Api<Webhook> = Api::namespaced(cp.client(), NS);
    let all_delivering = || async {
        let list = api.list(&ListParams::default()).await?;
        let n = list
            .items
            .iter()
            .filter(|w| {
                w.condition("Ready")
                    .is_some_and(|c| c.reason == reason::DELIVERING)
            })
            .count();
        Ok((n == WEBHOOKS).then_some(list))
    };
    wait_for(
        "every Webhook Delivering",
        Duration::from_secs(60),
        Duration::from_millis(500),
        all_delivering,
    )
    .await?;

    // The operator consumes the reports queue.
    let conn = connect(&rmq.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    let queue = reports_queue("busy");
    until_consumed(&ch, &queue).await?;

    // Count status writes from here on.
    let rv = api
        .list_metadata(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let watch_api = api.clone();
    let counter = tokio::spawn(async move {
        let mut seen: HashMap<String, Vec<Instant>> = HashMap::new();
        let wp = WatchParams::default().timeout(SECONDS as u32 + 30);
        let mut events = watch_api.watch(&wp, &rv).await?.boxed();
        while let Some(ev) = events.try_next().await? {
            if let WatchEvent::Modified(w) = ev {
                seen.entry(w.metadata.name.unwrap_or_default())
                    .or_default()
                    .push(Instant::now());
            }
        }
        anyhow::Ok(seen)
    });
    let writes_before = op
        .metrics
        .writes
        .get_or_create(&hookfleet_operator::metrics::KindLabels {
            kind: "WebhookStatus".into(),
        })
        .get();

    // A minute of reports: ten workers, one report a second each.
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for t in 0..SECONDS {
        tick.tick().await;
        for w in 0..WORKERS {
            let body = serde_json::to_vec(&report(w, t))?;
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await?;
        }
    }
    let window = t0.elapsed();
    let seen = counter.await??;
    let writes_after = op
        .metrics
        .writes
        .get_or_create(&hookfleet_operator::metrics::KindLabels {
            kind: "WebhookStatus".into(),
        })
        .get();

    let total: usize = seen.values().map(Vec::len).sum();
    let mut min_gap = Duration::MAX;
    let mut most = 0;
    for times in seen.values() {
        most = most.max(times.len());
        for pair in times.windows(2) {
            min_gap = min_gap.min(pair[1] - pair[0]);
        }
    }
    let per_minute = total as f64 * 60.0 / (window.as_secs_f64() + 30.0).max(1.0);
    println!(
        "{WEBHOOKS} Webhooks, {} reports/s ({} tallies/s per Webhook) for {:?} (+ the watch's last 30 s): {total} \
         status writes seen by the watch ({per_minute:.0}/min, {:.1}/min per Webhook), at most {most} for one \
         Webhook, shortest gap between two writes of one Webhook {:?}; the operator's metric counted {}",
        WORKERS,
        WORKERS,
        window,
        per_minute / WEBHOOKS as f64,
        min_gap,
        writes_after - writes_before
    );
    // Watch delivery jitters a little around the writer's 10 s.
    assert!(
        min_gap >= state_every - Duration::from_millis(500),
        "two writes of one Webhook {min_gap:?} apart"
    );
    let bound = ((window.as_secs() + 30) / state_every.as_secs() + 1) as usize;
    assert!(most <= bound, "{most} writes of one Webhook in {window:?}");
    assert!(total > 0, "the statuses were written");

    // Every status shows what was reported.
    let expected = |i: usize| -> (i64, i64) {
        let (w, s) = (WORKERS as i64, SECONDS as i64);
        if flips(i) {
            (s / 2 * w * 2, s / 2 * w)
        } else {
            (s * w * 2, 0)
        }
    };
    let list = wait_for(
        "the reported counts",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let list = api.list(&ListParams::default()).await?;
            let wrong: Vec<String> = list
                .items
                .iter()
                .filter_map(|w| {
                    let i: usize = w.metadata.name.as_deref()?[1..].parse().ok()?;
                    let s = w.status.clone().unwrap_or_default();
                    ((s.delivered, s.failed) != expected(i))
                        .then(|| format!("{} {}/{}", name(i), s.delivered, s.failed))
                })
                .collect();
            if wrong.is_empty() {
                Ok(Some(list))
            } else {
                anyhow::bail!("{} not yet, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(3)])
            }
        },
    )
    .await?;
    let by_name: BTreeMap<String, &Webhook> = list
        .items
        .iter()
        .map(|w| (w.metadata.name.clone().unwrap_or_default(), w))
        .collect();
    for i in 0..WEBHOOKS {
        let w = by_name[&name(i)];
        let s = w.status.as_ref().unwrap();
        assert_eq!(
            s.destination_host.as_deref(),
            Some(format!("customer-{i}.example.com").as_str())
        );
        assert!(s.last_success_time.is_some());
        let ready = w.condition("Ready").unwrap();
        if flips(i) {
            let f = s.last_failure.as_ref().expect("the last failure");
            assert_eq!((f.status, f.kind.as_str()), (Some(503), "http_status"));
            assert_eq!(
                f.excerpt.as_deref(),
                Some(format!("busy {}", SECONDS - 1).as_str())
            );
            assert_eq!(
                s.consecutive_failures, WORKERS as i64,
                "each worker's failure after the last success"
            );
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                ("False", reason::FAILING)
            );
        } else {
            assert!(s.last_failure.is_none());
            assert_eq!(s.consecutive_failures, 0);
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                ("True", reason::DELIVERING)
            );
        }
    }
    let flippers = (0..WEBHOOKS).filter(|i| flips(*i)).count() as i32;
    let intg = until(&cp, "busy", "status.webhooks", 30, |i| {
        i.status
            .as_ref()
            .and_then(|s| s.webhooks.as_ref())
            .is_some_and(|w| w.failing == flippers && w.ready == WEBHOOKS as i32 - flippers)
    })
    .await?;
    println!("status.webhooks: {:?}", intg.status.unwrap().webhooks);
    let _ = ch.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
