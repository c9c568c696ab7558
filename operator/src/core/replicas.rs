//! How many workers an Integration gets: a fixed count, or a count that follows the queue backlog with a
//! scale-up rate limit (at most ×2 per scale-up period) and a scale-down stabilisation window (the fleet
//! shrinks only to the highest recommendation seen during the window, as the HorizontalPodAutoscaler does).
//!
//! Pure: the clock is a parameter. The state lives in the operator's memory; after a restart or a
//! leader change it starts from the current replica count, so a new leader never scales down before a
//! full window has passed. While it has memory, it steps from its own last decision, not from the
//! Deployment in the operator's cache: that copy can be older than the last apply (just after the
//! Deployment was created it may be missing), and stepping from it would undo a scale-up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hookfleet_crds::integration::{AutoscaleSpec, WorkersSpec};

/// Workers when the spec sets neither `replicas` nor `autoscale`.
pub const DEFAULT_REPLICAS: i32 = 2;

/// Fixed replicas from the spec, or `None` when autoscaled.
pub fn fixed(workers: &WorkersSpec) -> Option<i32> {
    match (&workers.autoscale, workers.replicas) {
        (Some(_), _) => None,
        (None, r) => Some(r.unwrap_or(DEFAULT_REPLICAS)),
    }
}

/// Workers the backlog asks for, before rate limits: `ceil(backlog / target)` within `[min, max]`.
pub fn recommend(spec: &AutoscaleSpec, backlog: i64) -> i32 {
    let target = spec.target_backlog_per_replica.max(1) as u64;
    let want = (backlog.max(0) as u64).div_ceil(target).min(i64::MAX as u64) as i64;
    want.clamp(i64::from(spec.min), i64::from(spec.max)) as i32
}

/// Autoscaler memory for one Integration.
#[derive(Clone, Debug, Default)]
pub struct Autoscaler {
    /// Recommendations within the stabilisation window, oldest first.
    history: VecDeque<(Instant, i32)>,
    last_scale_up: Option<Instant>,
    /// The replica count last decided (before the bounds: they are applied on every decision).
    last: Option<i32>,
}

/// What the autoscaler decided, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub replicas: i32,
    /// The unthrottled recommendation.
    pub recommended: i32,
}

impl Autoscaler {
    /// The replica count for now. `current` is the Deployment's replica count as cached (None before it
    /// exists), used only when this autoscaler has decided nothing yet; `backlog` is None when the broker
    /// could not be read, which holds the fleet where it is.
    pub fn next(
        &mut self,
        spec: &AutoscaleSpec,
        current: Option<i32>,
        backlog: Option<i64>,
        now: Instant,
        scale_up_period: Duration,
    ) -> Decision {
        let window: Duration = spec.scale_down_stabilization.into();
        let current = self.last.or(current).unwrap_or(spec.min);
        let decision = self.decide(spec, current, backlog, now, scale_up_period, window);
        self.last = Some(decision.replicas);
        decision
    }

