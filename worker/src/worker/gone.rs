//! 410 Gone: the destination says it will never take a message again (Standard Webhooks). The worker
//! hands the message back (it stays in the queue: nothing is lost, nothing dead-lettered), stops taking
//! new messages, lets its in-flight deliveries settle as usual (within `--shutdown-grace`), and exits
//! with `DESTINATION_GONE` and a termination message naming the URL (userinfo redacted) and the time.
//! The operator turns that into `Degraded`/`DestinationGone` and scales the fleet to 0 until the URL
//! changes or someone asks to retry.
//!
//! Why not dead-letter with reason `gone`: every message of the queue would follow, one request each,
//! into the dead-letter queue for a URL that no longer exists; when the endpoint is restored (or the
//! URL fixed) they would have to be shovelled back by hand. Left in the queue they are simply
//! delivered later.

use std::time::SystemTime;

use hookfleet_crds::contract::exit;
use reqwest::Url;
use tokio::sync::watch;
use tracing::error;

use super::error::Fatal;
use crate::metrics::Metrics;

/// When and where the destination answered 410.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    /// The destination URL without its userinfo.
    pub url: String,
    pub at: SystemTime,
}

impl Gone {
    pub fn new(url: &Url, at: SystemTime) -> Self {
        Self {
            url: hookfleet_crds::redact::userinfo(url.as_str()),
            at,
        }
    }

    /// The line of the termination message.
    pub fn message(&self) -> String {
        format!(
            "destination gone: {} answered 410 Gone at {}; stopped taking messages (they stay in the \
             queue); change spec.destination.url or annotate the Integration to retry",
            self.url,
            httpdate::fmt_http_date(self.at)
        )
    }
}

/// The first 410 of this worker's destination, once it came: set once, never cleared (the worker
/// exits), watched by `Worker::serve` to stop consuming.
pub struct GoneLatch {
    /// `None` with Webhooks: a 410 dead-letters that Webhook's copy, it never stops the fleet.
    destination: Option<Url>,
    tx: watch::Sender<Option<Gone>>,
}

impl GoneLatch {
    pub fn new(destination: Option<Url>) -> Self {
        Self {
            destination,
            tx: watch::Sender::new(None),
        }
    }

    /// Whether the destination answered 410: no more requests.
    pub fn is_set(&self) -> bool {
        self.tx.borrow().is_some()
    }

    /// Records the first 410: the gauge, the log line, and the signal that stops consuming.
    pub fn set(&self, metrics: &Metrics) {
        let Some(destination) = &self.destination else {
            return;
        };
        let gone = Gone::new(destination, SystemTime::now());
        let first = self.tx.send_if_modified(|g| {
            if g.is_some() {
                return false;
            }
            *g = Some(gone.clone());
            true
        });
        if first {
            metrics.destination_gone.set(1);
            error!(url = %gone.url, "the destination answered 410 Gone: draining and exiting");
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Gone>> {
        self.tx.subscribe()
    }

    /// After the drain: exit code `DESTINATION_GONE` and the termination message, once set.
    pub fn fatal(&self) -> Option<Fatal> {
        self.tx.borrow().as_ref().map(|g| Fatal {
            code: exit::DESTINATION_GONE,
            message: g.message(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_the_url_without_userinfo_and_the_time() {
        let url = Url::parse("https://user:s3cret@erp.example.com/hooks?x=1").unwrap();
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let m = Gone::new(&url, at).message();
        assert!(m.contains("https://***@erp.example.com/hooks?x=1"), "{m}");
        assert!(m.contains("Tue, 14 Nov 2023 22:13:20 GMT"), "{m}");
        assert!(!m.contains("s3cret") && !m.contains("user"), "{m}");
        assert!(!m.contains('\n'));
        let plain = Url::parse("http://hooks.example.com/a").unwrap();
        assert_eq!(
            hookfleet_crds::redact::userinfo(plain.as_str()),
            "http://hooks.example.com/a"
        );
    }
}
