//! Status from observations: pure, so every condition and transition is unit-tested.
//!
//! `Ready` means the desired workers are Ready *and* consuming; `Degraded` names what the fleet will not
//! repair by itself; `Progressing` is a rollout or scale under way; `Paused` is present while
//! `spec.paused` is true, `Suspended` while `spec.suspend` is. `lastTransitionTime` moves only when a
//! condition's status flips, and Events are derived from flips, so a steady state writes nothing and says
//! nothing.

use hookfleet_crds::IntegrationStatus;
use hookfleet_crds::contract::{self, exit};
use hookfleet_crds::integration::condition;
use hookfleet_crds::integration::{DestinationGone, ExcludedNode, WebhookCounts};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::names::CONTAINER;

/// Condition reasons.
pub mod reason {
    pub const CONSUMING: &str = "Consuming";
    pub const SINGLE_REPLICA: &str = "SingleReplica";
    pub const WORKERS_NOT_READY: &str = "WorkersNotReady";
    pub const NOT_CONSUMING: &str = "NotConsuming";
    pub const CRASH_LOOPING: &str = "CrashLooping";
    pub const FD_LIMIT_NOT_MET: &str = "FileDescriptorLimitNotMet";
    /// A queue exists on the broker with other arguments than the workers declare (worker exit 4).
    pub const QUEUE_MISMATCH: &str = "QueueMismatch";
    /// `spec.source.topology: external` and queues the workers use do not exist (worker exit 6).
    pub const QUEUES_MISSING: &str = "QueuesMissing";
    pub const CONTAINER_NOT_STARTING: &str = "ContainerNotStarting";
    /// The destination answered HTTP 410 Gone (worker exit 5): the workers are scaled to 0.
    pub const DESTINATION_GONE: &str = "DestinationGone";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// A Webhooks fleet's snapshot is over what a Secret holds: Webhook changes are not applied.
    pub const SNAPSHOT_TOO_LARGE: &str = "WebhooksSnapshotTooLarge";
    pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
    pub const INVALID_BROKER_URI: &str = "InvalidBrokerUri";
    pub const BROKER_AUTH_FAILED: &str = "BrokerAuthFailed";
    pub const BROKER_UNREACHABLE: &str = "BrokerUnreachable";
    pub const AS_EXPECTED: &str = "AsExpected";
    /// The stored object does not deserialize into the types (see `reconcile::malformed`), or the worker
    /// would refuse a field of its spec (`hookfleet_crds::validate`): nothing is applied.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    pub const PAUSED: &str = "Paused";
    /// `spec.suspend` is true and applied: the workers are scaled to 0 (Ready False, Suspended True).
    pub const SUSPENDED: &str = "Suspended";
    /// `Suspended` True: by `spec.suspend`.
    pub const SUSPENDED_BY_SPEC: &str = "SuspendedBySpec";
    /// `QueuesDeleted` False: the connection Secret could not be read (an API error, not its absence).
    pub const SECRET_UNREADABLE: &str = "SecretUnreadable";
    /// `QueuesDeleted` False: worker pods are still stopping (see `core::deletion`).
    pub const WAITING_FOR_WORKERS: &str = "WaitingForWorkers";
    /// `QueuesDeleted` False: consumers are still attached to a queue.
    pub const QUEUES_IN_USE: &str = "QueuesInUse";
    /// `QueuesDeleted` False: the broker refused to delete a queue (e.g. no `configure` permission).
    pub const QUEUE_DELETE_REFUSED: &str = "QueueDeleteRefused";
}

/// The worker Deployment as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeploymentObs {
    pub spec_replicas: i32,
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    /// The Deployment controller has seen the current Deployment spec.
    pub observed: bool,
}

impl DeploymentObs {
    pub fn from_deployment(d: &Deployment) -> Self {
        let st = d.status.clone().unwrap_or_default();
        Self {
            spec_replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: st.replicas.unwrap_or(0),
            ready: st.ready_replicas.unwrap_or(0),
            updated: st.updated_replicas.unwrap_or(0),
            observed: st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0),
        }
    }
}

