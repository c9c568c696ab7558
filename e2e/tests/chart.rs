//! The Helm chart: `helm lint --strict` and `helm template` with default and full values, the values
//! schema, the alert rules under `promtool test rules`, RBAC in step with docs/operator.md, and on the local
//! control plane: `helm template | kubectl apply --dry-run=server`, `helm install`, and the operator running
//! as the chart's ServiceAccount (cluster-wide and namespaced) reconciling an Integration with no RBAC error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use hookfleet_crds::Integration;
use hookfleet_e2e::ControlPlane;
use hookfleet_e2e::chart::{self, helm, run, template};
use hookfleet_e2e::process::{free_port, wait_for};
use hookfleet_operator::{Config, LeaderElection, Operator};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

const FULL_VALUES: &str = "ci/full-values.yaml";

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hookfleet-helm-")
        .tempdir()
        .unwrap()
}

fn full_values() -> String {
    chart::dir().join(FULL_VALUES).display().to_string()
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn env_of(deployment: &Value) -> BTreeMap<String, Value> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

#[test]
fn lint_and_template_with_default_and_full_values() -> Result<()> {
    let home = home();
    run(helm(home.path())?.args(["lint", "--strict"]).arg(chart::dir()))?;
    run(helm(home.path())?
        .args(["lint", "--strict", "-f", &full_values()])
        .arg(chart::dir()))?;

    // Defaults: the operator and its RBAC, nothing optional.
    let objects = template(home.path(), "hookfleet", "hookfleet-system", &[])?;
    assert_eq!(
        kinds(&objects),
        BTreeSet::from(
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "Deployment",
                "PodDisruptionBudget",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount"
            ]
            .map(String::from)
        )
    );
    let d = find(&objects, "Deployment");
    assert_eq!(d["metadata"]["name"], "hookfleet-operator");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/hookfleet/operator:0.1.0", "appVersion tag");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert_eq!(pod["topologySpreadConstraints"].as_array().unwrap().len(), 2);
    assert_eq!(pod["serviceAccountName"], "hookfleet-operator");
    let env = env_of(d);
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env["HOOKFLEET_WORKER_IMAGE"]["value"],
        "ghcr.io/hookfleet/worker:0.1.0"
    );
    assert_eq!(env["HOOKFLEET_WORKER_IMAGE_PULL_POLICY"]["value"], "IfNotPresent");
    assert!(
        !env.contains_key("HOOKFLEET_WORKER_POD_TEMPLATE"),
        "no default pod template"
    );
    assert_eq!(env["HOOKFLEET_LEASE_NAME"]["value"], "hookfleet-operator");
    assert!(
        !env.contains_key("HOOKFLEET_WATCH_NAMESPACE"),
        "cluster-wide by default"
    );
    assert!(!env.contains_key("HOOKFLEET_NO_LEADER_ELECTION"));
    assert_eq!(find(&objects, "PodDisruptionBudget")["spec"]["minAvailable"], 1);

    // Full values: every optional part, and the values reach the objects.
    let objects = template(
        home.path(),
        "hookfleet",
        "hookfleet-system",
        &["-f", &full_values()],
    )?;
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
    ] {
        assert!(kinds(&objects).contains(kind), "{kind} missing with full values");
    }
    let d = find(&objects, "Deployment");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/hookfleet/operator:0.1.0-rc.1"
    );
    assert_eq!(env_of(d)["HOOKFLEET_WORKER_IMAGE_PULL_POLICY"]["value"], "Always");
    // worker.podTemplate reaches the operator as JSON it parses into the CRD's type.
    let template: hookfleet_crds::integration::WorkerPodTemplate = serde_json::from_str(
        env_of(d)["HOOKFLEET_WORKER_POD_TEMPLATE"]["value"]
            .as_str()
            .unwrap(),
    )?;
    assert_eq!(template.metadata.unwrap().labels["team"], "platform");
    assert_eq!(
        template.spec.unwrap().priority_class_name.as_deref(),
        Some("business-critical")
    );
    let rule = find(&objects, "PrometheusRule");
    let alerts: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r.get("alert").is_some())
        .collect();
    // One alert per alert runbook (docs/runbooks/Hookfleet*.md), and the other way round.
    let runbooks: BTreeSet<String> =
        std::fs::read_dir(hookfleet_e2e::tools::repo_root().join("docs/runbooks"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.starts_with("Hookfleet"))
            .filter_map(|f| f.strip_suffix(".md").map(str::to_string))
            .collect();
    let names: BTreeSet<String> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, runbooks, "every alert of docs/runbooks");
    assert_eq!(alerts.len(), 16);
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        let severity = a["labels"]["severity"].as_str().unwrap();
        assert!(["page", "ticket"].contains(&severity), "{name}: {severity}");
        assert_eq!(a["labels"]["team"], "platform", "{name}: additionalLabels");
        assert!(a["annotations"]["summary"].is_string() && a["annotations"]["description"].is_string());
        let url = a["annotations"]["runbook_url"].as_str().unwrap();
        let file = url.rsplit('/').next().unwrap();
        assert_eq!(file, format!("{name}.md"));
        let runbook = hookfleet_e2e::tools::repo_root().join("docs/runbooks").join(file);
        assert!(runbook.is_file(), "{name}: {} missing", runbook.display());
    }
    let dead = alerts
        .iter()
        .find(|a| a["alert"] == "HookfleetDeadLetterRate")
        .unwrap();
    assert_eq!(dead["labels"]["severity"], "page", "severity from values");
    assert_eq!(dead["for"], "1m", "for: from values");
    assert!(
        dead["expr"].as_str().unwrap().contains("> 0.5 unless"),
        "threshold from values"
    );
    // A suspended Integration (workers at 0 on purpose) pages no one: every alert about an Integration.
    for a in alerts
        .iter()
        .filter(|a| !a["alert"].as_str().unwrap().starts_with("HookfleetOperator"))
    {
        assert!(
            a["expr"]
                .as_str()
                .unwrap()
                .contains("hookfleet_operator_integration_suspended"),
            "{} fires for a suspended Integration",
            a["alert"]
        );
    }

    // The dashboard: JSON in a ConfigMap with the sidecar label, with the panels on-call needs.
    let cm = find(&objects, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value = serde_json::from_str(cm["data"]["hookfleet.json"].as_str().unwrap())?;
    let text = dashboard.to_string();
    for series in [
        "hookfleet_deliveries_total",
        "hookfleet_dead_letters_total",
        "hookfleet_delivery_duration_seconds_bucket",
        "hookfleet_operator_integration_backlog_messages",
        "hookfleet:integration_backlog_age_seconds:estimate",
        "hookfleet_operator_integration_ready_workers",
        "hookfleet_operator_integration_consumers",
        "hookfleet_open_fds",
        "hookfleet_max_fds",
        "hookfleet_webhooks_in_state",
        "hookfleet_webhook_consecutive_failures",
    ] {
        assert!(text.contains(series), "dashboard shows no {series}");
    }
    Ok(())
}

