//! A local Kubernetes control plane on real binaries, the way controller-runtime's envtest runs one:
//! etcd and kube-apiserver on free loopback ports in a temporary directory, and on request
//! kube-controller-manager, kube-scheduler and kwok (with a fake node), so that Deployments get Pods
//! that reach Running and garbage collection works. There is no kubelet here: pods never run a container
//! unless a real node joins (hookfleet-e2e's `node`, started with it by its `Cluster`).
//!
//! Everything is stopped when the [`ControlPlane`] is dropped (also on a panic). Children are tied to the
//! thread that started them (`PR_SET_PDEATHSIG`), so start it from a thread that outlives it (a test's
//! own thread or a runtime worker, not `spawn_blocking`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::pki::Pki;
use crate::process::{Process, free_port, wait_for};
use crate::tools::{self, Tool};

/// What to start besides etcd and kube-apiserver.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// kube-controller-manager, kube-scheduler and kwok with one fake node: Deployments get Pods that
    /// kwok marks Running and Ready; owner references are garbage collected.
    pub workloads: bool,
    /// With `workloads`: no kwok and no fake node, because a real node joins (and the node-lifecycle
    /// controller runs, as the real node heartbeats).
    pub no_fake_node: bool,
    /// Serve the API on this address instead of 127.0.0.1 and advertise it as the endpoint of the
    /// `kubernetes` Service: a real node's bridge gateway, so that pods reach the API server through the
    /// Service IP ([`SERVICE_IP`], also in the serving certificate).
    pub advertise_address: Option<Ipv4Addr>,
}

/// The Service IP range of the local control plane.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP (the first address of [`SERVICE_CIDR`]).
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// A running local control plane.
pub struct ControlPlane {
    // Fields drop in declaration order: clients of the API server first, etcd last, the directory after.
    kwok: Option<Process>,
    scheduler: Option<Process>,
    controller_manager: Option<Process>,
    apiserver: Process,
    etcd: Process,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    server: String,
    client: Client,
    pki: Pki,
}

/// kwok's stages: node Ready, pod Running and Ready, deleted pod removed (see the file's header).
const KWOK_STAGES: &str = include_str!("../kwok/stages.yaml");

/// Name of the fake node kwok manages.
pub const FAKE_NODE: &str = "kwok-node-0";

impl ControlPlane {
    /// etcd + kube-apiserver.
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// etcd + kube-apiserver + controller-manager + scheduler + kwok.
    pub async fn start_with_workloads() -> Result<Self> {
        Self::start_with(Options {
            workloads: true,
            ..Options::default()
        })
        .await
    }

