//! Deleting an Integration's queues (`spec.source.deletionPolicy: Delete`), the pure part: whether the
//! finalizer `hookfleet.io/queues` is wanted, which queues are the Integration's own to delete, what one
//! attempt's answers mean (done, try again, give up at the deadline), the condition and the Events.
//!
//! The order (carried out by `reconcile::finalize`): the workers are scaled to 0 and their pods waited for,
//! so no worker consumes, publishes a retry or declares a queue again while the queues go; then each queue
//! is read (passive declare) and deleted only when no consumer is attached to it. Until
//! `--queue-deletion-timeout` after the deletion, anything in the way (pods still stopping, a broker that
//! does not answer or refuses, a queue still consumed) is a `QueuesDeleted` False condition, an Event
//! when its reason changes, and another attempt with backoff; after it, the finalizer goes anyway and a
//! Warning Event names the queues left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hookfleet_crds::IntegrationSpec;
use hookfleet_crds::contract::{Pod, WorkerSetup};
use hookfleet_crds::integration::{DeletionPolicy, condition, finalizer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::status::reason;

/// Event reasons of queue deletion.
pub mod event {
    /// Normal: queues deleted, with the messages each held.
    pub const QUEUES_DELETED: &str = "QueuesDeleted";
    /// Warning: a queue another Integration also declares is kept.
    pub const QUEUE_SHARED: &str = "QueueShared";
    /// Warning: the timeout passed; the finalizer is removed, these queues stay on the broker.
    pub const QUEUES_LEFT_BEHIND: &str = "QueuesLeftBehind";
    /// Normal: the policy became `Retain` while the Integration was being deleted: the queues stay.
    pub const QUEUES_RETAINED: &str = "QueuesRetained";
    /// Warning: a malformed Integration the API server refuses to update: its finalizer cannot be removed
    /// until its spec is fixed.
    pub const FINALIZER_NOT_REMOVED: &str = "FinalizerNotRemoved";
}

/// What the operator remembers of one Integration's queue deletion between passes (in its memory: after a
/// restart the next pass starts afresh, and finds the queues already deleted absent).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// A first pass ran (the `QueueShared` Warning is published once).
    pub started: bool,
    /// Passes so far (the retry backoff).
    pub attempts: u32,
    /// Queues found deleted or absent.
    pub gone: BTreeSet<String>,
    /// Queues deleted, with the messages each held.
    pub deleted: Vec<(String, u32)>,
}

/// A change to the finalizer of an Integration that is not being deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalizerChange {
    Add,
    Remove,
}

/// Whether the finalizer must be added (policy `Delete`) or removed (policy `Retain`: today's behaviour,
/// nothing blocks the deletion) given the finalizers the object has.
pub fn finalizer_change(policy: DeletionPolicy, finalizers: &[String]) -> Option<FinalizerChange> {
    let has = finalizers.iter().any(|f| f == finalizer::QUEUES);
    match (policy, has) {
        (DeletionPolicy::Delete, false) => Some(FinalizerChange::Add),
        (DeletionPolicy::Retain, true) => Some(FinalizerChange::Remove),
        _ => None,
    }
}

/// `finalizers` with ours added or removed (the others kept, in order).
pub fn with_change(finalizers: &[String], change: FinalizerChange) -> Vec<String> {
    let mut out: Vec<String> = finalizers
        .iter()
        .filter(|f| *f != finalizer::QUEUES)
        .cloned()
        .collect();
    if change == FinalizerChange::Add {
        out.push(finalizer::QUEUES.to_owned());
    }
    out
}

/// The queues the workers of `spec` declare: the contract's `WorkerArgs::declared_queues` on the arguments
/// the operator renders for it (the pod's settings name no queue).
pub fn declared_queues(spec: &IntegrationSpec) -> Vec<String> {
    WorkerSetup::from_spec(spec, &Pod::any()).args.declared_queues()
}

