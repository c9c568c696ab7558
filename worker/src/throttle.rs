//! Adaptive throttling (`--adaptive-throttle`), as Particle's integrations do: while a destination's
//! failures outnumber its successes, send it less. At the end of each window the worker compares the
//! retryable failures (timeouts, connection errors, 5xx, 408/425/429) with the other answers of the
//! window: more failures halve the attempts allowed in flight (not below the minimum); otherwise, if
//! anything succeeded, the limit grows by a tenth of `--concurrency` (at least 1), up to it.
//! Multiplicative decrease, additive increase: a struggling endpoint gets relief within a window or
//! two and is not flooded the moment it answers again.
//!
//! It complements the circuit breaker, which reacts to *consecutive* failures by stopping altogether:
//! an endpoint that fails half its requests never trips the breaker but is throttled here.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

struct State {
    limit: usize,
    /// The limit [`Throttle::record`] last reported (a window may end in `acquire` too).
    reported: usize,
    in_use: usize,
    ok: u32,
    failed: u32,
    window_start: Instant,
}

pub struct Throttle {
    min: usize,
    max: usize,
    window: Duration,
    state: Mutex<State>,
    freed: Notify,
}

/// One attempt let through; frees its place when dropped.
pub struct Pass<'a> {
    throttle: &'a Throttle,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.throttle.lock();
        s.in_use -= 1;
        drop(s);
        self.throttle.freed.notify_one();
    }
}

impl Throttle {
    /// Starts wide open (`max`).
    pub fn new(min: usize, max: usize, window: Duration) -> Self {
        let min = min.clamp(1, max.max(1));
        Self {
            min,
            max,
            window,
            state: Mutex::new(State {
                limit: max,
                reported: max,
                in_use: 0,
                ok: 0,
                failed: 0,
                window_start: Instant::now(),
            }),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The attempts allowed in flight now.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Lets an attempt start if the limit allows it now; never waits.
    pub fn try_acquire(&self) -> Option<Pass<'_>> {
        let mut s = self.lock();
        self.roll(&mut s);
        (s.in_use < s.limit).then(|| {
            s.in_use += 1;
            Pass { throttle: self }
        })
    }

    /// Waits until an attempt may start.
    pub async fn acquire(&self) -> Pass<'_> {
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                self.roll(&mut s);
                if s.in_use < s.limit {
                    s.in_use += 1;
                    return Pass { throttle: self };
                }
            }
            notified.await;
        }
    }

    /// Records an attempt's result (`healthy`: not a retryable failure). Returns the limit when it
    /// changed since the last call that returned one (for the gauge and the log).
    pub fn record(&self, healthy: bool) -> Option<usize> {
        let mut s = self.lock();
        self.roll(&mut s);
        if healthy {
            s.ok += 1;
        } else {
            s.failed += 1;
        }
        if s.limit != s.reported {
            s.reported = s.limit;
            return Some(s.limit);
        }
        None
    }

    /// Ends the window if it is over: adjusts the limit, starts a new one.
    fn roll(&self, s: &mut State) {
        if s.window_start.elapsed() < self.window {
            return;
        }
        let before = s.limit;
        if s.failed > s.ok {
            s.limit = (s.limit / 2).max(self.min);
        } else if s.ok > 0 {
            s.limit = (s.limit + (self.max / 10).max(1)).min(self.max);
        }
        s.ok = 0;
        s.failed = 0;
        s.window_start = Instant::now();
        if s.limit > before {
            self.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn try_acquire_never_waits_and_follows_the_limit() {
        let t = Throttle::new(1, 4, Duration::from_secs(10));
        let passes: Vec<_> = (0..4).map(|_| t.try_acquire().unwrap()).collect();
        assert!(t.try_acquire().is_none(), "at the limit: no pass, no wait");
        drop(passes);
        // A failing window halves it: two at once, then none.
        for _ in 0..3 {
            t.record(false);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let (a, b) = (t.try_acquire(), t.try_acquire());
        assert!(a.is_some() && b.is_some());
        assert!(t.try_acquire().is_none());
        assert_eq!(t.limit(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn halves_while_failures_outnumber_successes_then_recovers() {
        let t = Throttle::new(2, 40, Duration::from_secs(10));
        assert_eq!(t.limit(), 40);
        // A window of mostly failures: halved at its end, then again, never below the minimum.
        let mut limits = Vec::new();
        for _ in 0..6 {
            for i in 0..10 {
                t.record(i < 3);
            }
            tokio::time::advance(Duration::from_secs(10)).await;
            limits.push(t.record(false).unwrap_or(t.limit()));
        }
        assert_eq!(limits, [20, 10, 5, 2, 2, 2]);
        // As many failures as successes is not worse: no decrease. Then it recovers by 4 (a tenth).
        for i in 0..10 {
            t.record(i % 2 == 0);
        }
        t.record(true);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(t.record(true), Some(6));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(t.record(true), Some(10), "the previous window had one success");
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(t.acquire().await);
        assert_eq!(t.limit(), 14);
        assert_eq!(
            t.record(true),
            Some(14),
            "a window that ended in acquire is reported too"
        );
        assert_eq!(t.record(true), None);
        // A quiet window (nothing recorded) changes nothing.
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(t.acquire().await);
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(t.acquire().await);
        assert_eq!(t.limit(), 18, "one window had successes (+4), the next none (+0)");
    }

    #[tokio::test(start_paused = true)]
    async fn holds_attempts_beyond_the_limit_until_one_finishes() {
        let t = Throttle::new(1, 4, Duration::from_secs(1));
        for _ in 0..5 {
            t.record(false);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let a = t.acquire().await;
        assert_eq!(t.limit(), 2);
        let _b = t.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(100), t.acquire()).await;
        assert!(third.is_err(), "a third attempt waits at a limit of 2");
        drop(a);
        let third = tokio::time::timeout(Duration::from_millis(100), t.acquire()).await;
        assert!(third.is_ok(), "a finished attempt lets the next one through");
    }
}
