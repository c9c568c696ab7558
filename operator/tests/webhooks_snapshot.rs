//! A Webhooks fleet's snapshot Secret follows its Webhooks and the Secrets they reference, against a real
//! API server: created, changed, paused, deleted, a Secret rotated; refused and Secret-less Webhooks are
//! left out with the reason on their status. The change → snapshot latency is measured (printed p50/p99)
//! with the resync far away, so what it measures is the watches.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hookfleet_crds::Webhook;
use hookfleet_crds::contract::webhooks::Snapshot;
use hookfleet_crds::webhook::reason;
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::wait_for;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

/// Waits until the snapshot of `fleet` satisfies `f`; returns it and how long it took.
async fn snapshot_until(
    cp: &ControlPlane,
    what: &str,
    f: impl Fn(&Snapshot) -> bool,
) -> anyhow::Result<(Snapshot, Duration)> {
    let t0 = Instant::now();
    let f = &f;
    let s = wait_for(
        what,
        Duration::from_secs(20),
        Duration::from_millis(10),
        || async move { Ok(snapshot(cp, "fleet").await?.filter(|s| f(s))) },
    )
    .await?;
    Ok((s, t0.elapsed()))
}

fn entry<'a>(s: &'a Snapshot, name: &str) -> Option<&'a hookfleet_crds::contract::webhooks::Entry> {
    s.webhooks.iter().find(|e| e.name == name)
}

fn names(s: &Snapshot) -> Vec<&str> {
    s.webhooks.iter().map(|e| e.name.as_str()).collect()
}

async fn ready_reason(api: &Api<Webhook>, name: &str, reason: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{name} Ready reason {reason}"),
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async move {
            let w = api.get(name).await?;
            Ok(w.condition("Ready")
                .filter(|c| c.reason == reason)
                .map(|c| c.message.clone()))
        },
    )
    .await
}