/// Which of `ours` another Integration also declares: queue → that Integration (`namespace/name`, the first
/// by name). `others` are the other Integrations the operator sees, with the queues they declare; an
/// Integration that is itself being deleted with policy `Delete` is left out by the caller (its queues go
/// too). Names are compared without knowing the broker: two Integrations on different brokers with one
/// queue name keep that queue (the safe side).
pub fn shared(ours: &[String], others: &[(String, Vec<String>)]) -> BTreeMap<String, String> {
    let ours: BTreeSet<&String> = ours.iter().collect();
    let mut out = BTreeMap::new();
    let mut others: Vec<&(String, Vec<String>)> = others.iter().collect();
    others.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, queues) in others {
        for q in queues {
            if ours.contains(q) {
                out.entry(q.clone()).or_insert_with(|| name.clone());
            }
        }
    }
    out
}

/// What became of one queue in an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueFate {
    /// Deleted with the messages it held.
    Deleted { messages: u32 },
    /// Not on the broker (never declared, or deleted by an earlier attempt or by someone else).
    Absent,
    /// Not deleted: consumers are attached (a worker still stopping, or a consumer from elsewhere).
    InUse { consumers: u32 },
    /// Not deleted: the broker refused (e.g. `ACCESS_REFUSED`: no `configure` permission on it).
    Refused(String),
}

/// One attempt's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Worker pods are still there (stopping): the broker is not asked yet.
    WaitingForWorkers { pods: usize },
    /// The broker could not be asked (Secret, URI, connection, login): one of the `status::reason`s.
    Blocked { reason: &'static str, message: String },
    /// Each queue's fate.
    Queues(Vec<(String, QueueFate)>),
}

/// What to do after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every queue is gone: remove the finalizer.
    Done,
    /// Try again; the `QueuesDeleted` condition says why (reason, message).
    Retry { reason: &'static str, message: String },
    /// The timeout passed: remove the finalizer anyway, these queues (maybe) left on the broker.
    GiveUp { left: Vec<String>, why: String },
}

/// The verdict on `attempt` for `queues` (the ones to delete); `gone` are those an earlier attempt found
/// deleted or absent. `expired`: the timeout has passed.
pub fn verdict(attempt: &Attempt, queues: &[String], gone: &BTreeSet<String>, expired: bool) -> Verdict {
    let (reason, message) = match attempt {
        Attempt::WaitingForWorkers { pods } => (
            reason::WAITING_FOR_WORKERS,
            format!("{pods} worker pods are still stopping; the queues are deleted once they are gone"),
        ),
        Attempt::Blocked { reason, message } => (*reason, message.clone()),
        Attempt::Queues(fates) => {
            let mut in_use = Vec::new();
            let mut refused = Vec::new();
            for (q, fate) in fates {
                match fate {
                    QueueFate::InUse { consumers } => in_use.push(format!("{q} ({consumers} consumers)")),
                    QueueFate::Refused(m) => refused.push(format!("{q}: {m}")),
                    QueueFate::Deleted { .. } | QueueFate::Absent => {}
                }
            }
            if !refused.is_empty() {
                (
                    reason::QUEUE_DELETE_REFUSED,
                    format!("the broker refused to delete {}", refused.join("; ")),
                )
            } else if !in_use.is_empty() {
                (
                    reason::QUEUES_IN_USE,
                    format!("not deleted while consumers are attached: {}", in_use.join(", ")),
                )
            } else {
                return Verdict::Done;
            }
        }
    };
    if !expired {
        return Verdict::Retry { reason, message };
    }
    let now_gone: BTreeSet<&str> = match attempt {
        Attempt::Queues(fates) => fates
            .iter()
            .filter(|(_, f)| matches!(f, QueueFate::Deleted { .. } | QueueFate::Absent))
            .map(|(q, _)| q.as_str())
            .collect(),
        _ => BTreeSet::new(),
    };
    let left = queues
        .iter()
        .filter(|q| !gone.contains(*q) && !now_gone.contains(q.as_str()))
        .cloned()
        .collect();
    Verdict::GiveUp {
        left,
        why: format!("{reason}: {message}"),
    }
}