#[test]
fn schema_refuses_a_wrong_type_and_an_unknown_key_naming_it() -> Result<()> {
    let home = home();
    let refused = |args: &[&str]| -> Result<String> {
        let out = helm(home.path())?
            .arg("template")
            .arg("hookfleet")
            .arg(chart::dir())
            .args(args)
            .output()?;
        assert!(!out.status.success(), "helm accepted {args:?}");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let e = refused(&["--set", "replicaCount=two"])?;
    assert!(e.contains("/replicaCount") && e.contains("want integer"), "{e}");
    let e = refused(&["--set", "replicaCont=3"])?;
    assert!(e.contains("'replicaCont' not allowed"), "{e}");
    let e = refused(&["--set", "prometheusRule.alerts.FileDescriptorsHigh.ratio=high"])?;
    assert!(
        e.contains("/prometheusRule/alerts/FileDescriptorsHigh/ratio"),
        "{e}"
    );
    let e = refused(&["--set", "prometheusRule.alerts.FileDescriptorsHigh.treshold=1"])?;
    assert!(e.contains("'treshold' not allowed"), "{e}");
    let e = refused(&["--set", "operator.resync=soon"])?;
    assert!(e.contains("/operator/resync"), "{e}");
    // Checks across keys, which a schema cannot express, fail in the templates with the keys named.
    let e = refused(&["--set", "leaderElection.enabled=false"])?;
    assert!(
        e.contains("leaderElection.enabled=false with replicaCount 2"),
        "{e}"
    );
    let single = template(
        home.path(),
        "hookfleet",
        "hookfleet-system",
        &["--set", "leaderElection.enabled=false,replicaCount=1"],
    )?;
    assert!(
        !kinds(&single).contains("PodDisruptionBudget"),
        "a PDB over one replica would block drains"
    );
    assert_eq!(
        env_of(find(&single, "Deployment"))["HOOKFLEET_NO_LEADER_ELECTION"]["value"],
        "true"
    );
    Ok(())
}

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let home = home();
    let dir = tempfile::tempdir()?;
    // The rules under test are the chart's rendered output, with default values.
    let rules = chart::rules_file(home.path(), dir.path(), &[])?;
    let tests = hookfleet_e2e::tools::repo_root().join("e2e/promtool/alerts.test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts.test.yaml"))?;
    let promtool = std::env::var("HOOKFLEET_PROMTOOL").unwrap_or_else(|_| "/usr/bin/promtool".into());
    let check = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules))?;
    assert!(String::from_utf8_lossy(&check.stdout).contains("SUCCESS: 18 rules found"));
    let out =
        run(Command::new(&promtool)
            .current_dir(dir.path())
            .args(["test", "rules", "alerts.test.yaml"]))?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"));

    // Every alert of the chart has a firing case in the test file.
    let rendered: Value = serde_yaml::from_str(&std::fs::read_to_string(&rules)?)?;
    let test_text = std::fs::read_to_string(&tests)?;
    for group in rendered["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            if let Some(name) = rule["alert"].as_str() {
                assert!(
                    test_text.contains(&format!(
                        "alertname: {name}\n        exp_alerts:\n          - exp_labels"
                    )),
                    "{name} has no firing case in {}",
                    tests.display()
                );
            }
        }
    }
    Ok(())
}

