//! `kubectl hookfleet test-delivery`: one request to an Integration's destination (or one of its Webhooks)
//! sent from inside the cluster the way its workers send it.
//!
//! The plugin does not send anything itself: it creates a short-lived pod from the worker Deployment's own
//! pod template (same image, environment and Secret references, volumes, ServiceAccount, security context,
//! node constraints) whose container runs `hookfleet-worker test-delivery [test flags] -- [the worker's
//! flags]` (`contract::test_delivery`): the worker parses its own configuration and sends one marked
//! request through its own delivery path, from a pod subject to the namespace's network policies and DNS.
//! The plugin waits for the container to end, prints its output (the request, the answer, the verdict),
//! exits with its code, and deletes the pod in every case (also on Ctrl-C or an error; a pod left by a
//! killed plugin ends by its `activeDeadlineSeconds` and is garbage-collected with the Integration).
//!
//! The user needs no Secret read: the kubelet fills the pod from the Secrets, as for the workers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hookfleet_crds::contract::test_delivery::{MAX_BODY_BYTES, TestDeliveryArgs};
use hookfleet_crds::{Integration, Webhook};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Affinity, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use kube::{Client, Resource, ResourceExt};

/// The worker container's name in the Deployment (the operator's).
pub const WORKER_CONTAINER: &str = "worker";
/// `app.kubernetes.io/name` of a test-delivery pod: not `hookfleet-worker`, so the fleet's selectors (the
/// Deployment's, the PodDisruptionBudget's, the metrics Service's) never count it.
pub const APP_NAME: &str = "hookfleet-test-delivery";
/// Label naming the Integration a test-delivery pod is for.
pub const FOR_LABEL: &str = "hookfleet.io/test-delivery-for";
/// The operator's labels on the worker pods, left off a test-delivery pod: with them the operator would take
/// it for one of the fleet's workers (its exit code for a crash, its 410 for a gone destination).
const WORKER_LABELS: &[&str] = &[
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "hookfleet.io/integration",
];
/// Seconds past the plugin's timeout after which the pod ends by itself (a plugin killed with SIGKILL).
const DEADLINE_MARGIN_SECONDS: i64 = 30;

/// What the user asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub integration: String,
    pub test: TestDeliveryArgs,
    /// How long to wait for the pod to run and the request to be answered.
    pub timeout: Duration,
}

/// `--body` or the content of `--body-file` (at most [`MAX_BODY_BYTES`]).
pub fn body(body: Option<String>, file: Option<&std::path::Path>) -> Result<Option<String>> {
    let body = match (body, file) {
        (Some(_), Some(_)) => bail!("--body and --body-file: give one"),
        (Some(b), None) => Some(b),
        (None, Some(f)) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("--body-file {}", f.display()))?)
        }
        (None, None) => None,
    };
    if let Some(b) = &body
        && b.len() > MAX_BODY_BYTES
    {
        bail!(
            "the body has {} bytes; a test delivery takes at most {MAX_BODY_BYTES}",
            b.len()
        );
    }
    Ok(body)
}

