//! Scenario `testdelivery`: `kubectl hookfleet test-delivery` run as a user runs it (the plugin binary, the
//! suite's kubeconfig) against an installed Integration delivering to the suite's sink, signed, with a body
//! template. Expected: the plugin makes a pod from the worker Deployment, which sends exactly one request to
//! the sink from inside the cluster: marked as a test, with a fresh `test_` id, the body rendered by the
//! template and a signature that verifies with the Integration's signing Secret; the plugin prints the request
//! and the answer and exits 0; the pod is gone afterwards. With the sink answering 503 the plugin exits 6
//! (retry), and a Webhook name on a single-destination Integration is refused before any pod is made.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use hookfleet_crds::contract::test_delivery::{H_TEST_DELIVERY, exit};
use hookfleet_e2e::messages;
use hookfleet_e2e::process::wait_for;
use hookfleet_e2e::sink::{Hit, Mode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use super::{Outcome, SIGNING_SECRET, Stack};

const NS: &str = "e2e-testdelivery";
const TEMPLATE: &str = r#"{"order": {{ data | tojson }}, "event": "{{ routing_key }}"}"#;

/// The sink's test deliveries so far.
fn marked(s: &Stack) -> Vec<Hit> {
    s.sink
        .hits()
        .into_iter()
        .filter(|h| h.headers.contains_key(H_TEST_DELIVERY))
        .collect()
}

/// Runs the plugin with `args`: (exit code, stdout, stderr).
async fn plugin(s: &Stack, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    // Built once (later calls: cargo's no-op), before any timing.
    let bin = hookfleet_e2e::images::plugin_binary()?;
    plugin_with(s, bin, args).await
}

async fn plugin_with(
    s: &Stack,
    bin: std::path::PathBuf,
    args: &[&str],
) -> anyhow::Result<(Option<i32>, String, String)> {
    let (kubeconfig, args) = (
        s.kubeconfig.clone(),
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .env("KUBECONFIG", kubeconfig)
            .args(args)
            .output()
    })
    .await??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub async fn testdelivery(s: &Stack) -> Outcome {
    let api = s.namespace(NS, "").await?;
    s.integration(
        &api,
        "td",
        "e2e.testdelivery",
        serde_json::json!({"destination": {"body": {"template": TEMPLATE}}}),
    )
    .await?;
    let deploy: Api<Deployment> = Api::namespaced(s.client.clone(), NS);
    wait_for(
        "the worker Deployment",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let deploy = deploy.clone();
            async move { Ok(deploy.get_opt("td").await?) }
        },
    )
    .await?;
    let result = run(s).await;
    s.sink.set_mode(Mode::ok());
    if result.is_ok() {
        s.drop_namespace(NS).await;
    }
    result
}

async fn run(s: &Stack) -> Outcome {
    let bin = hookfleet_e2e::images::plugin_binary()?;
    let before = marked(s).len();
    let args = [
        "test-delivery",
        "td",
        "-n",
        NS,
        "--event",
        "orders.created",
        "--body",
        r#"{"data": {"n": 7}}"#,
        "--timeout",
        "120s",
    ];
    let t0 = std::time::Instant::now();
    let (code, stdout, stderr) = plugin_with(s, bin.clone(), &args).await?;
    let took = t0.elapsed();
    println!("kubectl hookfleet test-delivery (exit {code:?}, {took:.1?}):\n{stdout}{stderr}");
    ensure!(code == Some(exit::DELIVERED), "exit {code:?}\n{stdout}{stderr}");
    let hits = marked(s);
    ensure!(
        hits.len() == before + 1,
        "{} test deliveries reached the sink, want exactly one",
        hits.len() - before
    );
    let hit = hits.last().context("the test delivery")?;
    messages::verify_signature(hit, SIGNING_SECRET)?;
    let id = hit.id.clone().context("no webhook-id")?;
    ensure!(id.starts_with("test_"), "not a fresh test id: {id}");
    let body = String::from_utf8_lossy(&hit.body).into_owned();
    ensure!(
        body == r#"{"order": {"n": 7}, "event": "orders.created"}"#,
        "not rendered by the Integration's template: {body}"
    );
    ensure!(stdout.contains(&format!("> webhook-id: {id}")), "{stdout}");
    ensure!(
        stdout.contains("< 200 OK") && stdout.contains("result: delivered (200)"),
        "{stdout}"
    );
    ensure!(!stdout.contains(SIGNING_SECRET), "the signing secret was printed");

    // The pod is gone (deleted by the plugin, not left Completed).
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let left = |pods: Api<Pod>| async move {
        let lp = ListParams::default().labels("app.kubernetes.io/name=hookfleet-test-delivery");
        anyhow::Ok(pods.list(&lp).await?.items.len())
    };
    wait_for(
        "the test-delivery pod to be deleted",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let pods = pods.clone();
            async move { Ok((left(pods).await? == 0).then_some(())) }
        },
    )
    .await?;

    // The sink answering 503: exit 6, the worker would retry; still one request.
    s.sink.set_mode(Mode::status(503));
    let (code, stdout, stderr) = plugin_with(s, bin.clone(), &args).await?;
    s.sink.set_mode(Mode::ok());
    ensure!(code == Some(exit::RETRY), "503: exit {code:?}\n{stdout}{stderr}");
    ensure!(
        stdout.contains("< 503") && stdout.contains("result: retry (http_status 503)"),
        "{stdout}"
    );
    ensure!(marked(s).len() == before + 2, "one request per test delivery");

    // Refused before any pod: a Webhook on a single-destination Integration, an Integration that is not there.
    let (code, _, stderr) = plugin(s, &["test-delivery", "td", "-n", NS, "--webhook", "acme"]).await?;
    ensure!(
        code == Some(1) && stderr.contains("single destination"),
        "--webhook on a single destination: {code:?} {stderr}"
    );
    let (code, _, stderr) = plugin(s, &["test-delivery", "nope", "-n", NS]).await?;
    ensure!(
        code == Some(1) && stderr.contains(&format!("no Integration {NS}/nope")),
        "{code:?} {stderr}"
    );
    ensure!(left(pods.clone()).await? == 0, "a pod left behind");
    let fleet = webhooks(s, &bin).await?;
    Ok((
        None,
        format!(
            "1 signed, rendered, marked request ({id}) from a pod of the worker's template; printed and exit 0 in \
             {took:.1?} (the pod created, run, read and deleted); 503 → exit 6; pods deleted; bad \
             Webhook/Integration refused before a pod; {fleet}"
        ),
    ))
}

