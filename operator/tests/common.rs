//! Shared helpers of the operator's integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use hookfleet_crds::Integration;
use hookfleet_operator::{Config, LeaderElection, Metrics, Operator};
use hookfleet_testkit::ControlPlane;
use hookfleet_testkit::process::{free_port, wait_for};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::task::JoinHandle;

pub const NS: &str = "default";

/// An operator running in this test process.
pub struct Running {
    pub task: JoinHandle<hookfleet_operator::Result<()>>,
    pub metrics: Arc<Metrics>,
    pub http: std::net::SocketAddr,
}

impl Running {
    pub fn leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }
    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }
}

/// Short intervals so the suite stays quick; lease of 3 s.
/// What most operator tests start from. Fields drop in order: the operator first, the control plane last.
pub struct Stack {
    pub op: Running,
    pub conn: Connection,
    pub rmq: hookfleet_testkit::RabbitMq,
    pub cp: ControlPlane,
}

/// The control plane with its workload controllers and the CRDs (and a fake node for each of `nodes`), a
/// RabbitMQ node and a connection to it, the `rabbitmq` Secret pointing at it, and one operator ("solo").
pub async fn stack(nodes: &[&str]) -> anyhow::Result<Stack> {
    let cp = ControlPlane::start_with_workloads().await?;
    cp.install_crds().await?;
    for n in nodes {
        cp.add_fake_node(n).await?;
    }
    let rmq = hookfleet_testkit::RabbitMq::start().await?;
    let conn = connect(&rmq.amqp_uri()).await?;
    secret(&cp, "rabbitmq", &rmq.amqp_uri()).await?;
    let op = spawn(cp.client(), config("solo"));
    Ok(Stack { op, conn, rmq, cp })
}

/// Creates Integration `orders` (queue `orders`, the `rabbitmq` Secret) delivering to `url` with `replicas`
/// workers.
pub async fn create_orders(cp: &ControlPlane, url: &str, replicas: i32) -> anyhow::Result<Integration> {
    create(
        cp,
        serde_json::json!({"metadata": {"name": "orders"}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "orders"},
            "destination": {"url": url},
            "workers": {"replicas": replicas}
        }}),
    )
    .await
}

/// `spec.replicas` of Deployment `orders` in [`NS`].
pub async fn replicas(cp: &ControlPlane) -> anyhow::Result<Option<i32>> {
    let api: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(cp.client(), NS);
    Ok(api.get("orders").await?.spec.and_then(|s| s.replicas))
}

/// Waits up to 30 s until Deployment `orders` asks for `want` replicas.
pub async fn wait_replicas(cp: &ControlPlane, want: i32) -> anyhow::Result<()> {
    wait_for(
        &format!("Deployment at {want} replicas"),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async move { Ok((replicas(cp).await? == Some(want)).then_some(())) },
    )
    .await
}

pub fn config(identity: &str) -> Config {
    let mut c = Config::new("ghcr.io/hookfleet/worker:test");
    c.resync = Duration::from_secs(1);
    c.retry = Duration::from_secs(1);
    c.max_backoff = Duration::from_secs(2);
    c.scale_up_period = Duration::from_secs(1);
    c.http_addr = Some(format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap());
    c.instance = identity.into();
    c.leader_election = Some(LeaderElection {
        lease_name: "hookfleet-operator".into(),
        lease_namespace: NS.into(),
        identity: identity.into(),
        lease_duration_secs: 3,
        renew_grace_secs: 1,
    });
    c
}

pub fn spawn(client: Client, config: Config) -> Running {
    let http = config.http_addr.unwrap();
    let op = Operator::new(config);
    let metrics = op.metrics();
    let task = tokio::spawn(op.run(client, futures::future::pending::<()>()));
    Running { task, metrics, http }
}

pub async fn secret(cp: &ControlPlane, name: &str, uri: &str) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(cp.client(), NS);
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "stringData": {"uri": uri}
    }))?;
    let _ = api.delete(name, &Default::default()).await;
    wait_for(
        "old secret gone",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let api = api.clone();
            async move { Ok(api.get_opt(name).await?.is_none().then_some(())) }
        },
    )
    .await?;
    api.create(&PostParams::default(), &s).await?;
    Ok(())
}

pub async fn create(cp: &ControlPlane, body: serde_json::Value) -> anyhow::Result<Integration> {
    let api: Api<Integration> = Api::namespaced(cp.client(), NS);
    let mut body = body;
    body["apiVersion"] = "hookfleet.io/v1alpha1".into();
    body["kind"] = "Integration".into();
    let intg: Integration = serde_json::from_value(body)?;
    Ok(api.create(&PostParams::default(), &intg).await?)
}