/// What the broker said about the queue, or why it could not be asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceObs {
    Queue {
        consumers: i32,
        backlog: i64,
    },
    /// The queue does not exist yet (workers declare it when they start), or with `source.nats` the
    /// durable consumer (workers create it with `topology: managed`).
    QueueMissing,
    /// A NATS JetStream consumer (`source.nats`). JetStream counts no attached pull consumers, so
    /// `pulling` stands in for them: the pull requests waiting on the consumer, read only while no worker
    /// can be busy (nothing pending, fewer messages awaiting acks than one worker holds: every live worker
    /// then keeps one request open); `Some(0)` when messages are pending and none was delivered for
    /// 30 s (the prober's `STALLED_AFTER`) although workers have room; `None` (unknown) while the workers are
    /// busy and delivering.
    Stream {
        pulling: Option<i32>,
        /// Messages in the stream not yet delivered to a worker (`num_pending`).
        backlog: i64,
        /// Seconds since the consumer last delivered a message, when it is stalled.
        stalled_secs: Option<u64>,
    },
    /// A Secret, URI or broker problem; `reason` is one of the [`reason`] constants.
    Problem {
        reason: &'static str,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodProblemKind {
    FdLimit,
    QueueMismatch,
    QueuesMissing,
    CrashLoop,
    NotStarting,
}

/// A worker pod in trouble.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodProblem {
    pub pod: String,
    pub kind: PodProblemKind,
    pub message: String,
    /// The node it runs on (`spec.nodeName`), once scheduled.
    pub node: Option<String>,
}

/// Restarts after which a worker that is not Ready counts as crash-looping even before the kubelet
/// reports `CrashLoopBackOff`.
const CRASH_RESTARTS: i32 = 3;

fn is_fd_message(m: &str) -> bool {
    let m = m.to_ascii_lowercase();
    [
        contract::FD_LIMIT_MESSAGE,
        "file descriptor",
        "file-descriptor",
        "rlimit_nofile",
        "fd limit",
        "nofile",
    ]
    .iter()
    .any(|k| m.contains(k))
}

/// The worker container's status in `pod`; None for a pod being deleted (its successor counts).
fn worker_status(pod: &Pod) -> Option<&ContainerStatus> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)
}

/// The trouble a worker pod is in, if any, quoting its last termination message.
pub fn pod_problem(pod: &Pod) -> Option<PodProblem> {
    let (kind, message) = problem_of(worker_status(pod)?)?;
    Some(PodProblem {
        pod: pod.metadata.name.clone().unwrap_or_default(),
        kind,
        message,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
    })
}

/// The kind of trouble of a worker container and its message.
fn problem_of(cs: &ContainerStatus) -> Option<(PodProblemKind, String)> {
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| cs.state.as_ref().and_then(|s| s.terminated.as_ref()));
    let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
    let waiting_reason = waiting.and_then(|w| w.reason.as_deref()).unwrap_or("");
    let termination = last.map(|t| {
        let msg = t.message.as_deref().map(str::trim).unwrap_or("");
        if msg.is_empty() {
            format!(
                "exit code {}{}",
                t.exit_code,
                t.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
            )
        } else {
            msg.lines().last().unwrap_or(msg).to_string()
        }
    });
    // docs/worker.md: exit code 3 is "fd limit cannot be met", 4 "a queue exists with other arguments",
    // 6 "queues missing" (external topology).
    let fd_exit = last.is_some_and(|t| t.exit_code == exit::FD_LIMIT);
    if let (Some(t), Some(term)) = (last, &termination)
        && t.exit_code == exit::QUEUE_MISMATCH
        && !cs.ready
    {
        return Some((PodProblemKind::QueueMismatch, term.clone()));
    }
    if let (Some(t), Some(term)) = (last, &termination)
        && t.exit_code == exit::QUEUES_MISSING
        && !cs.ready
    {
        return Some((PodProblemKind::QueuesMissing, term.clone()));
    }
    if let Some(t) = &termination
        && (fd_exit || is_fd_message(t))
        && !cs.ready
    {
        return Some((PodProblemKind::FdLimit, t.clone()));
    }
    // Restarted after a failure and not Ready again: still crash-looping, also in the seconds the
    // container runs between two back-offs. Without this the Integration flapped CrashLooping →
    // Recovered → CrashLooping at each restart, and each flap wrote status, emitted Events and reset
    // every alert's `for:` timer. It stays Degraded until the worker runs Ready again.
    let restarted_unready = cs.restart_count >= 1 && !cs.ready && last.is_some_and(|t| t.exit_code != 0);
    if waiting_reason == "CrashLoopBackOff"
        || (cs.restart_count >= CRASH_RESTARTS && !cs.ready)
        || restarted_unready
    {
        return Some((
            PodProblemKind::CrashLoop,
            format!(
                "restarted {} times, last termination: {}",
                cs.restart_count,
                termination.unwrap_or_else(|| "unknown".into())
            ),
        ));
    }
    if matches!(
        waiting_reason,
        "CreateContainerConfigError"
            | "CreateContainerError"
            | "InvalidImageName"
            | "ErrImagePull"
            | "ImagePullBackOff"
    ) {
        return Some((
            PodProblemKind::NotStarting,
            format!(
                "{waiting_reason}: {}",
                waiting.and_then(|w| w.message.as_deref()).unwrap_or("")
            ),
        ));
    }
    None
}

