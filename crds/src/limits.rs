//! The ranges of the settings, written once: the CRD schema's attributes (`#[schemars(range…)]`,
//! `length`, the duration CEL rules) and the worker's flag parser (`contract::WorkerArgs`) both read
//! them, so the API server and the worker refuse the same values.
//!
//! Where the worker takes more than the CRD allows, it says so beside the constant it uses.

use std::fmt::Display;
use std::time::Duration;

/// An inclusive range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range<T> {
    pub min: T,
    pub max: T,
}

impl<T> Range<T> {
    pub const fn new(min: T, max: T) -> Self {
        Self { min, max }
    }
}

impl<T: PartialOrd + Display + Copy> Range<T> {
    /// `value`, or `"<value> is outside [<min>, <max>]"`.
    pub fn check(&self, value: T) -> Result<T, String> {
        if value < self.min || value > self.max {
            return Err(format!("{value} is outside [{}, {}]", self.min, self.max));
        }
        Ok(value)
    }
}

/// An inclusive range of durations, written as Go durations (as the CEL rules and the messages show
/// them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationRange {
    pub min: &'static str,
    pub max: &'static str,
}

impl DurationRange {
    pub const fn new(min: &'static str, max: &'static str) -> Self {
        Self { min, max }
    }

    fn bound(text: &str) -> Duration {
        crate::duration::parse(text).expect("the bounds of a DurationRange are Go durations (tested)")
    }

    pub fn min(&self) -> Duration {
        Self::bound(self.min)
    }

    pub fn max(&self) -> Duration {
        Self::bound(self.max)
    }

    /// `d`, or `"<d> is outside [<min>, <max>]"` (as `Debug` shows durations: `1ms`, `600s`).
    pub fn check(&self, d: Duration) -> Result<Duration, String> {
        let (min, max) = (self.min(), self.max());
        if d < min || d > max {
            return Err(format!("{d:?} is outside [{min:?}, {max:?}]"));
        }
        Ok(d)
    }

    /// The CEL rule the CRD puts on a duration field of this range.
    pub fn cel(&self) -> String {
        format!(
            "duration(self) >= duration('{}') && duration(self) <= duration('{}')",
            self.min, self.max
        )
    }

    /// The message of [`DurationRange::cel`].
    pub fn message(&self) -> String {
        format!("must be a duration between {} and {}", self.min, self.max)
    }
}