/// The test-delivery pod for `intg`, built from its worker Deployment `deploy` (pure).
pub fn pod(intg: &Integration, deploy: &Deployment, options: &Options) -> Result<Pod> {
    let name = intg.name_any();
    let template = deploy
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .context("the worker Deployment has no spec")?;
    let mut spec = template.spec.context("the worker Deployment has no pod spec")?;
    let i = spec
        .containers
        .iter()
        .position(|c| c.name == WORKER_CONTAINER)
        .unwrap_or(0);
    let mut worker = spec
        .containers
        .get(i)
        .cloned()
        .context("the worker Deployment has no container")?;
    let worker_args = worker.args.take().unwrap_or_default();
    worker.args = Some(options.test.to_argv(&worker_args));
    // One request, no server: no probes, no ports.
    worker.liveness_probe = None;
    worker.readiness_probe = None;
    worker.startup_probe = None;
    worker.ports = None;
    worker.lifecycle = None;
    spec.containers = vec![worker];
    spec.restart_policy = Some("Never".into());
    // Spreading and pod (anti-)affinity select the fleet's workers: not this pod's business. Node affinity
    // (where the workers may run) stays.
    spec.topology_spread_constraints = None;
    spec.affinity = spec.affinity.and_then(|a| a.node_affinity).map(|n| Affinity {
        node_affinity: Some(n),
        ..Affinity::default()
    });
    spec.termination_grace_period_seconds = Some(5);
    spec.active_deadline_seconds =
        Some(options.timeout.as_secs().min(i64::MAX as u64 / 2) as i64 + DEADLINE_MARGIN_SECONDS);

    let meta = template.metadata.unwrap_or_default();
    let mut labels: BTreeMap<String, String> = meta
        .labels
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !WORKER_LABELS.contains(&k.as_str()))
        .collect();
    labels.insert("app.kubernetes.io/name".into(), APP_NAME.into());
    labels.insert("app.kubernetes.io/managed-by".into(), "kubectl-hookfleet".into());
    labels.insert(FOR_LABEL.into(), name.clone());
    // The user's annotations stay (a sidecar opt-out, …); scraping and the operator's checksums do not.
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("prometheus.io/") && !k.starts_with("hookfleet.io/"))
        .collect();
    let owner = intg.meta().uid.clone().map(|uid| OwnerReference {
        api_version: Integration::api_version(&()).into_owned(),
        kind: Integration::kind(&()).into_owned(),
        name: name.clone(),
        uid,
        controller: Some(false),
        block_owner_deletion: None,
    });
    Ok(Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-test-delivery-")),
            namespace: intg.namespace(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Where a test-delivery pod is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Still on its way (what it waits for).
    Waiting(String),
    /// The container ended with this exit code.
    Done(i32),
    /// It will not run: why, in the pod's words.
    Failed(String),
}

/// Container waiting reasons that do not go away by waiting.
const STUCK: &[&str] = &[
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CrashLoopBackOff",
];

/// Where `pod` is (pure).
pub fn progress(pod: &Pod) -> Progress {
    let Some(status) = &pod.status else {
        return Progress::Waiting("created".into());
    };
    let container = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == WORKER_CONTAINER)
        .or_else(|| status.container_statuses.iter().flatten().next());
    let say = |reason: Option<&String>, message: Option<&String>| match (reason, message) {
        (Some(r), Some(m)) if !m.is_empty() => format!("{r}: {m}"),
        (Some(r), _) => r.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => "no reason given".into(),
    };
    if let Some(state) = container.and_then(|c| c.state.as_ref()) {
        if let Some(t) = &state.terminated {
            return Progress::Done(t.exit_code);
        }
        if let Some(w) = &state.waiting
            && let Some(reason) = w.reason.as_deref()
        {
            if STUCK.contains(&reason) {
                return Progress::Failed(format!(
                    "the test pod's container cannot start: {}",
                    say(w.reason.as_ref(), w.message.as_ref())
                ));
            }
            return Progress::Waiting(format!(
                "container {}",
                say(w.reason.as_ref(), w.message.as_ref())
            ));
        }
    }
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        && c.reason.as_deref() == Some("Unschedulable")
    {
        return Progress::Failed(format!(
            "the test pod cannot be scheduled: {}",
            say(c.reason.as_ref(), c.message.as_ref())
        ));
    }
    let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
    if phase == "Failed" {
        return Progress::Failed(format!(
            "the test pod failed: {}",
            say(status.reason.as_ref(), status.message.as_ref())
        ));
    }
    Progress::Waiting(phase)
}

/// Checks what can be checked before a pod is made: the Integration, the Webhook, the worker Deployment.
async fn prepare(client: &Client, ns: &str, options: &Options) -> Result<(Integration, Deployment)> {
    let name = &options.integration;
    let intg = Api::<Integration>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .with_context(|| format!("no Integration {ns}/{name}"))?;
    match (&options.test.webhook, intg.spec.webhooks.is_some()) {
        (Some(w), false) => {
            bail!("Integration {ns}/{name} has a single destination, no Webhooks: leave out --webhook {w}")
        }
        (Some(w), true) => {
            let hook = Api::<Webhook>::namespaced(client.clone(), ns)
                .get_opt(w)
                .await?
                .with_context(|| format!("no Webhook {ns}/{w}"))?;
            if hook.spec.integration != *name {
                bail!(
                    "Webhook {ns}/{w} is delivered by Integration {}, not {name}",
                    hook.spec.integration
                );
            }
        }
        (None, true) if options.test.event.is_none() => bail!(
            "Integration {ns}/{name} delivers to Webhooks: name one with --webhook, or give --event to pick the \
             one it matches"
        ),
        _ => {}
    }
    let deploy = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .with_context(|| {
            format!(
                "no worker Deployment {ns}/{name} yet (the operator makes it: `kubectl hookfleet status -n {ns}`)"
            )
        })?;
    Ok((intg, deploy))
}

