//! A rate limit for the whole fleet (`--rate-limit-scope fleet`, and each Webhook's with `scope: fleet`
//! in the snapshot): each worker takes
//! `--rate-limit / consumers` (burst likewise, at least 1), where *consumers* is the number of
//! consumers attached to the work queue, which the broker reports on a passive declare: one per
//! running worker, this one included. Re-read every [`FLEET_POLL`], so a fleet that scales (by hand or
//! by autoscaling) rebalances within seconds without a change of the pod template, hence without a
//! rollout. Between two reads the fleet may briefly exceed the limit (a worker just started, the others
//! not yet aware) or fall short of it (a worker just stopped).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hookfleet_crds::integration::RateLimitScope;
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::error::SessionError;
use super::shared::Worker;
use crate::ratelimit::share;

/// How often the consumer count is re-read.
pub const FLEET_POLL: Duration = Duration::from_secs(5);

/// The poller of one session; stops when dropped.
pub struct FleetShare(JoinHandle<()>);

impl Drop for FleetShare {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Worker {
    /// With a fleet-wide rate limit, or with Webhooks (any of which may have one): opens a channel on
    /// `conn` and keeps this worker's shares current for as long as the session lasts. `None` otherwise.
    pub(super) async fn start_fleet_share(
        self: &Arc<Self>,
        conn: &Connection,
    ) -> Result<Option<FleetShare>, SessionError> {
        let limit = match (self.cfg.rate_limit, self.cfg.rate_limit_scope) {
            (Some(limit), RateLimitScope::Fleet) => Some(limit),
            _ => None,
        };
        if limit.is_none() && self.hooks.is_none() {
            return Ok(None);
        }
        let ch = conn.create_channel().await.map_err(SessionError::Channel)?;
        let worker = self.clone();
        let task = tokio::spawn(async move {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let mut last = 0;
            loop {
                match ch
                    .queue_declare(worker.cfg.queue.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    Ok(q) => {
                        let n = q.consumer_count().max(1);
                        if let Some(limit) = limit
                            && n != last
                        {
                            let (per_second, burst) = share(limit, n);
                            if let Some(l) = &worker.limiter {
                                l.set_rate(per_second, burst).await;
                            }
                            worker.metrics.rate_limit.set(per_second);
                            info!(
                                consumers = n,
                                per_second, burst, "fleet-wide rate limit: this worker's share"
                            );
                        }
                        last = n;
                        let reshared = worker.share_webhook_limits(n).await;
                        if reshared > 0 {
                            info!(
                                consumers = n,
                                webhooks = reshared,
                                "fleet-wide Webhook rate limits: this worker's shares"
                            );
                        }
                    }
                    Err(e) => {
                        // The session will notice its connection is gone; the share stays as it was.
                        warn!(error = %e, "reading the consumer count for the fleet-wide rate limit");
                        return;
                    }
                }
                tokio::time::sleep(FLEET_POLL).await;
            }
        });
        Ok(Some(FleetShare(task)))
    }

    /// With Webhooks: `consumers` workers now. Snapshots built from here on use it, and each Webhook of
    /// the live one with a fleet-wide rate limit whose share was for another count is reshared.
    /// Returns how many were.
    pub(super) async fn share_webhook_limits(&self, consumers: u32) -> usize {
        let Some(hooks) = &self.hooks else { return 0 };
        hooks.builder.set_consumers(consumers);
        let Some(snapshot) = hooks.live.current() else {
            return 0;
        };
        let mut reshared = 0;
        for hook in &snapshot.hooks {
            let (Some((limit, of)), Some(rate)) = (&hook.fleet_rate, &hook.rate) else {
                continue;
            };
            if of.swap(consumers, Ordering::Relaxed) != consumers {
                let (per_second, burst) = share(*limit, consumers);
                rate.set_rate(per_second, burst).await;
                reshared += 1;
            }
        }
        reshared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_divided_among_the_consumers() {
        assert_eq!(share((100, 200), 4), (25.0, 50.0));
        assert_eq!(share((10, 1), 3), (10.0 / 3.0, 1.0), "burst at least 1");
        assert_eq!(share((10, 10), 0), (10.0, 10.0), "no consumer yet: this one");
    }
}
