//! What the operator's caches keep of each watched object: only what a reconcile reads, applied to every
//! object as it arrives from a watch (`watcher(..).modify(..)`, before the reflector stores it).
//!
//! Every cached object loses its managed fields (the operator never reads them; for a Deployment they are
//! about as large as its pod template). Beyond that:
//!
//! - a Deployment keeps its metadata, `spec.replicas`, the pod template's metadata (the Secrets checksum
//!   annotation) and its status, not the pod template's spec: the apply step compares what it last applied
//!   by hash and the Deployment's generation, never with the cached spec;
//! - a PodDisruptionBudget and a Service keep their metadata only (the apply step reads their
//!   generation or resourceVersion, the controller their owner references);
//! - a worker Pod keeps its metadata, status and `spec.nodeName` (where an fd-limit failure happened,
//!   `core::nodes`), not the rest of its spec;
//! - a Node keeps its name, `spec.unschedulable` and its `Ready` condition (`core::nodes::NodeObs`);
//! - an Integration keeps everything but its managed fields.
//!
//! With 1,000 Integrations, 3,000 children and 2,000 worker pods the whole objects took about half of the
//! operator's memory.
//!
//! And which of their watch events reach the controller ([`Changes`]): a Deployment's, a
//! PodDisruptionBudget's or a worker Pod's event reconciles its Integration only when something a reconcile
//! reads of it changed (its [`deployment_reads`], [`pdb_reads`], [`pod_reads`]), or when it is deleted.
//! An Integration's event reconciles it unless only its status changed ([`integration_reads`]): the
//! status is the operator's own output, and each reconcile ends with a requeue (the resync, or the retry
//! while something is wrong) that corrects a status someone else edited.
//! A worker pod's life (created, scheduled, started, ready), the Deployment's and the budget's status
//! updates along the way and the echoes of the operator's own status writes asked for about a dozen
//! reconciles per Integration while a fleet came up (14,000 for 1,000 Integrations), each a Secret check
//! and a broker probe, and a thousand Integrations' first reconciles waited behind them.

use hookfleet_crds::Integration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::core::DeserializeGuard;

fn no_managed_fields<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

pub fn deployment(d: &mut Deployment) {
    no_managed_fields(d);
    if let Some(spec) = d.spec.as_mut() {
        spec.template.spec = None;
        spec.strategy = None;
    }
}

pub fn pdb(p: &mut PodDisruptionBudget) {
    no_managed_fields(p);
    p.spec = None;
    p.status = None;
}

pub fn service(s: &mut Service) {
    no_managed_fields(s);
    s.spec = None;
    s.status = None;
}

pub fn pod(p: &mut Pod) {
    no_managed_fields(p);
    p.spec = p.spec.take().map(|s| k8s_openapi::api::core::v1::PodSpec {
        node_name: s.node_name,
        ..Default::default()
    });
}

pub fn node(n: &mut Node) {
    n.metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: n.metadata.name.take(),
        uid: n.metadata.uid.take(),
        resource_version: n.metadata.resource_version.take(),
        ..Default::default()
    };
    n.spec = n.spec.take().map(|s| k8s_openapi::api::core::v1::NodeSpec {
        unschedulable: s.unschedulable,
        ..Default::default()
    });
    n.status = n.status.take().map(|s| k8s_openapi::api::core::v1::NodeStatus {
        conditions: s
            .conditions
            .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()),
        ..Default::default()
    });
}

/// What a reconcile reads of a Node: whether it is schedulable and when its `Ready` condition changed.
/// Heartbeats (every few seconds per node) do not pass.
pub fn node_reads(n: &Node) -> u64 {
    digest(crate::core::nodes::NodeObs::from_node(n))
}

pub fn integration(i: &mut DeserializeGuard<Integration>) {
    no_managed_fields(i);
}

/// A hash of what `reads` returns: what a reconcile reads of an object.
fn digest<T: std::fmt::Debug>(reads: T) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    format!("{reads:?}").hash(&mut h);
    h.finish()
}

/// What a reconcile reads of a cached Deployment: its observed state (`status::DeploymentObs`), the
/// generation the apply step compares, the Secrets checksum and whom it belongs to.
pub fn deployment_reads(d: &Deployment) -> u64 {
    digest((
        crate::core::status::DeploymentObs::from_deployment(d),
        d.metadata.generation,
        crate::core::desired::secrets_checksum(d),
        &d.metadata.owner_references,
        d.metadata.deletion_timestamp.is_some(),
    ))
}

/// What a reconcile reads of a cached PodDisruptionBudget: the generation the apply step compares.
pub fn pdb_reads(p: &PodDisruptionBudget) -> u64 {
    digest((
        p.metadata.generation,
        &p.metadata.owner_references,
        p.metadata.deletion_timestamp.is_some(),
    ))
}

