//! Desired child objects of an Integration: pure functions of the spec and the operator's settings, so
//! they are tested from YAML fixtures without an API server.
//!
//! Every object is minimal (only the fields we mean to own) because it is server-side applied: a field we
//! send is a field we own, and `Default` structs of k8s-openapi would claim empty atomic fields.

use std::collections::BTreeMap;

use hookfleet_crds::Integration;
use hookfleet_crds::contract;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, KeyToPath,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Toleration,
    TopologySpreadConstraint, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

// The settings the pod builder takes, by the path its callers know.
pub use crate::config::WorkerSettings;

use super::podtemplate;
use crate::names::{
    CHECKSUM_ANNOTATION, CONTAINER, INTEGRATION_LABEL, MANAGED_BY, TLS_CERT_KEY, TLS_KEY_KEY,
};

/// Port of the worker's `/metrics`, `/healthz` and `/readyz` (the contract's, as a container port).
pub const METRICS_PORT: i32 = contract::METRICS_PORT as i32;
/// Label value of `app.kubernetes.io/name` on every worker object.
pub const APP_NAME: &str = "hookfleet-worker";
/// Where the CA bundle of `destination.tls.caFrom` is mounted (read-only Secret volume).
pub const TLS_CA_DIR: &str = "/etc/hookfleet/tls/ca";
/// Where the client certificate Secret of `destination.tls.clientCertSecret` is mounted.
pub const TLS_CLIENT_DIR: &str = "/etc/hookfleet/tls/client";
/// Where the credentials file of `source.nats.credentialsSecretRef` is mounted.
pub const NATS_CREDS_DIR: &str = "/etc/hookfleet/nats";
/// The file name of the mounted NATS credentials.
const NATS_CREDS_FILE: &str = "user.creds";
/// Time a worker gets after its delivery timeout to hand back in-flight work and close cleanly.
const DRAIN_SECONDS: i64 = 15;
/// Margin between the worker's own shutdown deadline and the kubelet's SIGKILL.
const KILL_MARGIN_SECONDS: i64 = 5;
/// Non-root uid/gid of the worker (distroless `nonroot`).
const NONROOT_ID: i64 = 65532;

/// Why the desired objects cannot be built: only a malformed object (no name or uid).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Integration is malformed: {0}")]
    InvalidObject(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Labels every child carries; the first two also select the pods.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert("app.kubernetes.io/instance".into(), name.into());
    l.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    l.insert("app.kubernetes.io/component".into(), "worker".into());
    l
}

/// Labels that select the worker pods of one Integration (stable: a selector is immutable).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), APP_NAME.into()),
        (INTEGRATION_LABEL.into(), name.into()),
    ])
}

