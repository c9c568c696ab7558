//! A stored Integration that does not fit the Rust types (created under a looser CRD; stored objects are not
//! re-validated when the CRD tightens) does not wedge the controller: the others reconcile, the bad one gets
//! a Warning Event and a condition naming the field, and it is not retried until it changes. Deleted while it
//! holds the queue finalizer, it is released at once (its queues cannot be named) with a Warning.

mod common;

use std::time::Duration;

use common::*;
use hookfleet_crds::Integration;
use hookfleet_crds::integration::condition::DEGRADED;
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};

/// The real CRD with `spec` accepting anything.
fn permissive_crd() -> anyhow::Result<CustomResourceDefinition> {
    let mut crd: serde_json::Value = serde_yaml::from_str(&hookfleet_crds::crd_yaml())?;
    for v in crd["spec"]["versions"].as_array_mut().unwrap() {
        v["schema"]["openAPIV3Schema"]["properties"]["spec"] =
            serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        if let Some(root) = v["schema"]["openAPIV3Schema"].as_object_mut() {
            root.remove("x-kubernetes-validations");
        }
        // The scale subresource type-checks spec.workers.replicas on create.
        if let Some(sub) = v["subresources"].as_object_mut() {
            sub.remove("scale");
        }
    }
    Ok(serde_json::from_value(crd)?)
}

fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_integration_does_not_wedge_the_controller() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start_with_workloads().await?;
    let rmq = hookfleet_testkit::RabbitMq::start().await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;

    // Two objects stored under a permissive CRD, then the real CRD back.
    hookfleet_testkit::control_plane::install_crd(&cp.client(), &permissive_crd()?).await?;
    let raw: Api<DynamicObject> =
        Api::namespaced_with(cp.client(), NS, &ApiResource::erase::<Integration>(&()));
    let source = serde_json::json!({"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "q"});
    let destination = serde_json::json!({"url": "https://erp.example.com/hooks"});
    for (name, spec) in [
        (
            "three",
            serde_json::json!({"source": source, "destination": destination, "workers": {"replicas": "three"}}),
        ),
        ("sourceless", serde_json::json!({"destination": destination})),
    ] {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": name}, "spec": spec
        }))?;
        raw.create(&PostParams::default(), &obj).await?;
    }
    // One that holds the queue finalizer (deletionPolicy Delete) too: its deletion must not wait.
    let held: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
        "metadata": {"name": "held", "finalizers": [hookfleet_crds::integration::finalizer::QUEUES]},
        "spec": {"source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "held",
                            "prefetch": "many"},
                 "destination": destination}
    }))?;
    raw.create(&PostParams::default(), &held).await?;
    cp.install_crds().await?;
    let typed: Api<Integration> = Api::namespaced(cp.client(), NS);
    assert!(
        typed.list(&ListParams::default()).await.is_err(),
        "a typed list fails on the stored objects (what would wedge a typed watch)"
    );

    let op = spawn(cp.client(), config("solo"));
    create_orders(&cp, "https://erp.example.com/hooks", 2).await?;

    // The good one reconciles: children and status.
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    wait_exists(&deployments, "orders").await?;
    let st = wait_for(
        "status of orders",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let raw = raw.clone();
            async move {
                let o = raw.get("orders").await?;
                Ok(o.data
                    .get("status")
                    .filter(|s| s.get("observedGeneration").is_some())
                    .cloned())
            }
        },
    )
    .await?;
    eprintln!("orders status: {st}");

    // The bad ones: a Warning Event and a condition naming the problem, nothing applied.
    for (name, needle) in [
        ("three", "spec.workers.replicas: invalid type: string \"three\""),
        ("sourceless", "missing field `source`"),
    ] {
        let cp = &cp;
        let evs = wait_for(
            &format!("InvalidSpec Event on {name}"),
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async move {
                let evs = events(cp, name, Some("InvalidSpec")).await?;
                Ok((!evs.is_empty()).then_some(evs))
            },
        )
        .await?;
        let note = evs[0].note.clone().unwrap_or_default();
        eprintln!("{name}: Event {note}");
        assert_eq!(evs[0].type_.as_deref(), Some("Warning"));
        assert!(note.contains(needle), "{name}: {note}");
        // The Event is published before the status is written: wait for the condition, do not race it.
        let raw_api = &raw;
        let degraded = wait_for(
            &format!("Degraded/InvalidSpec on {name}"),
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async move {
                let o = raw_api.get(name).await?;
                Ok(o.data["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Degraded"))
                    .cloned())
            },
        )
        .await?;
        assert_eq!(
            (degraded["status"].as_str(), degraded["reason"].as_str()),
            (Some("True"), Some("InvalidSpec")),
            "{name}: {degraded}"
        );
        assert!(degraded["message"].as_str().unwrap_or("").contains(needle));
        assert!(
            deployments.get_opt(name).await?.is_none(),
            "nothing applied for {name}"
        );
    }

    // Not retried hot: with a 1 s retry/resync, the error count and the Events stay put.
    let text = http_get(op.http, "/metrics").await?;
    let key = "hookfleet_operator_reconcile_errors_total{reason=\"invalid_spec\"}";
    let before = metric(&text, key);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = metric(&http_get(op.http, "/metrics").await?, key);
    eprintln!("invalid_spec errors: {before} → {after} in 5 s");
    assert!(before >= 2, "{text}");
    assert_eq!(before, after, "a malformed object is not requeued");
    for name in ["three", "sourceless"] {
        let evs = events(&cp, name, None).await?;
        assert_eq!(evs.len(), 1, "one Event for {name}: {evs:?}");
        assert!(evs[0].series.is_none(), "published once: {:?}", evs[0].series);
    }

    // The operator is healthy and keeps reconciling the good one.
    assert!(!op.task.is_finished(), "the operator is still running");
    for path in ["/readyz", "/healthz"] {
        let r = http_get(op.http, path).await?;
        assert!(r.lines().next().unwrap_or("").contains(" 200 "), "{path}: {r}");
    }
    let r0 = op.reconciles();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(op.reconciles() > r0, "still reconciling");

    // A change is what retries it: fixed, it reconciles like any other.
    raw.patch(
        "three",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"workers": {"replicas": 3}}})),
    )
    .await?;
    let d = wait_exists(&deployments, "three").await?;
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(3));
    let i = until(&cp, "three", "no longer InvalidSpec", 30, |i| {
        cond(i, DEGRADED).1 != "InvalidSpec" && !cond(i, DEGRADED).1.is_empty()
    })
    .await?;
    eprintln!("three fixed: Degraded {:?}", cond(&i, DEGRADED));

    // Deleted while malformed, with the queue finalizer: its queues cannot be named, so the finalizer is
    // removed at once with a Warning, and the object goes.
    raw.delete("held", &Default::default()).await?;
    wait_for(
        "held deleted",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let raw = raw.clone();
            async move { Ok(raw.get_opt("held").await?.is_none().then_some(())) }
        },
    )
    .await?;
    let evs = events(&cp, "held", Some("QueuesLeftBehind")).await?;
    eprintln!("held: {evs:?}");
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].type_.as_deref(), Some("Warning"));
    op.task.abort();
    Ok(())
}

