//! `spec.workers.podTemplate` over the operator-wide defaults (`--worker-pod-template`, the chart's
//! `worker.podTemplate`), onto the worker pod template `desired::deployment` renders.
//!
//! The operator owns the container (image, args, probes, resources, security context), the pod's security
//! context and the selector labels; a platform adds the rest:
//!
//! - labels and annotations: the defaults', then the Integration's (it wins per key), never over a key the
//!   operator sets;
//! - every `spec` field: the Integration's when it sets it, else the default's;
//! - tolerations are added to the operator's (not-ready/unreachable for 30 s); one with the same key and
//!   effect replaces the operator's;
//! - affinity replaces the operator's zone anti-affinity part by part (nodeAffinity, podAffinity,
//!   podAntiAffinity); nodes kept off for their fd limit are added to every required node term later
//!   (`desired::set_excluded_nodes`);
//! - topologySpreadConstraints replace the operator's spread over nodes; nodeSelector, priorityClassName
//!   and imagePullSecrets are set as given.

use hookfleet_crds::integration::{WorkerPodMetadata, WorkerPodSpec, WorkerPodTemplate};
use k8s_openapi::api::core::v1::{Affinity, PodTemplateSpec};

/// The Integration's template over the defaults (module doc).
pub fn effective(defaults: Option<&WorkerPodTemplate>, own: Option<&WorkerPodTemplate>) -> WorkerPodTemplate {
    let meta = |t: Option<&WorkerPodTemplate>| t.and_then(|t| t.metadata.clone()).unwrap_or_default();
    let (d, o) = (meta(defaults), meta(own));
    let mut labels = d.labels;
    labels.extend(o.labels);
    let mut annotations = d.annotations;
    annotations.extend(o.annotations);
    let spec = |t: Option<&WorkerPodTemplate>| t.and_then(|t| t.spec.clone()).unwrap_or_default();
    let (d, o) = (spec(defaults), spec(own));
    let spec = WorkerPodSpec {
        node_selector: o.node_selector.or(d.node_selector),
        tolerations: o.tolerations.or(d.tolerations),
        affinity: o.affinity.or(d.affinity),
        topology_spread_constraints: o.topology_spread_constraints.or(d.topology_spread_constraints),
        priority_class_name: o.priority_class_name.or(d.priority_class_name),
        image_pull_secrets: o.image_pull_secrets.or(d.image_pull_secrets),
    };
    WorkerPodTemplate {
        metadata: (!labels.is_empty() || !annotations.is_empty())
            .then_some(WorkerPodMetadata { labels, annotations }),
        spec: (spec != WorkerPodSpec::default()).then_some(spec),
    }
}

/// Applies `t` to the rendered pod template (module doc).
pub fn apply(template: &mut PodTemplateSpec, t: &WorkerPodTemplate) {
    if let Some(m) = &t.metadata {
        let meta = template.metadata.get_or_insert_with(Default::default);
        let labels = meta.labels.get_or_insert_with(Default::default);
        for (k, v) in &m.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        for (k, v) in &m.annotations {
            annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let (Some(s), Some(pod)) = (&t.spec, template.spec.as_mut()) else {
        return;
    };
    if let Some(n) = &s.node_selector {
        pod.node_selector = Some(n.clone());
    }
    if let Some(theirs) = &s.tolerations {
        let ours = pod.tolerations.get_or_insert_with(Vec::new);
        ours.retain(|o| !theirs.iter().any(|t| t.key == o.key && t.effect == o.effect));
        ours.extend(theirs.iter().cloned());
    }
    if let Some(a) = &s.affinity {
        let ours = pod.affinity.get_or_insert_with(Affinity::default);
        if a.node_affinity.is_some() {
            ours.node_affinity = a.node_affinity.clone();
        }
        if a.pod_affinity.is_some() {
            ours.pod_affinity = a.pod_affinity.clone();
        }
        if a.pod_anti_affinity.is_some() {
            ours.pod_anti_affinity = a.pod_anti_affinity.clone();
        }
    }
    if let Some(c) = &s.topology_spread_constraints {
        pod.topology_spread_constraints = Some(c.clone());
    }
    if let Some(p) = &s.priority_class_name {
        pod.priority_class_name = Some(p.clone());
    }
    if let Some(i) = &s.image_pull_secrets {
        pod.image_pull_secrets = Some(i.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: serde_json::Value) -> WorkerPodTemplate {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_integration_wins_per_label_and_per_field_over_the_defaults() {
        let d = t(serde_json::json!({
            "metadata": {"labels": {"team": "platform", "tier": "x"}, "annotations": {"a": "1"}},
            "spec": {"priorityClassName": "low", "nodeSelector": {"pool": "shared"}}
        }));
        let o = t(serde_json::json!({
            "metadata": {"labels": {"tier": "gold"}},
            "spec": {"priorityClassName": "high"}
        }));
        let e = effective(Some(&d), Some(&o));
        let m = e.metadata.unwrap();
        assert_eq!(m.labels["team"], "platform");
        assert_eq!(m.labels["tier"], "gold");
        assert_eq!(m.annotations["a"], "1");
        let s = e.spec.unwrap();
        assert_eq!(s.priority_class_name.as_deref(), Some("high"));
        assert_eq!(s.node_selector.unwrap()["pool"], "shared");
        assert_eq!(effective(None, None), WorkerPodTemplate::default());
    }

    #[test]
    fn the_operators_keys_and_own_parts_are_kept() {
        let mut template: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "metadata": {"labels": {"hookfleet.io/integration": "orders"}},
            "spec": {
                "containers": [{"name": "worker"}],
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}
                ],
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
            }
        }))
        .unwrap();
        apply(
            &mut template,
            &t(serde_json::json!({
                "metadata": {"labels": {"hookfleet.io/integration": "other", "team": "a"}},
                "spec": {
                    "tolerations": [
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                        {"key": "dedicated", "operator": "Equal", "value": "hooks", "effect": "NoSchedule"}
                    ],
                    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
                    "imagePullSecrets": [{"name": "mirror"}]
                }
            })),
        );
        let v = serde_json::to_value(&template).unwrap();
        assert_eq!(v["metadata"]["labels"]["hookfleet.io/integration"], "orders");
        assert_eq!(v["metadata"]["labels"]["team"], "a");
        let tolerations: Vec<(String, i64)> = v["spec"]["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["key"].as_str().unwrap().to_string(),
                    t["tolerationSeconds"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        assert_eq!(
            tolerations,
            [
                ("node.kubernetes.io/not-ready".to_string(), 30),
                ("node.kubernetes.io/unreachable".to_string(), 300),
                ("dedicated".to_string(), -1)
            ]
        );
        // The node affinity is added; the operator's anti-affinity stays (not replaced).
        assert!(v["spec"]["affinity"]["nodeAffinity"].is_object());
        assert!(v["spec"]["affinity"]["podAntiAffinity"].is_object());
        assert_eq!(v["spec"]["imagePullSecrets"][0]["name"], "mirror");
        assert_eq!(v["spec"]["containers"][0]["name"], "worker");
    }
}
