//! Where the binaries of the local stack (control plane and node) come from.
//!
//! In order: `HOOKFLEET_<NAME>` (a path), `KUBEBUILDER_ASSETS` (envtest's etcd, kube-apiserver, kubectl),
//! the version-keyed cache written by `hack/build-tools.sh` (its `tools.env`), and finally a build by that
//! script (slow the first time on a machine, instant afterwards).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// A binary the local stack runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tool {
    Etcd,
    KubeApiserver,
    KubeControllerManager,
    KubeScheduler,
    Kubectl,
    Kwok,
    Helm,
    /// The node agent of hookfleet-e2e's real node (root only).
    Kubelet,
    /// Service IPs on the node, in iptables mode (root only).
    KubeProxy,
    /// NATS with JetStream: the NATS source's tests (nats.rs).
    NatsServer,
    /// The release tools (`make release-local`): go-containerregistry's `crane` (which also serves a
    /// registry), `cosign`, `syft`, `actionlint`.
    Crane,
    Cosign,
    Syft,
    Actionlint,
}

impl Tool {
    /// The file name of the binary.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Etcd => "etcd",
            Tool::KubeApiserver => "kube-apiserver",
            Tool::KubeControllerManager => "kube-controller-manager",
            Tool::KubeScheduler => "kube-scheduler",
            Tool::Kubectl => "kubectl",
            Tool::Kwok => "kwok",
            Tool::Helm => "helm",
            Tool::Kubelet => "kubelet",
            Tool::KubeProxy => "kube-proxy",
            Tool::NatsServer => "nats-server",
            Tool::Crane => "crane",
            Tool::Cosign => "cosign",
            Tool::Syft => "syft",
            Tool::Actionlint => "actionlint",
        }
    }

    /// The `HOOKFLEET_<NAME>` variable that overrides its path (also the key in `tools.env`).
    pub fn env_var(self) -> String {
        format!("HOOKFLEET_{}", self.name().to_uppercase().replace('-', "_"))
    }

    fn in_kubebuilder_assets(self) -> bool {
        matches!(self, Tool::Etcd | Tool::KubeApiserver | Tool::Kubectl)
    }
}

/// The repository root (this crate lives in `<root>/testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent")
        .to_owned()
}

/// Cache root shared with `hack/build-tools.sh`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOOKFLEET_CACHE") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    Path::new(&home).join(".cache/hookfleet")
}

/// Path of `tool`, building it with `hack/build-tools.sh` when no other source has it.
pub fn path(tool: Tool) -> Result<PathBuf> {
    // Serialise builds within one process; the script itself is safe to run twice.
    static BUILD: Mutex<()> = Mutex::new(());
    if let Some(p) = find(tool) {
        return Ok(p);
    }
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find(tool) {
        return Ok(p);
    }
    let script = repo_root().join("hack/build-tools.sh");
    eprintln!(
        "hookfleet-testkit: {} not found; building it with {} (cached afterwards)",
        tool.name(),
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .arg(tool.name())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} {} failed ({status})", script.display(), tool.name());
    }
    find(tool).with_context(|| {
        format!(
            "{} built by {} but not found in its tools.env",
            tool.name(),
            script.display()
        )
    })
}

fn find(tool: Tool) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(tool.env_var()) {
        return Some(p.into());
    }
    if tool.in_kubebuilder_assets()
        && let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS")
    {
        let p = Path::new(&dir).join(tool.name());
        if p.is_file() {
            return Some(p);
        }
    }
    cached()
        .remove(&tool.env_var())
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// `tools.env` of the cache: `HOOKFLEET_<NAME>=<path>` lines for the pinned versions.
fn cached() -> HashMap<String, String> {
    let text = std::fs::read_to_string(cache_root().join("bin/tools.env")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}