    fn decide(
        &mut self,
        spec: &AutoscaleSpec,
        current: i32,
        backlog: Option<i64>,
        now: Instant,
        scale_up_period: Duration,
        window: Duration,
    ) -> Decision {
        if self.history.is_empty() {
            // No memory (new object, restart, new leader): behave as if `current` had been recommended
            // for the whole window, so nothing shrinks before a full window of low backlog.
            self.history.push_back((now, current));
        }
        let Some(backlog) = backlog else {
            let held = current.clamp(spec.min, spec.max);
            return Decision {
                replicas: held,
                recommended: held,
            };
        };
        let recommended = recommend(spec, backlog);
        self.history.push_back((now, recommended));
        // Keep the newest entry that is older than the window: it was in force at the window's start.
        while self.history.len() > 1 && now.duration_since(self.history[1].0) >= window {
            self.history.pop_front();
        }

        let replicas = if recommended > current {
            let may_scale_up = self
                .last_scale_up
                .is_none_or(|t| now.duration_since(t) >= scale_up_period);
            if may_scale_up {
                self.last_scale_up = Some(now);
                recommended.min(current.saturating_mul(2).max(1)).max(spec.min)
            } else {
                current
            }
        } else if recommended < current {
            let stabilised = if window.is_zero() {
                recommended
            } else {
                self.history.iter().map(|&(_, r)| r).max().unwrap_or(current)
            };
            stabilised.min(current)
        } else {
            current
        };
        Decision {
            replicas: replicas.clamp(spec.min, spec.max),
            recommended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: i32, max: i32, target: i64, window_s: u64) -> AutoscaleSpec {
        AutoscaleSpec {
            min,
            max,
            target_backlog_per_replica: target,
            scale_down_stabilization: Duration::from_secs(window_s).into(),
        }
    }

    #[test]
    fn fixed_defaults_to_two_and_is_none_when_autoscaled() {
        let mut w = WorkersSpec::default();
        assert_eq!(fixed(&w), Some(2));
        w.replicas = Some(1);
        assert_eq!(fixed(&w), Some(1));
        w.replicas = None;
        w.autoscale = Some(spec(2, 5, 10, 60));
        assert_eq!(fixed(&w), None);
    }

    #[test]
    fn recommendation_is_ceil_within_bounds() {
        let s = spec(2, 10, 100, 60);
        assert_eq!(recommend(&s, 0), 2);
        assert_eq!(recommend(&s, 101), 2);
        assert_eq!(recommend(&s, 301), 4);
        assert_eq!(recommend(&s, 1_000_000), 10);
    }

    #[test]
    fn scale_up_at_most_doubles_per_period() {
        let s = spec(1, 20, 10, 60);
        let period = Duration::from_secs(15);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let d = a.next(&s, Some(1), Some(1000), t0, period);
        assert_eq!(
            d,
            Decision {
                replicas: 2,
                recommended: 20
            }
        );
        // Within the period: hold.
        let d = a.next(&s, Some(2), Some(1000), t0 + Duration::from_secs(5), period);
        assert_eq!(d.replicas, 2);
        let d = a.next(&s, Some(2), Some(1000), t0 + Duration::from_secs(15), period);
        assert_eq!(d.replicas, 4);
        let d = a.next(&s, Some(4), Some(1000), t0 + Duration::from_secs(30), period);
        assert_eq!(d.replicas, 8);
        let d = a.next(&s, Some(8), Some(1000), t0 + Duration::from_secs(45), period);
        assert_eq!(d.replicas, 16);
        let d = a.next(&s, Some(16), Some(1000), t0 + Duration::from_secs(60), period);
        assert_eq!(d.replicas, 20, "capped at max");
    }

    #[test]
    fn scale_down_waits_for_the_window() {
        let s = spec(2, 20, 10, 60);
        let period = Duration::from_secs(1);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        assert_eq!(a.next(&s, Some(8), Some(80), t0, period).replicas, 8);
        // Backlog drains at t0+10s; nothing shrinks until 60 s later.
        for s_after in [10, 20, 40, 69] {
            let d = a.next(&s, Some(8), Some(0), t0 + Duration::from_secs(s_after), period);
            assert_eq!(d.replicas, 8, "at t0+{s_after}s");
            assert_eq!(d.recommended, 2);
        }
        let d = a.next(&s, Some(8), Some(0), t0 + Duration::from_secs(71), period);
        assert_eq!(d.replicas, 2);
    }

    #[test]
    fn a_spike_inside_the_window_restarts_it() {
        let s = spec(2, 20, 10, 30);
        let p = Duration::from_secs(1);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        a.next(&s, Some(6), Some(60), t0, p);
        a.next(&s, Some(6), Some(0), t0 + Duration::from_secs(20), p);
        a.next(&s, Some(6), Some(40), t0 + Duration::from_secs(25), p); // 4
        // Window t0+10..t0+40: the 6 recommended at t0 was in force until t0+20.
        let d = a.next(&s, Some(6), Some(0), t0 + Duration::from_secs(40), p);
        assert_eq!(d.replicas, 6);
        // Window t0+26..t0+56: the 4 of t0+25 was in force until t0+40.
        let d = a.next(&s, Some(6), Some(0), t0 + Duration::from_secs(56), p);
        assert_eq!(d.replicas, 4);
        let d = a.next(&s, Some(4), Some(0), t0 + Duration::from_secs(71), p);
        assert_eq!(d.replicas, 2);
    }

    #[test]
    fn fresh_memory_never_scales_down_at_once_and_broker_loss_holds() {
        let s = spec(2, 20, 10, 60);
        let p = Duration::from_secs(1);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        assert_eq!(a.next(&s, Some(9), Some(0), t0, p).replicas, 9);
        assert_eq!(
            a.next(&s, Some(9), None, t0 + Duration::from_secs(90), p)
                .replicas,
            9
        );
        // Out-of-bounds current (spec edited) is clamped immediately.
        assert_eq!(Autoscaler::default().next(&s, Some(30), None, t0, p).replicas, 20);
        // So is the autoscaler's own last decision (9) when the spec's max drops below it.
        let lower = spec(2, 5, 10, 60);
        assert_eq!(
            a.next(&lower, Some(9), None, t0 + Duration::from_secs(91), p)
                .replicas,
            5
        );
        // No Deployment yet: start at min.
        let mut b = Autoscaler::default();
        assert_eq!(b.next(&s, None, Some(0), t0, p).replicas, 2);
    }

    #[test]
    fn a_stale_cache_never_undoes_a_scale_up() {
        // Seen in CI: the Deployment was created at 2, the next reconcile's cache did not have it yet
        // (then 1), and the fleet went 2 → 1 → 2.
        let s = spec(1, 6, 10, 4);
        let p = Duration::from_secs(1);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        assert_eq!(a.next(&s, None, Some(50), t0, p).replicas, 2);
        let soon = t0 + Duration::from_millis(100);
        assert_eq!(
            a.next(&s, None, Some(50), soon, p).replicas,
            2,
            "Deployment not cached yet"
        );
        assert_eq!(
            a.next(&s, Some(1), Some(50), soon, p).replicas,
            2,
            "an older copy"
        );
        assert_eq!(a.next(&s, Some(2), Some(50), t0 + p, p).replicas, 4);
        assert_eq!(a.next(&s, Some(2), Some(50), t0 + 2 * p, p).replicas, 5);
    }
}