/// `(apiGroup, resource) → verbs` of RBAC rules.
type Grants = BTreeMap<(String, String), BTreeSet<String>>;

fn grants(rules: &Value) -> Grants {
    let mut out = Grants::new();
    for r in rules.as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                out.entry((g.as_str().unwrap().into(), res.as_str().unwrap().into()))
                    .or_default()
                    .extend(
                        r["verbs"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_owned()),
                    );
            }
        }
    }
    out
}

/// The table under "## RBAC it needs" in docs/operator.md.
fn documented_grants() -> Result<Grants> {
    let doc = std::fs::read_to_string(hookfleet_e2e::tools::repo_root().join("docs/operator.md"))?;
    let section = doc
        .split("## RBAC it needs")
        .nth(1)
        .context("docs/operator.md has no 'RBAC it needs' section")?;
    let mut out = Grants::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells[0] == "API group" || cells[0].starts_with("---") {
            continue;
        }
        let group = cells[0].trim_matches('"').to_owned();
        // "get (only the referenced ones …)": the verbs come before any parenthesis.
        let verbs: BTreeSet<String> = cells[2]
            .split('(')
            .next()
            .unwrap()
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        for res in cells[1].split(',') {
            out.insert((group.clone(), res.trim().to_owned()), verbs.clone());
        }
    }
    Ok(out)
}

#[test]
fn rbac_grants_exactly_what_docs_operator_md_lists() -> Result<()> {
    let home = home();
    let documented = documented_grants()?;
    assert!(documented.len() >= 9, "parsed {documented:?}");
    for (args, role_kind) in [
        (vec![], "ClusterRole"),
        (vec!["--set", "watchNamespace=team-b"], "Role"),
    ] {
        let objects = template(home.path(), "hookfleet", "hookfleet-system", &args)?;
        let mut granted = Grants::new();
        for o in &objects {
            let kind = o["kind"].as_str().unwrap();
            if kind == "ClusterRole" || kind == "Role" {
                for (k, v) in grants(&o["rules"]) {
                    granted.entry(k).or_default().extend(v);
                }
            }
        }
        assert_eq!(granted, documented, "{role_kind} mode");
        // Leases only in the operator's namespace; in namespaced mode nothing is cluster-wide.
        let lease_role = objects
            .iter()
            .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "hookfleet-operator-leader-election")
            .unwrap();
        assert_eq!(lease_role["metadata"]["namespace"], "hookfleet-system");
        // Reading Nodes (cluster-scoped) is the one cluster-wide grant in both modes.
        let cluster_roles: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "ClusterRole").collect();
        let nodes_role = cluster_roles
            .iter()
            .find(|o| o["metadata"]["name"] == "hookfleet-operator-nodes")
            .expect("the Nodes ClusterRole");
        assert_eq!(
            nodes_role["rules"],
            json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}])
        );
        if role_kind == "Role" {
            assert_eq!(cluster_roles.len(), 1, "only reading Nodes is cluster-wide");
            let main = objects
                .iter()
                .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "hookfleet-operator")
                .unwrap();
            assert_eq!(main["metadata"]["namespace"], "team-b");
            assert_eq!(
                env_of(find(&objects, "Deployment"))["HOOKFLEET_WATCH_NAMESPACE"]["value"],
                "team-b"
            );
        }
    }
    Ok(())
}

