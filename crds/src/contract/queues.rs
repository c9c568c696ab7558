//! The names of the queues the worker declares around one work queue. The worker declares them
//! (`worker/src/worker/topology.rs`); the operator renders the dead-letter default and reads them on the
//! broker; `validate` refuses a dead-letter queue that is one of the others.

use std::time::Duration;

/// A NATS source's default dead-letter subject for the durable consumer `consumer`.
pub fn nats_dead_letter(consumer: &str) -> String {
    format!("hookfleet.dead.{consumer}")
}

/// Where messages that cannot be delivered go when `spec.delivery.deadLetter` is not set:
/// `<queue>.dead`.
pub fn dead_letter(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The retry-ready queue: where retries land when their delay is over, consumed in the retry lane:
/// `<queue>.retries`.
pub fn retry_ready(queue: &str) -> String {
    format!("{queue}.retries")
}

/// The delay queue of `ttl` (one fixed TTL each, dead-lettering to the retry-ready queue):
/// `<queue>.delay.<ms>ms`.
pub fn delay(queue: &str, ttl: Duration) -> String {
    format!("{queue}.delay.{}ms", ttl.as_millis())
}

/// The shortest delay queue's TTL; a shorter delay is rounded up to it.
pub const MIN_DELAY: Duration = Duration::from_millis(100);
/// Rungs per doubling of the delay ladder.
const RUNGS_PER_DOUBLING: f64 = 4.0;

/// The TTLs of the delay queues the worker declares for `--backoff-max` `max`: a geometric ladder from
/// [`MIN_DELAY`], 4 rungs per doubling (whole milliseconds), up to `max`, which is the last rung. The
/// worker rounds each retry's delay to one of them; the operator deletes exactly these queues.
pub fn delay_ttls(max: Duration) -> Vec<Duration> {
    let rung = |k: u32| {
        let ms = MIN_DELAY.as_millis() as f64 * 2f64.powf(f64::from(k) / RUNGS_PER_DOUBLING);
        Duration::from_millis(ms.round() as u64)
    };
    let mut rungs = Vec::new();
    let mut k = 0;
    loop {
        let d = rung(k);
        if d >= max {
            break;
        }
        rungs.push(d);
        k += 1;
    }
    rungs.push(max.max(MIN_DELAY));
    rungs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_ladder() {
        let l = delay_ttls(Duration::from_secs(600));
        assert_eq!(l[0], MIN_DELAY);
        assert_eq!(l[1], Duration::from_millis(119));
        assert_eq!(*l.last().unwrap(), Duration::from_secs(600));
        assert!(l.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(delay_ttls(Duration::from_millis(50)), [MIN_DELAY]);
    }

    #[test]
    fn names() {
        assert_eq!(dead_letter("orders"), "orders.dead");
        assert_eq!(retry_ready("orders"), "orders.retries");
        assert_eq!(
            delay("orders", Duration::from_millis(1414)),
            "orders.delay.1414ms"
        );
    }
}