    pub async fn start_with(options: Options) -> Result<Self> {
        let etcd_bin = tools::path(Tool::Etcd)?;
        let apiserver_bin = tools::path(Tool::KubeApiserver)?;
        let workload_bins = if options.workloads {
            Some((
                tools::path(Tool::KubeControllerManager)?,
                tools::path(Tool::KubeScheduler)?,
                if options.no_fake_node {
                    None
                } else {
                    Some(tools::path(Tool::Kwok)?)
                },
            ))
        } else {
            None
        };

        let dir = tempfile::Builder::new().prefix("hookfleet-cp-").tempdir()?;
        let extra_ips: Vec<IpAddr> = options
            .advertise_address
            .map(|a| vec![IpAddr::V4(a), IpAddr::V4(SERVICE_IP)])
            .unwrap_or_default();
        let pki = Pki::write_with(&dir.path().join("pki"), &extra_ips)?;
        let api_addr = options.advertise_address.unwrap_or(Ipv4Addr::LOCALHOST);

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let etcd = Process::spawn(
            "etcd",
            &etcd_bin,
            &[
                format!("--data-dir={}", dir.path().join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}"),
                // A throwaway store: durability buys nothing here and fsync dominates on slow disks.
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &[],
            &dir.path().join("etcd.log"),
        )?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        wait_for(
            "etcd to listen",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let running = etcd.check_running();
                async move {
                    running?;
                    Ok(std::net::TcpStream::connect(("127.0.0.1", etcd_port))
                        .ok()
                        .map(|_| ()))
                }
            },
        )
        .await?;

        let api_port = free_port()?;
        let apiserver = Process::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--bind-address={api_addr}"),
                format!("--advertise-address={api_addr}"),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", dir.path().join("pki").display()),
                format!("--tls-cert-file={}", pki.serving_cert.display()),
                format!("--tls-private-key-file={}", pki.serving_key.display()),
                format!("--client-ca-file={}", pki.ca_cert.display()),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", pki.sa_pub.display()),
                format!("--service-account-signing-key-file={}", pki.sa_key.display()),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                // For `kubectl logs`/`exec` on a real node: the kubelet's serving certificate is signed by
                // this CA for the node's InternalIP, and the admin identity may use the kubelet's API.
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--kubelet-certificate-authority={}", pki.ca_cert.display()),
                format!("--kubelet-client-certificate={}", pki.admin_cert.display()),
                format!("--kubelet-client-key={}", pki.admin_key.display()),
                "--v=1".into(),
            ],
            &[],
            &dir.path().join("kube-apiserver.log"),
        )?;
        let server = format!("https://{api_addr}:{api_port}");

        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki))?;
        let client = client_for(&kubeconfig).await?;

        // /readyz covers etcd, the RBAC bootstrap roles and the other post-start hooks.
        wait_for(
            "kube-apiserver /readyz",
            Duration::from_secs(90),
            Duration::from_millis(250),
            || {
                let running = apiserver.check_running();
                let client = client.clone();
                async move {
                    running?;
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    Ok(client
                        .request_text(req)
                        .await
                        .ok()
                        .filter(|body| body.trim() == "ok")
                        .map(|_| ()))
                }
            },
        )
        .await
        .with_context(|| format!("log tail:\n{}", apiserver.log_tail(30)))?;

        let mut cp = Self {
            kwok: None,
            scheduler: None,
            controller_manager: None,
            apiserver,
            etcd,
            dir,
            kubeconfig,
            server,
            client,
            pki,
        };
        if let Some((kcm, scheduler, kwok)) = workload_bins {
            cp.start_workloads(&kcm, &scheduler, kwok.as_deref()).await?;
        }
        Ok(cp)
    }

    async fn start_workloads(&mut self, kcm: &Path, scheduler: &Path, kwok: Option<&Path>) -> Result<()> {
        let pki = &self.pki;
        let kubeconfig = self.kubeconfig.display().to_string();
        let auth = [
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
        ];
        let mut kcm_args = auth.to_vec();
        kcm_args.extend([
            format!("--secure-port={}", free_port()?),
            format!("--service-account-private-key-file={}", pki.sa_key.display()),
            format!("--root-ca-file={}", pki.ca_cert.display()),
            "--use-service-account-credentials=false".into(),
            // No cloud, no node IPAM (the node's CNI config owns its pod range), no bootstrap tokens, and
            // with kwok no node lifecycle (kwok's node sends no heartbeats, and would be marked NotReady);
            // everything else (deployments, replicasets, garbage collector, service accounts, endpoints,
            // disruption) runs. A real node heartbeats, so there the lifecycle controller lifts its
            // not-ready taint as in any cluster.
            if kwok.is_some() {
                "--controllers=*,-nodeipam,-nodelifecycle,-bootstrapsigner,-tokencleaner".into()
            } else {
                "--controllers=*,-nodeipam,-bootstrapsigner,-tokencleaner".into()
            },
            "--concurrent-deployment-syncs=10".into(),
            "--v=1".into(),
        ]);
        self.controller_manager = Some(Process::spawn(
            "kube-controller-manager",
            kcm,
            &kcm_args,
            &[],
            &self.dir.path().join("kube-controller-manager.log"),
        )?);

        let mut sched_args = auth.to_vec();
        sched_args.extend([format!("--secure-port={}", free_port()?), "--v=1".into()]);
        self.scheduler = Some(Process::spawn(
            "kube-scheduler",
            scheduler,
            &sched_args,
            &[],
            &self.dir.path().join("kube-scheduler.log"),
        )?);

        if let Some(kwok) = kwok {
            let stages = self.dir.path().join("kwok-stages.yaml");
            std::fs::write(&stages, KWOK_STAGES)?;
            self.kwok = Some(Process::spawn(
                "kwok",
                kwok,
                &[
                    format!("--kubeconfig={kubeconfig}"),
                    format!("--config={}", stages.display()),
                    "--manage-all-nodes=false".into(),
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                    "--node-ip=10.244.0.1".into(),
                    "--cidr=10.244.0.0/16".into(),
                    // No --server-address: nothing here reads kwok's server, and its start builds a CEL
                    // environment through easycel v0.6.0's unguarded package-level type cache while the
                    // node controller builds the node stage's; the race killed kwok once in CI.
                ],
                &[],
                &self.dir.path().join("kwok.log"),
            )?);
            self.add_fake_node(FAKE_NODE).await?;
        }

        // Pods are admitted only once the namespace has its default ServiceAccount.
        let sa: Api<ServiceAccount> = Api::namespaced(self.client(), "default");
        wait_for(
            "the default ServiceAccount",
            Duration::from_secs(60),
            Duration::from_millis(250),
            || {
                let sa = sa.clone();
                let running = self.check_running();
                async move {
                    running?;
                    Ok(sa.get_opt("default").await?.map(|_| ()))
                }
            },
        )
        .await
    }

    /// Registers a Node that kwok manages (it heartbeats it Ready and runs its pods to Running).
    pub async fn add_fake_node(&self, name: &str) -> Result<()> {
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "topology.kubernetes.io/zone": "zone-a",
                    "type": "kwok"
                }
            },
            "spec": {},
            // Room for the fleets of 1,000 Integrations (3 workers each by default; `make bench-operator`):
            // kwok's pods cost nothing, and a kubelet's default of 110 would leave most of them Pending.
            "status": {
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "5000"},
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": "5000"}
            }
        }))?;
        let nodes: Api<Node> = Api::all(self.client());
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("creating node {name}"))?;
        wait_for(
            &format!("node {name} Ready"),
            Duration::from_secs(60),
            Duration::from_millis(250),
            || {
                let nodes = nodes.clone();
                let name = name.to_owned();
                let running = self.check_running();
                async move {
                    running?;
                    let node = nodes.get(&name).await?;
                    Ok(node_ready(&node).then_some(()))
                }
            },
        )
        .await
        // kwok's log says why its node is not Ready; an exited kwok's is in the error already.
        .with_context(|| match &self.kwok {
            Some(k) if !k.exited() => format!("kwok log:\n{}", k.log_tail(20)),
            _ => String::new(),
        })?;
        // Admission gives a new node the not-ready taint; the node-lifecycle controller would lift it,
        // but it is off here (it would mark the heartbeat-less node NotReady again), so lift it ourselves.
        let untaint = serde_json::json!({"spec": {"taints": null}});
        nodes
            .patch(name, &PatchParams::default(), &kube::api::Patch::Merge(&untaint))
            .await?;
        Ok(())
    }

    /// A client authenticated as a cluster admin.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Path of an admin kubeconfig for this control plane.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>` (or the advertise address, see [`Options::advertise_address`]).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA and the certificates the API server uses (a node signs its kubelet's certificate with it).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The temporary directory holding logs, certificates and etcd's data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails (with the log tail) if any component has exited.
    pub fn check_running(&self) -> Result<()> {
        [
            Some(&self.etcd),
            Some(&self.apiserver),
            self.controller_manager.as_ref(),
            self.scheduler.as_ref(),
            self.kwok.as_ref(),
        ]
        .into_iter()
        .flatten()
        .try_for_each(Process::check_running)
    }

    /// A `kubectl` command bound to this control plane (the pinned kubectl from the cache).
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(tools::path(Tool::Kubectl)?);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        Ok(cmd)
    }

    /// Applies the CRDs generated from the Rust types (Integration, Webhook) and waits until they are
    /// Established.
    pub async fn install_crds(&self) -> Result<()> {
        for (_, _, yaml) in hookfleet_crds::crds() {
            let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml)?;
            install_crd(&self.client(), &crd).await?;
        }
        Ok(())
    }

    /// Creates a namespace (idempotent).
    pub async fn create_namespace(&self, name: &str) -> Result<()> {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))?;
        Api::<Namespace>::all(self.client())
            .patch(
                name,
                &PatchParams::apply("hookfleet-e2e").force(),
                &kube::api::Patch::Apply(&ns),
            )
            .await?;
        Ok(())
    }

    /// Stops every component now (drop does the same).
    pub fn stop(self) {}
}

/// Server-side applies `crd` and waits for its `Established` condition.
pub async fn install_crd(client: &Client, crd: &CustomResourceDefinition) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().context("the CRD has a name")?;
    api.patch(
        &name,
        &PatchParams::apply("hookfleet-e2e").force(),
        &kube::api::Patch::Apply(crd),
    )
    .await
    .with_context(|| format!("applying CRD {name}"))?;
    wait_for(
        &format!("CRD {name} Established"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            }
        },
    )
    .await
}

/// A client from a kubeconfig file.
/// Whether a Node reports the condition Ready=True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let text = std::fs::read_to_string(kubeconfig)?;
    let config =
        Config::from_custom_kubeconfig(Kubeconfig::from_yaml(&text)?, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: hookfleet-local
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: hookfleet-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: hookfleet-local
  context: {{cluster: hookfleet-local, user: hookfleet-admin, namespace: default}}
current-context: hookfleet-local
",
        ca = b64(&pki.ca_pem),
        cert = b64(&pki.admin_cert_pem),
        key = b64(&pki.admin_key_pem),
    )
}