/// When the worker container of `pod` last stopped with exit code 5 (HTTP 410 from the destination, see
/// `contract::exit::DESTINATION_GONE`), from its current or last termination; None for a pod being deleted.
pub fn destination_gone_at(pod: &Pod) -> Option<Time> {
    worker_stopped_at(pod, Some(exit::DESTINATION_GONE))
}

/// When the worker container of `pod` last stopped (with exit code `exit_code`, when given), from its
/// current or last termination; None for a pod being deleted.
pub fn worker_stopped_at(pod: &Pod, exit_code: Option<i32>) -> Option<Time> {
    let cs = worker_status(pod)?;
    [
        cs.state.as_ref().and_then(|s| s.terminated.as_ref()),
        cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()),
    ]
    .into_iter()
    .flatten()
    .filter(|t| exit_code.is_none_or(|code| t.exit_code == code))
    .filter_map(|t| t.finished_at.clone())
    .max_by_key(|t| t.0)
}

/// Restarts of the worker container of `pod` (0 for a pod being deleted: its successor counts).
pub fn worker_restarts(pod: &Pod) -> i64 {
    worker_status(pod).map_or(0, |c| i64::from(c.restart_count))
}

/// Everything status is computed from.
#[derive(Clone, Debug)]
pub struct Observed {
    pub generation: Option<i64>,
    pub paused: bool,
    /// `spec.suspend`: it takes effect unless the spec is paused (nothing is applied then); with an invalid
    /// spec too, through the Deployment's scale.
    pub suspend: bool,
    /// What the workers consume, for messages: `queue <name>`, or `JetStream consumer <name> of stream <S>`.
    pub queue: String,
    /// Workers wanted now (fixed or autoscaled).
    pub desired: i32,
    /// The spec asks for exactly one fixed worker.
    pub single_replica: bool,
    pub deployment: Option<DeploymentObs>,
    pub pod_problems: Vec<PodProblem>,
    pub source: SourceObs,
    pub selector: String,
    /// Set while the destination is gone (decided by the reconcile's build step).
    pub destination_gone: Option<DestinationGone>,
    /// The fields the worker would refuse (`field: reason; …`): the spec is not applied.
    pub invalid_spec: Option<String>,
    /// A Webhooks fleet's Webhooks by state.
    pub webhooks: Option<WebhookCounts>,
    /// Why a Webhooks fleet's snapshot could not be written.
    pub webhooks_problem: Option<String>,
    /// Nodes the workers are kept off (decided by the build step, `core::nodes`).
    pub excluded_nodes: Vec<ExcludedNode>,
    /// Nodes that failed the fd limit but stay usable: excluding them would leave no schedulable node.
    pub kept_nodes: Vec<String>,
    /// Where the poison-message limit comes from when the queue's own arguments do not give it
    /// (`source.topology: external`, [`poison_limit_note`]); appended to Ready's message.
    pub poison_limit: Option<String>,
}

/// What the workers of `source` consume, as status messages name it.
pub fn source_name(source: &hookfleet_crds::integration::SourceSpec) -> String {
    match &source.nats {
        Some(n) => format!("JetStream consumer {} of stream {}", source.queue, n.stream),
        None => format!("queue {}", source.queue),
    }
}