/// What a reconcile reads of a worker Pod: its problem, restarts and last exit 5 (`crate::core::status`),
/// and which Integration it belongs to.
pub fn pod_reads(p: &Pod) -> u64 {
    use kube::ResourceExt;
    digest((
        crate::core::status::pod_problem(p),
        crate::core::status::worker_restarts(p),
        crate::core::status::destination_gone_at(p),
        crate::core::nodes::fd_failure(p),
        p.labels().get(crate::names::INTEGRATION_LABEL),
        p.metadata.deletion_timestamp.is_some(),
    ))
}

/// What a reconcile reads of an Integration that the status step does not write: everything but its
/// status (and the `resourceVersion` and managed fields that change with it). So the echo of the
/// operator's own status write reconciles nothing; a spec, label or annotation change does. An
/// Integration that does not deserialize passes with every change.
pub fn integration_reads(w: &DeserializeGuard<Integration>) -> u64 {
    match &w.0 {
        Ok(i) => {
            let mut meta = i.metadata.clone();
            meta.resource_version = None;
            meta.managed_fields = None;
            digest((meta, &i.spec))
        }
        Err(invalid) => digest(&invalid.metadata.resource_version),
    }
}

/// Filters a watch stream down to the events that change what a reconcile reads (see the module): an
/// object's first event, each event whose `reads` differs from the last one passed on, every deletion,
/// and the list markers. The store is fed before this filter, so it always holds the latest object.
pub struct Changes<K> {
    reads: fn(&K) -> u64,
    last: std::collections::HashMap<String, u64>,
}

impl<K: Resource> Changes<K> {
    pub fn new(reads: fn(&K) -> u64) -> Self {
        Self {
            reads,
            last: std::collections::HashMap::new(),
        }
    }

    fn key(obj: &K) -> String {
        let m = obj.meta();
        match &m.uid {
            Some(uid) => uid.clone(),
            None => format!(
                "{}/{}",
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default()
            ),
        }
    }

    /// Whether `event` goes on to the controller.
    pub fn passes(&mut self, event: &kube::runtime::watcher::Event<K>) -> bool {
        use kube::runtime::watcher::Event;
        match event {
            Event::Apply(obj) | Event::InitApply(obj) => {
                let h = (self.reads)(obj);
                self.last.insert(Self::key(obj), h) != Some(h)
            }
            Event::Delete(obj) => {
                self.last.remove(&Self::key(obj));
                true
            }
            Event::Init | Event::InitDone => true,
        }
    }
}