/// The pod selector as a string (`status.selector`, for the scale subresource and `kubectl`).
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn meta(intg: &Integration) -> Result<ObjectMeta> {
    let name = intg
        .metadata
        .name
        .clone()
        .ok_or(Error::InvalidObject("metadata.name is missing"))?;
    let owner = intg
        .controller_owner_ref(&())
        .ok_or(Error::InvalidObject("metadata.uid is missing"))?;
    Ok(ObjectMeta {
        name: Some(name.clone()),
        namespace: intg.metadata.namespace.clone(),
        labels: Some(labels(&name)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// Seconds the worker gets to finish in-flight deliveries after SIGTERM: one delivery timeout plus drain.
pub fn shutdown_grace_seconds(intg: &Integration) -> i64 {
    // With Webhooks, the longest timeout a Webhook may have would hold every rollout: the default
    // request timeout stands in (a longer request cut short is handed back and redelivered).
    let timeout: std::time::Duration = match &intg.spec.destination {
        Some(d) => d.timeout.into(),
        None => std::time::Duration::from_secs(10),
    };
    (timeout.as_millis() as u64).div_ceil(1000) as i64 + DRAIN_SECONDS
}

/// The worker's command line and environment: the contract's rendering of the spec
/// ([`contract::WorkerSetup`]) in this pod. Secret values never appear here: they are `secretKeyRef`s
/// the kubelet resolves.
pub fn worker_args_env(intg: &Integration) -> Result<(Vec<String>, Vec<EnvVar>)> {
    let ns = intg.metadata.namespace.as_deref().unwrap_or("default");
    let name = intg
        .metadata
        .name
        .as_deref()
        .ok_or(Error::InvalidObject("metadata.name is missing"))?;
    let pod = contract::Pod {
        integration: format!("{ns}/{name}"),
        shutdown_grace: std::time::Duration::from_secs(shutdown_grace_seconds(intg) as u64),
        tls_ca_file: format!("{TLS_CA_DIR}/ca.crt"),
        tls_client_cert_file: format!("{TLS_CLIENT_DIR}/{}", crate::names::TLS_CERT_KEY),
        tls_client_key_file: format!("{TLS_CLIENT_DIR}/{}", crate::names::TLS_KEY_KEY),
        nats_creds_file: format!("{NATS_CREDS_DIR}/{NATS_CREDS_FILE}"),
    };
    Ok(contract::WorkerSetup::from_spec(&intg.spec, &pod).render())
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// The pod's volumes and the worker's mounts: `/tmp`, and the TLS Secrets of `destination.tls`
/// (mounted, not in env: a PEM bundle is a file, and a mounted key never shows in `kubectl describe`).
fn volumes(intg: &Integration) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "64Mi".into(),
            )),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    let mut secret_volume = |volume: &str, dir: &str, secret: &str, items: Vec<(String, String)>| {
        volumes.push(Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                items: Some(
                    items
                        .into_iter()
                        .map(|(key, path)| KeyToPath {
                            key,
                            path,
                            mode: None,
                        })
                        .collect(),
                ),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume.into(),
            mount_path: dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    };
    if let Some(creds) = intg
        .spec
        .source
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret_ref.as_ref())
    {
        secret_volume(
            "nats-creds",
            NATS_CREDS_DIR,
            &creds.name,
            vec![(creds.key.clone(), NATS_CREDS_FILE.into())],
        );
    }
    if let Some(tls) = intg.spec.destination.as_ref().and_then(|d| d.tls.as_ref()) {
        if let Some(ca) = &tls.ca_from {
            secret_volume(
                "tls-ca",
                TLS_CA_DIR,
                &ca.name,
                vec![(ca.key.clone(), "ca.crt".into())],
            );
        }
        if let Some(client) = &tls.client_cert_secret {
            let (crt, key) = (TLS_CERT_KEY, TLS_KEY_KEY);
            secret_volume(
                "tls-client",
                TLS_CLIENT_DIR,
                &client.name,
                vec![(crt.into(), crt.into()), (key.into(), key.into())],
            );
        }
    }
    (volumes, mounts)
}

/// The worker container's resources: `spec.workers.resources` as written when it sets a memory request
/// or limit; otherwise with both set to the memory the worker's bound needs
/// ([`contract::memory::worker_memory_quantity`]: `source.prefetch`, `source.maxMessageBytes`,
/// `workers.inFlightBytes`). Request = limit: memory is not reclaimed from a worker that holds its
/// bound, so a lower request would promise the node memory it may not have.
pub fn resources(intg: &Integration) -> Option<ResourceRequirements> {
    let mut r = intg.spec.workers.resources.clone().unwrap_or_default();
    let has_memory =
        |m: &Option<BTreeMap<String, Quantity>>| m.as_ref().is_some_and(|m| m.contains_key("memory"));
    if has_memory(&r.requests) || has_memory(&r.limits) {
        return Some(r);
    }
    let spec = &intg.spec;
    let memory = Quantity(contract::memory::worker_memory_quantity(
        // The CRD bounds both: they fit (`limits::PREFETCH`; `limits::IN_FLIGHT_BYTES` is positive).
        u16::try_from(spec.source.prefetch).unwrap_or(u16::MAX),
        spec.source.max_message_bytes,
        u64::try_from(spec.workers.in_flight_bytes).unwrap_or_default(),
    ));
    for m in [&mut r.requests, &mut r.limits] {
        m.get_or_insert_with(BTreeMap::new)
            .insert("memory".into(), memory.clone());
    }
    Some(r)
}

/// How long a worker pod stays bound to a node that stopped reporting (NotReady or unreachable) before
/// it is evicted and the Deployment replaces it on another node.
pub const NODE_LOSS_TOLERATION_SECONDS: i64 = 30;

/// Tolerations of the node-lifecycle taints for [`NODE_LOSS_TOLERATION_SECONDS`] instead of the 300 s
/// the API server adds by default (`DefaultTolerationSeconds`): a worker keeps no state (its messages
/// wait in the broker, which hands back what a lost worker held once its connection dies), so waiting
/// five minutes on a lost node would only keep the fleet short.
fn node_loss_tolerations() -> Vec<Toleration> {
    ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"]
        .into_iter()
        .map(|key| Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(NODE_LOSS_TOLERATION_SECONDS),
            value: None,
        })
        .collect()
}

/// The node label the workers spread over.
const HOSTNAME_KEY: &str = "kubernetes.io/hostname";
/// The node label of zones, which the workers prefer to spread over when nodes carry it.
const ZONE_KEY: &str = "topology.kubernetes.io/zone";

/// The worker Deployment with `replicas` pods.
pub fn deployment(intg: &Integration, settings: &WorkerSettings, replicas: i32) -> Result<Deployment> {
    let meta = meta(intg)?;
    let name = meta.name.clone().unwrap_or_default();
    let (args, env) = worker_args_env(intg)?;
    let pod_labels = labels(&name);
    let (volumes, mounts) = volumes(intg);
    let container = Container {
        name: CONTAINER.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        resources: resources(intg),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        termination_message_path: Some(contract::TERMINATION_LOG.into()),
        // The worker writes why it refused to start; a panic's last log line is the fallback.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    // Spread over nodes: a preference, so a single-node cluster still schedules every worker.
    let spread = TopologySpreadConstraint {
        max_skew: 1,
        topology_key: HOSTNAME_KEY.into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&name)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    };
    // And over zones, as a preferred anti-affinity rather than a second spread constraint: the scheduler
    // scores no node for spreading when any constraint's topology key is missing from it, so on nodes without
    // zone labels (bare metal, kind) a zone constraint would silently turn the hostname spread off too.
    let zones = Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(&name)),
                        ..LabelSelector::default()
                    }),
                    topology_key: ZONE_KEY.into(),
                    ..PodAffinityTerm::default()
                },
            }]),
            required_during_scheduling_ignored_during_execution: None,
        }),
        ..Affinity::default()
    };
    // A Webhooks fleet's workers watch their snapshot Secret with their own ServiceAccount
    // ([`worker_access`]); a single-destination worker talks to no API server and gets no token.
    let webhooks = intg.spec.webhooks.is_some();
    let pod = PodSpec {
        containers: vec![container],
        service_account_name: webhooks.then(|| crate::names::worker_access(&name)),
        automount_service_account_token: Some(webhooks),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NONROOT_ID),
            run_as_group: Some(NONROOT_ID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        termination_grace_period_seconds: Some(shutdown_grace_seconds(intg) + KILL_MARGIN_SECONDS),
        topology_spread_constraints: Some(vec![spread]),
        affinity: Some(zones),
        tolerations: Some(node_loss_tolerations()),
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(pod),
    };
    podtemplate::apply(
        &mut template,
        &podtemplate::effective(
            settings.pod_template.as_ref(),
            intg.spec.workers.pod_template.as_ref(),
        ),
    );
    Ok(Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            revision_history_limit: Some(3),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            },
            // Surge first: a rollout never takes a consuming worker away before its successor is Ready.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

