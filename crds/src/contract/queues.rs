//! The names of the queues the worker declares around one work queue. The worker declares them
//! (`worker/src/worker/topology.rs`); the operator renders the dead-letter default and reads them on the
//! broker; `validate` refuses a dead-letter queue that is one of the others.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
