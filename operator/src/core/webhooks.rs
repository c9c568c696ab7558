//! Webhooks, decided: the snapshot a fleet delivers from ([`compile`]), the aggregate of what its workers
//! reported ([`Agg`]), and each Webhook's status from both ([`status`], [`counts`]). Pure: the Secrets'
//! values, the reports and the clock are parameters.

use std::collections::BTreeMap;

use hookfleet_crds::contract::WorkerSetup;
use hookfleet_crds::contract::webhooks::{Entry, FailureNote, Snapshot, Tally, secret_key};
use hookfleet_crds::integration::{SecretKeyRef, WebhookCounts};
use hookfleet_crds::webhook::{WebhookFailure, reason};
use hookfleet_crds::{Webhook, WebhookStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types of a Webhook.
pub const READY: &str = "Ready";
pub const PAUSED: &str = "Paused";
/// Reason of `Paused=False`.
pub const ACTIVE: &str = "Active";

/// The largest encoded snapshot the operator writes: a Secret holds at most 1 MiB, and the object's
/// metadata needs some of it.
pub const SNAPSHOT_MAX_BYTES: usize = 900 * 1024;

/// Why a Webhook is in its fleet's snapshot or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Included,
    /// `field: reason; …` ([`hookfleet_crds::validate_webhook`]).
    Invalid(String),
    /// Which Secret (and key) is missing; never a value.
    SecretMissing(String),
}

/// What the compile decided of one Webhook, at the generation it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub generation: i64,
    pub verdict: Verdict,
}

/// A fleet's snapshot and, per Webhook name, what became of it.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub snapshot: Snapshot,
    pub decided: BTreeMap<String, Decided>,
}

/// Every Secret key a Webhook's destination references (the contract's list: what the worker reads).
pub fn secret_refs(webhook: &Webhook, allow_private: bool) -> Vec<SecretKeyRef> {
    WorkerSetup::for_webhook(&webhook.spec.destination, allow_private)
        .secret_refs()
        .cloned()
        .collect()
}

/// The value of a Secret key, as read: `Ok(None)` when the Secret does not exist, `Ok(Some(None))` when
/// it lacks the key.
pub type Lookup<'a> = dyn Fn(&SecretKeyRef) -> Option<Option<String>> + 'a;