/// Puts the checksum of the referenced Secrets (`secrets::checksum`) on the pod template, so a
/// changed Secret rolls the workers (env from `secretKeyRef` is read only when a container starts).
pub fn set_secrets_checksum(deployment: &mut Deployment, checksum: String) {
    if let Some(meta) = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.metadata.as_mut())
    {
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(CHECKSUM_ANNOTATION.into(), checksum);
    }
}

/// Keeps the workers off `nodes` (sorted node names, `core::nodes`): a required node affinity on the pod
/// template, `matchFields` `metadata.name` NotIn the names (node names, not hostname labels, which may
/// differ), added to every required term a `workers.podTemplate` gives (terms are ORed, so each needs it)
/// or as the only term. No node affinity of its own when there are none, so the template is as before. The
/// same names render the same template: no roll without a change. A `metadata.name NotIn` requirement in a
/// user's term is taken for the operator's and replaced.
pub fn set_excluded_nodes(deployment: &mut Deployment, nodes: &[String]) {
    let Some(pod) = deployment.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return;
    };
    let mut names = nodes.to_vec();
    names.sort();
    names.dedup();
    let affinity = pod.affinity.get_or_insert_with(Affinity::default);
    let node = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    let ours = |r: &NodeSelectorRequirement| r.key == "metadata.name" && r.operator == "NotIn";
    // What an earlier call added goes first.
    if let Some(required) = node.required_during_scheduling_ignored_during_execution.as_mut() {
        for term in &mut required.node_selector_terms {
            if let Some(fields) = term.match_fields.as_mut() {
                fields.retain(|r| !ours(r));
                if fields.is_empty() {
                    term.match_fields = None;
                }
            }
        }
        required
            .node_selector_terms
            .retain(|t| t.match_fields.is_some() || t.match_expressions.is_some());
        if required.node_selector_terms.is_empty() {
            node.required_during_scheduling_ignored_during_execution = None;
        }
    }
    if !names.is_empty() {
        let requirement = NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "NotIn".into(),
            values: Some(names),
        };
        let required = node
            .required_during_scheduling_ignored_during_execution
            .get_or_insert_with(|| NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm::default()],
            });
        for term in &mut required.node_selector_terms {
            term.match_fields
                .get_or_insert_with(Vec::new)
                .push(requirement.clone());
        }
    }
    if *node == NodeAffinity::default() {
        affinity.node_affinity = None;
    }
    if *affinity == Affinity::default() {
        pod.affinity = None;
    }
}