/// An Integration with Webhooks: the one-shot reads the fleet's snapshot with the workers' ServiceAccount and
/// sends to the one Webhook the event matches, signed with that Webhook's key, `webhook-id` `<id>:<webhook>`.
async fn webhooks(s: &Stack, bin: &std::path::Path) -> anyhow::Result<String> {
    use hookfleet_crds::Webhook;
    use hookfleet_crds::contract::webhooks::{SNAPSHOT_KEY, Snapshot};
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::PostParams;

    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "hook-keys"}, "stringData": {"acme": "acme-key", "beta": "beta-key"}
            }))?,
        )
        .await?;
    let base = s.sink.url().trim_end_matches("/hook").to_owned();
    let hooks: Api<Webhook> = Api::namespaced(s.client.clone(), NS);
    for (name, event) in [("acme", "temp"), ("beta", "door")] {
        hooks
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "apiVersion": "hookfleet.io/v1alpha1", "kind": "Webhook",
                    "metadata": {"name": name},
                    "spec": {
                        "integration": "tdfleet",
                        "events": [event],
                        "destination": {
                            "url": format!("{base}/td/{name}"),
                            "signing": {"secretRef": {"name": "hook-keys", "key": name}},
                        },
                    },
                }))?,
            )
            .await?;
    }
    let api: Api<hookfleet_crds::Integration> = Api::namespaced(s.client.clone(), NS);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": "tdfleet"},
            "spec": {
                "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "e2e.testdelivery.fleet"},
                "webhooks": {"eventNameHeader": "x-event", "allowPrivateNetworks": true},
                "workers": {"replicas": 2, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}},
            },
        }))?,
    )
    .await?;
    // The operator compiled both into the fleet's snapshot, and made the Deployment.
    wait_for(
        "the fleet's snapshot with both Webhooks, and its Deployment",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || {
            let (secrets, deploy) = (
                secrets.clone(),
                Api::<Deployment>::namespaced(s.client.clone(), NS),
            );
            async move {
                let Some(secret) = secrets.get_opt("tdfleet-webhooks").await? else {
                    return Ok(None);
                };
                let snap = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(SNAPSHOT_KEY))
                    .and_then(|b| Snapshot::decode(&b.0).ok());
                let both = snap.is_some_and(|s| s.webhooks.len() == 2);
                Ok((both && deploy.get_opt("tdfleet").await?.is_some()).then_some(()))
            }
        },
    )
    .await?;
    let before = marked(s).len();
    let args = [
        "test-delivery",
        "tdfleet",
        "-n",
        NS,
        "--event",
        "temperature/basement",
        "--body",
        r#"{"t": 21}"#,
        "--timeout",
        "120s",
    ];
    let t0 = std::time::Instant::now();
    let (code, stdout, stderr) = plugin_with(s, bin.to_path_buf(), &args).await?;
    let took = t0.elapsed();
    println!("kubectl hookfleet test-delivery with Webhooks (exit {code:?}, {took:.1?}):\n{stdout}{stderr}");
    ensure!(code == Some(exit::DELIVERED), "exit {code:?}\n{stdout}{stderr}");
    let hits = marked(s);
    ensure!(
        hits.len() == before + 1,
        "{} requests, want one",
        hits.len() - before
    );
    let hit = hits.last().context("the test delivery")?;
    ensure!(
        hit.path == "/td/acme",
        "sent to {}, not Webhook acme's path",
        hit.path
    );
    messages::verify_signature(hit, "acme-key")?;
    let id = hit.id.clone().context("no webhook-id")?;
    ensure!(
        id.starts_with("test_") && id.ends_with(":acme"),
        "webhook-id {id}"
    );
    ensure!(
        stdout.contains("test delivery to Webhook acme of Integration"),
        "{stdout}"
    );
    // A Webhook that does not exist is refused before any pod.
    let missing = ["test-delivery", "tdfleet", "-n", NS, "--webhook", "nope"];
    let (code, _, stderr) = plugin_with(s, bin.to_path_buf(), &missing).await?;
    ensure!(
        code == Some(1) && stderr.contains(&format!("no Webhook {NS}/nope")),
        "{code:?} {stderr}"
    );
    Ok(format!(
        "with Webhooks: event temperature/basement → Webhook acme only ({id}, signed with its key), exit 0 in {took:.1?}"
    ))
}
