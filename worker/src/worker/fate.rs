//! What an outcome means for the message: its [`Fate`], decided by one pure function ([`decide`])
//! for every outcome there is (an HTTP answer, a transport error, a deferral by the open circuit
//! breaker, a 410, a message the template cannot render, a panic). Carrying a fate out (acks,
//! copies, hand-backs) is `settlement`'s business.

use std::time::Duration;

use rand::Rng;

use crate::backoff::Backoff;
use crate::message::Failure;
use crate::outcome::Outcome;

/// What becomes of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Delivered (2xx): ack.
    Ack { status: u16 },
    /// Store a copy in a delay queue or the dead-letter queue, wait for the broker's confirm, then
    /// ack.
    Store(Store),
    /// Leave it to the broker: `nack` with requeue when `requeue_now`, else leave it unacked until the
    /// session's channel closes (the session is ending anyway).
    HandBack { reason: &'static str, requeue_now: bool },
    /// 410 Gone: hand the message back (left unacked, reason `gone`) and stop the worker: it takes
    /// no more messages, drains and exits (see `gone`).
    Stop,
}

/// The copy a [`Fate::Store`] stores. `attempts` (made so far) is written on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// In the delay queue of `next_in` (a rung of the ladder), for another attempt.
    Retry {
        failure: Failure,
        attempts: u32,
        next_in: Duration,
    },
    /// Not attempted (the circuit breaker is open; with Webhooks also a paused Webhook, or one
    /// whose attempt panicked): as a retry, with the attempt count unchanged. `reason` is the
    /// `x-hookfleet-last-error` and the metric reason (`circuit_open`, `paused`, `panic`, …).
    Defer {
        attempts: u32,
        next_in: Duration,
        reason: &'static str,
    },
    /// In the dead-letter queue.
    DeadLetter {
        /// Metric label: the refusal's reason, `attempts_exhausted` or `template`.
        reason: &'static str,
        failure: Failure,
        attempts: u32,
        /// The `x-hookfleet-dead-reason` header when it says more than `reason`.
        detail: Option<String>,
    },
}

/// What a message may spend: attempts, and the schedule between them.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    /// Attempts before dead-lettering, the first included.
    pub max_attempts: u32,
    pub backoff: &'a Backoff,
}