/// The snapshot of `webhooks` (those naming the fleet, any order): sorted by name, each checked with
/// `validate_webhook` (private networks as the Integration allows) and its Secret keys looked up with
/// `lookup`; a refused Webhook or one whose Secret is missing is left out, and [`Compiled::decided`] says why.
pub fn compile<'a>(
    webhooks: impl IntoIterator<Item = &'a Webhook>,
    allow_private: bool,
    lookup: &Lookup<'_>,
) -> Compiled {
    let mut sorted: Vec<&Webhook> = webhooks.into_iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = Compiled::default();
    for w in sorted {
        let name = w.metadata.name.clone().unwrap_or_default();
        let generation = w.metadata.generation.unwrap_or_default();
        let verdict = match hookfleet_crds::validate_webhook(&w.spec, allow_private) {
            Err(refused) => Verdict::Invalid(
                refused
                    .iter()
                    .map(|i| format!("{}: {}", i.field, i.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Ok(()) => {
                let mut secrets = BTreeMap::new();
                let mut missing = None;
                for r in secret_refs(w, allow_private) {
                    match lookup(&r) {
                        Some(Some(v)) => {
                            secrets.insert(secret_key(&r), v);
                        }
                        Some(None) => {
                            missing = Some(format!("Secret {:?} has no key {:?}", r.name, r.key));
                            break;
                        }
                        None => {
                            missing = Some(format!("Secret {:?} not found", r.name));
                            break;
                        }
                    }
                }
                match missing {
                    Some(m) => Verdict::SecretMissing(m),
                    None => {
                        out.snapshot.webhooks.push(Entry {
                            name: name.clone(),
                            generation,
                            events: w.spec.events.clone(),
                            match_headers: w.spec.match_headers.clone(),
                            paused: w.spec.paused,
                            destination: w.spec.destination.clone(),
                            secrets,
                        });
                        Verdict::Included
                    }
                }
            }
        };
        out.decided.insert(name, Decided { generation, verdict });
    }
    out
}

/// What the workers reported of one Webhook since this operator started: counts are sums of the
/// reports' deltas; the last success and failure are the latest reported; the consecutive failures are
/// the sum of each worker's trailing count, a worker's count being reset by a success any worker
/// reported after that worker's report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Agg {
    pub delivered: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub last_success_ms: Option<i64>,
    pub last_failure: Option<FailureNote>,
    /// The highest generation a worker delivered with.
    pub generation: i64,
    /// Worker → (its trailing failures, when it reported them).
    trailing: BTreeMap<String, (u64, i64)>,
}

impl Agg {
    /// Adds one worker's tally, reported at `at_ms`.
    pub fn fold(&mut self, worker: &str, at_ms: i64, t: &Tally) {
        self.delivered = self.delivered.saturating_add(t.delivered);
        self.failed = self.failed.saturating_add(t.failed);
        self.dead_lettered = self.dead_lettered.saturating_add(t.dead_lettered);
        self.generation = self.generation.max(t.generation);
        if let Some(s) = t.last_success_ms {
            self.last_success_ms = Some(self.last_success_ms.map_or(s, |l| l.max(s)));
            // The other workers' failures reported before this success are behind it.
            for (w, (n, at)) in self.trailing.iter_mut() {
                if w != worker && *at <= s {
                    *n = 0;
                }
            }
        }
        if let Some(f) = &t.last_failure
            && self.last_failure.as_ref().is_none_or(|l| l.at_ms <= f.at_ms)
        {
            self.last_failure = Some(f.clone());
        }
        let keep = t.consecutive_failures > 0 || self.trailing.contains_key(worker);
        if keep {
            self.trailing
                .insert(worker.to_owned(), (t.consecutive_failures, at_ms));
        }
        self.trailing.retain(|_, (n, _)| *n > 0);
    }

    /// Failed attempts since the last success, over every worker.
    pub fn consecutive_failures(&self) -> u64 {
        self.trailing.values().map(|(n, _)| *n).sum()
    }
}

/// What a Webhook's status counts start from: its status when this operator first saw it (so a restart
/// of the operator continues the counts instead of starting them again).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Base {
    pub delivered: i64,
    pub failed: i64,
    pub dead_lettered: i64,
    pub consecutive_failures: i64,
    pub last_success: Option<Time>,
    pub last_failure: Option<WebhookFailure>,
}

impl Base {
    pub fn of(status: Option<&WebhookStatus>) -> Self {
        let Some(s) = status else {
            return Base::default();
        };
        Base {
            delivered: s.delivered,
            failed: s.failed,
            dead_lettered: s.dead_lettered,
            consecutive_failures: s.consecutive_failures,
            last_success: s.last_success_time.clone(),
            last_failure: s.last_failure.clone(),
        }
    }
}

/// Where the Webhook stands with its fleet: no fleet (no Integration of that name with `spec.webhooks`),
/// or what its fleet's last compile decided (None: not compiled yet).
#[derive(Clone, Copy, Debug)]
pub enum Fleet<'a> {
    Missing,
    Compiled(Option<&'a Decided>),
}

/// The host of `url`, without userinfo or port; None when it has none.
pub fn host(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        format!("[{}]", v6.split(']').next().unwrap_or_default())
    } else {
        hostport.split(':').next().unwrap_or_default().to_owned()
    };
    (!host.is_empty()).then_some(host)
}