/// What keeps a message that crashes every worker from being redelivered forever, for a source whose queues
/// hookfleet does not declare (`None`: a managed topology, whose queue arguments say it).
pub fn poison_limit_note(source: &hookfleet_crds::integration::SourceSpec) -> Option<String> {
    use hookfleet_crds::integration::{QueueType, Topology};
    if source.nats.is_some() {
        // The consumer's MaxDeliver (delivery.maxAttempts + 1), checked by the workers when external.
        return None;
    }
    match (source.topology, source.queue_type) {
        (Topology::Managed, _) => None,
        (Topology::External, QueueType::Quorum) => Some(format!(
            "topology external: the poison-message limit is the workers' own, from the broker's \
             x-delivery-count (deliveryLimit {}), unless a policy gives the queue one",
            source.delivery_limit
        )),
        (Topology::External, QueueType::Classic) => Some(
            "topology external on a classic queue: no poison-message limit (classic queues count no \
             redeliveries)"
                .into(),
        ),
    }
}

/// "RLIMIT_NOFILE hard limit H, workers need N" from the worker's fd line (docs/worker.md), or the line.
pub fn limit_summary(line: &str) -> String {
    let number_after = |key: &str| -> Option<String> {
        let rest = &line[line.find(key)? + key.len()..];
        let n: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        (!n.is_empty()).then_some(n)
    };
    match (number_after("hard limit"), number_after("needs")) {
        (Some(hard), Some(need)) => format!("RLIMIT_NOFILE hard limit {hard}, workers need {need}"),
        _ => format!("\"{line}\""),
    }
}

/// What the on-call person does about `node`, in one line.
pub fn remedy(node: &str) -> String {
    format!(
        "raise containerd's LimitNOFILE on {node} and restart it (or set the annotation {} to a new value once fixed)",
        hookfleet_crds::integration::annotation::RETRY_NODES
    )
}

/// The FdLimit line of one node: its limits, whether the workers are kept off it, and what to do.
fn fd_node_message(o: &Observed, node: &str, line: &str) -> String {
    let summary = limit_summary(line);
    let what = if o.excluded_nodes.iter().any(|e| e.node == node) {
        format!("workers are kept off {node}")
    } else if o.kept_nodes.iter().any(|k| k == node) {
        format!("workers are not kept off {node}: the operator sees no other schedulable node")
    } else {
        format!("workers are not kept off {node} yet")
    };
    format!("node {node}: {summary}; {what} — {}", remedy(node))
}

