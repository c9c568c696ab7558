//! A pod's processes as the host sees them (real nodes only: the harness shares their pid namespace):
//! found by the pod's UID in `/proc/PID/cgroup`, to kill one with a signal the kubelet never sent.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use nix::sys::signal::Signal;

/// The node `pod` was scheduled to ("" before it was).
pub fn node_of(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
}

/// Sends `sig` to host pid `pid` (one of [`worker_pids`] or [`operator_pids`]).
pub fn signal(pid: i32, sig: Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .with_context(|| format!("{sig} to pid {pid}"))
}

/// Host pids of the `hookfleet-worker` processes of a pod.
pub fn worker_pids(pod: &Pod) -> Vec<i32> {
    pids(pod, "hookfleet-worker")
}

/// Host pids of the `hookfleet-operator` processes of a pod.
pub fn operator_pids(pod: &Pod) -> Vec<i32> {
    pids(pod, "hookfleet-operator")
}

/// Host pids of the processes of `pod` whose executable is named `name` (`/proc/PID/comm` holds only its
/// first 15 bytes). Cgroup paths name the pod's UID, with dashes under the cgroupfs driver and underscores
/// under systemd's.
pub fn pids(pod: &Pod, name: &str) -> Vec<i32> {
    let uid = pod.uid().unwrap_or_default();
    let (dashed, underscored) = (format!("pod{uid}"), format!("pod{}", uid.replace('-', "_")));
    let comm_prefix = &name[..name.len().min(15)];
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.trim().starts_with(comm_prefix) {
            continue;
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cgroup.contains(&dashed) || cgroup.contains(&underscored) {
            out.push(pid);
        }
    }
    out
}
