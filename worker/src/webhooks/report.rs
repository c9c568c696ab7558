//! What this worker saw of each Webhook since its last report: deltas the operator adds up into the
//! Webhook's status ([`Report`]). Recorded per copy by the fan-out; taken every few seconds by the
//! report loop, merged back when the publish failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use hookfleet_crds::contract::webhooks::{FailureNote, Report, Tally};

/// The tallies since the last report, and each Webhook's consecutive failures at this worker.
#[derive(Default)]
pub struct Tallies {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pending: BTreeMap<String, Tally>,
    consecutive: HashMap<String, u64>,
}

/// What became of one copy, for its Webhook's tally.
pub enum Seen {
    Delivered,
    /// An attempt failed (`dead`: and the copy went to the dead letters).
    Failed {
        note: FailureNote,
        dead: bool,
    },
    /// Dead-lettered without an attempt (its Webhook is gone, or the message never renders).
    DeadLettered,
}

impl Tallies {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record(&self, webhook: &str, generation: i64, at_ms: i64, seen: Seen) {
        let mut inner = self.lock();
        let Inner { pending, consecutive } = &mut *inner;
        let t = pending.entry(webhook.to_owned()).or_default();
        t.generation = generation;
        let c = consecutive.entry(webhook.to_owned()).or_default();
        match seen {
            Seen::Delivered => {
                t.delivered += 1;
                t.last_success_ms = Some(at_ms);
                *c = 0;
            }
            Seen::Failed { note, dead } => {
                t.failed += 1;
                t.dead_lettered += u64::from(dead);
                t.last_failure = Some(note);
                *c += 1;
            }
            Seen::DeadLettered => t.dead_lettered += 1,
        }
        t.consecutive_failures = *c;
    }

    /// Each Webhook's failed attempts in a row at this worker (Webhooks that never failed: absent).
    pub fn consecutive(&self) -> HashMap<String, u64> {
        let inner = self.lock();
        inner
            .consecutive
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    /// The report of everything since the last one (`None` when nothing happened), emptied.
    pub fn take(&self, worker: &str, at_ms: i64) -> Option<Report> {
        let mut inner = self.lock();
        if inner.pending.is_empty() {
            return None;
        }
        Some(Report {
            worker: worker.to_owned(),
            at_ms,
            webhooks: std::mem::take(&mut inner.pending),
        })
    }

    /// A report that was not published: its deltas go back, under what came since (newer last
    /// success, failure, consecutive count and generation win).
    pub fn merge_back(&self, report: Report) {
        let mut inner = self.lock();
        for (name, old) in report.webhooks {
            match inner.pending.get_mut(&name) {
                None => {
                    inner.pending.insert(name, old);
                }
                Some(new) => {
                    new.delivered += old.delivered;
                    new.failed += old.failed;
                    new.dead_lettered += old.dead_lettered;
                    new.last_success_ms = new.last_success_ms.or(old.last_success_ms);
                    new.last_failure = new.last_failure.take().or(old.last_failure);
                }
            }
        }
    }
}

/// The worker's name in its reports: `HOSTNAME` (the pod's name), else `POD_NAME`, else `worker`.
pub fn worker_name(env: &dyn Fn(&str) -> Option<String>) -> String {
    env("HOSTNAME")
        .or_else(|| env("POD_NAME"))
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(at: i64, status: u16) -> FailureNote {
        FailureNote {
            at_ms: at,
            status: Some(status),
            kind: "http_status".into(),
            excerpt: None,
        }
    }

    #[test]
    fn deltas_since_the_last_report_and_consecutive_failures() {
        let t = Tallies::default();
        assert!(t.take("w", 1).is_none());
        t.record("a", 3, 10, Seen::Delivered);
        t.record(
            "b",
            1,
            11,
            Seen::Failed {
                note: note(11, 503),
                dead: false,
            },
        );
        t.record(
            "b",
            1,
            12,
            Seen::Failed {
                note: note(12, 500),
                dead: true,
            },
        );
        let r = t.take("w", 20).unwrap();
        assert_eq!(r.worker, "w");
        let a = &r.webhooks["a"];
        assert_eq!((a.generation, a.delivered, a.last_success_ms), (3, 1, Some(10)));
        let b = &r.webhooks["b"];
        assert_eq!((b.failed, b.dead_lettered, b.consecutive_failures), (2, 1, 2));
        assert_eq!(b.last_failure.as_ref().unwrap().status, Some(500));
        assert!(t.take("w", 21).is_none(), "deltas: emptied");
        // Consecutive failures carry over reports until a success.
        t.record(
            "b",
            1,
            30,
            Seen::Failed {
                note: note(30, 503),
                dead: false,
            },
        );
        // A report not published comes back, merged under the newer.
        t.merge_back(r);
        let r = t.take("w", 40).unwrap();
        let b = &r.webhooks["b"];
        assert_eq!((b.failed, b.dead_lettered, b.consecutive_failures), (3, 1, 3));
        assert_eq!(b.last_failure.as_ref().unwrap().at_ms, 30);
        assert_eq!(r.webhooks["a"].delivered, 1);
        t.record("b", 1, 50, Seen::Delivered);
        assert_eq!(t.take("w", 60).unwrap().webhooks["b"].consecutive_failures, 0);
    }

    #[test]
    fn worker_name_from_the_pod() {
        let env = |k: &str| (k == "POD_NAME").then(|| "w-1".to_owned());
        assert_eq!(worker_name(&env), "w-1");
        assert_eq!(worker_name(&|_| None), "worker");
    }
}