fn ms_time(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

fn cond(type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// The Ready condition's (status, reason, message), or None while the fleet has not compiled the
/// Webhook yet (nothing to say).
pub fn ready(webhook: &Webhook, fleet: Fleet<'_>, failing: bool) -> Option<(bool, &'static str, String)> {
    let d = match fleet {
        Fleet::Missing => {
            return Some((
                false,
                reason::NO_INTEGRATION,
                format!(
                    "no Integration {:?} with spec.webhooks in this namespace: nothing delivers this Webhook",
                    webhook.spec.integration
                ),
            ));
        }
        Fleet::Compiled(None) => return None,
        Fleet::Compiled(Some(d)) => d,
    };
    Some(match &d.verdict {
        Verdict::Invalid(m) => (
            false,
            reason::INVALID_SPEC,
            format!("{m}. The fleet does not deliver this Webhook until the field is fixed"),
        ),
        Verdict::SecretMissing(m) => (
            false,
            reason::SECRET_MISSING,
            format!("{m}. The fleet does not deliver this Webhook until it exists"),
        ),
        Verdict::Included if webhook.spec.paused => (
            false,
            reason::PAUSED,
            "spec.paused is true: its messages are kept and delivered after it resumes".into(),
        ),
        Verdict::Included if failing => (
            false,
            reason::FAILING,
            "its last delivery attempt failed (status.lastFailure); it is retried with backoff".into(),
        ),
        Verdict::Included => (
            true,
            reason::DELIVERING,
            "in the fleet's configuration; no failure since the last delivery".into(),
        ),
    })
}

/// The status of `webhook`: conditions from where it stands ([`ready`]) merged over `old`'s (a
/// condition that did not flip keeps its `lastTransitionTime`), counts from `base` plus `agg`. None while
/// its fleet has not compiled it yet.
pub fn status(
    webhook: &Webhook,
    fleet: Fleet<'_>,
    base: &Base,
    agg: Option<&Agg>,
    old: &WebhookStatus,
    now: &Time,
) -> Option<WebhookStatus> {
    let consecutive = match agg {
        Some(a) => i64::try_from(a.consecutive_failures()).unwrap_or(i64::MAX),
        None => base.consecutive_failures,
    };
    let (ok, why, message) = ready(webhook, fleet, consecutive > 0)?;
    let generation = match fleet {
        Fleet::Compiled(Some(d)) => Some(d.generation),
        _ => webhook.metadata.generation,
    };
    let paused = webhook.spec.paused;
    let conditions = vec![
        cond(READY, ok, why, message, generation),
        cond(
            PAUSED,
            paused,
            if paused { reason::PAUSED } else { ACTIVE },
            if paused {
                "spec.paused is true".into()
            } else {
                "delivering when events match".into()
            },
            generation,
        ),
    ];
    let conditions = super::status::merge_conditions(&old.conditions, conditions, now);
    let add = |b: i64, d: Option<u64>| b.saturating_add(i64::try_from(d.unwrap_or(0)).unwrap_or(i64::MAX));
    let reported_success = agg.and_then(|a| a.last_success_ms).and_then(ms_time);
    let last_success_time = match (base.last_success.clone(), reported_success) {
        (Some(b), Some(r)) => Some(if r.0 > b.0 { r } else { b }),
        (b, r) => r.or(b),
    };
    let reported_failure = agg.and_then(|a| a.last_failure.as_ref()).and_then(|f| {
        Some(WebhookFailure {
            time: ms_time(f.at_ms)?,
            status: f.status,
            kind: f.kind.clone(),
            excerpt: f.excerpt.clone(),
        })
    });
    let last_failure = match (base.last_failure.clone(), reported_failure) {
        (Some(b), Some(r)) => Some(if r.time.0 >= b.time.0 { r } else { b }),
        (b, r) => r.or(b),
    };
    Some(WebhookStatus {
        observed_generation: generation,
        conditions,
        destination_host: host(&webhook.spec.destination.url),
        last_success_time,
        last_failure,
        consecutive_failures: consecutive,
        delivered: add(base.delivered, agg.map(|a| a.delivered)),
        failed: add(base.failed, agg.map(|a| a.failed)),
        dead_lettered: add(base.dead_lettered, agg.map(|a| a.dead_lettered)),
    })
}

/// Whether `new` differs from `old` in what someone acts on (a condition's status, reason or message,
/// the generation, the host), rather than only in counts and timestamps.
pub fn state_changed(old: &WebhookStatus, new: &WebhookStatus) -> bool {
    let key = |s: &WebhookStatus| {
        s.conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    key(old) != key(new)
        || old.observed_generation != new.observed_generation
        || old.destination_host != new.destination_host
}

/// When a Webhook's status may be written: a changed state at most once per `state_every`, a change of
/// counts or timestamps alone at most once per `counts_every`; nothing when nothing changed.
pub fn may_write(
    old: &WebhookStatus,
    new: &WebhookStatus,
    since_last_write: Option<std::time::Duration>,
    state_every: std::time::Duration,
    counts_every: std::time::Duration,
) -> bool {
    if old == new {
        return false;
    }
    let every = if state_changed(old, new) {
        state_every
    } else {
        counts_every
    };
    since_last_write.is_none_or(|s| s >= every)
}

/// The Webhooks of a fleet by state, from their statuses as they would be written.
pub fn counts<'a>(statuses: impl IntoIterator<Item = &'a WebhookStatus>) -> WebhookCounts {
    let mut c = WebhookCounts::default();
    for s in statuses {
        c.total += 1;
        match s.conditions.iter().find(|c| c.type_ == READY) {
            Some(r) if r.status == "True" => c.ready += 1,
            Some(r) if r.reason == reason::PAUSED => c.paused += 1,
            Some(r) if r.reason == reason::FAILING => c.failing += 1,
            Some(r) if r.reason == reason::INVALID_SPEC => c.invalid += 1,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn webhook(name: &str, spec: serde_json::Value) -> Webhook {
        let mut w: Webhook = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Webhook",
            "metadata": {"name": name, "namespace": "ns", "generation": 2},
            "spec": spec,
        }))
        .unwrap();
        w.metadata.uid = Some(format!("uid-{name}"));
        w
    }

    fn fine(name: &str) -> Webhook {
        webhook(
            name,
            serde_json::json!({"integration": "fleet", "events": ["temp"],
                "destination": {"url": "https://u:p@acme.example:8443/h",
                    "signing": {"secretRef": {"name": "acme", "key": "k"}}}}),
        )
    }

    #[test]
    fn the_snapshot_holds_valid_webhooks_sorted_with_their_own_secrets() {
        let bad = webhook(
            "bad",
            serde_json::json!({"integration": "fleet", "events": ["a"],
                "destination": {"url": "https://h.example/", "headers": {"X": "a\r\nB: c"}}}),
        );
        let lost = webhook(
            "lost",
            serde_json::json!({"integration": "fleet", "events": ["a"],
                "destination": {"url": "https://h.example/", "signing": {"secretRef": {"name": "gone", "key": "k"}}}}),
        );
        let (z, a) = (fine("zeta"), fine("alpha"));
        let lookup = |r: &SecretKeyRef| match r.name.as_str() {
            "acme" => Some(Some(format!("v-{}", r.key))),
            _ => None,
        };
        let c = compile([&z, &bad, &lost, &a], false, &lookup);
        let names: Vec<_> = c.snapshot.webhooks.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(c.snapshot.webhooks[0].secrets["acme/k"], "v-k");
        assert_eq!(c.snapshot.webhooks[0].generation, 2);
        assert!(
            matches!(&c.decided["bad"].verdict, Verdict::Invalid(m) if m.starts_with("spec.destination.headers")),
            "{:?}",
            c.decided["bad"]
        );
        assert_eq!(
            c.decided["lost"].verdict,
            Verdict::SecretMissing("Secret \"gone\" not found".into())
        );
        let no_key = |_: &SecretKeyRef| Some(None);
        let c = compile([&a], false, &no_key);
        assert!(c.snapshot.webhooks.is_empty());
        assert!(
            matches!(&c.decided["alpha"].verdict, Verdict::SecretMissing(m) if m.contains("no key \"k\""))
        );
    }

    fn tally(
        delivered: u64,
        failed: u64,
        success: Option<i64>,
        fail_at: Option<i64>,
        trailing: u64,
    ) -> Tally {
        Tally {
            generation: 2,
            delivered,
            failed,
            dead_lettered: 0,
            last_success_ms: success,
            last_failure: fail_at.map(|at| FailureNote {
                at_ms: at,
                status: Some(503),
                kind: "http_status".into(),
                excerpt: Some("down".into()),
            }),
            consecutive_failures: trailing,
        }
    }

    #[test]
    fn reports_fold_into_sums_latest_times_and_trailing_failures() {
        let mut a = Agg::default();
        a.fold("w1", 1_000, &tally(5, 2, Some(900), Some(950), 2));
        a.fold("w2", 1_100, &tally(1, 3, None, Some(1_050), 3));
        assert_eq!((a.delivered, a.failed), (6, 5));
        assert_eq!(a.consecutive_failures(), 5);
        assert_eq!(a.last_failure.as_ref().unwrap().at_ms, 1_050);
        // A success at w2 after both reports resets w1's trailing count too.
        a.fold("w2", 1_300, &tally(1, 0, Some(1_200), None, 0));
        assert_eq!(a.consecutive_failures(), 0);
        assert_eq!(a.last_success_ms, Some(1_200));
        assert_eq!(a.last_failure.as_ref().unwrap().at_ms, 1_050, "kept");
        // A failure after it counts again; an older failure note does not replace a newer one.
        a.fold("w1", 1_400, &tally(0, 1, None, Some(1_000), 1));
        assert_eq!(a.consecutive_failures(), 1);
        assert_eq!(a.last_failure.as_ref().unwrap().at_ms, 1_050);
    }

    #[test]
    fn status_from_the_fleet_and_the_reports() {
        let w = fine("acme");
        let now = Time(Timestamp::from_second(1_000_000).unwrap());
        let included = Decided {
            generation: 2,
            verdict: Verdict::Included,
        };
        let none = WebhookStatus::default();
        assert_eq!(
            status(&w, Fleet::Compiled(None), &Base::default(), None, &none, &now),
            None
        );
        let s = status(&w, Fleet::Missing, &Base::default(), None, &none, &now).unwrap();
        assert_eq!(s.conditions[0].reason, reason::NO_INTEGRATION);
        let s = status(
            &w,
            Fleet::Compiled(Some(&included)),
            &Base::default(),
            None,
            &none,
            &now,
        )
        .unwrap();
        assert_eq!(
            (s.conditions[0].status.as_str(), s.conditions[0].reason.as_str()),
            ("True", reason::DELIVERING)
        );
        assert_eq!(
            s.destination_host.as_deref(),
            Some("acme.example"),
            "no userinfo, no port"
        );
        assert_eq!(s.observed_generation, Some(2));
        let mut a = Agg::default();
        a.fold("w1", 2_000, &tally(3, 2, Some(1_000), Some(1_500), 2));
        let base = Base {
            delivered: 10,
            ..Base::default()
        };
        let f = status(&w, Fleet::Compiled(Some(&included)), &base, Some(&a), &s, &now).unwrap();
        assert_eq!((f.delivered, f.failed, f.consecutive_failures), (13, 2, 2));
        assert_eq!(f.conditions[0].reason, reason::FAILING);
        assert_eq!(f.last_failure.as_ref().unwrap().status, Some(503));
        assert!(state_changed(&s, &f));
        let every = (Duration::from_secs(10), Duration::from_secs(60));
        assert!(may_write(&s, &f, None, every.0, every.1));
        assert!(!may_write(&s, &f, Some(Duration::from_secs(9)), every.0, every.1));
        assert!(may_write(&s, &f, Some(Duration::from_secs(10)), every.0, every.1));
        let mut more = f.clone();
        more.delivered += 1;
        assert!(!state_changed(&f, &more));
        assert!(!may_write(
            &f,
            &more,
            Some(Duration::from_secs(30)),
            every.0,
            every.1
        ));
        assert!(may_write(
            &f,
            &more,
            Some(Duration::from_secs(60)),
            every.0,
            every.1
        ));
        assert!(!may_write(&f, &f.clone(), None, every.0, every.1));
        let c = counts([&s, &f]);
        assert_eq!((c.total, c.ready, c.failing), (2, 1, 1));
    }

    #[test]
    fn hosts_without_userinfo_or_port() {
        assert_eq!(host("https://u:p@h.example:1/x@y").as_deref(), Some("h.example"));
        assert_eq!(host("http://[::1]:8080/").as_deref(), Some("[::1]"));
        assert_eq!(host("nope"), None);
    }
}