/// Minimal stand-ins for the Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule), so the
/// full-values render can be dry-run against this API server. Their schemas accept any spec: what is
/// checked here is that the objects are well-formed Kubernetes objects of those kinds.
fn monitoring_crds() -> Vec<Value> {
    [
        ("servicemonitors", "ServiceMonitor"),
        ("podmonitors", "PodMonitor"),
        ("prometheusrules", "PrometheusRule"),
    ]
    .iter()
    .map(|(plural, kind)| {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": true
                }}}]
            }
        })
    })
    .collect()
}

fn kubectl_apply_dry_run(cp: &ControlPlane, manifests: &str) -> Result<String> {
    let mut child = cp
        .kubectl()?
        .args(["apply", "--dry-run=server", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(manifests.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl apply --dry-run=server failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A client that authenticates as the admin but acts as ServiceAccount `ns/name` (impersonation), with the
/// groups a real token of that ServiceAccount carries.
async fn client_as_service_account(kubeconfig: &Path, ns: &str, name: &str) -> Result<kube::Client> {
    let text = std::fs::read_to_string(kubeconfig)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(Kubeconfig::from_yaml(&text)?, &KubeConfigOptions::default())
            .await?;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{name}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]);
    Ok(kube::Client::try_from(config)?)
}

/// Runs the operator in-process as the chart's ServiceAccount `sa` of namespace `release_ns` (watching
/// `watch` or everything), creates a Secret and an Integration in `intg_ns`, and checks that the operator
/// reconciled it through every permission it needs: children created, status and an Event written, the
/// Lease held, no reconcile error.
async fn reconciles_as(
    cp: &ControlPlane,
    release_ns: &str,
    sa: &str,
    watch: Option<&str>,
    intg_ns: &str,
) -> Result<()> {
    cp.create_namespace(intg_ns).await?;
    // A broker URI nobody listens on: the operator must report it (status + Event), which exercises the
    // same permissions as a healthy Integration without a RabbitMQ node.
    let dead_port = free_port()?;
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbitmq"},
        "stringData": {"uri": format!("amqp://guest:guest@127.0.0.1:{dead_port}/%2f")}
    }))?;
    Api::<Secret>::namespaced(cp.client(), intg_ns)
        .create(&PostParams::default(), &secret)
        .await?;
    let integrations: Api<Integration> = Api::namespaced(cp.client(), intg_ns);
    let intg: Integration = serde_json::from_value(json!({
        "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
        "metadata": {"name": "orders"},
        "spec": {
            // Delete: the queue finalizer is added and, on deletion, removed after the (shortened) timeout.
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "orders",
                       "deletionPolicy": "Delete"},
            "destination": {"url": "https://erp.example.com/hooks"},
            "workers": {"replicas": 2}
        }
    }))?;
    integrations.create(&PostParams::default(), &intg).await?;

    let client = client_as_service_account(cp.kubeconfig(), release_ns, sa).await?;
    let identity = format!("{sa}-rbac-test");
    let mut config = Config::new("ghcr.io/hookfleet/worker:test");
    config.namespace = watch.map(str::to_owned);
    config.resync = Duration::from_secs(2);
    config.retry = Duration::from_secs(2);
    config.queue_deletion_timeout = Duration::from_secs(3);
    config.instance = identity.clone();
    config.leader_election = Some(LeaderElection {
        lease_name: sa.into(),
        lease_namespace: release_ns.into(),
        identity: identity.clone(),
        lease_duration_secs: 5,
        renew_grace_secs: 2,
    });
    let op = Operator::new(config);
    let metrics = op.metrics();
    let task = tokio::spawn(op.run(client, futures::future::pending::<()>()));
    // Aborts the operator also when an assertion below fails.
    struct Abort(tokio::task::JoinHandle<hookfleet_operator::Result<()>>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let task = Abort(task);

    let reconciled = wait_for(
        "the Integration's status from the operator",
        Duration::from_secs(90),
        Duration::from_millis(300),
        || {
            let integrations = integrations.clone();
            let finished = task.0.is_finished();
            async move {
                anyhow::ensure!(!finished, "the operator stopped (an RBAC error at start?)");
                let i = integrations.get("orders").await?;
                Ok(i.condition("Degraded")
                    .filter(|c| c.reason == "BrokerUnreachable")
                    .map(|_| i.clone()))
            }
        },
    )
    .await?;
    assert_eq!(reconciled.status.as_ref().unwrap().replicas, Some(2));
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), intg_ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(cp.client(), intg_ns);
    let services: Api<Service> = Api::namespaced(cp.client(), intg_ns);
    let events: Api<Event> = Api::namespaced(cp.client(), intg_ns);
    wait_for(
        "children and a Warning Event",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let (deployments, pdbs, services, events) = (
                deployments.clone(),
                pdbs.clone(),
                services.clone(),
                events.clone(),
            );
            async move {
                let d = deployments.get_opt("orders").await?;
                let p = pdbs.get_opt("orders").await?;
                let s = services.get_opt("orders-metrics").await?;
                let e = events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .any(|e| e.reason.as_deref() == Some("BrokerUnreachable"));
                Ok((d.is_some() && p.is_some() && s.is_some() && e).then_some(()))
            }
        },
    )
    .await?;
    let worker = deployments.get("orders").await?;
    assert_eq!(
        worker
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .automount_service_account_token,
        Some(false),
        "workers mount no service-account token"
    );
    let lease = Api::<Lease>::namespaced(cp.client(), release_ns).get(sa).await?;
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(identity.as_str())
    );
    let text = metrics.encode();
    assert!(
        !text.contains("hookfleet_operator_reconcile_errors_total{"),
        "reconcile errors as {sa}:\n{text}"
    );
    assert!(text.contains("hookfleet_operator_leader 1"), "{text}");
    // Ready only once every cache (Integrations, Deployments, PDBs, Services, Pods) has listed and watches:
    // a missing list/watch grant would keep it at 0.
    assert!(text.contains("hookfleet_operator_ready 1"), "{text}");
    assert!(
        text.contains(&format!(
            "hookfleet_operator_integration_desired_workers{{integration=\"{intg_ns}/orders\"}} 2"
        )),
        "{text}"
    );
    // deletionPolicy Delete with the broker unreachable: the finalizer (patch on integrations), the workers
    // scaled to 0 (patch on deployments), QueuesDeleted (integrations/status), then the finalizer removed
    // after the timeout: the Integration goes, with no permission error on the way.
    let finalizers = integrations.get("orders").await?.metadata.finalizers;
    assert_eq!(finalizers, Some(vec!["hookfleet.io/queues".to_owned()]));
    integrations.delete("orders", &Default::default()).await?;
    wait_for(
        "the Integration deleted after the queue deletion timeout",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let integrations = integrations.clone();
            async move { Ok(integrations.get_opt("orders").await?.is_none().then_some(())) }
        },
    )
    .await?;
    let text = metrics.encode();
    assert!(
        !text.contains("hookfleet_operator_reconcile_errors_total{"),
        "reconcile errors as {sa} while deleting:\n{text}"
    );
    assert!(
        text.contains(r#"hookfleet_operator_writes_total{kind="IntegrationFinalizers"} 2"#),
        "{text}"
    );
    drop(task);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_install_and_operator_rbac_on_the_local_control_plane() -> Result<()> {
    hookfleet_e2e::init_tracing();
    let home = home();
    // Workloads (kwok) so `helm install --wait` sees the operator Deployment become available.
    let cp = ControlPlane::start_with_workloads().await?;
    let kubeconfig = cp.kubeconfig().display().to_string();

    // 1. Server-side dry run of everything the chart renders, CRD included, with full values.
    cp.create_namespace("hookfleet-system").await?;
    for crd in monitoring_crds() {
        let crd: CustomResourceDefinition = serde_json::from_value(crd)?;
        hookfleet_e2e::control_plane::install_crd(&cp.client(), &crd).await?;
    }
    for args in [
        vec!["--include-crds"],
        vec!["--include-crds", "-f", &full_values()],
    ] {
        let manifests = chart::template_text(home.path(), "hookfleet", "hookfleet-system", &args)?;
        let out = kubectl_apply_dry_run(&cp, &manifests)?;
        assert!(
            out.contains("deployment.apps/hookfleet-operator created (server dry run)"),
            "{out}"
        );
        assert!(
            out.contains("customresourcedefinition.apiextensions.k8s.io/integrations.hookfleet.io created (server dry run)"),
            "{out}"
        );
    }

    // 2. helm install (CRD from the chart's crds/), the operator Deployment available with 2 replicas.
    run(helm(home.path())?
        .args(["install", "hookfleet"])
        .arg(chart::dir())
        .args(["--namespace", "hookfleet-system", "--create-namespace"])
        .args(["--wait", "--timeout", "3m", "--kubeconfig", &kubeconfig]))?;
    let d = Api::<Deployment>::namespaced(cp.client(), "hookfleet-system")
        .get("hookfleet-operator")
        .await?;
    assert_eq!(d.status.and_then(|s| s.available_replicas), Some(2));
    let pods = Api::<Pod>::namespaced(cp.client(), "hookfleet-system")
        .list(&ListParams::default().labels("app.kubernetes.io/name=hookfleet-operator"))
        .await?;
    assert_eq!(pods.items.len(), 2);
    // The CRD came from the chart and is served.
    run(cp.kubectl()?.args(["get", "integrations", "-A"]))?;
    // The documented upgrade path: the CRD applied server-side over Helm's copy, then `helm upgrade`.
    run(cp
        .kubectl()?
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(chart::dir().join("crds")))?;
    let upgraded = run(helm(home.path())?
        .args(["upgrade", "hookfleet"])
        .arg(chart::dir())
        .args([
            "--namespace",
            "hookfleet-system",
            "--reuse-values",
            "--kubeconfig",
            &kubeconfig,
        ]))?;
    assert!(String::from_utf8_lossy(&upgraded.stdout).contains("REVISION: 2"));

    // 3. The operator as the chart's ServiceAccount, cluster-wide.
    reconciles_as(&cp, "hookfleet-system", "hookfleet-operator", None, "team-a").await?;

    // 4. Namespaced mode: a second release watching team-b only (the CRD is there already; the watched
    // namespace must exist: the Role lives there).
    cp.create_namespace("team-b").await?;
    run(helm(home.path())?
        .args(["install", "scoped"])
        .arg(chart::dir())
        .args([
            "--namespace",
            "scoped-system",
            "--create-namespace",
            "--skip-crds",
        ])
        .args(["--set", "watchNamespace=team-b", "--kubeconfig", &kubeconfig]))?;
    reconciles_as(
        &cp,
        "scoped-system",
        "scoped-hookfleet-operator",
        Some("team-b"),
        "team-b",
    )
    .await?;
    // …and it can do nothing outside team-b.
    let scoped =
        client_as_service_account(cp.kubeconfig(), "scoped-system", "scoped-hookfleet-operator").await?;
    let err = Api::<Pod>::namespaced(scoped.clone(), "team-a")
        .list(&ListParams::default())
        .await
        .expect_err("a namespaced operator must not list pods in team-a");
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 403), "{err}");
    let err = Api::<Integration>::all(scoped)
        .list(&ListParams::default())
        .await
        .expect_err("a namespaced operator must not list Integrations cluster-wide");
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 403), "{err}");

    run(helm(home.path())?.args([
        "uninstall",
        "scoped",
        "--namespace",
        "scoped-system",
        "--kubeconfig",
        &kubeconfig,
    ]))?;
    run(helm(home.path())?.args([
        "uninstall",
        "hookfleet",
        "--namespace",
        "hookfleet-system",
        "--kubeconfig",
        &kubeconfig,
    ]))?;
    Ok(())
}
