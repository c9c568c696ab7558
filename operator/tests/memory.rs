//! The operator keeps one memory per Integration (applied fingerprints, autoscaler, failure count, last
//! written status) and drops it when the Integration is deleted, however it is deleted and whether or not
//! its reconciles were failing. On the real API server.

mod common;

use std::time::Duration;

use common::*;
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::wait_for;
use kube::api::{Api, DeleteParams};

fn metric(text: &str, line_prefix: &str) -> Option<i64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_integrations_leave_no_memory_behind() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    // With the garbage collector: a foreground deletion waits for it to remove the children.
    let cp = ControlPlane::start_with_workloads().await?;
    cp.install_crds().await?;
    let op = spawn(cp.client(), config("solo"));
    let spec = serde_json::json!({
        "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "orders"},
        "destination": {"url": "https://erp.example.com/hooks"},
        "workers": {"replicas": 2}
    });
    // Healthy as far as the operator goes (its Secret is missing: a condition, not a failure).
    create(
        &cp,
        serde_json::json!({"metadata": {"name": "healthy"}, "spec": spec}),
    )
    .await?;
    // Failing: `<name>-metrics` is longer than a Service name may be (63), so every reconcile fails at
    // the apply of its Service and is retried with backoff.
    let failing = "f".repeat(58);
    create(
        &cp,
        serde_json::json!({"metadata": {"name": failing}, "spec": spec}),
    )
    .await?;

    let text = wait_for(
        "both remembered, the failing one failing",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let text = op.metrics.encode();
            let remembered = metric(&text, "hookfleet_operator_integrations_remembered ");
            let failed = metric(
                &text,
                r#"hookfleet_operator_reconcile_errors_total{reason="apply"}"#,
            );
            Ok((remembered == Some(2) && failed.unwrap_or(0) >= 2).then_some(text))
        },
    )
    .await?;
    assert!(
        text.contains(r#"hookfleet_operator_integration_desired_workers{integration="default/healthy"} 2"#),
        "{text}"
    );

    // One deleted in the foreground (the API server sets deletionTimestamp first and the operator sees
    // it), one in the background (it is simply gone: the operator never reconciles it again).
    let api: Api<hookfleet_crds::Integration> = Api::namespaced(cp.client(), NS);
    api.delete(&failing, &DeleteParams::foreground()).await?;
    api.delete("healthy", &DeleteParams::background()).await?;
    wait_for(
        "both deleted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let api = api.clone();
            let failing = failing.clone();
            async move {
                Ok(
                    (api.get_opt(&failing).await?.is_none() && api.get_opt("healthy").await?.is_none())
                        .then_some(()),
                )
            }
        },
    )
    .await?;
    let text = wait_for(
        "no memory left",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let text = op.metrics.encode();
            let remembered = metric(&text, "hookfleet_operator_integrations_remembered ");
            if remembered == Some(0) {
                Ok(Some(text))
            } else {
                anyhow::bail!("remembered: {remembered:?}")
            }
        },
    )
    .await?;
    assert!(
        !text.contains("default/healthy"),
        "per-Integration series of a deleted Integration are dropped:\n{text}"
    );
    op.task.abort();
    Ok(())
}
