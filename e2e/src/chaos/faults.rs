//! The faults the soak injects, one at a time: each is injected, lasts a while when it is a condition
//! (a node away, a sink down), and is undone here; the caller then waits for the stack to be healthy again.
//! What is hit (which pod, node, broker node) and for how long come from the run's seeded RNG.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use nix::sys::signal::Signal;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::stack::{NS, Stack};
use crate::install::NAMESPACE as SYSTEM_NS;
use crate::pods;
use crate::sink::Mode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    WorkerKill9,
    PodDelete,
    NodeDrain,
    NodeLoss,
    BrokerRestart,
    SinkOutage,
    SinkSlow,
    OperatorLeaderKill,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::WorkerKill9,
        Kind::PodDelete,
        Kind::NodeDrain,
        Kind::NodeLoss,
        Kind::BrokerRestart,
        Kind::SinkOutage,
        Kind::SinkSlow,
        Kind::OperatorLeaderKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::WorkerKill9 => "worker kill -9",
            Kind::PodDelete => "worker pod delete",
            Kind::NodeDrain => "node drain",
            Kind::NodeLoss => "node loss",
            Kind::BrokerRestart => "broker node restart",
            Kind::SinkOutage => "sink outage (503)",
            Kind::SinkSlow => "sink slow-down",
            Kind::OperatorLeaderKill => "operator leader kill -9",
        }
    }
}

/// The order of the faults: rounds of every kind once, each round shuffled, so that even a short run meets
/// every kind and a long one meets them evenly, at random times and in random order.
pub struct Schedule {
    rng: StdRng,
    round: Vec<Kind>,
}

impl Schedule {
    pub fn new(rng: StdRng) -> Self {
        Self {
            rng,
            round: Vec::new(),
        }
    }

    /// The next fault and the gap before it (10 to 40 s).
    pub fn next_fault(&mut self) -> (Kind, Duration) {
        if self.round.is_empty() {
            self.round = Kind::ALL.to_vec();
            self.round.shuffle(&mut self.rng);
        }
        let gap = Duration::from_secs(self.rng.random_range(10..=40));
        (self.round.pop().unwrap_or(Kind::WorkerKill9), gap)
    }
}

/// Injects `kind` (and undoes it when it is a condition), logging each step with `log`; returns what was
/// done.
pub async fn inject(s: &mut Stack, kind: Kind, rng: &mut StdRng, log: &dyn Fn(&str)) -> Result<String> {
    match kind {
        Kind::WorkerKill9 => {
            let pod = pick_pod(s, rng).await?;
            let pid = *pods::worker_pids(&pod)
                .first()
                .with_context(|| format!("no worker process of pod {}", pod.name_any()))?;
            pods::signal(pid, Signal::SIGKILL)?;
            Ok(format!(
                "SIGKILL to pid {pid}, the worker of {} on {}",
                pod.name_any(),
                pods::node_of(&pod)
            ))
        }
        Kind::PodDelete => {
            let pod = pick_pod(s, rng).await?;
            Api::<Pod>::namespaced(s.client.clone(), NS)
                .delete(&pod.name_any(), &DeleteParams::default())
                .await?;
            Ok(format!(
                "deleted pod {} on {}",
                pod.name_any(),
                pods::node_of(&pod)
            ))
        }
        Kind::NodeDrain => {
            let node = s.cluster.nodes()[rng.random_range(0..s.cluster.nodes().len())]
                .name()
                .to_owned();
            let away = Duration::from_secs(rng.random_range(20..=60));
            let drained = s.kubectl(&[
                "drain",
                &node,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--timeout=180s",
            ]);
            let evicted = match &drained {
                Ok(out) => out.lines().filter(|l| l.contains("evicted")).count().to_string(),
                Err(e) => format!("drain failed ({e:#})"),
            };
            log(&format!(
                "{node} drained ({evicted} pods evicted); uncordon in {away:?}"
            ));
            tokio::time::sleep(away).await;
            s.kubectl(&["uncordon", &node])?;
            Ok(format!(
                "drained {node} ({evicted} pods evicted), uncordoned {away:?} later"
            ))
        }
        Kind::NodeLoss => {
            let i = rng.random_range(0..s.cluster.nodes().len());
            let away = Duration::from_secs(rng.random_range(45..=90));
            let node = s.cluster.nodes()[i].name().to_owned();
            s.cluster.node_mut(i).kill_hard()?;
            log(&format!(
                "{node} killed (kubelet, containerd, its pods: kill -9); back in {away:?}"
            ));
            tokio::time::sleep(away).await;
            s.cluster.node_mut(i).restart().await?;
            Ok(format!(
                "{node} lost (kill -9 of everything) and restarted {away:?} later"
            ))
        }
        Kind::BrokerRestart => {
            let i = rng.random_range(0..s.rabbit.len());
            let away = Duration::from_secs(rng.random_range(5..=30));
            let name = s.rabbit.nodename(i).to_owned();
            let leader = s
                .rabbit
                .quorum_queue(super::stack::QUEUE)
                .map(|q| q.leader)
                .unwrap_or_default();
            s.rabbit.kill_node(i)?;
            let role = if leader == name {
                ", the work queue's leader"
            } else {
                ""
            };
            log(&format!(
                "broker node {name}{role} killed (SIGKILL); started again in {away:?}"
            ));
            tokio::time::sleep(away).await;
            s.rabbit.restart_node(i).await?;
            Ok(format!(
                "broker node {name}{role} killed (SIGKILL), started {away:?} later"
            ))
        }
        Kind::SinkOutage => {
            let away = Duration::from_secs(rng.random_range(20..=60));
            s.sink.set_mode(Mode::status(503));
            tokio::time::sleep(away).await;
            s.sink.set_mode(Mode::ok());
            Ok(format!("sink answered 503 for {away:?}"))
        }
        Kind::SinkSlow => {
            let away = Duration::from_secs(rng.random_range(30..=90));
            let delay = Duration::from_millis(rng.random_range(500..=3000));
            s.sink.set_mode(Mode::delayed(200, delay));
            tokio::time::sleep(away).await;
            s.sink.set_mode(Mode::ok());
            Ok(format!("sink answered after {delay:?} for {away:?}"))
        }
        Kind::OperatorLeaderKill => {
            let leader = s.leader().await?.context("no operator leader")?;
            let pod = Api::<Pod>::namespaced(s.client.clone(), SYSTEM_NS)
                .get(&leader)
                .await?;
            let pid = *pods::operator_pids(&pod)
                .first()
                .with_context(|| format!("no operator process of pod {leader}"))?;
            pods::signal(pid, Signal::SIGKILL)?;
            Ok(format!(
                "SIGKILL to pid {pid}, the operator leader {leader} on {}",
                pods::node_of(&pod)
            ))
        }
    }
}

/// A running worker pod, at random.
async fn pick_pod(s: &Stack, rng: &mut StdRng) -> Result<Pod> {
    let mut pods = s.worker_pods().await?;
    anyhow::ensure!(!pods.is_empty(), "no running worker pod");
    let i = rng.random_range(0..pods.len());
    Ok(pods.swap_remove(i))
}