/// The queues an attempt found deleted or absent.
pub fn gone(attempt: &Attempt) -> Vec<String> {
    match attempt {
        Attempt::Queues(fates) => fates
            .iter()
            .filter(|(_, f)| matches!(f, QueueFate::Deleted { .. } | QueueFate::Absent))
            .map(|(q, _)| q.clone())
            .collect(),
        _ => Vec::new(),
    }
}

/// The queues an attempt deleted, with the messages each held.
pub fn deleted(attempt: &Attempt) -> Vec<(String, u32)> {
    match attempt {
        Attempt::Queues(fates) => fates
            .iter()
            .filter_map(|(q, f)| match f {
                QueueFate::Deleted { messages } => Some((q.clone(), *messages)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The note of the one `QueuesDeleted` Event (None when no queue was deleted): how many queues and
/// messages, each queue that held messages with its count, then how many were empty. One Event for the
/// whole deletion, published when it ends: the Event recorder folds Events of one reason into a series that
/// keeps the first note. At most 1,000 characters reach the Event; the log has every queue.
pub fn deleted_note(deleted: &[(String, u32)]) -> Option<String> {
    if deleted.is_empty() {
        return None;
    }
    let total: u64 = deleted.iter().map(|(_, m)| u64::from(*m)).sum();
    let with: Vec<String> = deleted
        .iter()
        .filter(|(_, m)| *m > 0)
        .map(|(q, m)| format!("{q} ({m})"))
        .collect();
    let empty = deleted.len() - with.len();
    let mut note = format!(
        "deleted {} with {} in them",
        count(deleted.len() as u64, "queue"),
        count(total, "message")
    );
    if !with.is_empty() {
        note.push_str(&format!(": {}", with.join(", ")));
    }
    if empty > 0 {
        note.push_str(&format!("; {} empty", count(empty as u64, "queue")));
    }
    Some(note)
}

/// `1 queue`, `2 queues`.
fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The note of the `QueueShared` Warning: the queues kept because another Integration declares them.
pub fn shared_note(shared: &BTreeMap<String, String>) -> Option<String> {
    if shared.is_empty() {
        return None;
    }
    let list: Vec<String> = shared
        .iter()
        .map(|(q, other)| format!("{q} (also declared by Integration {other})"))
        .collect();
    Some(format!(
        "not deleting queues another Integration uses: {}",
        list.join(", ")
    ))
}

/// The note of the `QueuesLeftBehind` Warning.
pub fn left_behind_note(left: &[String], why: &str, timeout: Duration) -> String {
    format!(
        "gave up deleting queues after the queue deletion timeout ({}s) and removed the finalizer {}; left on \
         the broker with their messages: {} (last: {why}). Delete them by hand (rabbitmqctl delete_queue NAME)",
        timeout.as_secs(),
        finalizer::QUEUES,
        if left.is_empty() {
            "none known".to_owned()
        } else {
            left.join(", ")
        }
    )
}

/// The `QueuesDeleted` False condition of a retry, naming when the finalizer is removed regardless.
pub fn condition(reason: &str, message: &str, deadline: &Time, generation: Option<i64>) -> Condition {
    Condition {
        type_: condition::QUEUES_DELETED.into(),
        status: "False".into(),
        reason: reason.into(),
        message: format!(
            "{message}. Retrying; at {} the finalizer {} is removed regardless and the queues left are named in a \
             Warning Event",
            deadline.0,
            finalizer::QUEUES
        ),
        observed_generation: generation,
        // Replaced by `status::merge_conditions`.
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// How long before the next attempt: the retry interval doubled per consecutive attempt up to the maximum
/// backoff, never past the deadline (`remaining`), at least half a second.
pub fn retry_in(attempt: u32, retry: Duration, max_backoff: Duration, remaining: Duration) -> Duration {
    retry
        .checked_mul(1u32 << attempt.clamp(1, 11).saturating_sub(1))
        .unwrap_or(max_backoff)
        .min(max_backoff)
        .min(remaining)
        .max(Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> IntegrationSpec {
        serde_json::from_value(json).expect("a valid spec")
    }

    fn orders() -> IntegrationSpec {
        spec(serde_json::json!({
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "orders"},
            "destination": {"url": "https://erp.example.com/hooks"},
            "delivery": {"backoff": {"initial": "1s", "max": "1s"}},
        }))
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_finalizer_follows_the_policy() {
        let none: Vec<String> = Vec::new();
        let ours = names(&["other.io/x", finalizer::QUEUES]);
        assert_eq!(
            finalizer_change(DeletionPolicy::Delete, &none),
            Some(FinalizerChange::Add)
        );
        assert_eq!(finalizer_change(DeletionPolicy::Delete, &ours), None);
        assert_eq!(finalizer_change(DeletionPolicy::Retain, &none), None);
        assert_eq!(
            finalizer_change(DeletionPolicy::Retain, &ours),
            Some(FinalizerChange::Remove)
        );
        // Others' finalizers are kept, in order.
        assert_eq!(
            with_change(&ours, FinalizerChange::Remove),
            names(&["other.io/x"])
        );
        assert_eq!(with_change(&names(&["other.io/x"]), FinalizerChange::Add), ours);
    }

    #[test]
    fn the_default_policy_is_retain() {
        assert_eq!(orders().source.deletion_policy, DeletionPolicy::Retain);
    }

    #[test]
    fn declared_queues_are_the_workers_topology() {
        // backoff.max 1s: the ladder 100ms … 1s, 4 rungs per doubling.
        let q = declared_queues(&orders());
        let ladder: Vec<String> = hookfleet_crds::contract::queues::delay_ttls(Duration::from_secs(1))
            .into_iter()
            .map(|t| format!("orders.delay.{}ms", t.as_millis()))
            .collect();
        let mut want = names(&["orders", "orders.dead", "orders.retries"]);
        want.extend(ladder);
        assert_eq!(q, want);
        assert_eq!(q.last().map(String::as_str), Some("orders.delay.1000ms"));
        // A dead-letter queue of its own name; a Webhooks fleet also has its reports queue.
        let mut s = orders();
        s.delivery.dead_letter =
            Some(serde_json::from_value(serde_json::json!({"queue": "all.dead"})).unwrap());
        assert_eq!(declared_queues(&s)[1], "all.dead");
        let fleet = spec(serde_json::json!({
            "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "events"},
            "webhooks": {},
        }));
        assert!(declared_queues(&fleet).contains(&"events.webhook-reports".to_owned()));
        assert!(
            !declared_queues(&orders())
                .iter()
                .any(|q| q.ends_with("webhook-reports"))
        );
    }

    #[test]
    fn a_queue_another_integration_declares_is_kept() {
        let ours = names(&["orders", "all.dead", "orders.retries"]);
        let others = vec![
            ("b/refunds".to_owned(), names(&["refunds", "all.dead"])),
            ("a/audit".to_owned(), names(&["all.dead"])),
            ("c/x".to_owned(), names(&["x"])),
        ];
        let s = shared(&ours, &others);
        assert_eq!(s.len(), 1);
        assert_eq!(s["all.dead"], "a/audit", "the first by name");
        let note = shared_note(&s).unwrap();
        assert!(
            note.contains("all.dead (also declared by Integration a/audit)"),
            "{note}"
        );
        assert!(shared_note(&BTreeMap::new()).is_none());
    }

    #[test]
    fn verdicts() {
        let queues = names(&["q", "q.dead"]);
        let none = BTreeSet::new();
        let all_gone = Attempt::Queues(vec![
            ("q".into(), QueueFate::Deleted { messages: 7 }),
            ("q.dead".into(), QueueFate::Absent),
        ]);
        assert_eq!(verdict(&all_gone, &queues, &none, false), Verdict::Done);
        assert_eq!(verdict(&all_gone, &queues, &none, true), Verdict::Done);
        let waiting = Attempt::WaitingForWorkers { pods: 2 };
        assert!(matches!(
            verdict(&waiting, &queues, &none, false),
            Verdict::Retry {
                reason: reason::WAITING_FOR_WORKERS,
                ..
            }
        ));
        let blocked = Attempt::Blocked {
            reason: reason::BROKER_UNREACHABLE,
            message: "cannot reach the broker: connection refused".into(),
        };
        match verdict(&blocked, &queues, &none, false) {
            Verdict::Retry { reason, message } => {
                assert_eq!(reason, reason::BROKER_UNREACHABLE);
                assert!(message.contains("connection refused"));
            }
            v => panic!("{v:?}"),
        }
        // At the deadline: the queues not known gone are left behind.
        let earlier: BTreeSet<String> = ["q".to_owned()].into();
        assert_eq!(
            verdict(&blocked, &queues, &earlier, true),
            Verdict::GiveUp {
                left: names(&["q.dead"]),
                why: "BrokerUnreachable: cannot reach the broker: connection refused".into()
            }
        );
        let in_use = Attempt::Queues(vec![
            ("q".into(), QueueFate::Deleted { messages: 0 }),
            ("q.dead".into(), QueueFate::InUse { consumers: 1 }),
        ]);
        assert!(matches!(
            verdict(&in_use, &queues, &none, false),
            Verdict::Retry {
                reason: reason::QUEUES_IN_USE,
                ..
            }
        ));
        assert!(matches!(
            verdict(&in_use, &queues, &none, true),
            Verdict::GiveUp { left, .. } if left == names(&["q.dead"])
        ));
        let refused = Attempt::Queues(vec![("q".into(), QueueFate::Refused("ACCESS_REFUSED".into()))]);
        assert!(matches!(
            verdict(&refused, &queues, &none, false),
            Verdict::Retry {
                reason: reason::QUEUE_DELETE_REFUSED,
                ..
            }
        ));
        assert_eq!(gone(&all_gone), names(&["q", "q.dead"]));
        assert!(gone(&waiting).is_empty());
    }

    #[test]
    fn the_event_counts_the_messages_of_each_queue() {
        let a = Attempt::Queues(vec![
            ("q".into(), QueueFate::Deleted { messages: 7 }),
            ("q.dead".into(), QueueFate::Deleted { messages: 2 }),
            ("q.retries".into(), QueueFate::Deleted { messages: 0 }),
            ("q.delay.100ms".into(), QueueFate::Absent),
        ]);
        assert_eq!(
            deleted_note(&deleted(&a)).unwrap(),
            "deleted 3 queues with 9 messages in them: q (7), q.dead (2); 1 queue empty"
        );
        assert!(deleted(&Attempt::Queues(vec![("q".into(), QueueFate::Absent)])).is_empty());
        assert!(deleted(&Attempt::WaitingForWorkers { pods: 1 }).is_empty());
        assert!(deleted_note(&[]).is_none());
        assert_eq!(
            deleted_note(&[("q".into(), 1)]).unwrap(),
            "deleted 1 queue with 1 message in them: q (1)"
        );
        let left = left_behind_note(
            &names(&["q", "q.dead"]),
            "BrokerUnreachable: x",
            Duration::from_secs(300),
        );
        assert!(
            left.contains("(300s)") && left.contains("q, q.dead") && left.contains(finalizer::QUEUES),
            "{left}"
        );
    }

    #[test]
    fn retries_back_off_but_never_past_the_deadline() {
        let s = Duration::from_secs;
        assert_eq!(retry_in(1, s(15), s(300), s(300)), s(15));
        assert_eq!(retry_in(3, s(15), s(300), s(300)), s(60));
        assert_eq!(retry_in(30, s(15), s(300), s(1000)), s(300));
        assert_eq!(retry_in(3, s(15), s(300), s(20)), s(20));
        assert_eq!(
            retry_in(3, s(15), s(300), Duration::ZERO),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn the_condition_names_the_deadline() {
        let deadline = Time("2026-12-06T21:00:00Z".parse().unwrap());
        let c = condition(
            reason::BROKER_UNREACHABLE,
            "cannot reach the broker",
            &deadline,
            Some(3),
        );
        assert_eq!((c.type_.as_str(), c.status.as_str()), ("QueuesDeleted", "False"));
        assert!(c.message.contains("2026-12-06T21:00:00Z"), "{}", c.message);
        assert_eq!(c.observed_generation, Some(3));
    }
}
