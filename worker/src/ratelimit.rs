//! A token bucket: at most `burst` requests at once, refilled at `per_second`. Both can change while
//! it runs ([`RateLimiter::set_rate`]: a worker's share of a fleet-wide limit).

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

struct Bucket {
    tokens: f64,
    last: Instant,
    per_second: f64,
    burst: f64,
}

impl Bucket {
    /// Adds the tokens earned since the last refill, up to the burst.
    fn refill(&mut self, now: Instant) {
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second).min(self.burst);
        self.last = now;
    }
}

pub struct RateLimiter {
    state: Mutex<Bucket>,
}

/// A worker's share of a fleet-wide limit `(per second, burst)` among `consumers` workers (burst at
/// least 1; no consumer yet counts as this one).
pub fn share(limit: (u32, u32), consumers: u32) -> (f64, f64) {
    let n = f64::from(consumers.max(1));
    (f64::from(limit.0) / n, (f64::from(limit.1) / n).max(1.0))
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self::with_rate(per_second as f64, burst as f64)
    }

    /// A bucket of `burst` tokens (at least 1) refilled at `per_second` (more than 0): a share.
    pub fn with_rate(per_second: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        Self {
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
                per_second: per_second.max(0.001),
                burst,
            }),
        }
    }

    /// Changes the rate and the burst (each at least 1 token's worth: `burst ≥ 1`, `per_second > 0`);
    /// tokens above the new burst are dropped.
    pub async fn set_rate(&self, per_second: f64, burst: f64) {
        let mut s = self.state.lock().await;
        s.refill(Instant::now());
        s.per_second = per_second.max(0.001);
        s.burst = burst.max(1.0);
        s.tokens = s.tokens.min(s.burst);
    }

    /// (per second, burst) now.
    pub async fn rate(&self) -> (f64, f64) {
        let s = self.state.lock().await;
        (s.per_second, s.burst)
    }

    /// Takes a token if there is one now; else how long until there is (nothing taken).
    pub async fn try_take(&self) -> Result<(), Duration> {
        let mut s = self.state.lock().await;
        s.refill(Instant::now());
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - s.tokens) / s.per_second))
    }

    /// Waits for a token. Callers hold no unacked-message state beyond their prefetch slot while
    /// waiting: this paces sends, it does not park retries.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                s.refill(Instant::now());
                if s.tokens >= 1.0 {
                    s.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.tokens) / s.per_second)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_after_the_burst() {
        let rl = RateLimiter::new(10, 5);
        let start = tokio::time::Instant::now();
        for _ in 0..15 {
            rl.acquire().await;
        }
        // 5 at once, then 10 more at 10/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(950) && took <= Duration::from_millis(1100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn try_take_never_waits_and_says_how_long() {
        let rl = RateLimiter::new(2, 2);
        assert_eq!(rl.try_take().await, Ok(()));
        assert_eq!(rl.try_take().await, Ok(()));
        let wait = rl.try_take().await.unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(rl.try_take().await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_share_takes_effect_at_once() {
        let rl = RateLimiter::new(10, 10);
        // Two workers share a fleet limit of 10/s: 5/s each, burst 5.
        rl.set_rate(5.0, 5.0).await;
        let start = tokio::time::Instant::now();
        for _ in 0..15 {
            rl.acquire().await;
        }
        // 5 at once (the burst, cut to the new one), then 10 at 5/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1950) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }
}
