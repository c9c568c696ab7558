//! When to try again: the exponential, jittered schedule, `Retry-After`, and the ladder of delay queues
//! a delay is rounded to.
//!
//! RabbitMQ expires messages only at the head of a queue, so one retry queue with per-message TTLs
//! would hold a 1 s retry behind a 10 min one. Each delay queue therefore has one fixed TTL
//! (`x-message-ttl`), and a delay is rounded to the nearest rung of a geometric ladder (4 rungs per
//! doubling, about ±9%): few queues, and jitter survives the rounding.

use std::time::{Duration, SystemTime};

use hookfleet_crds::integration::Jitter;
use rand::Rng;

/// The shortest delay queue; full jitter may draw less, which is rounded up to it (the contract's, which
/// the operator shares to name the delay queues it deletes).
pub use hookfleet_crds::contract::queues::MIN_DELAY;

/// Exponential backoff between attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: Jitter,
}

impl Backoff {
    /// The delay after the `attempt`-th failed attempt (1-based) before jitter:
    /// `initial × multiplier^(attempt−1)`, at most `max`.
    pub fn base(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(1000) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// [`Backoff::base`] with jitter applied.
    pub fn jittered(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let d = self.base(attempt);
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => d.mul_f64(rng.random_range(0.0..=1.0)),
            Jitter::Equal => d / 2 + (d / 2).mul_f64(rng.random_range(0.0..=1.0)),
        }
    }

    /// The delay before the next attempt: the jittered backoff, or the endpoint's `Retry-After` when it
    /// asks for longer, never more than `max` (an endpoint cannot park a message for a week).
    pub fn next_delay(&self, attempt: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let d = self.jittered(attempt, rng);
        match retry_after {
            Some(ra) => d.max(ra).min(self.max),
            None => d,
        }
    }

    /// The delay queues' TTLs: the ladder from [`MIN_DELAY`] up to `max` (which is the last rung).
    pub fn ladder(&self) -> Vec<Duration> {
        hookfleet_crds::contract::queues::delay_ttls(self.max)
    }

    /// The rung of [`Backoff::ladder`] nearest to `d` (in ratio).
    pub fn bucket(&self, d: Duration) -> Duration {
        let ladder = self.ladder();
        let target = d.max(MIN_DELAY).as_secs_f64();
        ladder
            .into_iter()
            .min_by(|a, b| {
                let da = (a.as_secs_f64() / target).ln().abs();
                let db = (b.as_secs_f64() / target).ln().abs();
                da.total_cmp(&db)
            })
            .unwrap_or(MIN_DELAY)
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date (relative to `now`; a past date is zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(600),
            multiplier: 2.0,
            jitter,
        }
    }

    #[test]
    fn schedule_grows_exponentially_and_is_capped() {
        let b = backoff(Jitter::None);
        let secs: Vec<u64> = (1..=12).map(|a| b.base(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(b.base(u32::MAX), b.max);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(b.jittered(3, &mut rng), Duration::from_secs(4));
    }

    #[test]
    fn jitter_stays_in_its_band() {
        let mut rng = StdRng::seed_from_u64(7);
        let full = backoff(Jitter::Full);
        let equal = backoff(Jitter::Equal);
        let mut seen_low = false;
        for _ in 0..1000 {
            let f = full.jittered(4, &mut rng);
            assert!(f <= Duration::from_secs(8));
            seen_low |= f < Duration::from_secs(2);
            let e = equal.jittered(4, &mut rng);
            assert!(
                e >= Duration::from_secs(4) && e <= Duration::from_secs(8),
                "{e:?}"
            );
        }
        assert!(seen_low, "full jitter should reach the bottom of its band");
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let b = backoff(Jitter::None);
        let mut rng = StdRng::seed_from_u64(1);
        // Longer than the backoff: honoured.
        assert_eq!(
            b.next_delay(1, Some(Duration::from_secs(30)), &mut rng),
            Duration::from_secs(30)
        );
        // Shorter than the backoff: the backoff wins.
        assert_eq!(
            b.next_delay(4, Some(Duration::from_secs(1)), &mut rng),
            Duration::from_secs(8)
        );
        // Longer than max: clamped.
        assert_eq!(
            b.next_delay(1, Some(Duration::from_secs(86_400)), &mut rng),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn ladder_is_geometric_and_ends_at_max() {
        let b = backoff(Jitter::Full);
        let ladder = b.ladder();
        assert_eq!(ladder[0], Duration::from_millis(100));
        assert_eq!(*ladder.last().unwrap(), Duration::from_secs(600));
        assert!(ladder.windows(2).all(|w| w[0] < w[1]));
        // 100ms → 600s is ~12.6 doublings: about 51 queues.
        assert!(ladder.len() < 60, "{}", ladder.len());
        for w in ladder.windows(2) {
            assert!(w[1].as_secs_f64() / w[0].as_secs_f64() <= 1.2 + 1e-9, "{w:?}");
        }
    }

    #[test]
    fn delays_round_to_a_near_rung() {
        let b = backoff(Jitter::Full);
        assert_eq!(b.bucket(Duration::ZERO), MIN_DELAY);
        assert_eq!(b.bucket(Duration::from_secs(10_000)), Duration::from_secs(600));
        for ms in [150u64, 333, 1000, 4321, 60_000, 599_000] {
            let d = Duration::from_millis(ms);
            let r = b.bucket(d).as_secs_f64() / d.as_secs_f64();
            assert!((0.9..=1.1).contains(&r), "{ms}ms → {:?}", b.bucket(d));
            assert!(b.ladder().contains(&b.bucket(d)));
        }
    }
}
