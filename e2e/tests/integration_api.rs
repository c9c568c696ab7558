//! The generated CRD on a real kube-apiserver: it becomes Established, the examples are accepted with
//! their defaults filled in, and bad manifests are refused with an error that names the field.

use hookfleet_crds::{Integration, Webhook};
use hookfleet_e2e::ControlPlane;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("hookfleet.io", "v1alpha1", kind))
}

/// Applies `yaml` the way `kubectl apply --server-side` does (strict field validation).
async fn apply(cp: &ControlPlane, yaml: &str) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_yaml::from_str(yaml).expect("test manifest is YAML");
    let kind = obj.types.as_ref().map_or("Integration", |t| t.kind.as_str());
    let api: Api<DynamicObject> = Api::namespaced_with(cp.client(), "default", &resource(kind));
    let name = obj.metadata.name.clone().expect("test manifest has a name");
    api.patch(
        &name,
        &PatchParams::apply("e2e-test").validation_strict(),
        &Patch::Apply(&obj),
    )
    .await
}

const VALID_BASE: &str = r#"
apiVersion: hookfleet.io/v1alpha1
kind: Integration
metadata: {name: NAME}
spec:
  source: {connectionSecretRef: {name: rabbitmq, key: uri}, queue: q}
  destination: {url: "https://hooks.example.com/x"}
"#;

/// A manifest from the valid base with `spec` replaced by `spec_yaml`.
fn with_spec(name: &str, spec_yaml: &str) -> String {
    format!(
        "apiVersion: hookfleet.io/v1alpha1\nkind: Integration\nmetadata: {{name: {name}}}\nspec:\n{spec_yaml}"
    )
}