/// The node names a Deployment's pod template keeps its pods off (see [`set_excluded_nodes`]).
pub fn excluded_nodes(deployment: &Deployment) -> Vec<String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .into_iter()
        // Every term carries the same list (see there): the first says it.
        .flat_map(|r| r.node_selector_terms.first())
        .flat_map(|t| t.match_fields.iter().flatten())
        .filter(|r| r.key == "metadata.name" && r.operator == "NotIn")
        .flat_map(|r| r.values.iter().flatten().cloned())
        .collect()
}

/// The Secrets checksum on a Deployment's pod template, if any.
pub fn secrets_checksum(deployment: &Deployment) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CHECKSUM_ANNOTATION)
        .cloned()
}

/// `minAvailable` of the PodDisruptionBudget: from the spec, else one less than the fleet's floor
/// (fixed replicas or autoscale.min), so a drain can always evict one pod; never negative; 0 while `replicas`
/// (the workers wanted now) is 0.
pub fn min_available(intg: &Integration, replicas: i32) -> i32 {
    // At 0 (suspended, destination gone) a budget asking for more would report the fleet short forever
    // (`kube_poddisruptionbudget_status_current_healthy` below desired) for workers nobody wants.
    if replicas == 0 {
        return 0;
    }
    let w = &intg.spec.workers;
    if let Some(d) = &w.disruption {
        return d.min_available;
    }
    let floor = w
        .replicas
        .or(w.autoscale.as_ref().map(|a| a.min))
        .unwrap_or(crate::core::replicas::DEFAULT_REPLICAS);
    (floor - 1).max(0)
}