/// What the snapshot compile reads of a Webhook: its spec (through its generation), where it is, and
/// whether it is being deleted; never its status (the operator writes that).
pub fn webhook_reads(w: &hookfleet_crds::Webhook) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    w.metadata.generation.hash(&mut h);
    w.spec.integration.hash(&mut h);
    w.metadata.deletion_timestamp.is_some().hash(&mut h);
    // The operator's auto-pause (set or cleared) changes the entry's `paused`.
    w.status
        .as_ref()
        .is_some_and(|s| s.auto_paused.is_some())
        .hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::desired;
    use crate::core::status::DeploymentObs;

    fn full_deployment() -> Deployment {
        let intg: Integration = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": "orders", "namespace": "a", "uid": "u1", "generation": 3},
            "spec": {
                "source": {"connectionSecretRef": {"name": "r", "key": "uri"}, "queue": "orders"},
                "destination": {"url": "https://erp.example.com/h"}
            }
        }))
        .unwrap();
        let settings = crate::config::WorkerSettings {
            image: "w".into(),
            image_pull_policy: None,
            pod_template: None,
        };
        let mut d = desired::deployment(&intg, &settings, 3).unwrap();
        desired::set_secrets_checksum(&mut d, "abc".into());
        let mut v = serde_json::to_value(&d).unwrap();
        v["metadata"]["generation"] = 4.into();
        v["metadata"]["resourceVersion"] = "17".into();
        v["metadata"]["managedFields"] = serde_json::json!([{
            "manager": "hookfleet-operator", "operation": "Apply", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:replicas": {}}}
        }]);
        v["status"] = serde_json::json!({
            "observedGeneration": 4, "replicas": 3, "readyReplicas": 2, "updatedReplicas": 3
        });
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_slim_deployment_reads_as_the_whole_one() {
        let full = full_deployment();
        let mut slim = full.clone();
        deployment(&mut slim);
        assert!(slim.metadata.managed_fields.is_none());
        assert!(slim.spec.as_ref().unwrap().template.spec.is_none());
        // What the reconcile reads of a cached Deployment is unchanged.
        assert_eq!(
            DeploymentObs::from_deployment(&slim),
            DeploymentObs::from_deployment(&full)
        );
        assert_eq!(desired::secrets_checksum(&slim).as_deref(), Some("abc"));
        assert_eq!(slim.metadata.generation, Some(4));
        assert_eq!(slim.metadata.resource_version.as_deref(), Some("17"));
        assert_eq!(slim.metadata.owner_references, full.metadata.owner_references);
        assert!(
            serde_json::to_vec(&slim).unwrap().len() * 2 < serde_json::to_vec(&full).unwrap().len(),
            "most of a Deployment is its pod template"
        );
        assert_eq!(deployment_reads(&slim), deployment_reads(&full));
    }

    #[test]
    fn only_changes_a_reconcile_reads_pass() {
        use kube::runtime::watcher::Event;
        let d = full_deployment();
        let mut changes = Changes::new(deployment_reads);
        assert!(changes.passes(&Event::Apply(d.clone())), "first sight");
        assert!(!changes.passes(&Event::Apply(d.clone())), "the same again");
        // A status change nothing reads (a condition's time, say) does not pass; the ready count does.
        let mut other = d.clone();
        other.metadata.resource_version = Some("18".into());
        other.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        assert!(!changes.passes(&Event::Apply(other.clone())));
        other.status.as_mut().unwrap().ready_replicas = Some(3);
        assert!(changes.passes(&Event::Apply(other.clone())));
        // So does a new generation, and always a deletion.
        other.metadata.generation = Some(5);
        assert!(changes.passes(&Event::InitApply(other.clone())));
        assert!(changes.passes(&Event::Delete(other.clone())));
        assert!(changes.passes(&Event::Apply(other)), "after a deletion it is new");
    }

    #[test]
    fn the_echo_of_a_status_write_does_not_pass() {
        use kube::runtime::watcher::Event;
        let intg: Integration = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": "orders", "namespace": "a", "uid": "u1", "generation": 1,
                         "resourceVersion": "5"},
            "spec": {
                "source": {"connectionSecretRef": {"name": "r", "key": "uri"}, "queue": "orders"},
                "destination": {"url": "https://erp.example.com/h"}
            }
        }))
        .unwrap();
        let mut changes = Changes::new(integration_reads);
        assert!(changes.passes(&Event::Apply(DeserializeGuard(Ok(intg.clone())))));
        let mut written = intg.clone();
        written.metadata.resource_version = Some("6".into());
        written.status = Some(hookfleet_crds::IntegrationStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        assert!(!changes.passes(&Event::Apply(DeserializeGuard(Ok(written.clone())))));
        // An annotation (the destination retry, say) is a change.
        written
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("hookfleet.io/retry-destination".into(), "1".into());
        assert!(changes.passes(&Event::Apply(DeserializeGuard(Ok(written)))));
    }

    #[test]
    fn a_slim_pod_keeps_its_node_and_a_slim_node_its_ready_condition() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "orders-1", "namespace": "a"},
            "spec": {"nodeName": "n3", "containers": [{"name": "worker", "image": "w"}]}
        }))
        .unwrap();
        let mut slim = p.clone();
        pod(&mut slim);
        let spec = slim.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n3"));
        assert!(spec.containers.is_empty());

        let n = |heartbeat: &str, transition: &str| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n3", "uid": "n", "labels": {"a": "b"}, "annotations": {"x": "y"}},
                "spec": {"podCIDR": "10.0.0.0/24"},
                "status": {"conditions": [
                    {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat},
                    {"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat,
                     "lastTransitionTime": transition}
                ], "images": [{"names": ["big"]}]}
            }))
            .unwrap()
        };
        let full = n("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z");
        let mut slim = full.clone();
        node(&mut slim);
        assert_eq!(slim.metadata.labels, None);
        assert_eq!(
            slim.status.as_ref().unwrap().conditions.as_ref().unwrap().len(),
            1
        );
        assert_eq!(node_reads(&slim), node_reads(&full));
        // A heartbeat does not pass; a Ready transition does.
        use kube::runtime::watcher::Event;
        let mut changes = Changes::new(node_reads);
        assert!(changes.passes(&Event::Apply(full)));
        assert!(!changes.passes(&Event::Apply(n("2026-01-01T00:00:10Z", "2026-01-01T00:00:00Z"))));
        assert!(changes.passes(&Event::Apply(n("2026-01-01T00:00:20Z", "2026-01-01T00:00:15Z"))));
    }

    #[test]
    fn a_pod_passes_when_its_worker_restarts() {
        use kube::runtime::watcher::Event;
        let pod = |restarts: i32, phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "orders-1", "namespace": "a", "uid": "p1",
                             "labels": {crate::names::INTEGRATION_LABEL: "orders"}},
                "status": {"phase": phase, "containerStatuses": [{
                    "name": crate::names::CONTAINER, "image": "w", "imageID": "", "ready": true,
                    "restartCount": restarts
                }]}
            }))
            .unwrap()
        };
        let mut changes = Changes::new(pod_reads);
        assert!(changes.passes(&Event::Apply(pod(0, "Pending"))));
        assert!(!changes.passes(&Event::Apply(pod(0, "Running"))));
        assert!(changes.passes(&Event::Apply(pod(1, "Running"))));
    }
}