/// A spec the schema accepts but the worker would refuse at start (here a body template that does not
/// parse) is not rolled out: the running Deployment keeps its pod template, the Integration is Degraded
/// with reason `InvalidSpec` naming the field, one Warning Event says so, and a fix rolls out as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_worker_would_refuse_is_not_rolled_out() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start().await?;
    cp.install_crds().await?;
    let rmq = hookfleet_testkit::RabbitMq::start().await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;
    let op = spawn(cp.client(), config("solo"));
    let spec = |template: &str| {
        serde_json::json!({
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "orders"},
            "destination": {"url": "https://erp.example.com/hooks", "body": {"template": template}},
            "workers": {"replicas": 2}
        })
    };
    create(
        &cp,
        serde_json::json!({"metadata": {"name": "orders"}, "spec": spec("{{ data | tojson }}")}),
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    let before = wait_exists(&deployments, "orders").await?;
    let template_of = |d: &Deployment| serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap();

    // The API server takes it (a template is a string to the schema); the operator refuses to roll it.
    let typed: Api<Integration> = Api::namespaced(cp.client(), NS);
    typed
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": spec("{{ data | tojson ")})),
        )
        .await?;
    let i = until(&cp, "orders", "Degraded InvalidSpec", 30, |i| {
        cond(i, DEGRADED).1 == "InvalidSpec"
    })
    .await?;
    let (status, _, message) = cond(&i, DEGRADED);
    eprintln!("Degraded {status}: {message}");
    assert_eq!(status, "True");
    assert!(
        message.starts_with("spec.destination.body.template: "),
        "the message names the field first: {message}"
    );
    assert_eq!(cond(&i, "Ready"), ("False", "InvalidSpec", message));
    assert_eq!(cond(&i, "Progressing").1, "InvalidSpec");
    assert_eq!(
        i.status.as_ref().and_then(|s| s.observed_generation),
        i.metadata.generation
    );
    let evs = wait_for(
        "InvalidSpec Event",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let evs = events(&cp, "orders", Some("InvalidSpec")).await?;
            Ok((!evs.is_empty()).then_some(evs))
        },
    )
    .await?;
    assert_eq!(evs[0].type_.as_deref(), Some("Warning"));
    assert!(
        evs[0]
            .note
            .as_deref()
            .unwrap_or("")
            .contains("spec.destination.body.template")
    );

    // Several passes later the fleet still runs the last valid spec, and the Event was not repeated.
    let r0 = op.reconciles();
    wait_for(
        "two more reconciles",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { Ok((op.reconciles() >= r0 + 2).then_some(())) },
    )
    .await?;
    let now = deployments.get("orders").await?;
    assert_eq!(
        template_of(&now),
        template_of(&before),
        "the pod template did not change"
    );
    assert_eq!(
        events(&cp, "orders", Some("InvalidSpec")).await?.len(),
        1,
        "one Event"
    );

    // Fixed, it rolls out like any other change, and the condition clears.
    typed
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": spec("{\"order\": {{ data | tojson }}}")})),
        )
        .await?;
    wait_for(
        "the fixed template rolled out",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let deployments = deployments.clone();
            let old = template_of(&before);
            async move {
                let d = deployments.get("orders").await?;
                Ok((template_of(&d) != old).then_some(()))
            }
        },
    )
    .await?;
    until(&cp, "orders", "no longer InvalidSpec", 30, |i| {
        !cond(i, DEGRADED).1.is_empty() && cond(i, DEGRADED).1 != "InvalidSpec"
    })
    .await?;
    op.task.abort();
    Ok(())
}