/// The PodDisruptionBudget of the workers, `replicas` of them wanted now.
pub fn pod_disruption_budget(intg: &Integration, replicas: i32) -> Result<PodDisruptionBudget> {
    let meta = meta(intg)?;
    let name = meta.name.clone().unwrap_or_default();
    Ok(PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(min_available(intg, replicas))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            }),
            // A crash-looping or unready worker must not block a node drain forever.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

/// Headless metrics Service: one scrape target per worker pod (a ServiceMonitor selects it by label).
pub fn metrics_service(intg: &Integration) -> Result<Service> {
    let mut meta = meta(intg)?;
    let name = meta.name.clone().unwrap_or_default();
    meta.name = Some(format!("{name}-metrics"));
    Ok(Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: METRICS_PORT,
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            // Scrape pods that are not Ready too: an unready worker's metrics say why.
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// Name of the metrics Service of an Integration.
pub fn service_name(name: &str) -> String {
    format!("{name}-metrics")
}

/// The Secret holding a Webhooks fleet's snapshot (`contract::webhooks::snapshot_secret`): the encoded
/// snapshot under `SNAPSHOT_KEY`, and `hash` (what it was compiled from) in an annotation.
pub fn snapshot_secret(intg: &Integration, encoded: Vec<u8>, hash: &str) -> Result<Secret> {
    let mut meta = meta(intg)?;
    let name = meta.name.clone().unwrap_or_default();
    meta.name = Some(contract::webhooks::snapshot_secret(&name));
    meta.annotations = Some(BTreeMap::from([(
        crate::names::SNAPSHOT_HASH_ANNOTATION.to_string(),
        hash.to_string(),
    )]));
    Ok(Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            contract::webhooks::SNAPSHOT_KEY.to_string(),
            k8s_openapi::ByteString(encoded),
        )])),
        ..Secret::default()
    })
}

