//! Per-Webhook metric series, bounded. A fleet may deliver 10,000 Webhooks; a series per Webhook per
//! metric would multiply the fleet's series by that. So each refresh ranks this worker's Webhooks by
//! [`Standing`]: the ones in trouble (failing, breaker open, throttled, paused) are counted by state,
//! always one series per state, and only the [`TOP`] worst of them get series of their own; the rest
//! are counted as unlisted. A healthy Webhook never has a series of its own: its figures are in its
//! status (`kubectl get webhooks`).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::WebhookLabels;

/// At most this many Webhooks have series of their own at one worker.
pub const TOP: usize = 20;

/// The states a Webhook is counted in (one may be in several).
pub const STATES: [&str; 4] = ["failing", "circuit_open", "throttled", "paused"];

/// Copies each Webhook had set aside without an attempt for want of capacity (at its in-flight cap,
/// over its adaptive throttle, without a rate-limit token) since the last refresh.
#[derive(Default)]
pub struct SetAside {
    inner: Mutex<HashMap<String, u64>>,
}

impl SetAside {
    pub fn record(&self, webhook: &str) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(webhook) {
            Some(n) => *n += 1,
            None => {
                m.insert(webhook.to_owned(), 1);
            }
        }
    }

    /// The counts since the last call, emptied.
    pub fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One Webhook as this worker sees it at a refresh.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Standing {
    pub name: String,
    /// Failed attempts in a row at this worker (0 after a success).
    pub consecutive_failures: u64,
    pub circuit_open: bool,
    /// Copies set aside for want of capacity since the last refresh.
    pub set_aside: u64,
    /// All of its in-flight permits taken right now.
    pub at_cap: bool,
    pub paused: bool,
}

impl Standing {
    /// The states it is in, of [`STATES`].
    pub fn states(&self) -> Vec<&'static str> {
        let on = [
            self.consecutive_failures > 0,
            self.circuit_open,
            self.set_aside > 0 || self.at_cap,
            self.paused,
        ];
        STATES
            .iter()
            .zip(on)
            .filter_map(|(s, on)| on.then_some(*s))
            .collect()
    }

    /// Worst first: breaker open, then the longest run of failures, then the most set aside, then
    /// paused; by name last, so a refresh with nothing new lists the same Webhooks.
    fn rank(&self) -> impl Ord + '_ {
        (
            Reverse(self.circuit_open),
            Reverse(self.consecutive_failures),
            Reverse(self.set_aside + u64::from(self.at_cap)),
            Reverse(self.paused),
            &self.name,
        )
    }
}

/// What one refresh exports.
#[derive(Debug, Default, PartialEq)]
pub struct Ranked {
    /// Webhooks in each of [`STATES`], in that order.
    pub by_state: [u64; 4],
    /// The worst [`TOP`] (at most `top`) in trouble, worst first.
    pub listed: Vec<Standing>,
    /// Webhooks in trouble beyond those.
    pub unlisted: u64,
}

/// Counts every Webhook in trouble by state and picks the `top` worst.
pub fn rank(standings: impl IntoIterator<Item = Standing>, top: usize) -> Ranked {
    let mut by_state = [0; 4];
    let mut trouble: Vec<Standing> = standings
        .into_iter()
        .filter(|s| {
            let states = s.states();
            for st in &states {
                let i = STATES.iter().position(|x| x == st).expect("one of STATES");
                by_state[i] += 1;
            }
            !states.is_empty()
        })
        .collect();
    let unlisted = trouble.len().saturating_sub(top) as u64;
    if trouble.len() > top {
        trouble.select_nth_unstable_by(top, |a, b| a.rank().cmp(&b.rank()));
        trouble.truncate(top);
    }
    trouble.sort_by(|a, b| a.rank().cmp(&b.rank()));
    Ranked {
        by_state,
        listed: trouble,
        unlisted,
    }
}

/// The per-Webhook series set at the last refresh, by family.
#[derive(Default)]
pub struct Exported {
    pub states: HashSet<WebhookLabels>,
    pub runs: HashSet<WebhookLabels>,
    pub set_aside: HashSet<WebhookLabels>,
}

/// Sets `now` in `family` and removes what `before` had that `now` has not (never a moment without a
/// series that stays).
pub fn replace(
    family: &Family<WebhookLabels, Gauge>,
    before: &mut HashSet<WebhookLabels>,
    now: Vec<(WebhookLabels, i64)>,
) {
    let keep: HashSet<WebhookLabels> = now.iter().map(|(l, _)| l.clone()).collect();
    for (labels, value) in now {
        family.get_or_create(&labels).set(value);
    }
    for stale in before.difference(&keep) {
        family.remove(stale);
    }
    *before = keep;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(name: &str, n: u64) -> Standing {
        Standing {
            name: name.into(),
            consecutive_failures: n,
            ..Default::default()
        }
    }

    #[test]
    fn healthy_webhooks_have_no_series_and_trouble_is_counted_by_state() {
        let r = rank(
            [
                Standing {
                    name: "ok".into(),
                    ..Default::default()
                },
                failing("f", 3),
                Standing {
                    name: "open".into(),
                    consecutive_failures: 5,
                    circuit_open: true,
                    ..Default::default()
                },
                Standing {
                    name: "slow".into(),
                    set_aside: 7,
                    ..Default::default()
                },
                Standing {
                    name: "full".into(),
                    at_cap: true,
                    ..Default::default()
                },
                Standing {
                    name: "p".into(),
                    paused: true,
                    ..Default::default()
                },
            ],
            TOP,
        );
        assert_eq!(r.by_state, [2, 1, 2, 1]);
        let names: Vec<&str> = r.listed.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["open", "f", "slow", "full", "p"],
            "worst first, no healthy one"
        );
        assert_eq!(r.listed[0].states(), ["failing", "circuit_open"]);
        assert_eq!(r.unlisted, 0);
    }

    #[test]
    fn ten_thousand_failing_webhooks_give_top_series_and_a_count() {
        let r = rank((0..10_000).map(|i| failing(&format!("w{i:05}"), i % 97 + 1)), TOP);
        assert_eq!(r.listed.len(), TOP);
        assert_eq!(r.unlisted, 10_000 - TOP as u64);
        assert_eq!(r.by_state, [10_000, 0, 0, 0]);
        assert!(
            r.listed.iter().all(|s| s.consecutive_failures == 97),
            "the longest runs"
        );
        assert!(
            r.listed.windows(2).all(|w| w[0].name < w[1].name),
            "ties by name: stable"
        );
        assert_eq!(rank(Vec::new(), TOP), Ranked::default());
        assert!(rank([failing("a", 1)], 0).listed.is_empty());
    }

    #[test]
    fn set_aside_counts_are_taken_once() {
        let s = SetAside::default();
        s.record("a");
        s.record("a");
        s.record("b");
        let t = s.take();
        assert_eq!((t["a"], t["b"]), (2, 1));
        assert!(s.take().is_empty());
    }
}
