//! Webhooks, decided: the snapshot a fleet delivers from ([`compile`]), the aggregate of what its workers
//! reported ([`Agg`]), and each Webhook's status from both ([`status`], [`counts`]). Pure: the Secrets'
//! values, the reports and the clock are parameters.

use std::collections::BTreeMap;

use hookfleet_crds::contract::WorkerSetup;
use hookfleet_crds::contract::webhooks::{Entry, FailureNote, Snapshot, Tally, secret_key};
use hookfleet_crds::integration::{SecretKeyRef, WebhookCounts};
use hookfleet_crds::webhook::{
    AutoPauseSpec, AutoPaused, RESUME_ANNOTATION, WebhookFailure, WebhookLimits, reason,
};
use hookfleet_crds::{Webhook, WebhookStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

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

/// Why the operator keeps `webhook` paused (its status, as last written), if it does.
pub fn auto_paused(webhook: &Webhook) -> Option<&AutoPaused> {
    webhook.status.as_ref()?.auto_paused.as_ref()
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
///
/// Each entry carries the Webhook's effective in-flight cap and rate limit (its own `limits`, else the
/// Integration's `perWebhook`), and is `paused` while the Webhook is paused by its spec or by the
/// operator (`status.autoPaused`): its copies then wait on its retry path.
pub fn compile<'a>(
    webhooks: impl IntoIterator<Item = &'a Webhook>,
    allow_private: bool,
    per_webhook: Option<&WebhookLimits>,
    lookup: &Lookup<'_>,
) -> Compiled {
    let mut sorted: Vec<&Webhook> = webhooks.into_iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = Compiled::default();
    for w in sorted {
        let name = w.metadata.name.clone().unwrap_or_default();
        let generation = w.metadata.generation.unwrap_or_default();
        let verdict = match hookfleet_crds::validate_webhook(&w.spec, allow_private, per_webhook) {
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
                        let limits = WebhookLimits::effective(per_webhook, w.spec.limits.as_ref());
                        out.snapshot.webhooks.push(Entry {
                            name: name.clone(),
                            generation,
                            events: w.spec.events.clone(),
                            match_headers: w.spec.match_headers.clone(),
                            paused: w.spec.paused || auto_paused(w).is_some(),
                            destination: w.spec.destination.clone(),
                            secrets,
                            max_in_flight: limits.max_in_flight,
                            rate_limit: limits.rate_limit,
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
    /// When the current run of failures (no success since) began, as first reported: the first failure
    /// note of the report that started it (so a run's span may be short by up to one report interval).
    pub run_started_ms: Option<i64>,
    /// The latest failure of kind `gone` (a 410) reported, even when a later failure of another kind
    /// became `last_failure`.
    pub last_gone_ms: Option<i64>,
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
            && f.kind == GONE_KIND
        {
            self.last_gone_ms = Some(self.last_gone_ms.map_or(f.at_ms, |g| g.max(f.at_ms)));
        }
        if let Some(f) = &t.last_failure
            && self.last_failure.as_ref().is_none_or(|l| l.at_ms <= f.at_ms)
        {
            self.last_failure = Some(f.clone());
        }
        let was_failing = self.consecutive_failures() > 0;
        let keep = t.consecutive_failures > 0 || self.trailing.contains_key(worker);
        if keep {
            self.trailing
                .insert(worker.to_owned(), (t.consecutive_failures, at_ms));
        }
        self.trailing.retain(|_, (n, _)| *n > 0);
        if self.consecutive_failures() == 0 {
            self.run_started_ms = None;
        } else if !was_failing || self.run_started_ms.is_none() {
            self.run_started_ms = Some(t.last_failure.as_ref().map_or(at_ms, |f| f.at_ms));
        }
    }

    /// Forgets the current run of failures (the Webhook was resumed: what failed before does not
    /// count towards pausing it again).
    pub fn reset_run(&mut self) {
        self.trailing.clear();
        self.run_started_ms = None;
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
/// or what its fleet's last compile decided (None: not compiled yet), the fleet delivering or suspended
/// (`spec.suspend`: its workers at 0).
#[derive(Clone, Copy, Debug)]
pub enum Fleet<'a> {
    Missing,
    Compiled(Option<&'a Decided>),
    Suspended(Option<&'a Decided>),
}

impl<'a> Fleet<'a> {
    /// `decided` of a fleet that is `suspended` or not.
    pub fn of(decided: Option<&'a Decided>, suspended: bool) -> Self {
        if suspended {
            Fleet::Suspended(decided)
        } else {
            Fleet::Compiled(decided)
        }
    }
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

/// The operator's pause of a Webhook, as its status carries it (so it survives an operator restart).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pause {
    pub auto_paused: Option<AutoPaused>,
    pub resume_seen: Option<String>,
    pub resumed_at: Option<Time>,
}

impl Pause {
    pub fn of(status: &WebhookStatus) -> Self {
        Pause {
            auto_paused: status.auto_paused.clone(),
            resume_seen: status.resume_seen.clone(),
            resumed_at: status.resumed_at.clone(),
        }
    }
}

/// What [`pause`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseChange {
    Kept,
    Paused,
    Resumed,
}

/// The failure kind a worker reports for a 410 (the copy is kept; the Webhook is paused at once).
pub const GONE_KIND: &str = "gone";

fn ms_of(t: &Time) -> i64 {
    t.0.as_millisecond()
}

/// Whether the operator pauses `webhook` now, from its status as last written (`old`) and its fleet's
/// reports (`agg`):
/// - an auto-paused Webhook resumes when the annotation `hookfleet.io/resume` has a value other than the
///   one recorded (`resumeSeen`), or when `spec.paused` is set (the user's pause takes over; clearing it
///   then delivers);
/// - else it is paused with reason `Gone` when a failure of kind `gone` (a 410) was reported after its
///   last resume and after its last success, or with reason `Failing` when at least
///   `rule.consecutiveFailures` attempts failed in a row over at least `rule.after`.
///
/// The annotation's value is recorded whenever seen, so only a change of it resumes.
pub fn pause(
    webhook: &Webhook,
    agg: Option<&Agg>,
    rule: &AutoPauseSpec,
    old: &WebhookStatus,
    now: &Time,
) -> (Pause, PauseChange) {
    let mut p = Pause::of(old);
    let annotation = webhook.annotations().get(RESUME_ANNOTATION).cloned();
    let mut change = PauseChange::Kept;
    if p.auto_paused.is_some() {
        let asked = annotation.is_some() && annotation != p.resume_seen;
        if asked || webhook.spec.paused {
            p.auto_paused = None;
            p.resumed_at = Some(now.clone());
            change = PauseChange::Resumed;
        }
    }
    if annotation.is_some() {
        p.resume_seen = annotation;
    }
    if p.auto_paused.is_some() || change == PauseChange::Resumed || webhook.spec.paused {
        return (p, change);
    }
    let Some(a) = agg else { return (p, change) };
    let after_resume = |at: i64| p.resumed_at.as_ref().is_none_or(|r| at > ms_of(r));
    if let Some(gone_ms) = a.last_gone_ms
        && after_resume(gone_ms)
        && a.last_success_ms.is_none_or(|s| s < gone_ms)
    {
        p.auto_paused = Some(AutoPaused {
            reason: reason::GONE.into(),
            since: now.clone(),
            message: format!(
                "its endpoint answered 410 Gone at {}: paused by the operator; its messages are kept on its \
                 retry path and delivered after it resumes (annotate hookfleet.io/resume with a new value)",
                ms_time(gone_ms).map(|t| t.0.to_string()).unwrap_or_default()
            ),
        });
        return (p, PauseChange::Paused);
    }
    let n = a.consecutive_failures();
    let after = std::time::Duration::from(rule.after);
    if let (Some(start), Some(last)) = (a.run_started_ms, a.last_failure.as_ref())
        && n >= u64::from(rule.consecutive_failures)
        && after_resume(start)
        && u128::try_from(last.at_ms.saturating_sub(start)).unwrap_or(0) >= after.as_millis()
    {
        let span = std::time::Duration::from_millis(u64::try_from(last.at_ms - start).unwrap_or(0));
        p.auto_paused = Some(AutoPaused {
            reason: reason::FAILING.into(),
            since: now.clone(),
            message: format!(
                "{n} delivery attempts failed in a row over {} (autoPause: {} over {}): paused by the \
                 operator; its messages are kept on its retry path and delivered after it resumes (annotate \
                 hookfleet.io/resume with a new value)",
                hookfleet_crds::duration::render(std::time::Duration::from_secs(span.as_secs())),
                rule.consecutive_failures,
                hookfleet_crds::duration::render(after),
            ),
        });
        return (p, PauseChange::Paused);
    }
    (p, change)
}

/// The Ready condition's (status, reason, message), or None while the fleet has not compiled the
/// Webhook yet (nothing to say).
pub fn ready(
    webhook: &Webhook,
    fleet: Fleet<'_>,
    failing: bool,
    auto: Option<&AutoPaused>,
) -> Option<(bool, &'static str, String)> {
    let (d, suspended) = match fleet {
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
        Fleet::Compiled(None) | Fleet::Suspended(None) => return None,
        Fleet::Compiled(Some(d)) => (d, false),
        Fleet::Suspended(Some(d)) => (d, true),
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
        Verdict::Included if let Some(a) = auto => (
            false,
            if a.reason == reason::GONE {
                reason::GONE
            } else {
                reason::FAILING
            },
            a.message.clone(),
        ),
        // Before its own failures: nothing is attempted while the fleet is stopped.
        Verdict::Included if suspended => (
            false,
            reason::FLEET_SUSPENDED,
            format!(
                "its Integration {} is suspended (spec.suspend): no worker delivers, its messages wait in the \
                 queue until the Integration is unsuspended",
                webhook.spec.integration
            ),
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
    pause: &Pause,
    old: &WebhookStatus,
    now: &Time,
) -> Option<WebhookStatus> {
    let consecutive = match agg {
        Some(a) => i64::try_from(a.consecutive_failures()).unwrap_or(i64::MAX),
        None => base.consecutive_failures,
    };
    let auto = pause.auto_paused.as_ref();
    let (ok, why, message) = ready(webhook, fleet, consecutive > 0, auto)?;
    let generation = match fleet {
        Fleet::Compiled(Some(d)) | Fleet::Suspended(Some(d)) => Some(d.generation),
        _ => webhook.metadata.generation,
    };
    let (paused, paused_reason, paused_message) = match auto {
        _ if webhook.spec.paused => (true, reason::PAUSED, "spec.paused is true".to_owned()),
        Some(a) if a.reason == reason::GONE => (true, reason::GONE, a.message.clone()),
        Some(a) => (true, reason::FAILING, a.message.clone()),
        None => (false, ACTIVE, "delivering when events match".to_owned()),
    };
    let conditions = vec![
        cond(READY, ok, why, message, generation),
        cond(PAUSED, paused, paused_reason, paused_message, generation),
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
        auto_paused: pause.auto_paused.clone(),
        resume_seen: pause.resume_seen.clone(),
        resumed_at: pause.resumed_at.clone(),
    })
}

/// Why a Webhook is paused (its `Paused` condition's reason: `Paused`, `Failing` or `Gone`), if it is.
pub fn paused_reason(status: &WebhookStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == PAUSED && c.status == "True")
        .map(|c| c.reason.as_str())
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
        || old.auto_paused != new.auto_paused
        || old.resume_seen != new.resume_seen
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
        if paused_reason(s).is_some() {
            c.paused += 1;
            continue;
        }
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
        let c = compile([&z, &bad, &lost, &a], false, None, &lookup);
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
        let c = compile([&a], false, None, &no_key);
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
            status(
                &w,
                Fleet::Compiled(None),
                &Base::default(),
                None,
                &Pause::default(),
                &none,
                &now
            ),
            None
        );
        let s = status(
            &w,
            Fleet::Missing,
            &Base::default(),
            None,
            &Pause::default(),
            &none,
            &now,
        )
        .unwrap();
        assert_eq!(s.conditions[0].reason, reason::NO_INTEGRATION);
        let s = status(
            &w,
            Fleet::Compiled(Some(&included)),
            &Base::default(),
            None,
            &Pause::default(),
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
        let f = status(
            &w,
            Fleet::Compiled(Some(&included)),
            &base,
            Some(&a),
            &Pause::default(),
            &s,
            &now,
        )
        .unwrap();
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

        // Its fleet suspended: not Ready, whatever its own failures; a Webhook paused by its owner stays Paused.
        let held = status(
            &w,
            Fleet::of(Some(&included), true),
            &base,
            Some(&a),
            &Pause::default(),
            &f,
            &now,
        )
        .unwrap();
        let r = &held.conditions[0];
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reason::FLEET_SUSPENDED)
        );
        assert!(r.message.contains("wait in the queue"), "{}", r.message);
        assert_eq!(held.observed_generation, Some(2));
        let mut paused = w.clone();
        paused.spec.paused = true;
        let p = status(
            &paused,
            Fleet::of(Some(&included), true),
            &base,
            None,
            &Pause::default(),
            &none,
            &now,
        )
        .unwrap();
        assert_eq!(p.conditions[0].reason, reason::PAUSED);
        let c = counts([&s, &held]);
        assert_eq!((c.total, c.ready, c.failing, c.paused), (2, 1, 0, 0));
    }

    fn failing(at: i64, kind: &str) -> Tally {
        let mut t = tally(0, 1, None, Some(at), 1);
        t.last_failure.as_mut().unwrap().kind = kind.into();
        t
    }

    #[test]
    fn repeated_failures_pause_a_webhook_the_annotation_resumes_it() {
        let mut w = fine("acme");
        let included = Decided {
            generation: 2,
            verdict: Verdict::Included,
        };
        let rule = AutoPauseSpec {
            consecutive_failures: 3,
            after: Duration::from_secs(60).into(),
        };
        let at = |ms: i64| Time(Timestamp::from_millisecond(ms).unwrap());
        let none = WebhookStatus::default();
        let mut a = Agg::default();
        // Three failures within 30 s: enough in number, not in time.
        for (i, ms) in [1_000, 11_000, 31_000].into_iter().enumerate() {
            let mut t = failing(ms, "http_status");
            t.consecutive_failures = i as u64 + 1;
            a.fold("w1", ms, &t);
        }
        assert_eq!((a.consecutive_failures(), a.run_started_ms), (3, Some(1_000)));
        let (p, c) = pause(&w, Some(&a), &rule, &none, &at(40_000));
        assert_eq!((p.auto_paused, c), (None, PauseChange::Kept));
        // A fourth over 61 s: paused, reason Failing.
        let mut t = failing(62_000, "http_status");
        t.consecutive_failures = 4;
        a.fold("w1", 62_000, &t);
        let (p, c) = pause(&w, Some(&a), &rule, &none, &at(63_000));
        assert_eq!(c, PauseChange::Paused);
        let auto = p.auto_paused.clone().unwrap();
        assert_eq!(auto.reason, reason::FAILING);
        assert!(
            auto.message
                .starts_with("4 delivery attempts failed in a row over 61s"),
            "{}",
            auto.message
        );
        let s = status(
            &w,
            Fleet::Compiled(Some(&included)),
            &Base::default(),
            Some(&a),
            &p,
            &none,
            &at(63_000),
        )
        .unwrap();
        let c = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(
            (c(PAUSED).status.as_str(), c(PAUSED).reason.as_str()),
            ("True", reason::FAILING)
        );
        assert_eq!(
            (c(READY).status.as_str(), c(READY).reason.as_str()),
            ("False", reason::FAILING)
        );
        assert_eq!(paused_reason(&s), Some(reason::FAILING));
        assert_eq!(counts([&s]).paused, 1);
        // Read back (an operator restart): still paused, whatever the reports say.
        let (p2, c2) = pause(&w, None, &rule, &s, &at(70_000));
        assert_eq!((p2.auto_paused.as_ref(), c2), (Some(&auto), PauseChange::Kept));
        // And the compile pauses its entry.
        w.status = Some(s.clone());
        let lookup = |r: &SecretKeyRef| Some(Some(format!("v-{}", r.key)));
        assert!(compile([&w], false, None, &lookup).snapshot.webhooks[0].paused);
        // The annotation, set: resumed once, its value recorded.
        w.metadata.annotations = Some([(RESUME_ANNOTATION.to_owned(), "1".to_owned())].into());
        let (p3, c3) = pause(&w, Some(&a), &rule, &s, &at(80_000));
        assert_eq!(c3, PauseChange::Resumed);
        assert_eq!((p3.auto_paused, p3.resume_seen.as_deref()), (None, Some("1")));
        assert_eq!(p3.resumed_at, Some(at(80_000)));
        // Failures from before the resume do not pause it again (the writer resets the run)...
        a.reset_run();
        let resumed = WebhookStatus {
            resume_seen: Some("1".into()),
            resumed_at: Some(at(80_000)),
            ..WebhookStatus::default()
        };
        assert_eq!(
            pause(&w, Some(&a), &rule, &resumed, &at(81_000)).1,
            PauseChange::Kept
        );
        // ...and the same annotation value does not resume a later pause.
        let mut paused_again = resumed.clone();
        paused_again.auto_paused = Some(auto.clone());
        assert_eq!(
            pause(&w, None, &rule, &paused_again, &at(90_000)).1,
            PauseChange::Kept
        );
        // spec.paused takes over from the operator's pause.
        w.spec.paused = true;
        let (p4, c4) = pause(&w, None, &rule, &paused_again, &at(91_000));
        assert_eq!((p4.auto_paused, c4), (None, PauseChange::Resumed));
    }

    #[test]
    fn a_410_pauses_at_once_with_reason_gone_not_before_a_resume() {
        let w = fine("acme");
        let rule = AutoPauseSpec::default();
        let at = |ms: i64| Time(Timestamp::from_millisecond(ms).unwrap());
        let mut a = Agg::default();
        a.fold("w1", 5_000, &failing(4_000, GONE_KIND));
        // A later failure of another kind does not hide it.
        a.fold("w2", 5_100, &failing(4_500, "http_status"));
        let (p, c) = pause(&w, Some(&a), &rule, &WebhookStatus::default(), &at(6_000));
        assert_eq!(c, PauseChange::Paused);
        assert_eq!(p.auto_paused.unwrap().reason, reason::GONE);
        // A 410 from before its last resume is history.
        let resumed = WebhookStatus {
            resumed_at: Some(at(4_500)),
            ..WebhookStatus::default()
        };
        assert_eq!(
            pause(&w, Some(&a), &rule, &resumed, &at(6_000)).1,
            PauseChange::Kept
        );
        // So is one followed by a success.
        a.fold("w2", 7_000, &tally(1, 0, Some(6_500), None, 0));
        assert_eq!(
            pause(&w, Some(&a), &rule, &WebhookStatus::default(), &at(8_000)).1,
            PauseChange::Kept
        );
    }

    #[test]
    fn hosts_without_userinfo_or_port() {
        assert_eq!(host("https://u:p@h.example:1/x@y").as_deref(), Some("h.example"));
        assert_eq!(host("http://[::1]:8080/").as_deref(), Some("[::1]"));
        assert_eq!(host("nope"), None);
    }
}