/// The fate of a message whose handling number `attempt` (1-based: the attempts its headers count,
/// plus this one) came to `outcome`. Pure: the only randomness, the jitter of a retry's delay, is
/// drawn from `rng`.
pub fn decide(outcome: Outcome, attempt: u32, limits: Limits<'_>, rng: &mut impl Rng) -> Fate {
    match outcome {
        Outcome::Delivered { status } => Fate::Ack { status },
        Outcome::Retry {
            reason,
            status,
            retry_after,
        } if attempt < limits.max_attempts => {
            let delay = limits.backoff.next_delay(attempt, retry_after, rng);
            Fate::Store(Store::Retry {
                failure: Failure { reason, status },
                attempts: attempt,
                next_in: limits.backoff.bucket(delay),
            })
        }
        Outcome::Retry { reason, status, .. } => Fate::Store(Store::DeadLetter {
            reason: "attempts_exhausted",
            failure: Failure { reason, status },
            attempts: attempt,
            detail: None,
        }),
        // Not attempted: the attempt count stays as it was.
        Outcome::Deferred { delay } => Fate::Store(Store::Defer {
            attempts: attempt - 1,
            next_in: limits.backoff.bucket(delay.min(limits.backoff.max)),
            reason: "circuit_open",
        }),
        Outcome::Reject { reason, status } => Fate::Store(Store::DeadLetter {
            reason,
            failure: Failure { reason, status },
            attempts: attempt,
            detail: None,
        }),
        // It will never render: dead-letter it now, without spending the attempts.
        Outcome::Unrenderable { error } => Fate::Store(Store::DeadLetter {
            reason: "template",
            failure: Failure {
                reason: "template",
                status: None,
            },
            attempts: attempt,
            detail: Some(format!("template: {error}")),
        }),
        // Never attempted, never will be: dead-letter it now, without spending the attempts.
        Outcome::TooLarge { size, max } => Fate::Store(Store::DeadLetter {
            reason: "too_large",
            failure: Failure {
                reason: "too_large",
                status: None,
            },
            attempts: attempt,
            detail: Some(format!(
                "the body of {size} bytes is larger than maxMessageBytes ({max})"
            )),
        }),
        // Redelivered too often (crashed or stopped workers each time): a poison message.
        Outcome::DeliveryLimit { count, limit } => Fate::Store(Store::DeadLetter {
            reason: "delivery_limit",
            failure: Failure {
                reason: "delivery_limit",
                status: None,
            },
            attempts: attempt,
            detail: Some(format!(
                "redelivered {count} times by the broker (x-delivery-count, or JetStream's delivery count), the delivery limit is {limit}"
            )),
        }),
        Outcome::Gone => Fate::Stop,
        // Left unacked: the session ends (the worker stops) and the broker requeues it.
        Outcome::Stopped => Fate::HandBack {
            reason: "gone",
            requeue_now: false,
        },
        // Back to the queue at once rather than unacked until the next reconnect; on a quorum
        // queue the delivery limit dead-letters a message that panics every time.
        Outcome::Panicked => Fate::HandBack {
            reason: "panic",
            requeue_now: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use hookfleet_crds::integration::Jitter;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// 1 s after the first failure, doubling, at most `max_secs`.
    fn backoff(max_secs: u64, jitter: Jitter) -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(max_secs),
            multiplier: 2.0,
            jitter,
        }
    }

    fn failure(reason: &'static str, status: Option<u16>) -> Failure {
        Failure { reason, status }
    }

    fn retry(reason: &'static str, status: Option<u16>, retry_after: Option<Duration>) -> Outcome {
        Outcome::Retry {
            reason,
            status,
            retry_after,
        }
    }

    fn again(failure: Failure, attempts: u32, next_in: Duration) -> Fate {
        Fate::Store(Store::Retry {
            failure,
            attempts,
            next_in,
        })
    }

    fn defer(attempts: u32, next_in: Duration) -> Fate {
        Fate::Store(Store::Defer {
            attempts,
            next_in,
            reason: "circuit_open",
        })
    }

    fn dead(reason: &'static str, failure: Failure, attempts: u32, detail: Option<&str>) -> Fate {
        Fate::Store(Store::DeadLetter {
            reason,
            failure,
            attempts,
            detail: detail.map(str::to_owned),
        })
    }

    /// Every outcome × attempt → fate, with 3 attempts at most and no jitter: 1 s, 2 s, 4 s, … at
    /// most 60 s, each rounded to a rung of the ladder (`at`; 60 s, the last rung, is exact).
    #[test]
    fn every_outcome_and_attempt_has_one_fate() {
        let backoff = backoff(60, Jitter::None);
        let limits = Limits {
            max_attempts: 3,
            backoff: &backoff,
        };
        let s503 = failure("http_status", Some(503));
        // The rung of the ladder a delay is rounded to.
        let at = |millis| backoff.bucket(ms(millis));
        #[rustfmt::skip]
        let table: Vec<(Outcome, u32, Fate)> = vec![
            // 2xx: ack, whatever the attempt.
            (Outcome::Delivered { status: 200 }, 1, Fate::Ack { status: 200 }),
            (Outcome::Delivered { status: 204 }, 3, Fate::Ack { status: 204 }),
            // Transient: a retry after the backoff of this attempt (rounded to a rung) while
            // attempts are left, then the dead letters.
            (retry("http_status", Some(503), None), 1, again(s503, 1, at(1000))),
            (retry("http_status", Some(503), None), 2, again(s503, 2, at(2000))),
            (retry("http_status", Some(503), None), 3, dead("attempts_exhausted", s503, 3, None)),
            (retry("timeout", None, None), 4, dead("attempts_exhausted", failure("timeout", None), 4, None)),
            (retry("redirect", Some(301), None), 1, again(failure("redirect", Some(301)), 1, at(1000))),
            // Retry-After: honoured when longer than the backoff, never beyond `max`.
            (retry("http_status", Some(429), Some(Duration::from_secs(8))), 1,
                again(failure("http_status", Some(429)), 1, at(8000))),
            (retry("http_status", Some(429), Some(ms(10))), 2,
                again(failure("http_status", Some(429)), 2, at(2000))),
            (retry("http_status", Some(429), Some(Duration::from_secs(3600))), 1,
                again(failure("http_status", Some(429)), 1, ms(60_000))),
            (retry("http_status", Some(429), Some(Duration::from_secs(8))), 3,
                dead("attempts_exhausted", failure("http_status", Some(429)), 3, None)),
            // Breaker open: deferred about the cooldown (at most `max`), no attempt spent, even
            // when none is left.
            (Outcome::Deferred { delay: Duration::from_secs(10) }, 1, defer(0, at(10_000))),
            (Outcome::Deferred { delay: Duration::from_secs(3600) }, 3, defer(2, ms(60_000))),
            // Refused (4xx but 408/425/429/410): the dead letters at once, with the refusal's reason.
            (Outcome::Reject { reason: "http_status", status: Some(400) }, 1,
                dead("http_status", failure("http_status", Some(400)), 1, None)),
            (Outcome::Reject { reason: "http_status", status: Some(422) }, 3,
                dead("http_status", failure("http_status", Some(422)), 3, None)),
            // A message the template cannot render never will: the dead letters at once.
            (Outcome::Unrenderable { error: "undefined value".into() }, 1,
                dead("template", failure("template", None), 1, Some("template: undefined value"))),
            (Outcome::Unrenderable { error: "not JSON".into() }, 2,
                dead("template", failure("template", None), 2, Some("template: not JSON"))),
            // Above --max-message-bytes: the dead letters at once.
            (Outcome::TooLarge { size: 9, max: 8 }, 1,
                dead("too_large", failure("too_large", None), 1,
                    Some("the body of 9 bytes is larger than maxMessageBytes (8)"))),
            // 410: hand back and stop; after it, hand back without an attempt.
            (Outcome::Gone, 1, Fate::Stop),
            (Outcome::Gone, 3, Fate::Stop),
            (Outcome::Stopped, 1, Fate::HandBack { reason: "gone", requeue_now: false }),
            (Outcome::Stopped, 3, Fate::HandBack { reason: "gone", requeue_now: false }),
            // A panic: back to the queue now.
            (Outcome::Panicked, 1, Fate::HandBack { reason: "panic", requeue_now: true }),
            (Outcome::Panicked, 3, Fate::HandBack { reason: "panic", requeue_now: true }),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        for (outcome, attempt, want) in table {
            let got = decide(outcome.clone(), attempt, limits, &mut rng);
            assert_eq!(got, want, "{outcome:?} at attempt {attempt}");
        }
    }

    /// With jitter the delay is drawn below the backoff (full jitter) and still lands on a rung.
    #[test]
    fn a_jittered_retry_waits_in_a_delay_queue_of_the_ladder() {
        let backoff = backoff(600, Jitter::Full);
        let limits = Limits {
            max_attempts: 10,
            backoff: &backoff,
        };
        let ladder = backoff.ladder();
        let mut rng = StdRng::seed_from_u64(1);
        for attempt in 1..10 {
            match decide(retry("connect", None, None), attempt, limits, &mut rng) {
                Fate::Store(Store::Retry {
                    next_in, attempts, ..
                }) => {
                    assert_eq!(attempts, attempt);
                    assert!(ladder.contains(&next_in), "{next_in:?}");
                    assert!(next_in <= backoff.bucket(backoff.base(attempt)), "{next_in:?}");
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
    }
}
