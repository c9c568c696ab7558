//! A cluster upgraded without the Webhook CRD (Helm installs CRDs only on first install): the operator
//! still serves single-destination Integrations, and becomes ready. Against a real API server.

mod common;

use common::*;
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::control_plane::install_crd;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_webhook_crd_integrations_are_served_as_before() -> anyhow::Result<()> {
    hookfleet_testkit::init_tracing();
    let cp = ControlPlane::start().await?;
    let (_, _, yaml) = hookfleet_crds::crds()
        .into_iter()
        .find(|(file, _, _)| file.contains("integrations"))
        .expect("the Integration CRD");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml)?;
    install_crd(&cp.client(), &crd).await?;
    secret(&cp, "rabbitmq", "amqp://guest:guest@127.0.0.1:1/%2f").await?;
    let op = spawn(cp.client(), config("no-webhook-crd"));
    create(
        &cp,
        serde_json::json!({"metadata": {"name": "single"}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "single"},
            "destination": {"url": "https://erp.example.com/hooks"},
        }}),
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    let d = wait_exists(&deployments, "single").await?;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.service_account_name, None);
    until(&cp, "single", "a status", 30, |i| {
        i.status.as_ref().is_some_and(|s| s.observed_generation.is_some())
    })
    .await?;
    let text = http_get(op.http, "/metrics").await?;
    assert!(text.contains("hookfleet_operator_ready 1"), "{text}");
    Ok(())
}
