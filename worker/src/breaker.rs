//! A circuit breaker for the destination: after `threshold` consecutive retryable failures it opens for
//! `cooldown`; while open, deliveries are not attempted but deferred through a delay queue (without
//! spending an attempt, so an outage does not dead-letter messages that were never really tried); then
//! one probe goes through (half-open) and its result closes or re-opens the breaker.
//!
//! Without it, every fresh message and every due retry hits an endpoint that is down: with 128 in flight
//! and 1,000 messages a second that is a stampede on the very service trying to recover.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// Whether an attempt may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// The one attempt that tests a recovering endpoint.
    Probe,
    /// Do not call the endpoint; defer for about this long.
    Defer(Duration),
}

/// What a transition means for logs and the gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Breaker {
    /// `threshold == 0` disables the breaker.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn admit(&self) -> Admit {
        if self.threshold == 0 {
            return Admit::Go;
        }
        let mut s = self.state.lock().expect("breaker lock");
        match *s {
            State::Closed { .. } => Admit::Go,
            State::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *s = State::HalfOpen;
                    Admit::Probe
                } else {
                    Admit::Defer(until - now)
                }
            }
            // A probe is out: wait for its verdict, at most a cooldown.
            State::HalfOpen => Admit::Defer(self.cooldown),
        }
    }

    /// Records an attempt's result: `healthy` when the endpoint answered (2xx or a 4xx refusal), not
    /// when it failed in a way worth a retry. `probe` when the attempt was admitted as [`Admit::Probe`].
    pub fn record(&self, healthy: bool, probe: bool) -> Option<Transition> {
        if self.threshold == 0 {
            return None;
        }
        let mut s = self.state.lock().expect("breaker lock");
        match (*s, healthy, probe) {
            (State::HalfOpen, true, true) => {
                *s = State::Closed { failures: 0 };
                Some(Transition::Closed)
            }
            (State::HalfOpen, false, true) => {
                *s = State::Open {
                    until: Instant::now() + self.cooldown,
                };
                None
            }
            (State::Closed { .. }, true, _) => {
                *s = State::Closed { failures: 0 };
                None
            }
            (State::Closed { failures }, false, _) => {
                let failures = failures + 1;
                if failures >= self.threshold {
                    *s = State::Open {
                        until: Instant::now() + self.cooldown,
                    };
                    Some(Transition::Opened)
                } else {
                    *s = State::Closed { failures };
                    None
                }
            }
            // Late results of attempts started before the breaker opened do not change it.
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.state.lock().expect("breaker lock"), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_probes_after_cooldown_and_closes() {
        let b = Breaker::new(3, Duration::from_secs(10));
        assert_eq!(b.record(false, false), None);
        assert_eq!(b.record(true, false), None, "a success resets the count");
        assert_eq!(b.record(false, false), None);
        assert_eq!(b.record(false, false), None);
        assert_eq!(b.record(false, false), Some(Transition::Opened));
        assert!(b.is_open());
        assert!(matches!(b.admit(), Admit::Defer(d) if d == Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(matches!(b.admit(), Admit::Defer(d) if d == Duration::from_secs(6)));
        // A late failure from before the opening does not extend it.
        assert_eq!(b.record(false, false), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.admit(), Admit::Probe);
        assert!(matches!(b.admit(), Admit::Defer(_)), "one probe at a time");
        // The probe fails: open again for a full cooldown.
        assert_eq!(b.record(false, true), None);
        assert!(matches!(b.admit(), Admit::Defer(d) if d == Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.record(true, true), Some(Transition::Closed));
        assert_eq!(b.admit(), Admit::Go);
        assert!(!b.is_open());
    }

    #[test]
    fn zero_threshold_disables_it() {
        let b = Breaker::new(0, Duration::from_secs(10));
        for _ in 0..100 {
            assert_eq!(b.record(false, false), None);
        }
        assert_eq!(b.admit(), Admit::Go);
    }
}