/// `spec.source.queue`, in bytes: the delay queues (`<queue>.delay.<ms>ms`) must stay under AMQP's 255.
pub const QUEUE_NAME_MAX: u32 = 200;
/// `spec.source.prefetch` (`basic.qos` takes a 16-bit count).
pub const PREFETCH: Range<u32> = Range::new(1, 65535);
/// `spec.source.deliveryLimit`.
pub const DELIVERY_LIMIT: Range<u32> = Range::new(1, 1000);
/// `spec.destination.timeout`.
pub const TIMEOUT: DurationRange = DurationRange::new("100ms", "10m");
/// `spec.delivery.maxAttempts`.
pub const MAX_ATTEMPTS: Range<u32> = Range::new(1, 100);
/// `spec.delivery.backoff.initial` and `.max`.
pub const BACKOFF: DurationRange = DurationRange::new("100ms", "24h");
/// `spec.delivery.backoff.multiplier`.
pub const BACKOFF_MULTIPLIER: Range<f64> = Range::new(1.0, 10.0);
/// `spec.delivery.concurrency`.
pub const CONCURRENCY: Range<u32> = Range::new(1, 10000);
/// `spec.delivery.rateLimit.perSecond` and `.burst`. The worker takes any rate from `min` up (a
/// hand-run worker is not bound by the CRD's ceiling).
pub const RATE_LIMIT: Range<u32> = Range::new(1, 100000);
/// `spec.delivery.circuitBreaker.failureThreshold` (0 disables the breaker).
pub const CIRCUIT_BREAKER_THRESHOLD: Range<u32> = Range::new(0, 10000);
/// `spec.delivery.circuitBreaker.cooldown`.
pub const CIRCUIT_BREAKER_COOLDOWN: DurationRange = DurationRange::new("100ms", "1h");
/// `spec.delivery.adaptiveThrottle.minConcurrency`. The worker bounds it by its concurrency instead
/// (the CRD says the same with a CEL rule).
pub const ADAPTIVE_THROTTLE_MIN: Range<u32> = Range::new(1, 10000);
/// `spec.delivery.adaptiveThrottle.window`.
pub const ADAPTIVE_THROTTLE_WINDOW: DurationRange = DurationRange::new("1s", "10m");
/// `spec.workers.fileDescriptorLimit`. The worker's own floor is [`WORKER_FD_LIMIT_MIN`].
pub const FILE_DESCRIPTOR_LIMIT: Range<i64> = Range::new(1024, 1073741816);
/// The lowest `--fd-limit` the worker takes: its reserve for the broker, the metrics server and the
/// runtime (what a concurrency needs on top is checked when the limit is raised).
pub const WORKER_FD_LIMIT_MIN: u64 = 64;
/// `spec.workers.autoscale.scaleDownStabilization`.
pub const SCALE_DOWN_STABILIZATION: DurationRange = DurationRange::new("0s", "24h");
/// `spec.source.maxMessageBytes`: from 1 KiB up to RabbitMQ's default `max_message_size` (128 MiB; the
/// broker refuses larger messages unless raised).
pub const MAX_MESSAGE_BYTES: Range<u32> = Range::new(1024, 134_217_728);
/// `spec.workers.inFlightBytes`: from 1 MiB to 64 GiB. The worker takes any value from `min` up.
pub const IN_FLIGHT_BYTES: Range<i64> = Range::new(1_048_576, 68_719_476_736);
/// A Webhook's auto-pause (`autoPause`): failures in a row, and the least time they span.
pub const AUTO_PAUSE_FAILURES: Range<u32> = Range::new(1, 1_000_000);
pub const AUTO_PAUSE_AFTER: DurationRange = DurationRange::new("0s", "720h");
/// `--confirm-timeout` (worker only).
pub const CONFIRM_TIMEOUT: DurationRange = DurationRange::new("100ms", "10m");
/// `--nats-ack-wait` (worker only): JetStream's AckWait of the durable consumer.
pub const NATS_ACK_WAIT: DurationRange = DurationRange::new("1s", "12h");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_bounds_parse_and_render_into_the_crd_rules() {
        for r in [
            TIMEOUT,
            BACKOFF,
            CIRCUIT_BREAKER_COOLDOWN,
            ADAPTIVE_THROTTLE_WINDOW,
            SCALE_DOWN_STABILIZATION,
            CONFIRM_TIMEOUT,
            NATS_ACK_WAIT,
            AUTO_PAUSE_AFTER,
        ] {
            assert!(r.min() <= r.max(), "{r:?}");
        }
        assert_eq!(
            TIMEOUT.cel(),
            "duration(self) >= duration('100ms') && duration(self) <= duration('10m')"
        );
        assert_eq!(TIMEOUT.message(), "must be a duration between 100ms and 10m");
        assert_eq!(
            CIRCUIT_BREAKER_COOLDOWN.check(Duration::from_millis(1)),
            Err("1ms is outside [100ms, 3600s]".into())
        );
    }

    #[test]
    fn ranges_say_the_value_and_the_bounds() {
        assert_eq!(MAX_ATTEMPTS.check(100), Ok(100));
        assert_eq!(MAX_ATTEMPTS.check(0), Err("0 is outside [1, 100]".into()));
        assert_eq!(
            BACKOFF_MULTIPLIER.check(11.0),
            Err("11 is outside [1, 10]".into())
        );
        assert_eq!(
            PREFETCH.max,
            u32::from(u16::MAX),
            "the worker reads prefetch as a u16"
        );
    }
}