/// Declares `queue` durable (the worker would) and attaches `n` consumers, one channel each; a
/// consumer goes away when its channel is dropped/closed.
pub async fn consumers(
    conn: &Connection,
    queue: &str,
    n: usize,
) -> anyhow::Result<Vec<(Channel, lapin::Consumer)>> {
    let mut out = Vec::new();
    for i in 0..n {
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        let tag = format!("test-{queue}-{i}-{}", free_port()?);
        // The Consumer is kept: dropping it cancels the subscription.
        let consumer = ch
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        out.push((ch, consumer));
    }
    Ok(out)
}

/// Waits until the operator consumes `queue` (a fleet's reports queue): at least one consumer on it.
pub async fn until_consumed(ch: &Channel, queue: &str) -> anyhow::Result<()> {
    wait_for(
        "the operator's report consumer",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async move {
            let q = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            Ok(q.ok().filter(|q| q.consumer_count() >= 1).map(|_| ()))
        },
    )
    .await
}

pub async fn connect(uri: &str) -> anyhow::Result<Connection> {
    Ok(Connection::connect(uri, ConnectionProperties::default()).await?)
}

/// Waits until the Integration satisfies `f`; the error shows the last status seen.
pub async fn until<F>(
    cp: &ControlPlane,
    name: &str,
    what: &str,
    secs: u64,
    f: F,
) -> anyhow::Result<Integration>
where
    F: Fn(&Integration) -> bool,
{
    let api: Api<Integration> = Api::namespaced(cp.client(), NS);
    let f = &f;
    wait_for(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(200),
        || {
            let api = api.clone();
            async move {
                let i = api.get(name).await?;
                if f(&i) {
                    Ok(Some(i))
                } else {
                    anyhow::bail!("status now: {}", serde_json::to_string(&i.status)?)
                }
            }
        },
    )
    .await
}

pub fn cond<'a>(i: &'a Integration, t: &str) -> (&'a str, &'a str, &'a str) {
    i.condition(t)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
        .unwrap_or(("", "", ""))
}

/// A plain HTTP/1.0 GET (status line and body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Waits (up to 30 s) until `name` exists in `api` and returns it: the operator applies an Integration's
/// children one after the other, a few milliseconds apart.
pub async fn wait_exists<K>(api: &Api<K>, name: &str) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(
        &format!("{name} to exist"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let api = api.clone();
            let name = name.to_owned();
            async move { Ok(api.get_opt(&name).await?) }
        },
    )
    .await
}

/// The Events about `name` (with `reason`, when given), as the operator recorded them.
pub async fn events(
    cp: &ControlPlane,
    name: &str,
    reason: Option<&str>,
) -> anyhow::Result<Vec<k8s_openapi::api::events::v1::Event>> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cp.client(), NS);
    Ok(api
        .list(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && reason.is_none_or(|r| e.reason.as_deref() == Some(r))
        })
        .collect())
}

/// Creates a Webhook in `NS` from `body` (metadata and spec).
pub async fn create_webhook(
    cp: &ControlPlane,
    body: serde_json::Value,
) -> anyhow::Result<hookfleet_crds::Webhook> {
    let api: Api<hookfleet_crds::Webhook> = Api::namespaced(cp.client(), NS);
    let mut body = body;
    body["apiVersion"] = "hookfleet.io/v1alpha1".into();
    body["kind"] = "Webhook".into();
    let w: hookfleet_crds::Webhook = serde_json::from_value(body)?;
    Ok(api.create(&PostParams::default(), &w).await?)
}

/// Creates (or replaces) Secret `name` in `NS` with `string_data`.
pub async fn put_secret(cp: &ControlPlane, name: &str, string_data: serde_json::Value) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(cp.client(), NS);
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": string_data
    }))?;
    api.patch(
        name,
        &kube::api::PatchParams::apply("test").force(),
        &kube::api::Patch::Apply(&s),
    )
    .await?;
    Ok(())
}

/// A Webhooks fleet (an Integration with `spec.webhooks`) on `queue`, its broker URI in Secret `rabbitmq`.
pub async fn fleet(cp: &ControlPlane, name: &str, queue: &str) -> anyhow::Result<Integration> {
    create(
        cp,
        serde_json::json!({"metadata": {"name": name}, "spec": {
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": queue},
            "webhooks": {},
        }}),
    )
    .await
}

/// The snapshot in Secret `<integration>-webhooks`, if the Secret exists.
pub async fn snapshot(
    cp: &ControlPlane,
    integration: &str,
) -> anyhow::Result<Option<hookfleet_crds::contract::webhooks::Snapshot>> {
    use hookfleet_crds::contract::webhooks::{SNAPSHOT_KEY, Snapshot, snapshot_secret};
    let api: Api<Secret> = Api::namespaced(cp.client(), NS);
    let Some(s) = api.get_opt(&snapshot_secret(integration)).await? else {
        return Ok(None);
    };
    let bytes = s
        .data
        .and_then(|d| d.get(SNAPSHOT_KEY).cloned())
        .ok_or_else(|| anyhow::anyhow!("no {SNAPSHOT_KEY} in the snapshot Secret"))?;
    Ok(Some(Snapshot::decode(&bytes.0).map_err(anyhow::Error::msg)?))
}
