//! Scenario `podtemplate`: what a platform adds to the worker pods reaches real pods. The chart is installed
//! with an operator-wide default (`worker.podTemplate.metadata.labels.platform=hookfleet-e2e`); an
//! Integration adds its own `spec.workers.podTemplate`: a label, an annotation, a nodeSelector pinning the
//! workers to one node, a toleration, a PriorityClass and an image pull Secret. Expected: 2 workers Ready and
//! consuming on that node with all of it, the operator's own parts kept (its selector label, the node-loss
//! tolerations, the restricted security context), and messages delivered.

use anyhow::{Context, ensure};
use hookfleet_e2e::messages;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use hookfleet_e2e::pods::node_of;

use super::{Outcome, Stack};

const NS: &str = "e2e-podtemplate";
const CLASS: &str = "hookfleet-e2e-workers";

pub async fn podtemplate(s: &Stack) -> Outcome {
    let api = s.namespace(NS, "").await?;
    let classes: Api<PriorityClass> = Api::all(s.client.clone());
    let _ = classes.delete(CLASS, &DeleteParams::default()).await;
    classes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": CLASS}, "value": 1000, "description": "e2e: hookfleet workers"
            }))?,
        )
        .await?;
    let result = run(s, &api).await;
    let _ = classes.delete(CLASS, &DeleteParams::default()).await;
    result
}

async fn run(s: &Stack, api: &Api<hookfleet_crds::Integration>) -> Outcome {
    // A node the workers may run on: the one the first operator pod runs on (Ready, not cordoned).
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(s.client.clone());
    let node = nodes
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|n| !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false))
        .filter_map(|n| n.metadata.name)
        .next()
        .context("no schedulable node")?;
    s.integration(
        api,
        "pt",
        "e2e.podtemplate",
        serde_json::json!({"workers": {"podTemplate": {
            "metadata": {
                "labels": {"team": "payments"},
                "annotations": {"example.com/owner": "payments"},
            },
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "hooks", "effect": "NoSchedule"}],
                "priorityClassName": CLASS,
                "imagePullSecrets": [{"name": "registry-mirror"}],
            },
        }}}),
    )
    .await?;
    // The operator's own keys are refused by the API server, naming the field.
    let refused = s
        .integration(
            api,
            "pt-refused",
            "e2e.podtemplate.refused",
            serde_json::json!({"workers": {"podTemplate": {"metadata": {"labels": {"hookfleet.io/integration": "x"}}}}}),
        )
        .await;
    let refused = match refused {
        Ok(()) => anyhow::bail!("a podTemplate label under hookfleet.io/ was accepted"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        refused.contains("spec.workers.podTemplate.metadata") && refused.contains("hookfleet.io/"),
        "the refusal does not name the field: {refused}"
    );
    s.ready_with_consumers(api, "pt", 2).await?;
    let pods = s.running_pods(NS, "pt").await?;
    ensure!(pods.len() == 2, "{} running worker pods", pods.len());
    for p in &pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let labels = p.metadata.labels.clone().unwrap_or_default();
        let annotations = p.metadata.annotations.clone().unwrap_or_default();
        let spec = p.spec.as_ref().context("no pod spec")?;
        ensure!(
            labels.get("team").map(String::as_str) == Some("payments"),
            "{name}: labels {labels:?}"
        );
        ensure!(
            labels.get("platform").map(String::as_str) == Some("hookfleet-e2e"),
            "{name}: the operator-wide default label is missing: {labels:?}"
        );
        ensure!(
            labels.get("hookfleet.io/integration").map(String::as_str) == Some("pt"),
            "{name}: the operator's selector label was overridden: {labels:?}"
        );
        ensure!(
            annotations.get("example.com/owner").map(String::as_str) == Some("payments"),
            "{name}: annotations {annotations:?}"
        );
        ensure!(node_of(p) == node, "{name} runs on {}, not {node}", node_of(p));
        ensure!(
            spec.priority_class_name.as_deref() == Some(CLASS) && spec.priority == Some(1000),
            "{name}: priority {:?} {:?}",
            spec.priority_class_name,
            spec.priority
        );
        let tolerations: Vec<&str> = spec
            .tolerations
            .iter()
            .flatten()
            .filter_map(|t| t.key.as_deref())
            .collect();
        for key in [
            "dedicated",
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            ensure!(tolerations.contains(&key), "{name}: tolerations {tolerations:?}");
        }
        ensure!(
            spec.image_pull_secrets
                .iter()
                .flatten()
                .any(|r| r.name == "registry-mirror"),
            "{name}: imagePullSecrets {:?}",
            spec.image_pull_secrets
        );
        let c = &spec.containers[0];
        ensure!(
            c.security_context.as_ref().is_some_and(
                |sc| sc.read_only_root_filesystem == Some(true) && sc.run_as_non_root == Some(true)
            ),
            "{name}: the container's security context changed"
        );
    }
    let ids = messages::ids("podtemplate", 500);
    s.publish("e2e.podtemplate", &ids, None).await?;
    let account = s.settle("e2e.podtemplate", &ids, 120).await?;
    s.drop_namespace(NS).await;
    Ok((
        Some(account),
        format!(
            "2 workers on {node} with the label, annotation, toleration, PriorityClass (priority 1000) and pull Secret \
             of spec.workers.podTemplate, the chart's default label, the operator's selector label and security \
             context kept"
        ),
    ))
}
