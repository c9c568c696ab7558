//! With Webhooks: publishing what this worker saw of each Webhook ([`Report`]) to the fleet's reports
//! queue, every [`EVERY`] and once more at shutdown, through the session's confirm-mode publisher.
//! A report not confirmed goes back into the tallies and rides with the next one; it never holds up
//! a delivery.

use std::sync::Arc;
use std::time::Duration;

use hookfleet_crds::contract::webhooks::reports_queue;
use lapin::BasicProperties;
use tracing::{debug, warn};

use super::broker::Session;
use super::shared::Worker;

/// How often a worker reports.
pub const EVERY: Duration = Duration::from_secs(5);

impl Worker {
    pub(super) fn set_report_session(&self, session: Option<Arc<Session>>) {
        if let Some(h) = &self.hooks {
            *h.session.lock().unwrap_or_else(|e| e.into_inner()) = session;
        }
    }

    /// Publishes the tallies since the last report, if any (merged back when not confirmed).
    pub(super) async fn report(&self) {
        let Some(hooks) = &self.hooks else { return };
        let Some(report) = hooks.tallies.take(&hooks.worker_name, crate::message::now_ms()) else {
            return;
        };
        let session = hooks.session.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(session) = session else {
            hooks.tallies.merge_back(report);
            return;
        };
        let body = serde_json::to_vec(&report).expect("a report serializes");
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let queue = reports_queue(&self.cfg.queue);
        match session.publisher.publish(&queue, &body, props).await {
            Ok(()) => {
                self.metrics.reports.get_or_create(&vec![("result", "ok")]).inc();
                debug!(webhooks = report.webhooks.len(), queue = %queue, "report published");
            }
            Err(e) => {
                self.metrics
                    .reports
                    .get_or_create(&vec![("result", "failed")])
                    .inc();
                warn!(error = %e, queue = %queue, "report not published; it goes with the next");
                hooks.tallies.merge_back(report);
            }
        }
    }
}