/// Degraded without a pod in trouble: the workers run elsewhere, but nodes stay excluded until fixed.
fn exclusion_problem(o: &Observed) -> Option<(&'static str, String)> {
    let first = o.excluded_nodes.first()?;
    let more = match o.excluded_nodes.len() {
        1 => String::new(),
        n => format!(
            " (and {} more nodes: {})",
            n - 1,
            o.excluded_nodes[1..]
                .iter()
                .map(|e| e.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Some((
        reason::FD_LIMIT_NOT_MET,
        format!("{}{more}", fd_node_message(o, &first.node, &first.message)),
    ))
}

fn cond(type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        // Replaced by `merge_conditions`.
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// Whether the workers are scaled to 0 for `spec.suspend`: it is set, and applied (not paused; a spec the
/// workers would refuse is not applied, but its suspend is, through the Deployment's scale).
pub fn suspended(o: &Observed) -> bool {
    o.suspend && !o.paused
}

/// The first problem (by precedence) as `(reason, message)`. A suspended fleet has no worker problems: its
/// workers are stopped on purpose (those still shutting down are neither short nor failing).
fn problem(o: &Observed, ready: i32) -> Option<(&'static str, String)> {
    // First: until it is fixed, no other change reaches the workers.
    if let Some(invalid) = &o.invalid_spec {
        let kept = if suspended(o) {
            " (but spec.suspend is, through the Deployment's scale: the workers are scaled to 0)"
        } else {
            ": they keep running the last valid one"
        };
        return Some((
            reason::INVALID_SPEC,
            format!(
                "{invalid}. The workers would refuse to start with this spec, so it is not applied{kept}. Fix the \
                 field and apply again"
            ),
        ));
    }
    // Then: no Webhook change reaches the workers until it is fixed.
    if let Some(p) = &o.webhooks_problem {
        return Some((reason::SNAPSHOT_TOO_LARGE, p.clone()));
    }
    // Then: it is why the fleet is at 0 on purpose, whatever else is wrong.
    if let Some(g) = &o.destination_gone {
        return Some((
            reason::DESTINATION_GONE,
            format!(
                "the destination {} answered HTTP 410 Gone at {}; the workers are scaled to 0 and messages \
                 wait in {}. Change spec.destination.url, or set the annotation {} to a new value to retry",
                g.url,
                g.since.0,
                o.queue,
                hookfleet_crds::integration::annotation::RETRY_DESTINATION
            ),
        ));
    }
    if let SourceObs::Problem { reason, message } = &o.source {
        return Some((reason, message.clone()));
    }
    if suspended(o) {
        return None;
    }
    for (kind, reason) in [
        (PodProblemKind::FdLimit, reason::FD_LIMIT_NOT_MET),
        (PodProblemKind::QueueMismatch, reason::QUEUE_MISMATCH),
        (PodProblemKind::QueuesMissing, reason::QUEUES_MISSING),
        (PodProblemKind::CrashLoop, reason::CRASH_LOOPING),
        (PodProblemKind::NotStarting, reason::CONTAINER_NOT_STARTING),
    ] {
        let hits: Vec<&PodProblem> = o.pod_problems.iter().filter(|p| p.kind == kind).collect();
        if let Some(first) = hits.first() {
            let more = if hits.len() > 1 {
                format!(" (and {} more pods)", hits.len() - 1)
            } else {
                String::new()
            };
            let message = match (&first.node, kind) {
                (Some(node), PodProblemKind::FdLimit) => format!(
                    "{} (worker pod {}: \"{}\"){more}",
                    fd_node_message(o, node, &first.message),
                    first.pod,
                    first.message
                ),
                _ => format!("worker pod {}: \"{}\"{more}", first.pod, first.message),
            };
            return Some((reason, message));
        }
    }
    let consumers = match o.source {
        SourceObs::Queue { consumers, .. } => consumers,
        SourceObs::QueueMissing => 0,
        SourceObs::Stream { pulling: Some(p), .. } => p,
        // A busy JetStream consumer: how many workers pull cannot be told, and it is delivering.
        SourceObs::Stream { pulling: None, .. } => return None,
        SourceObs::Problem { .. } => unreachable!("handled above"),
    };
    if ready <= consumers {
        return None;
    }
    let message = match o.source {
        SourceObs::Stream {
            backlog,
            stalled_secs: Some(secs),
            ..
        } => format!(
            "{ready} worker pods are Ready but {} has delivered no message for {secs}s with {backlog} \
             pending and room in the workers: no worker is pulling",
            o.queue
        ),
        SourceObs::Stream { .. } => format!(
            "{ready} worker pods are Ready but only {consumers} pull requests wait on {} while it is \
             idle (each live worker keeps one open): at least one worker is not pulling",
            o.queue
        ),
        SourceObs::QueueMissing => format!(
            "{ready} worker pods are Ready but only {consumers} consumers are attached to {} (the queue does \
             not exist on the broker)",
            o.queue
        ),
        _ => format!(
            "{ready} worker pods are Ready but only {consumers} consumers are attached to {}",
            o.queue
        ),
    };
    Some((reason::NOT_CONSUMING, message))
}

/// The status the observations describe, with conditions not yet merged (see [`merge_conditions`]).
pub fn compute(o: &Observed) -> IntegrationStatus {
    let g = o.generation;
    let dep = o.deployment.clone().unwrap_or_default();
    let ready = dep.ready;
    let (consumers, backlog) = match o.source {
        SourceObs::Queue { consumers, backlog } => (Some(consumers), Some(backlog)),
        SourceObs::Stream { pulling, backlog, .. } => (pulling, Some(backlog)),
        SourceObs::QueueMissing => (Some(0), None),
        SourceObs::Problem { .. } => (None, None),
    };
    let problem = problem(o, ready);
    let suspended = suspended(o);
    let mut conditions = Vec::with_capacity(5);
    let backlog_note = backlog.map(|b| format!(" (backlog {b})")).unwrap_or_default();

    let ready_cond = match &problem {
        // The one reason that is not a fault; a problem besides it is Degraded's.
        _ if suspended => cond(
            condition::READY,
            false,
            reason::SUSPENDED,
            format!(
                "spec.suspend is true: no workers deliver; messages wait in {}{backlog_note}",
                o.queue
            ),
            g,
        ),
        Some((r, m)) => cond(condition::READY, false, r, m.clone(), g),
        None if ready < o.desired => cond(
            condition::READY,
            false,
            reason::WORKERS_NOT_READY,
            format!("{ready} of {} workers Ready", o.desired),
            g,
        ),
        None => {
            let summary = format!(
                "{ready} of {} workers Ready, {} consumers on {}, backlog {}",
                o.desired,
                consumers.map_or_else(|| "unknown (busy)".into(), |c| c.to_string()),
                o.queue,
                backlog.map(|b| b.to_string()).unwrap_or_else(|| "unknown".into())
            );
            let summary = match &o.poison_limit {
                Some(note) => format!("{summary}; {note}"),
                None => summary,
            };
            if o.single_replica {
                cond(
                    condition::READY,
                    true,
                    reason::SINGLE_REPLICA,
                    format!("{summary}; a single worker is a single point of failure, use 2 or more"),
                    g,
                )
            } else {
                cond(condition::READY, true, reason::CONSUMING, summary, g)
            }
        }
    };
    conditions.push(ready_cond);

    let progressing = if o.paused {
        cond(
            condition::PROGRESSING,
            false,
            reason::PAUSED,
            "spec.paused is true: changes are not applied".into(),
            g,
        )
    } else if o.invalid_spec.is_some() {
        cond(
            condition::PROGRESSING,
            false,
            reason::INVALID_SPEC,
            "the spec is invalid (see Degraded): changes are not applied".into(),
            g,
        )
    } else if o.deployment.is_none() {
        cond(
            condition::PROGRESSING,
            true,
            reason::ROLLING_OUT,
            "creating the worker Deployment".into(),
            g,
        )
    } else if !dep.observed
        || dep.spec_replicas != o.desired
        || dep.updated < o.desired
        || dep.replicas > o.desired
    {
        cond(
            condition::PROGRESSING,
            true,
            reason::ROLLING_OUT,
            format!(
                "{} of {} workers updated, {} running",
                dep.updated, o.desired, dep.replicas
            ),
            g,
        )
    } else {
        cond(
            condition::PROGRESSING,
            false,
            reason::ROLLOUT_COMPLETE,
            format!("{} workers up to date", o.desired),
            g,
        )
    };
    conditions.push(progressing);

    // Nodes kept off degrade without making the fleet un-Ready: the workers run elsewhere.
    conditions.push(match problem.or_else(|| exclusion_problem(o)) {
        Some((r, m)) => cond(condition::DEGRADED, true, r, m, g),
        None => cond(
            condition::DEGRADED,
            false,
            reason::AS_EXPECTED,
            "no problems observed".into(),
            g,
        ),
    });
    if o.paused {
        conditions.push(cond(
            condition::PAUSED,
            true,
            reason::PAUSED,
            "spec.paused is true: the operator applies no changes to the workers".into(),
            g,
        ));
    }
    if o.suspend {
        conditions.push(suspended_condition(o, &dep, &backlog_note));
    }

    IntegrationStatus {
        webhooks: o.webhooks.clone(),
        observed_generation: g,
        replicas: Some(o.desired),
        ready_replicas: Some(ready),
        consumers,
        backlog,
        selector: Some(o.selector.clone()),
        conditions,
        destination_gone: o.destination_gone.clone(),
        excluded_nodes: o.excluded_nodes.clone(),
    }
}

/// `Suspended` while `spec.suspend` is true: True once it is applied, False while `spec.paused` is true
/// (the operator applies nothing), the workers then running as the Deployment says.
fn suspended_condition(o: &Observed, dep: &DeploymentObs, backlog_note: &str) -> Condition {
    let g = o.generation;
    if o.paused {
        cond(
            condition::SUSPENDED,
            false,
            reason::PAUSED,
            format!(
                "spec.suspend is true but spec.paused is true (the operator changes nothing it owns), so it is not \
                 applied: the worker Deployment keeps its {} replicas",
                dep.spec_replicas
            ),
            g,
        )
    } else {
        cond(
            condition::SUSPENDED,
            true,
            reason::SUSPENDED_BY_SPEC,
            format!(
                "spec.suspend is true: the workers are scaled to 0 and messages wait in {}{backlog_note}; \
                 set it to false to deliver them",
                o.queue
            ),
            g,
        )
    }
}

/// Carries `lastTransitionTime` over from `old` for every condition whose status did not flip; flipped
/// or new conditions get `now`.
pub fn merge_conditions(old: &[Condition], new: Vec<Condition>, now: &Time) -> Vec<Condition> {
    new.into_iter()
        .map(|mut c| {
            c.last_transition_time = match old.iter().find(|o| o.type_ == c.type_) {
                Some(o) if o.status == c.status => o.last_transition_time.clone(),
                _ => now.clone(),
            };
            c
        })
        .collect()
}

/// An Event to publish about a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

fn find<'a>(cs: &'a [Condition], t: &str) -> Option<&'a Condition> {
    cs.iter().find(|c| c.type_ == t)
}

/// Every Event of a reconcile: one per transition between the status last written (`old`) and the new one
/// (none in a steady state). Conditions changing status or reason ([`transitions`]); the replica count
/// becoming 1 for a fixed single worker (Warning `SingleReplica`); an autoscaled replica count changing
/// (`Scaled`, `autoscale_target` is the spec's target backlog per worker).
pub fn events(
    old: &IntegrationStatus,
    new: &IntegrationStatus,
    single_replica: bool,
    autoscale_target: Option<i64>,
) -> Vec<Transition> {
    let mut out = transitions(&old.conditions, &new.conditions);
    if single_replica && new.replicas == Some(1) && old.replicas != Some(1) {
        out.push(Transition {
            warning: true,
            reason: reason::SINGLE_REPLICA.into(),
            note: "spec.workers.replicas is 1: a single worker is a single point of failure; use 2 or more"
                .into(),
        });
    }
    if let (Some(target), Some(from), Some(to)) = (autoscale_target, old.replicas, new.replicas)
        && from != to
    {
        out.push(Transition {
            warning: false,
            reason: "Scaled".into(),
            note: format!(
                "{from} → {to} workers (backlog {}, target {target} per worker)",
                new.backlog
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "unknown".into())
            ),
        });
    }
    out
}

/// Events for the changes between `old` and `new` conditions (none in a steady state).
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    let mut out = Vec::new();
    let key = |c: Option<&Condition>| c.map(|c| (c.status.clone(), c.reason.clone()));
    let (od, nd) = (find(old, condition::DEGRADED), find(new, condition::DEGRADED));
    if key(od) != key(nd)
        && let Some(n) = nd
    {
        if n.status == "True" {
            out.push(Transition {
                warning: true,
                reason: n.reason.clone(),
                note: n.message.clone(),
            });
        } else if od.is_some_and(|o| o.status == "True") {
            out.push(Transition {
                warning: false,
                reason: "Recovered".into(),
                note: format!(
                    "no longer degraded (was {})",
                    od.map(|o| o.reason.as_str()).unwrap_or("")
                ),
            });
        }
    }
    let (or, nr) = (find(old, condition::READY), find(new, condition::READY));
    if key(or) != key(nr)
        && let Some(n) = nr
    {
        let degraded = nd.is_some_and(|d| d.status == "True");
        if n.status == "True" {
            out.push(Transition {
                warning: n.reason == reason::SINGLE_REPLICA,
                reason: n.reason.clone(),
                note: n.message.clone(),
            });
        } else if !degraded && n.reason != reason::SUSPENDED && or.is_some_and(|o| o.status == "True") {
            out.push(Transition {
                warning: true,
                reason: "NotReady".into(),
                note: n.message.clone(),
            });
        }
    }
    let suspended = |c: Option<&Condition>| c.is_some_and(|c| c.status == "True");
    let (os, ns) = (find(old, condition::SUSPENDED), find(new, condition::SUSPENDED));
    match (suspended(os), suspended(ns)) {
        (false, true) => out.push(Transition {
            warning: false,
            reason: "Suspended".into(),
            note: ns.map(|c| c.message.clone()).unwrap_or_default(),
        }),
        (true, false) => out.push(Transition {
            warning: false,
            reason: "Unsuspended".into(),
            note: match ns {
                Some(n) => n.message.clone(),
                None => {
                    "spec.suspend is false: the workers are scaled back and deliver the messages that waited"
                        .into()
                }
            },
        }),
        _ => {}
    }
    let (op, np) = (find(old, condition::PAUSED), find(new, condition::PAUSED));
    match (op.is_some(), np.is_some()) {
        (false, true) => out.push(Transition {
            warning: false,
            reason: "Paused".into(),
            note: "spec.paused is true: changes are not applied".into(),
        }),
        (true, false) => out.push(Transition {
            warning: false,
            reason: "Resumed".into(),
            note: "spec.paused is false: reconciling again".into(),
        }),
        _ => {}
    }
    out
}
