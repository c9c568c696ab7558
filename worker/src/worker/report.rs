//! With Webhooks: publishing what this worker saw of each Webhook ([`Report`]) to the fleet's reports
//! queue, every [`EVERY`] and once more at shutdown, through the session's confirm-mode publisher (on a
//! NATS source: to the reports stream, each report confirmed by JetStream's `PubAck`).
//! A report not confirmed goes back into the tallies and rides with the next one; it never holds up
//! a delivery. At the same pace, the bounded per-Webhook metric series ([`series`]).

use std::time::Duration;

use hookfleet_crds::contract::webhooks::{nats, reports_queue};
use lapin::BasicProperties;
use tracing::{debug, warn};

use super::pubacks::publish_confirmed;
use super::shared::{ReportSink, Worker};
use crate::webhooks::series::{self, STATES, Standing, replace};

/// How often a worker reports.
pub const EVERY: Duration = Duration::from_secs(5);

impl Worker {
    pub(super) fn set_report_session(&self, session: Option<ReportSink>) {
        if let Some(h) = &self.hooks {
            *h.session.lock().unwrap_or_else(|e| e.into_inner()) = session;
        }
    }

    /// Refreshes the per-Webhook metric series from the live snapshot, the runs of failures and the
    /// copies set aside: every state's count, and series of their own for the worst [`series::TOP`].
    pub(super) fn metric_series(&self) {
        let Some(hooks) = &self.hooks else { return };
        let Some(snapshot) = hooks.live.current() else {
            return;
        };
        let runs = hooks.tallies.consecutive();
        let set_aside = hooks.set_aside.take();
        let ranked = series::rank(
            snapshot.hooks.iter().map(|h| Standing {
                name: h.name.clone(),
                consecutive_failures: runs.get(&h.name).copied().unwrap_or(0),
                circuit_open: h.breaker.is_open(),
                set_aside: set_aside.get(&h.name).copied().unwrap_or(0),
                at_cap: h.in_flight.available_permits() == 0,
                paused: h.paused,
            }),
            series::TOP,
        );
        let m = &self.metrics;
        for (state, n) in STATES.iter().zip(ranked.by_state) {
            m.webhooks_by_state
                .get_or_create(&vec![("state", *state)])
                .set(n as i64);
        }
        m.webhooks_unlisted.set(ranked.unlisted as i64);
        let own = |s: &Standing| vec![("webhook", s.name.clone())];
        let mut states = Vec::new();
        let mut runs = Vec::new();
        let mut aside = Vec::new();
        for s in &ranked.listed {
            for state in s.states() {
                states.push((vec![("webhook", s.name.clone()), ("state", state.to_owned())], 1));
            }
            runs.push((own(s), s.consecutive_failures as i64));
            aside.push((own(s), s.set_aside as i64));
        }
        let mut exported = hooks.exported.lock().unwrap_or_else(|e| e.into_inner());
        replace(&m.webhook_state, &mut exported.states, states);
        replace(&m.webhook_consecutive_failures, &mut exported.runs, runs);
        replace(&m.webhook_set_aside, &mut exported.set_aside, aside);
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
        let (to, published) = match session {
            ReportSink::Amqp(session) => {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into());
                let queue = reports_queue(&self.cfg.queue);
                let r = session.publisher.publish(&queue, &body, props).await;
                (queue, r.map_err(|e| e.to_string()))
            }
            ReportSink::Nats(js) => {
                let subject = nats::reports_subject(&self.cfg.queue);
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Content-Type", "application/json");
                let r =
                    publish_confirmed(&js, subject.clone(), headers, &body, self.cfg.confirm_timeout).await;
                (subject, r.map_err(|e| e.to_string()))
            }
        };
        match published {
            Ok(()) => {
                self.metrics.reports.get_or_create(&vec![("result", "ok")]).inc();
                debug!(webhooks = report.webhooks.len(), to = %to, "report published");
            }
            Err(e) => {
                self.metrics
                    .reports
                    .get_or_create(&vec![("result", "failed")])
                    .inc();
                warn!(error = %e, to = %to, "report not published; it goes with the next");
                hooks.tallies.merge_back(report);
            }
        }
    }
}
