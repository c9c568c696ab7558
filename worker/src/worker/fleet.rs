//! A rate limit for the whole fleet (`--rate-limit-scope fleet`): each worker takes
//! `--rate-limit / consumers` (burst likewise, at least 1), where *consumers* is the number of
//! consumers attached to the work queue, which the broker reports on a passive declare: one per
//! running worker, this one included. Re-read every [`FLEET_POLL`], so a fleet that scales (by hand or
//! by autoscaling) rebalances within seconds without a change of the pod template, hence without a
//! rollout. Between two reads the fleet may briefly exceed the limit (a worker just started, the others
//! not yet aware) or fall short of it (a worker just stopped).

use std::sync::Arc;
use std::time::Duration;

use hookfleet_crds::integration::RateLimitScope;
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::error::SessionError;
use super::shared::Worker;

/// How often the consumer count is re-read.
pub const FLEET_POLL: Duration = Duration::from_secs(5);

/// The poller of one session; stops when dropped.
pub struct FleetShare(JoinHandle<()>);

impl Drop for FleetShare {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker's share of a fleet-wide limit `(per second, burst)` among `consumers` workers.
pub fn share(limit: (u32, u32), consumers: u32) -> (f64, f64) {
    let n = f64::from(consumers.max(1));
    (f64::from(limit.0) / n, (f64::from(limit.1) / n).max(1.0))
}

impl Worker {
    /// With a fleet-wide rate limit: opens a channel on `conn` and keeps this worker's share current
    /// for as long as the session lasts. `None` otherwise.
    pub(super) async fn start_fleet_share(
        self: &Arc<Self>,
        conn: &Connection,
    ) -> Result<Option<FleetShare>, SessionError> {
        let (Some(limit), RateLimitScope::Fleet) = (self.cfg.rate_limit, self.cfg.rate_limit_scope) else {
            return Ok(None);
        };
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
                        if n != last {
                            let (per_second, burst) = share(limit, n);
                            if let Some(l) = &worker.limiter {
                                l.set_rate(per_second, burst).await;
                            }
                            worker.metrics.rate_limit.set(per_second);
                            info!(
                                consumers = n,
                                per_second, burst, "fleet-wide rate limit: this worker's share"
                            );
                            last = n;
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
