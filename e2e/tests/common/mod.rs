//! Shared by the node tests (`node.rs`, one node; `nodes.rs`, several): a pod run to completion and its
//! logs, `kubectl describe` for errors, and the check that nothing is left on the host.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context, Result, bail};
use hookfleet_e2e::process::wait_for;
use hookfleet_e2e::{Cluster, node};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

/// Runs `script` with `sh` in a pod of `image` (on node `on` when given, by its hostname label) to
/// completion and returns its output as `kubectl logs` reads it (through the API server and the kubelet).
pub async fn run_pod(
    cluster: &Cluster,
    name: &str,
    on: Option<&str>,
    image: &str,
    script: &str,
) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let mut pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script]
            }]
        }
    });
    if let Some(node) = on {
        pod["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": node});
    }
    let pod: Pod = serde_json::from_value(pod)?;
    pods.create(&PostParams::default(), &pod).await?;
    let (phase, ran_on) = wait_for(
        &format!("pod {name} to finish"),
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            let running = cluster.check_running();
            async move {
                running?;
                let pod = pods.get(name).await?;
                let ran_on = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
                let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
                Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some((phase, ran_on)))
            }
        },
    )
    .await
    .with_context(|| describe(cluster, name))?;
    let out = cluster.control_plane().kubectl()?.args(["logs", name]).output()?;
    if !out.status.success() {
        bail!(
            "kubectl logs {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let logs = String::from_utf8_lossy(&out.stdout).into_owned();
    if phase != "Succeeded" {
        bail!("pod {name} {phase}; logs:\n{logs}\n{}", describe(cluster, name));
    }
    if let Some(node) = on {
        assert_eq!(ran_on, node, "pod {name} ran on its node");
    }
    Ok(logs)
}

/// `kubectl describe pod` of `pod`, for an error message (empty when it cannot be had).
pub fn describe(cluster: &Cluster, pod: &str) -> String {
    cluster
        .control_plane()
        .kubectl()
        .and_then(|mut c| Ok(c.args(["describe", "pod", pod]).output()?))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Nothing the node(s) made is left on the host.
pub fn assert_nothing_left() {
    let left = node::leftovers();
    assert!(
        left.is_empty(),
        "the node left things on the host:\n{}",
        left.join("\n")
    );
}
