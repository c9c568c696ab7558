//! What the soak runs on: 3 real nodes with hookfleet installed by its chart, a 3-node RabbitMQ cluster the
//! pods reach, a sink on the host, and one Integration (quorum queue, 3 workers) given all three brokers.

use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hookfleet_crds::Integration;
use k8s_openapi::api::core::v1::{Namespace, Node as NodeObject, Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};

use crate::install::{self, NAMESPACE as SYSTEM_NS};
use crate::sink::Sink;
use crate::{Cluster, ClusterOptions, RabbitCluster};

/// The Integration's namespace, name and queue (its dead letters go to `<QUEUE>.dead`).
pub const NS: &str = "chaos";
pub const NAME: &str = "soak";
pub const QUEUE: &str = "chaos.soak";
/// Workers of the Integration, and Kubernetes and broker nodes.
pub const WORKERS: i32 = 3;
pub const NODES: usize = 3;
/// How long the stack must stay healthy to count as recovered.
pub const STABLE: Duration = Duration::from_secs(10);

pub struct Stack {
    pub client: Client,
    pub sink: Arc<Sink>,
    pub rabbit: RabbitCluster,
    pub cluster: Cluster,
    /// Helm's home, the images, evidence.
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("hookfleet-chaos-").tempdir()?;
        let t0 = Instant::now();
        // A soak may queue behind another engineer's e2e run for a while.
        let cluster = Cluster::start(ClusterOptions {
            lock_timeout: Duration::from_secs(90 * 60),
            ..ClusterOptions::with_nodes(NODES)
        })
        .await?;
        say(&format!("{NODES} nodes up in {:.1?}", t0.elapsed()));
        let took = install::load_images(&cluster, &dir.path().join("images"))?;
        say(&format!("images built and imported in {took:.1?}"));
        let host = IpAddr::V4(cluster.host_addr());
        let t0 = Instant::now();
        let rabbit = RabbitCluster::start_on(NODES, Some(host)).await?;
        say(&format!(
            "{NODES}-node RabbitMQ cluster up in {:.1?}",
            t0.elapsed()
        ));
        // Bodies are not kept: a 30-minute soak sends ~100,000 requests.
        let sink = Arc::new(Sink::start_on(host, false).await?);
        let client = cluster.client();
        let t0 = Instant::now();
        let leader = install::helm_install(
            &client,
            cluster.control_plane().kubeconfig(),
            dir.path(),
            &[
                "operator.resync=2s",
                "operator.retry=2s",
                "operator.logFormat=text",
            ],
        )
        .await?;
        say(&format!(
            "hookfleet installed with helm in {:.1?}; leader {leader}",
            t0.elapsed()
        ));
        let stack = Self {
            client,
            sink,
            rabbit,
            cluster,
            dir,
        };
        stack.create_integration().await?;
        let t0 = Instant::now();
        stack.wait_healthy(Duration::from_secs(300)).await?;
        say(&format!(
            "Integration {NS}/{NAME} Ready with {WORKERS} consumers in {:.1?}",
            t0.elapsed()
        ));
        Ok(stack)
    }

    async fn create_integration(&self) -> Result<()> {
        let ns: Api<Namespace> = Api::all(self.client.clone());
        ns.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))?,
        )
        .await?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let secret = serde_json::json!({
            "metadata": {"name": "rabbitmq"},
            "stringData": {"uri": self.rabbit.amqp_uris_for_pods()},
        });
        secrets
            .create(&PostParams::default(), &serde_json::from_value(secret)?)
            .await?;
        // Up to 100 attempts over minutes: a sink outage of a minute ends in deliveries, not dead letters.
        let intg: Integration = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": NAME},
            "spec": {
                "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": QUEUE, "queueType": "quorum"},
                "destination": {
                    "url": self.sink.url(),
                    "allowPrivateNetworks": true,
                },
                "delivery": {"maxAttempts": 100, "concurrency": 32, "backoff": {"initial": "1s", "max": "10s"}},
                "workers": {
                    "replicas": WORKERS,
                    "disruption": {"minAvailable": WORKERS - 1},
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                },
            },
        }))?;
        Api::<Integration>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &intg)
            .await?;
        Ok(())
    }

    /// Why the stack is not healthy now, or `None` when it is: every node Ready and schedulable, every broker
    /// node running, an operator leading, and the Integration Ready with all its workers Ready and consuming.
    pub async fn unhealthy(&self) -> Result<Option<String>> {
        let nodes: Api<NodeObject> = Api::all(self.client.clone());
        for n in nodes.list(&ListParams::default()).await?.items {
            let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
            if !crate::control_plane::node_ready(&n) || cordoned {
                return Ok(Some(format!(
                    "node {} {}",
                    n.metadata.name.unwrap_or_default(),
                    if cordoned { "cordoned" } else { "not Ready" }
                )));
            }
        }
        if let Some(i) = (0..self.rabbit.len()).find(|&i| !self.rabbit.is_up(i)) {
            return Ok(Some(format!("broker node {} down", self.rabbit.nodename(i))));
        }
        let running = self.rabbit.running_nodes(0).unwrap_or_default().len();
        if running != self.rabbit.len() {
            return Ok(Some(format!("{running} broker nodes running")));
        }
        if self.leader().await?.is_none() {
            return Ok(Some("no operator leader".into()));
        }
        let i = Api::<Integration>::namespaced(self.client.clone(), NS)
            .get(NAME)
            .await?;
        let ready = i.condition("Ready").is_some_and(|c| c.status == "True");
        let st = i.status.clone().unwrap_or_default();
        if !ready || st.ready_replicas != Some(WORKERS) || st.consumers != Some(WORKERS) {
            let reason = i.condition("Ready").map(|c| c.reason.clone()).unwrap_or_default();
            return Ok(Some(format!(
                "Integration Ready={} ({reason}), ready workers {:?}, consumers {:?}",
                ready, st.ready_replicas, st.consumers
            )));
        }
        Ok(None)
    }

    /// Waits until [`Stack::unhealthy`] has said nothing for [`STABLE`] (polling every second: a status that
    /// has not yet seen a fault must not count as recovered) and returns when that began; fails after
    /// `timeout` with the last reason.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let mut last = String::new();
        let mut since: Option<Duration> = None;
        while t0.elapsed() < timeout {
            match self.unhealthy().await {
                Ok(None) => {
                    let from = *since.get_or_insert(t0.elapsed());
                    if t0.elapsed() - from >= STABLE {
                        return Ok(from);
                    }
                }
                Ok(Some(why)) => (last, since) = (why, None),
                Err(e) => (last, since) = (format!("{e:#}"), None),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        anyhow::bail!("not healthy after {timeout:?}: {last}")
    }

    /// The operator replica holding the leader Lease (its pod name).
    pub async fn leader(&self) -> Result<Option<String>> {
        install::leader(&self.client).await
    }

    /// The Integration's worker pods that run and are not being deleted, by name.
    pub async fn worker_pods(&self) -> Result<Vec<Pod>> {
        let lp = ListParams::default().labels(&format!("hookfleet.io/integration={NAME}"));
        let mut pods: Vec<Pod> = Api::<Pod>::namespaced(self.client.clone(), NS)
            .list(&lp)
            .await?
            .items
            .into_iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .collect();
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(pods)
    }

    /// Where the running workers are: `node×count` per node.
    pub async fn placement(&self) -> Result<String> {
        let mut on: std::collections::BTreeMap<String, usize> = Default::default();
        for p in self.worker_pods().await? {
            *on.entry(p.spec.and_then(|s| s.node_name).unwrap_or_default())
                .or_default() += 1;
        }
        Ok(on
            .iter()
            .map(|(n, c)| format!("{n}×{c}"))
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// `kubectl args…` against the cluster; its output, or an error with it.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.cluster.control_plane().kubectl()?.args(args).output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            text.trim()
        );
        Ok(text)
    }

    /// Loopback URIs of the broker nodes that are up.
    pub fn broker_uris_up(&self) -> Vec<String> {
        (0..self.rabbit.len())
            .filter(|&i| self.rabbit.is_up(i))
            .map(|i| self.rabbit.amqp_uri(i))
            .collect()
    }

    /// Messages in the Integration's queues other than its dead-letter queue (work, retry and delay queues),
    /// by queue, as the broker counts them.
    pub fn held(&self) -> Result<Vec<(String, u64)>> {
        let out = self
            .rabbit
            .ctl_any(&["list_queues", "-q", "--no-table-headers", "name", "messages"])?;
        let dead = format!("{QUEUE}.dead");
        Ok(out
            .lines()
            .filter_map(|l| {
                let (name, n) = l.split_once('\t')?;
                let n = n.trim().parse().ok()?;
                (name.starts_with(QUEUE) && name != dead).then(|| (name.to_owned(), n))
            })
            .collect())
    }

    /// Copies what a post-mortem needs into `to`: the brokers' directories (logs included), every pod's
    /// log (current and previous container) in the Integration's and the operator's namespaces, and the
    /// queues as the broker lists them.
    pub fn keep_evidence(&self, to: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(to)?;
        let _ = Command::new("cp")
            .arg("-r")
            .arg(self.rabbit.dir())
            .arg(to.join("rabbitmq"))
            .status();
        let queues = self.rabbit.list_queues();
        std::fs::write(to.join("queues.txt"), format!("{queues:?}"))?;
        for ns in [NS, SYSTEM_NS] {
            let names = self
                .kubectl(&["get", "pods", "-n", ns, "-o", "name"])
                .unwrap_or_default();
            for pod in names.lines().filter(|l| l.starts_with("pod/")) {
                for previous in [false, true] {
                    let mut args = vec!["logs", "-n", ns, pod, "--all-containers"];
                    if previous {
                        args.push("--previous");
                    }
                    if let Ok(log) = self.kubectl(&args) {
                        let file = format!(
                            "{ns}-{}{}.log",
                            &pod[4..],
                            if previous { ".previous" } else { "" }
                        );
                        std::fs::write(to.join(file), log)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Dead letters drained from `<QUEUE>.dead` through the first broker node that answers.
pub async fn drain_dead(uris: &[String]) -> Result<std::collections::HashSet<String>> {
    let mut last = None;
    for uri in uris {
        match crate::messages::drain_ids(uri, &format!("{QUEUE}.dead")).await {
            Ok(ids) => return Ok(ids),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no broker node is up"))).context("draining the dead letters")
}

/// A line of the run's log.
pub fn say(line: &str) {
    println!("chaos: {line}");
}
