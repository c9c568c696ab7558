//! With controller-manager, scheduler and kwok up, a plain Deployment gets Pods that become Ready, and
//! deleting it garbage-collects them.

use std::time::Duration;

use hookfleet_e2e::ControlPlane;
use hookfleet_e2e::process::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_reaches_two_ready_replicas() -> anyhow::Result<()> {
    hookfleet_e2e::init_tracing();
    let cp = ControlPlane::start_with_workloads().await?;
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), "default");
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))?;
    deployments.create(&PostParams::default(), &deployment).await?;

    let ready = wait_for(
        "2 ready replicas",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || {
            let deployments = deployments.clone();
            let running = cp.check_running();
            async move {
                running?;
                let d = deployments.get("web").await?;
                let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
                Ok((ready == 2).then_some(ready))
            }
        },
    )
    .await?;
    assert_eq!(ready, 2);

    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    let listed = pods.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(listed.items.len(), 2);
    for pod in &listed.items {
        let status = pod.status.as_ref().expect("pod has a status");
        assert_eq!(status.phase.as_deref(), Some("Running"), "kwok runs bound pods");
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(hookfleet_e2e::control_plane::FAKE_NODE)
        );
    }

    // The garbage collector removes the ReplicaSet and the Pods with their owner.
    deployments.delete("web", &DeleteParams::foreground()).await?;
    wait_for(
        "pods garbage-collected",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let pods = pods.clone();
            async move {
                Ok(pods
                    .list(&ListParams::default().labels("app=web"))
                    .await?
                    .items
                    .is_empty()
                    .then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}
