//! Least privilege of a Webhooks fleet's workers, against a real API server (RBAC on): the operator gives
//! each fleet a ServiceAccount whose Role reads that fleet's snapshot Secret, by name, and nothing else.
//! Checked with `kubectl auth can-i` and with a real token of the ServiceAccount (TokenRequest). The
//! operator itself runs as a ServiceAccount holding exactly the chart's rules (`helm template`), so granting
//! that Role needs nothing the chart does not give it.

mod common;

use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};

fn can_i(cp: &ControlPlane, args: &[&str], sa: &str) -> anyhow::Result<String> {
    let who = format!("system:serviceaccount:{NS}:{sa}");
    let out = cp
        .kubectl()?
        .args(["auth", "can-i"])
        .args(args)
        .args(["-n", NS, "--as", &who])
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    println!(
        "kubectl auth can-i {} -n {NS} --as {who}  ->  {answer}",
        args.join(" ")
    );
    Ok(answer)
}

/// A client that authenticates with `token` only (the control plane's CA, no client certificate).
async fn client_with_token(cp: &ControlPlane, token: &str) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))?;
    Ok(kube::Client::try_from(config)?)
}

/// The rules of the chart's operator ClusterRole (default values), rendered by `helm template`.
fn chart_rules() -> anyhow::Result<serde_json::Value> {
    use hookfleet_testkit::tools::{Tool, path};
    let home = tempfile::tempdir()?;
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/hookfleet");
    let out = std::process::Command::new(path(Tool::Helm)?)
        .args(["template", "hookfleet"])
        .arg(&chart)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(doc)?)?;
        if v["kind"] == "ClusterRole" && v["metadata"]["name"] == "hookfleet-operator" {
            return Ok(v["rules"].clone());
        }
    }
    anyhow::bail!("no ClusterRole hookfleet-operator in the chart")
}

