//! Secret changes roll the workers: the operator puts a checksum of the referenced Secrets' versions on
//! the pod template, and watches Secrets so that a change is applied at once, not at the next resync.
//! Against a real API server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hookfleet_crds::integration::condition::DEGRADED;
use hookfleet_operator::desired;
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

async fn put_secret(api: &Api<Secret>, name: &str, data: serde_json::Value) -> anyhow::Result<()> {
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data
    }))?;
    api.create(&PostParams::default(), &s).await?;
    Ok(())
}

async fn checksum_change(
    deployments: &Api<Deployment>,
    from: &str,
    within: Duration,
) -> anyhow::Result<(String, Duration)> {
    let t0 = Instant::now();
    let c = wait_for(
        "the checksum to change",
        within,
        Duration::from_millis(100),
        || async {
            let d = deployments.get("rotating").await?;
            Ok(desired::secrets_checksum(&d).filter(|c| c != from))
        },
    )
    .await?;
    Ok((c, t0.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_referenced_secret_changes_the_pod_template() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start().await?;
    cp.install_crds().await?;
    let secrets: Api<Secret> = Api::namespaced(cp.client(), NS);
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    // No broker: the Secrets are all this test is about (the broker is reported unreachable).
    secret(&cp, "rabbitmq", "amqp://guest:guest@127.0.0.1:1/%2f").await?;
    put_secret(&secrets, "signing", serde_json::json!({"secret": "old-key"})).await?;
    put_secret(
        &secrets,
        "signing-next",
        serde_json::json!({"secret": "next-key"}),
    )
    .await?;
    put_secret(&secrets, "unrelated", serde_json::json!({"x": "1"})).await?;
    // A resync far beyond the test's waits: what it sees comes from the Secret watch.
    let mut cfg = config("secrets");
    cfg.resync = Duration::from_secs(600);
    cfg.retry = Duration::from_secs(600);
    cfg.max_backoff = Duration::from_secs(600);
    let _op = spawn(cp.client(), cfg);

    create(
        &cp,
        serde_json::json!({"metadata": {"name": "rotating"}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "rotating"},
            "destination": {"url": "https://hooks.example.com/in",
                "signing": {"secretRef": {"name": "signing", "key": "secret"},
                            "secretRefs": [{"name": "signing-next", "key": "secret"}]}},
        }}),
    )
    .await?;
    let d = wait_exists(&deployments, "rotating").await?;
    let first = desired::secrets_checksum(&d).expect("the pod template carries the checksum");
    assert_eq!(first.len(), 64);

    // A change to an unrelated Secret changes nothing.
    secrets
        .patch(
            "unrelated",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"x": "2"}})),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = deployments.get("rotating").await?;
    assert_eq!(desired::secrets_checksum(&d).as_deref(), Some(first.as_str()));

    // The signing key changes: the template follows, long before any resync.
    secrets
        .patch(
            "signing",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"secret": "new-key"}})),
        )
        .await?;
    let (second, took) = checksum_change(&deployments, &first, Duration::from_secs(20)).await?;
    // And so does the second key of the list.
    secrets
        .patch(
            "signing-next",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"secret": "newer-key"}})),
        )
        .await?;
    let (third, took_next) = checksum_change(&deployments, &second, Duration::from_secs(20)).await?;

    // A referenced Secret that disappears: a condition, and the pods keep the checksum they run with
    // (no roll into pods that could not start).
    secrets.delete("signing-next", &DeleteParams::default()).await?;
    let i = until(&cp, "rotating", "SecretNotFound", 20, |i| {
        cond(i, DEGRADED).1 == "SecretNotFound"
    })
    .await?;
    let d = deployments.get("rotating").await?;
    assert_eq!(desired::secrets_checksum(&d).as_deref(), Some(third.as_str()));
    eprintln!(
        "secrets: checksum {}… → {}… {took:?} after the signing Secret changed, → {}… {took_next:?} after \
         the second key changed (resync 600 s); unrelated Secret: unchanged; deleted Secret: kept, {:?}",
        &first[..8],
        &second[..8],
        &third[..8],
        cond(&i, DEGRADED)
    );
    Ok(())
}