/// The identity of a Webhooks fleet's workers: a ServiceAccount, a Role that may get, list and watch the
/// fleet's snapshot Secret by name (`resourceNames`, so a list or watch must select it with
/// `metadata.name`) and nothing else, and the RoleBinding between them; all `names::worker_access`.
pub fn worker_access(intg: &Integration) -> Result<(ServiceAccount, Role, RoleBinding)> {
    let mut meta = meta(intg)?;
    let integration = meta.name.clone().unwrap_or_default();
    let name = crate::names::worker_access(&integration);
    meta.name = Some(name.clone());
    let sa = ServiceAccount {
        metadata: meta.clone(),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec![contract::webhooks::snapshot_secret(&integration)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: meta.clone(),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: meta.namespace.clone(),
            ..Subject::default()
        }]),
    };
    Ok((sa, role, binding))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment_with(nodes: &[&str]) -> Deployment {
        let intg: Integration = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": "orders", "namespace": "a", "uid": "u1"},
            "spec": {
                "source": {"connectionSecretRef": {"name": "r", "key": "uri"}, "queue": "orders"},
                "destination": {"url": "https://erp.example.com/h"}
            }
        }))
        .unwrap();
        let settings = WorkerSettings {
            image: "w".into(),
            image_pull_policy: None,
            pod_template: None,
        };
        let mut d = deployment(&intg, &settings, 3).unwrap();
        set_excluded_nodes(&mut d, &nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        d
    }

    #[test]
    fn excluded_nodes_render_one_required_match_fields_term() {
        let d = deployment_with(&["n3", "n1"]);
        let pod = serde_json::to_value(&d.spec.as_ref().unwrap().template.spec).unwrap();
        assert_eq!(
            pod["affinity"]["nodeAffinity"],
            serde_json::json!({"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "NotIn", "values": ["n1", "n3"]}
                ]}]
            }})
        );
        assert_eq!(excluded_nodes(&d), ["n1", "n3"]);
        // The spread over nodes and zones stays beside it.
        assert_eq!(pod["topologySpreadConstraints"].as_array().unwrap().len(), 1);
        assert_eq!(
            pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
                ["topologyKey"],
            "topology.kubernetes.io/zone"
        );
    }

    #[test]
    fn the_same_exclusions_render_the_same_template_and_none_renders_none() {
        let a = deployment_with(&["n3", "n1", "n3"]);
        let b = deployment_with(&["n1", "n3"]);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap(),
            "order and duplicates do not change the template (no roll)"
        );
        let none = deployment_with(&[]);
        let pod = serde_json::to_value(&none.spec.as_ref().unwrap().template.spec).unwrap();
        assert!(
            pod["affinity"].get("nodeAffinity").is_none(),
            "no node affinity at all: {pod}"
        );
        assert!(excluded_nodes(&none).is_empty());
        // Applying it twice changes nothing.
        let mut twice = deployment_with(&["n1", "n3"]);
        set_excluded_nodes(&mut twice, &["n3".into(), "n1".into()]);
        assert_eq!(twice, b);
        set_excluded_nodes(&mut twice, &[]);
        assert_eq!(twice, none);
    }

    #[test]
    fn exclusions_join_every_required_node_term_of_the_pod_template_and_leave_them_when_cleared() {
        let intg: Integration = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": "orders", "namespace": "a", "uid": "u1"},
            "spec": {
                "source": {"connectionSecretRef": {"name": "r", "key": "uri"}, "queue": "orders"},
                "destination": {"url": "https://erp.example.com/h"},
                "workers": {"podTemplate": {"spec": {"affinity": {"nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["hooks"]}]},
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["spare"]}]}
                    ]}
                }}}}}
            }
        }))
        .unwrap();
        let settings = WorkerSettings {
            image: "w".into(),
            image_pull_policy: None,
            pod_template: None,
        };
        let plain = deployment(&intg, &settings, 3).unwrap();
        let mut d = plain.clone();
        set_excluded_nodes(&mut d, &["n3".into()]);
        set_excluded_nodes(&mut d, &["n3".into()]);
        let pod = serde_json::to_value(&d.spec.as_ref().unwrap().template.spec).unwrap();
        let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        for term in terms.as_array().unwrap() {
            assert_eq!(
                term["matchFields"],
                serde_json::json!([{"key": "metadata.name", "operator": "NotIn", "values": ["n3"]}]),
                "{term}"
            );
            assert!(
                term["matchExpressions"].is_array(),
                "the user's requirement stays: {term}"
            );
        }
        assert_eq!(terms.as_array().unwrap().len(), 2);
        assert_eq!(excluded_nodes(&d), ["n3"]);
        set_excluded_nodes(&mut d, &[]);
        assert_eq!(d, plain, "cleared: the user's terms as given");
    }

    #[test]
    fn workers_leave_a_lost_node_after_30_seconds_not_300() {
        let pod = serde_json::to_value(&deployment_with(&[]).spec.unwrap().template.spec).unwrap();
        let keys: Vec<(&str, &str, i64)> = pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert_eq!(
                    (t["operator"].as_str(), t["effect"].as_str()),
                    (Some("Exists"), Some("NoExecute"))
                );
                (
                    t["key"].as_str().unwrap(),
                    t["effect"].as_str().unwrap(),
                    t["tolerationSeconds"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("node.kubernetes.io/not-ready", "NoExecute", 30),
                ("node.kubernetes.io/unreachable", "NoExecute", 30)
            ]
        );
    }
}