fn hook(name: &str, events: &[&str], secret: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"name": name}, "spec": {
        "integration": "fleet", "events": events,
        "destination": {"url": format!("https://{name}.example.com/in"),
            "signing": {"secretRef": {"name": secret, "key": "k"}}},
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_follows_webhooks_and_their_secrets() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start().await?;
    cp.install_crds().await?;
    secret(&cp, "rabbitmq", "amqp://guest:guest@127.0.0.1:1/%2f").await?;
    put_secret(&cp, "acme-key", serde_json::json!({"k": "v1"})).await?;
    let mut cfg = config("snapshot");
    cfg.resync = Duration::from_secs(600);
    cfg.retry = Duration::from_secs(600);
    cfg.max_backoff = Duration::from_secs(600);
    let op = spawn(cp.client(), cfg);
    let api: Api<Webhook> = Api::namespaced(cp.client(), NS);

    fleet(&cp, "fleet", "fleet").await?;
    create_webhook(&cp, hook("acme", &["temp"], "acme-key")).await?;
    // Refused by the fleet (a template that does not compile), and one whose Secret does not exist.
    let mut bad = hook("bad", &["temp"], "acme-key");
    bad["spec"]["destination"]["body"] = serde_json::json!({"template": "{{ unclosed"});
    create_webhook(&cp, bad).await?;
    create_webhook(&cp, hook("lost", &["x"], "lost-key")).await?;
    // Names an Integration that does not exist.
    let mut orphan = hook("orphan", &["x"], "acme-key");
    orphan["spec"]["integration"] = "nofleet".into();
    create_webhook(&cp, orphan).await?;

    let (s, _) = snapshot_until(&cp, "acme alone", |s| names(s) == ["acme"]).await?;
    let acme = entry(&s, "acme").unwrap();
    assert_eq!(acme.secrets.get("acme-key/k").map(String::as_str), Some("v1"));
    assert_eq!(acme.events, ["temp"]);
    assert_eq!(acme.secrets.len(), 1, "its own keys, nothing else");
    let m = ready_reason(&api, "bad", reason::INVALID_SPEC).await?;
    assert!(m.contains("spec.destination.body"), "{m}");
    let m = ready_reason(&api, "lost", reason::SECRET_MISSING).await?;
    assert!(m.contains("lost-key") && !m.contains("v1"), "{m}");
    ready_reason(&api, "orphan", reason::NO_INTEGRATION).await?;
    ready_reason(&api, "acme", reason::DELIVERING).await?;
    let intg = until(&cp, "fleet", "status.webhooks", 20, |i| {
        i.status
            .as_ref()
            .and_then(|s| s.webhooks.as_ref())
            .is_some_and(|w| w.total == 3 && w.ready == 1 && w.invalid == 1)
    })
    .await?;

    // The fleet suspended: its Webhooks are not delivered (Ready False, FleetSuspended) and not counted
    // ready; their snapshot is kept for the resume; a refused one keeps its own reason. Then back.
    let fleets: Api<hookfleet_crds::Integration> = Api::namespaced(cp.client(), NS);
    let suspend = |on: bool| serde_json::json!({"spec": {"suspend": on}});
    fleets
        .patch("fleet", &PatchParams::default(), &Patch::Merge(suspend(true)))
        .await?;
    let m = ready_reason(&api, "acme", reason::FLEET_SUSPENDED).await?;
    assert!(m.contains("Integration fleet is suspended"), "{m}");
    ready_reason(&api, "bad", reason::INVALID_SPEC).await?;
    until(&cp, "fleet", "no Webhook ready while suspended", 20, |i| {
        i.status
            .as_ref()
            .and_then(|s| s.webhooks.as_ref())
            .is_some_and(|w| w.total == 3 && w.ready == 0)
    })
    .await?;
    assert_eq!(names(&snapshot(&cp, "fleet").await?.unwrap()), ["acme"]);
    fleets
        .patch("fleet", &PatchParams::default(), &Patch::Merge(suspend(false)))
        .await?;
    ready_reason(&api, "acme", reason::DELIVERING).await?;

    println!("status.webhooks: {:?}", intg.status.unwrap().webhooks);
    let acme_status = api.get("acme").await?.status.unwrap_or_default();
    assert_eq!(acme_status.destination_host.as_deref(), Some("acme.example.com"));

    // ~20 changes, each timed from the API call's return to the snapshot showing it.
    let pp = PatchParams::default();
    let mut lat = Vec::new();
    for i in 0..6 {
        let events = vec![format!("temp-{i}")];
        api.patch(
            "acme",
            &pp,
            &Patch::Merge(serde_json::json!({"spec": {"events": events}})),
        )
        .await?;
        let (_, d) = snapshot_until(&cp, "events changed", |s| {
            entry(s, "acme").is_some_and(|e| e.events == events)
        })
        .await?;
        lat.push(d);
    }
    for paused in [true, false, true] {
        api.patch(
            "acme",
            &pp,
            &Patch::Merge(serde_json::json!({"spec": {"paused": paused}})),
        )
        .await?;
        let (_, d) = snapshot_until(&cp, "paused", |s| {
            entry(s, "acme").is_some_and(|e| e.paused == paused)
        })
        .await?;
        lat.push(d);
    }
    ready_reason(&api, "acme", reason::PAUSED).await?;
    for v in ["v2", "v3", "v4", "v5"] {
        put_secret(&cp, "acme-key", serde_json::json!({"k": v})).await?;
        let (_, d) = snapshot_until(&cp, "rotated", |s| {
            entry(s, "acme").is_some_and(|e| e.secrets.get("acme-key/k").map(String::as_str) == Some(v))
        })
        .await?;
        lat.push(d);
    }
    for i in 0..3 {
        let name = format!("new-{i}");
        create_webhook(&cp, hook(&name, &["n"], "acme-key")).await?;
        let (_, d) = snapshot_until(&cp, "created", |s| entry(s, &name).is_some()).await?;
        lat.push(d);
        api.delete(&name, &DeleteParams::default()).await?;
        let (_, d) = snapshot_until(&cp, "deleted", |s| entry(s, &name).is_none()).await?;
        lat.push(d);
    }
    // The missing Secret appears: the Webhook joins the snapshot.
    put_secret(&cp, "lost-key", serde_json::json!({"k": "l1"})).await?;
    let (_, d) = snapshot_until(&cp, "lost found", |s| entry(s, "lost").is_some()).await?;
    lat.push(d);
    ready_reason(&api, "lost", reason::DELIVERING).await?;
    // The refused Webhook fixed: joins too.
    api.patch(
        "bad",
        &pp,
        &Patch::Merge(
            serde_json::json!({"spec": {"destination": {"body": {"template": "{{ data | tojson }}"}}}}),
        ),
    )
    .await?;
    let (s, d) = snapshot_until(&cp, "bad fixed", |s| entry(s, "bad").is_some()).await?;
    lat.push(d);
    assert_eq!(names(&s), ["acme", "bad", "lost"], "sorted by name");
    // Moved to another Integration: leaves this one.
    api.patch(
        "bad",
        &pp,
        &Patch::Merge(serde_json::json!({"spec": {"integration": "nofleet"}})),
    )
    .await?;
    let (_, d) = snapshot_until(&cp, "bad moved away", |s| entry(s, "bad").is_none()).await?;
    lat.push(d);
    ready_reason(&api, "bad", reason::NO_INTEGRATION).await?;

    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    println!(
        "change -> snapshot Secret updated, {} changes: p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        pct(0.5),
        pct(0.99),
        lat.last().unwrap()
    );
    assert!(pct(0.99) < Duration::from_secs(2), "p99 {:?}", pct(0.99));

    // A steady state applies nothing: no snapshot write while nothing changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = |op: &Running| {
        op.metrics
            .writes
            .get_or_create(&hookfleet_operator::metrics::KindLabels {
                kind: "Secret".into(),
            })
            .get()
    };
    let (before, reconciles) = (writes(&op), op.reconciles());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        writes(&op),
        before,
        "no snapshot write in a steady state ({} reconciles meanwhile)",
        op.reconciles() - reconciles
    );

    // The Integration becomes a single-destination one: its snapshot (its former Webhooks' Secret values)
    // goes; the Webhooks are no longer delivered by anything.
    let integrations: Api<hookfleet_crds::Integration> = Api::namespaced(cp.client(), NS);
    integrations
        .patch(
            "fleet",
            &pp,
            &Patch::Merge(serde_json::json!({"spec": {"webhooks": null,
                "destination": {"url": "https://one.example.com/in"}}})),
        )
        .await?;
    wait_for(
        "the snapshot deleted",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { Ok(snapshot(&cp, "fleet").await?.is_none().then_some(())) },
    )
    .await?;
    ready_reason(&api, "acme", reason::NO_INTEGRATION).await?;
    Ok(())
}