/// A client acting as ServiceAccount `NS/hookfleet-operator`, bound to the chart's operator rules.
async fn operator_as_chart_account(cp: &ControlPlane) -> anyhow::Result<kube::Client> {
    let rules = chart_rules()?;
    let apply = |body: serde_json::Value| {
        let mut cmd = cp.kubectl()?;
        let mut child = cmd
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.to_string().as_bytes())?;
        anyhow::ensure!(child.wait()?.success(), "kubectl apply");
        anyhow::Ok(())
    };
    apply(serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "hookfleet-operator", "namespace": NS}}))?;
    apply(
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "hookfleet-operator"}, "rules": rules}),
    )?;
    apply(
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "hookfleet-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "hookfleet-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "hookfleet-operator", "namespace": NS}]}),
    )?;
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{NS}:hookfleet-operator"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{NS}"),
        "system:authenticated".into(),
    ]);
    Ok(kube::Client::try_from(config)?)
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 403)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleets_workers_read_their_own_snapshot_and_nothing_else() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start().await?;
    cp.install_crds().await?;
    // No broker: access is all this test is about.
    secret(&cp, "rabbitmq", "amqp://guest:guest@127.0.0.1:1/%2f").await?;
    put_secret(&cp, "a-key", serde_json::json!({"k": "secret-of-a"})).await?;
    put_secret(&cp, "b-key", serde_json::json!({"k": "secret-of-b"})).await?;
    // The operator with the chart's rules and nothing else (the leader Lease is the chart's other Role:
    // not needed for one instance).
    let mut cfg = config("access");
    cfg.leader_election = None;
    let op = spawn(operator_as_chart_account(&cp).await?, cfg);
    fleet(&cp, "a", "a").await?;
    fleet(&cp, "b", "b").await?;
    for (name, fleet) in [("wa", "a"), ("wb", "b")] {
        create_webhook(
            &cp,
            serde_json::json!({"metadata": {"name": name}, "spec": {
                "integration": fleet, "events": ["temp"],
                "destination": {"url": "https://hooks.example.com/in",
                    "signing": {"secretRef": {"name": format!("{fleet}-key"), "key": "k"}}},
            }}),
        )
        .await?;
    }
    let roles: Api<Role> = Api::namespaced(cp.client(), NS);
    let role = wait_exists(&roles, "a-worker").await?;
    let rule = &role.rules.as_ref().expect("rules")[0];
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&["a-webhooks".to_string()][..])
    );
    assert_eq!(rule.resources.as_deref(), Some(&["secrets".to_string()][..]));
    assert_eq!(role.rules.as_ref().unwrap().len(), 1, "nothing else");
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    let d = wait_exists(&deployments, "a").await?;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("a-worker"));
    assert_eq!(pod.automount_service_account_token, Some(true));
    let cpr = &cp;
    for f in ["a", "b"] {
        wait_for(
            "the snapshot",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async move {
                snapshot(cpr, f)
                    .await
                    .map(|s| s.filter(|s| s.webhooks.len() == 1))
            },
        )
        .await?;
    }
    wait_exists(&roles, "b-worker").await?;
    let metrics = op.metrics.encode();
    assert!(
        !metrics.contains("hookfleet_operator_reconcile_errors_total{"),
        "reconcile errors with the chart's rules:\n{metrics}"
    );

    // RBAC as the API server decides it.
    assert_eq!(can_i(&cp, &["get", "secret/a-webhooks"], "a-worker")?, "yes");
    assert_eq!(can_i(&cp, &["watch", "secret/a-webhooks"], "a-worker")?, "yes");
    assert_eq!(can_i(&cp, &["get", "secret/b-webhooks"], "a-worker")?, "no");
    assert_eq!(can_i(&cp, &["get", "secret/b-key"], "a-worker")?, "no");
    assert_eq!(can_i(&cp, &["get", "secret/a-key"], "a-worker")?, "no");
    assert_eq!(can_i(&cp, &["list", "secrets"], "a-worker")?, "no");
    assert_eq!(can_i(&cp, &["get", "webhooks.hookfleet.io"], "a-worker")?, "no");
    assert_eq!(can_i(&cp, &["list", "webhooks.hookfleet.io"], "a-worker")?, "no");
    assert_eq!(can_i(&cp, &["get", "secret/b-webhooks"], "b-worker")?, "yes");

    // A real token of a's ServiceAccount (TokenRequest API).
    let out = cp
        .kubectl()?
        .args(["create", "token", "a-worker", "-n", NS, "--duration", "10m"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl create token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    let a = client_with_token(&cp, &token).await?;
    let secrets: Api<Secret> = Api::namespaced(a, NS);

    // Its own snapshot: get, list and watch selected by name.
    let own = secrets.get("a-webhooks").await?;
    assert!(own.data.is_some());
    let listed = secrets
        .list(&ListParams::default().fields("metadata.name=a-webhooks"))
        .await?;
    assert_eq!(listed.items.len(), 1);
    let rv = listed.metadata.resource_version.unwrap_or_default();
    let mut events = secrets
        .watch(
            &WatchParams::default()
                .fields("metadata.name=a-webhooks")
                .timeout(5),
            "0",
        )
        .await?
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), events.try_next()).await??;
    assert!(
        matches!(&first, Some(WatchEvent::Added(s)) if s.metadata.name.as_deref() == Some("a-webhooks")),
        "the watch of its own snapshot delivers it: {first:?}"
    );
    println!(
        "a-worker's token watches secret/a-webhooks (fieldSelector=metadata.name=a-webhooks) from rv {rv}: ok"
    );

    // Anything else: refused.
    assert!(forbidden(secrets.get("b-webhooks").await), "get b-webhooks");
    assert!(forbidden(secrets.get("b-key").await), "get b's customer Secret");
    assert!(
        forbidden(secrets.list(&ListParams::default()).await),
        "list secrets"
    );
    assert!(
        forbidden(
            secrets
                .list(&ListParams::default().fields("metadata.name=b-webhooks"))
                .await
        ),
        "list b-webhooks by name"
    );
    let watch_b = secrets
        .watch(
            &WatchParams::default()
                .fields("metadata.name=b-webhooks")
                .timeout(5),
            "0",
        )
        .await;
    let refused = match watch_b {
        Err(kube::Error::Api(s)) => s.code == 403,
        Err(e) => anyhow::bail!("unexpected error watching b-webhooks: {e}"),
        Ok(stream) => {
            let first = stream.boxed().try_next().await;
            matches!(first, Err(kube::Error::Api(ref s)) if s.code == 403)
                || matches!(first, Ok(Some(WatchEvent::Error(ref s))) if s.code == 403)
        }
    };
    assert!(refused, "watch b-webhooks by name is refused (403)");
    println!("a-worker's token: get/list/watch secret/b-webhooks, get secret/b-key, list secrets -> 403");
    let webhooks: Api<hookfleet_crds::Webhook> = Api::namespaced(client_with_token(&cp, &token).await?, NS);
    assert!(
        forbidden(webhooks.list(&ListParams::default()).await),
        "list webhooks"
    );
    Ok(())
}
