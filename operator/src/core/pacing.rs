//! How soon an Integration is looked at again after a reconcile.
//!
//! Every reconcile ends with a requeue (the resync, or the shorter retry while something is wrong), and
//! kube-runtime's scheduler serves requeues with at most `--concurrency` reconciles at a time. When the
//! requeues ask for more reconciles per second than that serves (N Integrations × the mean reconcile time
//! ÷ the concurrency > the resync), the excess waits in the scheduler's pending set, which a freed slot
//! takes from in hash order, not arrival order: the same objects keep winning and some are never
//! reconciled at all (seen: with 1,000 Integrations, resync 1 s and concurrency 8, a third never got a
//! first status in 3 minutes, with nothing logged). So the requeue is paced: never sooner than the
//! time the whole fleet takes to go through the slots, twice over, so resyncs fill at most half of them
//! and first reconciles and changes (from watch events) always find a free slot. A ±10% jitter keeps
//! Integrations created together from staying in lockstep.
//!
//! Status writes are paced too, while the operator catches up ([`hold_status`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;

/// How long a status change may be held back at most while the operator catches up.
pub const STATUS_HOLD: Duration = Duration::from_secs(30);

/// Whether a changed status is written now (`None`) or held back for the returned time, after which the
/// reconcile runs again and writes whatever the status is then.
///
/// While some other Integration waits for its first status of its current generation (a fleet being
/// created, or a change applied to many at once: the operator is *catching up*), every status write
/// competes with those first reconciles for the API server. So a change that only reports progress on a
/// generation this leader already answered (`answers_generation` false: ready counts, consumers, a
/// condition moving while workers come up) is written at most once per [`STATUS_HOLD`] while catching up;
/// one that answers a new generation is never held, and nothing is held once the operator has caught up.
/// The metrics mirror every reconcile's status at once whether or not it is written, so alerts do not
/// wait. `since_last_write` is None when this leader has not written this status yet (then it writes);
/// `catching_up` is asked only when the answer matters.
pub fn hold_status(
    answers_generation: bool,
    since_last_write: Option<Duration>,
    catching_up: impl FnOnce() -> bool,
) -> Option<Duration> {
    if answers_generation {
        return None;
    }
    let left = STATUS_HOLD.checked_sub(since_last_write?)?;
    (!left.is_zero() && catching_up()).then_some(left)
}

/// A running mean of the reconcile time, and the requeue delays it gives.
#[derive(Debug, Default)]
pub struct Pacer {
    /// Exponentially weighted mean of the reconcile time, in µs (0: none seen yet).
    mean_micros: AtomicU64,
}

impl Pacer {
    /// Records one reconcile's duration.
    pub fn observe(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        // Races between two updates lose one sample at worst: fine for a mean.
        let old = self.mean_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 15 + sample) / 16
        };
        self.mean_micros.store(new, Ordering::Relaxed);
    }

    /// The mean reconcile time so far.
    pub fn mean(&self) -> Duration {
        Duration::from_micros(self.mean_micros.load(Ordering::Relaxed))
    }

    /// The delay before the next reconcile of one of `integrations`, wanted after `base`.
    pub fn next(&self, base: Duration, integrations: usize, concurrency: u16) -> Duration {
        let paced = floor(base, integrations, self.mean(), concurrency);
        paced.mul_f64(rand::rng().random_range(0.9..=1.1))
    }
}

/// `base`, or the time `integrations` reconciles of `mean` take through `concurrency` slots, twice over,
/// whichever is longer.
pub fn floor(base: Duration, integrations: usize, mean: Duration, concurrency: u16) -> Duration {
    let slots = u32::from(concurrency.max(1));
    let n = u32::try_from(integrations).unwrap_or(u32::MAX);
    let sweep = mean.saturating_mul(n) / slots;
    base.max(sweep.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_held_only_for_progress_while_catching_up() {
        let s = Duration::from_secs;
        let never = || -> bool { panic!("asked whether catching up when it cannot matter") };
        // A new generation's answer is written at once, catching up or not.
        assert_eq!(hold_status(true, Some(s(1)), never), None);
        // Not written by this leader yet (first reconcile, or after a restart): written.
        assert_eq!(hold_status(false, None, never), None);
        // Progress, written 10 s ago, while others wait for a first status: held for the rest of 30 s.
        assert_eq!(hold_status(false, Some(s(10)), || true), Some(s(20)));
        // The same once caught up: written.
        assert_eq!(hold_status(false, Some(s(10)), || false), None);
        // Held at most STATUS_HOLD: after it, written even while catching up.
        assert_eq!(hold_status(false, Some(STATUS_HOLD), never), None);
        assert_eq!(hold_status(false, Some(s(45)), never), None);
    }

    #[test]
    fn a_small_fleet_keeps_the_configured_resync() {
        // 100 Integrations of 20 ms through 8 slots: a sweep is 0.25 s, well inside 30 s.
        let d = floor(Duration::from_secs(30), 100, Duration::from_millis(20), 8);
        assert_eq!(d, Duration::from_secs(30));
    }

    #[test]
    fn a_large_fleet_is_spread_beyond_what_the_slots_serve() {
        // 1,000 of 20 ms through 8 slots: a sweep is 2.5 s; a 1 s resync would ask for 2.5× the capacity.
        let d = floor(Duration::from_secs(1), 1000, Duration::from_millis(20), 8);
        assert_eq!(d, Duration::from_secs(5));
        // Zero concurrency is read as one slot, not a division by zero.
        let d = floor(Duration::from_secs(1), 10, Duration::from_millis(200), 0);
        assert_eq!(d, Duration::from_secs(4));
    }

    #[test]
    fn the_mean_follows_the_samples_and_the_jitter_stays_within_ten_percent() {
        let p = Pacer::default();
        assert_eq!(p.mean(), Duration::ZERO);
        p.observe(Duration::from_millis(16));
        assert_eq!(p.mean(), Duration::from_millis(16));
        for _ in 0..200 {
            p.observe(Duration::from_millis(32));
        }
        let m = p.mean().as_secs_f64();
        assert!((0.031..=0.032).contains(&m), "mean {m}");
        for _ in 0..100 {
            let d = p.next(Duration::from_secs(10), 10, 8).as_secs_f64();
            assert!((9.0..=11.0).contains(&d), "{d}");
        }
    }
}