/// Runs the test delivery; the exit code (the worker's verdict, `contract::test_delivery::exit`).
pub async fn run(client: &Client, ns: &str, options: &Options) -> Result<i32> {
    let (intg, deploy) = prepare(client, ns, options).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let created = pods
        .create(&PostParams::default(), &pod(&intg, &deploy, options)?)
        .await
        .context("creating the test-delivery pod")?;
    let pod_name = created.name_any();
    eprintln!("test-delivery: pod {ns}/{pod_name} (deleted when done)");
    let outcome = tokio::select! {
        r = wait_and_print(&pods, &pod_name, options.timeout) => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    // In every case: the pod goes.
    let gone = pods
        .delete(
            &pod_name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await;
    if let Err(e) = gone {
        eprintln!("test-delivery: deleting pod {ns}/{pod_name}: {e} (delete it by hand)");
    }
    outcome
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn wait_and_print(pods: &Api<Pod>, name: &str, timeout: Duration) -> Result<i32> {
    let started = Instant::now();
    let code = loop {
        let pod = pods.get(name).await?;
        let what = match progress(&pod) {
            Progress::Done(code) => break code,
            Progress::Failed(why) => bail!("{why}"),
            Progress::Waiting(what) => what,
        };
        if started.elapsed() > timeout {
            bail!(
                "timed out after {} waiting for the test-delivery pod ({what})",
                hookfleet_crds::duration::render(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let logs = pods
        .logs(
            name,
            &LogParams {
                container: Some(WORKER_CONTAINER.into()),
                ..LogParams::default()
            },
        )
        .await
        .context("reading the test-delivery pod's output")?;
    print!("{logs}");
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integration() -> Integration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": "orders", "namespace": "team-a", "uid": "u-1"},
            "spec": {
                "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "orders"},
                "destination": {"url": "https://erp.example.com/hooks"}
            }
        }))
        .unwrap()
    }

    /// A worker Deployment as the operator renders it (the parts the pod derivation reads).
    fn deployment() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "orders", "namespace": "team-a"},
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": "hookfleet-worker", "hookfleet.io/integration": "orders"}},
                "template": {
                    "metadata": {
                        "labels": {
                            "app.kubernetes.io/name": "hookfleet-worker", "hookfleet.io/integration": "orders",
                            "app.kubernetes.io/instance": "orders", "app.kubernetes.io/managed-by": "hookfleet-operator",
                            "app.kubernetes.io/component": "worker", "team": "payments"
                        },
                        "annotations": {"prometheus.io/scrape": "true", "hookfleet.io/secrets-checksum": "abc",
                                        "example.com/owner": "payments"}
                    },
                    "spec": {
                        "serviceAccountName": "orders-worker",
                        "automountServiceAccountToken": true,
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
                        "nodeSelector": {"pool": "egress"},
                        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                        "imagePullSecrets": [{"name": "mirror"}],
                        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                       "whenUnsatisfiable": "ScheduleAnyway"}],
                        "affinity": {
                            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                                {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["bad"]}]}]}},
                            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                                {"weight": 100, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone"}}]}
                        },
                        "volumes": [{"name": "tls-ca", "secret": {"secretName": "ca"}}],
                        "containers": [{
                            "name": "worker",
                            "image": "hookfleet/worker:0.1.0",
                            "args": ["--integration", "team-a/orders", "--queue", "orders"],
                            "env": [{"name": "HOOKFLEET_AMQP_URI",
                                     "valueFrom": {"secretKeyRef": {"name": "rabbitmq", "key": "uri"}}}],
                            "ports": [{"name": "metrics", "containerPort": 9090}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}},
                            "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false},
                            "volumeMounts": [{"name": "tls-ca", "mountPath": "/etc/hookfleet/tls/ca"}]
                        }]
                    }
                }
            }
        }))
        .unwrap()
    }

    fn options() -> Options {
        Options {
            integration: "orders".into(),
            test: TestDeliveryArgs {
                event: Some("orders.created".into()),
                body: Some("{}".into()),
                ..TestDeliveryArgs::default()
            },
            timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn the_pod_is_the_workers_with_the_one_shot_command() {
        let p = pod(&integration(), &deployment(), &options()).unwrap();
        let spec = p.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(c.image.as_deref(), Some("hookfleet/worker:0.1.0"));
        assert_eq!(
            c.args.as_deref().unwrap(),
            [
                "test-delivery",
                "--event",
                "orders.created",
                "--body",
                "{}",
                "--",
                "--integration",
                "team-a/orders",
                "--queue",
                "orders"
            ]
        );
        // The worker's configuration and Secrets as they are: env, mounts, volumes, identity, security.
        assert_eq!(
            c.env,
            deployment().spec.unwrap().template.spec.unwrap().containers[0].env
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].name, "tls-ca");
        assert_eq!(spec.volumes.as_ref().unwrap()[0].name, "tls-ca");
        assert_eq!(spec.service_account_name.as_deref(), Some("orders-worker"));
        assert_eq!(spec.automount_service_account_token, Some(true));
        assert_eq!(
            c.security_context.as_ref().unwrap().read_only_root_filesystem,
            Some(true)
        );
        assert_eq!(spec.security_context.as_ref().unwrap().run_as_user, Some(65532));
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "egress");
        assert_eq!(spec.image_pull_secrets.as_ref().unwrap()[0].name, "mirror");
        assert!(spec.tolerations.is_some());
        // One run, no server, no spreading among the workers; node affinity kept.
        assert!(c.liveness_probe.is_none() && c.readiness_probe.is_none() && c.ports.is_none());
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert!(spec.topology_spread_constraints.is_none());
        let affinity = spec.affinity.as_ref().unwrap();
        assert!(affinity.node_affinity.is_some() && affinity.pod_anti_affinity.is_none());
        assert_eq!(spec.active_deadline_seconds, Some(60));
        // Not one of the fleet's workers for any selector; the user's label and annotation kept.
        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], APP_NAME);
        assert_eq!(labels[FOR_LABEL], "orders");
        assert_eq!(labels["team"], "payments");
        assert!(!labels.contains_key("hookfleet.io/integration"));
        assert_ne!(labels["app.kubernetes.io/managed-by"], "hookfleet-operator");
        let annotations = p.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["example.com/owner"]);
        assert_eq!(p.metadata.generate_name.as_deref(), Some("orders-test-delivery-"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("team-a"));
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Integration", "u-1", Some(false))
        );
    }

    fn pod_status(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    #[test]
    fn progress_reads_the_pods_own_words() {
        assert_eq!(
            progress(&pod_status(serde_json::json!({"phase": "Pending"}))),
            Progress::Waiting("Pending".into())
        );
        let done = pod_status(serde_json::json!({"phase": "Failed", "containerStatuses": [{
            "name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 6}}}]}));
        assert_eq!(progress(&done), Progress::Done(6));
        let pull = pod_status(serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}));
        assert_eq!(
            progress(&pull),
            Progress::Failed(
                "the test pod's container cannot start: ImagePullBackOff: Back-off pulling image \"x\""
                    .into()
            )
        );
        let creating = pod_status(serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(
            progress(&creating),
            Progress::Waiting("container ContainerCreating".into())
        );
        let unschedulable = pod_status(serde_json::json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."}]}));
        assert_eq!(
            progress(&unschedulable),
            Progress::Failed(
                "the test pod cannot be scheduled: Unschedulable: 0/3 nodes are available: 3 node(s) didn't match \
                 Pod's node affinity/selector."
                    .into()
            )
        );
        let deadline = pod_status(
            serde_json::json!({"phase": "Failed", "reason": "DeadlineExceeded",
            "message": "Pod was active on the node longer than the specified deadline"}),
        );
        assert!(matches!(progress(&deadline), Progress::Failed(m) if m.contains("DeadlineExceeded")));
    }

    #[test]
    fn the_body_is_one_of_body_and_body_file_and_bounded() {
        assert_eq!(body(None, None).unwrap(), None);
        assert_eq!(body(Some("{}".into()), None).unwrap().as_deref(), Some("{}"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("b.json");
        std::fs::write(&f, r#"{"a": 1}"#).unwrap();
        assert_eq!(body(None, Some(&f)).unwrap().as_deref(), Some(r#"{"a": 1}"#));
        assert!(body(Some("{}".into()), Some(&f)).is_err());
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        assert!(body(Some(big), None).unwrap_err().to_string().contains("at most"));
        assert!(body(None, Some(&dir.path().join("missing"))).is_err());
    }
}