fn kubectl_apply(cp: &ControlPlane, manifest: &str) -> anyhow::Result<std::process::Output> {
    use std::io::Write;
    let mut child = cp
        .kubectl()?
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(manifest.as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_is_established_and_validates_integrations() -> anyhow::Result<()> {
    hookfleet_e2e::init_tracing();
    let cp = ControlPlane::start().await?;
    cp.install_crds().await?;

    // Valid examples are accepted, and the schema's defaults are filled in by the API server.
    let examples = hookfleet_e2e::tools::repo_root().join("crds/examples");
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        let yaml = std::fs::read_to_string(&path)?.replace("namespace: team-a", "namespace: default");
        let applied = apply(&cp, &yaml)
            .await
            .map_err(|e| anyhow::anyhow!("{} refused: {e}", path.display()))?;
        if applied.types.as_ref().is_some_and(|t| t.kind == "Webhook") {
            let typed: Webhook = serde_json::from_value(serde_json::to_value(&applied)?)?;
            assert!(!typed.spec.events.is_empty(), "{}", path.display());
            continue;
        }
        let typed: Integration = serde_json::from_value(serde_json::to_value(&applied)?)?;
        assert!(
            typed.spec.delivery.max_attempts >= 1,
            "{}: defaults missing",
            path.display()
        );
    }
    let minimal = apply(&cp, &VALID_BASE.replace("NAME", "defaults")).await?;
    let minimal: Integration = serde_json::from_value(serde_json::to_value(&minimal)?)?;
    assert_eq!(minimal.spec.source.prefetch, 64);
    assert_eq!(minimal.spec.delivery.max_attempts, 10);
    assert_eq!(minimal.spec.delivery.concurrency, 128);
    assert_eq!(minimal.spec.workers.file_descriptor_limit, 1_048_576);
    assert_eq!(
        minimal.spec.destination.as_ref().unwrap().timeout,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(
        minimal.spec.workers.replicas, None,
        "replicas has no schema default (the operator picks 2)"
    );

    let src = "  source: {connectionSecretRef: {name: rabbitmq, key: uri}, queue: q}\n";
    let dst = "  destination: {url: \"https://hooks.example.com/x\"}\n";
    // (name, spec, text the API server's error must contain)
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "negative-replicas",
            format!("{src}{dst}  workers: {{replicas: -1}}\n"),
            "spec.workers.replicas",
        ),
        (
            "min-available-not-below-replicas",
            format!("{src}{dst}  workers: {{replicas: 3, disruption: {{minAvailable: 3}}}}\n"),
            "spec.workers.disruption.minAvailable",
        ),
        (
            "min-available-with-default-replicas",
            format!("{src}{dst}  workers: {{disruption: {{minAvailable: 2}}}}\n"),
            "spec.workers.disruption.minAvailable",
        ),
        (
            "ftp-url",
            format!("{src}  destination: {{url: \"ftp://files.example.com/x\"}}\n"),
            "spec.destination.url",
        ),
        (
            "relative-url",
            format!("{src}  destination: {{url: \"/hooks\"}}\n"),
            "spec.destination.url",
        ),
        (
            "missing-queue",
            format!("  source: {{connectionSecretRef: {{name: rabbitmq, key: uri}}}}\n{dst}"),
            "spec.source.queue",
        ),
        (
            "missing-destination",
            src.to_owned(),
            "exactly one of destination",
        ),
        (
            "destination-and-webhooks",
            format!("{src}{dst}  webhooks: {{}}\n"),
            "exactly one of destination",
        ),
        (
            "autoscale-min-above-max",
            format!("{src}{dst}  workers: {{autoscale: {{min: 5, max: 3}}}}\n"),
            "spec.workers.autoscale.min",
        ),
        (
            "replicas-and-autoscale",
            format!("{src}{dst}  workers: {{replicas: 2, autoscale: {{min: 2, max: 4}}}}\n"),
            "spec.workers.autoscale",
        ),
        (
            "bad-timeout",
            format!("{src}  destination: {{url: \"https://h.example.com\", timeout: \"ten seconds\"}}\n"),
            "spec.destination.timeout",
        ),
        (
            "backoff-initial-above-max",
            format!("{src}{dst}  delivery: {{backoff: {{initial: 5m, max: 1m}}}}\n"),
            "spec.delivery.backoff.initial",
        ),
        (
            "reserved-header",
            format!("{src}  destination: {{url: \"https://h.example.com\", headers: {{webhook-id: x}}}}\n"),
            "spec.destination.headers",
        ),
        (
            "bad-method",
            format!("{src}  destination: {{url: \"https://h.example.com\", method: GET}}\n"),
            "spec.destination.method",
        ),
        (
            "delete-the-queues-of-an-external-topology",
            format!(
                "  source: {{connectionSecretRef: {{name: r, key: k}}, queue: q, topology: external, \
                 deletionPolicy: Delete}}\n{dst}"
            ),
            "spec.source.deletionPolicy",
        ),
        (
            "fd-limit-too-low",
            format!("{src}{dst}  workers: {{fileDescriptorLimit: 256}}\n"),
            "spec.workers.fileDescriptorLimit",
        ),
        (
            "fd-limit-below-concurrency-budget",
            format!(
                "{src}{dst}  delivery: {{concurrency: 1000}}\n  workers: {{fileDescriptorLimit: 2000}}\n"
            ),
            "spec.workers.fileDescriptorLimit",
        ),
        (
            "two-auth-methods",
            format!(
                "{src}  destination: {{url: \"https://h.example.com\", auth: {{bearer: {{tokenFrom: {{name: t, key: t}}}}, \
                 basic: {{usernameFrom: {{name: b, key: u}}, passwordFrom: {{name: b, key: p}}}}}}}}\n"
            ),
            "spec.destination.auth",
        ),
        (
            "auth-and-an-authorization-header",
            format!(
                "{src}  destination: {{url: \"https://h.example.com\", headers: {{authorization: x}}, \
                 auth: {{bearer: {{tokenFrom: {{name: t, key: t}}}}}}}}\n"
            ),
            "spec.destination.auth",
        ),
        (
            "signing-without-a-key",
            format!("{src}  destination: {{url: \"https://h.example.com\", signing: {{}}}}\n"),
            "spec.destination.signing",
        ),
        (
            "oauth2-ftp-token-url",
            format!(
                "{src}  destination: {{url: \"https://h.example.com\", auth: {{oauth2: {{tokenUrl: \"ftp://x.example\", \
                 clientIdFrom: {{name: o, key: i}}, clientSecretFrom: {{name: o, key: s}}}}}}}}\n"
            ),
            "spec.destination.auth.oauth2.tokenUrl",
        ),
        (
            "dead-letter-is-the-work-queue",
            format!("{src}{dst}  delivery: {{deadLetter: {{queue: q}}}}\n"),
            "spec.delivery.deadLetter.queue",
        ),
        (
            "dead-letter-is-the-retry-ready-queue",
            format!("{src}{dst}  delivery: {{deadLetter: {{queue: q.retries}}}}\n"),
            "spec.delivery.deadLetter.queue",
        ),
        (
            "headers-from-a-reserved-name",
            format!(
                "{src}  destination: {{url: \"https://h.example.com\", headersFrom: [{{name: webhook-signature, \
                 secretKeyRef: {{name: s, key: k}}}}]}}\n"
            ),
            "spec.destination.headersFrom[0].name",
        ),
        (
            "authorization-in-headers-and-headers-from",
            format!(
                "{src}  destination: {{url: \"https://h.example.com\", headers: {{Authorization: a}}, \
                 headersFrom: [{{name: authorization, secretKeyRef: {{name: s, key: k}}}}]}}\n"
            ),
            "spec.destination.headers",
        ),
        (
            "nats-with-bindings",
            format!(
                "  source: {{connectionSecretRef: {{name: n, key: urls}}, queue: c, nats: {{stream: S}}, \
                 bindings: [{{exchange: e, routingKey: k}}]}}\n{dst}"
            ),
            "spec.source.bindings",
        ),
        (
            "nats-deleting-queues",
            format!(
                "  source: {{connectionSecretRef: {{name: n, key: urls}}, queue: c, nats: {{stream: S}}, \
                 deletionPolicy: Delete}}\n{dst}"
            ),
            "spec.source.deletionPolicy",
        ),
        (
            "nats-consumer-with-a-dot",
            format!(
                "  source: {{connectionSecretRef: {{name: n, key: urls}}, queue: a.b, nats: {{stream: S}}}}\n{dst}"
            ),
            "spec.source.queue",
        ),
        (
            "nats-credentials-and-token",
            format!(
                "  source: {{connectionSecretRef: {{name: n, key: urls}}, queue: c, nats: {{stream: S, \
                 credentialsSecretRef: {{name: n, key: creds}}, tokenSecretRef: {{name: n, key: t}}}}}}\n{dst}"
            ),
            "spec.source.nats",
        ),
        (
            "nats-ack-wait-too-long",
            format!(
                "  source: {{connectionSecretRef: {{name: n, key: urls}}, queue: c, nats: {{stream: S, ackWait: 13h}}}}\n{dst}"
            ),
            "spec.source.nats.ackWait",
        ),
        (
            "zero-prefetch",
            format!("  source: {{connectionSecretRef: {{name: r, key: uri}}, queue: q, prefetch: 0}}\n{dst}"),
            "spec.source.prefetch",
        ),
    ];
    // Webhooks: a tenant cannot allow private networks; at least one event prefix.
    let webhook = |name: &str, spec: &str| {
        format!("apiVersion: hookfleet.io/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}}}\nspec:\n{spec}")
    };
    let cases: Vec<(&str, String, &str)> = cases
        .into_iter()
        .map(|(n, s, f)| (n, with_spec(n, &s), f))
        .chain([
            (
                "webhook-allows-private-networks",
                webhook(
                    "private",
                    "  integration: f\n  events: [a]\n  destination: {url: \"http://10.0.0.1/\", allowPrivateNetworks: true}\n",
                ),
                "spec.destination.allowPrivateNetworks",
            ),
            (
                "webhook-without-events",
                webhook("no-events", "  integration: f\n  events: []\n  destination: {url: \"https://h.example.com\"}\n"),
                "spec.events",
            ),
        ])
        .collect();
    let mut failures = Vec::new();
    for (name, manifest, field) in &cases {
        match apply(&cp, manifest).await {
            Ok(_) => failures.push(format!("{name}: accepted, expected a refusal naming {field}")),
            Err(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => {
                if !status.message.contains(field) {
                    failures.push(format!(
                        "{name}: refused, but the message does not name {field}: {}",
                        status.message
                    ));
                } else {
                    eprintln!("{name}: refused: {}", status.message);
                }
            }
            Err(e) => failures.push(format!("{name}: unexpected error {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid manifests not refused as expected:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // An unknown field, the way a user meets it: `kubectl apply` (strict field validation by default).
    // (Server-side apply reports unknown fields as a 500 "field not declared in schema" instead.)
    let manifest = with_spec(
        "unknown-field",
        &format!(
            "  source: {{connectionSecretRef: {{name: rabbitmq, key: uri}}, queue: q, queueName: q}}\n{dst}"
        ),
    );
    let out = kubectl_apply(&cp, &manifest)?;
    assert!(!out.status.success(), "kubectl apply accepted an unknown field");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown field \"spec.source.queueName\""),
        "error does not name the field: {stderr}"
    );

    // What an application team reads: printer columns through the pinned kubectl, and the scale subresource.
    let out = cp
        .kubectl()?
        .args(["get", "integrations", "-o", "wide"])
        .output()?;
    assert!(
        out.status.success(),
        "kubectl get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for column in [
        "READY",
        "REPLICAS",
        "CONSUMERS",
        "BACKLOG",
        "SUSPEND",
        "REASON",
        "AGE",
        "defaults",
    ] {
        assert!(
            table.contains(column),
            "`kubectl get integrations -o wide` lacks {column}:\n{table}"
        );
    }
    // `spec.suspend` defaults to false in the schema, so the column says so for every Integration.
    // (Cells of an unset status are blank: the column is found by its offset in the header line.)
    let at = table.lines().next().unwrap_or_default().find("SUSPEND").unwrap();
    let row = table.lines().find(|l| l.starts_with("defaults")).unwrap();
    assert!(row.get(at..).is_some_and(|c| c.starts_with("false")), "{table}");
    let out = cp
        .kubectl()?
        .args(["scale", "intg/defaults", "--replicas=4"])
        .output()?;
    assert!(
        out.status.success(),
        "kubectl scale failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scaled = Api::<Integration>::namespaced(cp.client(), "default")
        .get("defaults")
        .await?;
    assert_eq!(scaled.spec.workers.replicas, Some(4));
    Ok(())
}
