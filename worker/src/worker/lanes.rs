//! Two lanes of concurrency: fresh messages (the work queue) and due retries (the retry-ready queue,
//! see `topology`), each consumed on its own channel with its own prefetch, by the same loop
//! (`consume`).
//!
//! The `--concurrency` slots are split in two pools: `⌊C/2⌋` *reserved* for fresh messages and the
//! rest *shared*. Fresh messages take a slot from either pool; retries only from the shared one. So:
//!
//! - however many retries are due (an endpoint that just recovered from an hour's outage), fresh
//!   traffic keeps at least half the slots, and competes for the other half too: the semaphore is
//!   FIFO, and the fresh lane keeps its place in the shared queue across messages ([`FreshWait`]),
//!   so it gets about every other shared slot that frees up. With a latency-bound destination that
//!   is ≥ 50% of its unloaded rate (without the kept place, each reserved slot it took sent it to
//!   the back of the shared queue, and it got little more than its half: 0.56–0.61 measured; with
//!   it, 0.69). The price: while fresh traffic is idle, one shared slot may sit granted to that wait;
//! - with no retries due, fresh traffic uses all `C` slots: nothing is held idle;
//! - retries use at most `⌈C/2⌉` slots: a retry storm drains at half speed at worst, which also
//!   spares the endpoint that just came back;
//! - in-flight deliveries never exceed `C`, so the file-descriptor budget is unchanged.
//!
//! Why half: the guarantee asked for is half the unloaded rate under any retry backlog; a larger
//! reserve would slow the drain of retries, which are older and just as wanted, for no gain in the
//! common case (no backlog) where fresh traffic has every slot anyway. With `C = 1` nothing can be
//! reserved: the one slot is shared.
//!
//! The operator's "consumers on the work queue vs ready workers" check is untouched: each worker still
//! has exactly one consumer on the work queue (and one on the retry-ready queue).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

type Acquiring = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The fresh lane's wait for a shared slot, kept across messages so that taking a reserved slot does
/// not give up its place in the shared queue. One per session (dropping it gives a slot it was
/// granted back).
#[derive(Default)]
pub struct FreshWait(Option<Acquiring>);

/// Which slots a lane's messages take.
pub enum Lane {
    /// The work queue's: a reserved slot or a shared one, whichever comes first.
    Fresh(FreshWait),
    /// The retry-ready queue's: a shared slot.
    Retries,
}

const CLOSED: &str = "the lane semaphores are never closed";

/// The concurrency slots of both lanes.
pub struct Lanes {
    reserved: Arc<Semaphore>,
    shared: Arc<Semaphore>,
    reserved_n: usize,
    shared_n: usize,
}

impl Lanes {
    pub fn new(concurrency: usize) -> Self {
        let reserved_n = concurrency / 2;
        let shared_n = concurrency - reserved_n;
        Self {
            reserved: Arc::new(Semaphore::new(reserved_n)),
            shared: Arc::new(Semaphore::new(shared_n)),
            reserved_n,
            shared_n,
        }
    }

    /// Slots only fresh messages may take.
    pub fn reserved_for_fresh(&self) -> usize {
        self.reserved_n
    }

    /// Slots both lanes may take.
    pub fn shared(&self) -> usize {
        self.shared_n
    }

    /// Waits for a slot for the next message of `lane`. Cancel-safe.
    pub async fn acquire(&self, lane: &mut Lane) -> OwnedSemaphorePermit {
        match lane {
            Lane::Fresh(wait) => self.acquire_fresh(wait).await,
            Lane::Retries => self.acquire_retry().await,
        }
    }

    /// Waits for a slot for a fresh message: a reserved one or a shared one, whichever comes first.
    /// Cancel-safe: the wait for a shared slot stays in `wait`.
    pub async fn acquire_fresh(&self, wait: &mut FreshWait) -> OwnedSemaphorePermit {
        let shared = self.shared.clone();
        let pending = wait.0.get_or_insert_with(|| Box::pin(shared.acquire_owned()));
        let (permit, from_shared) = tokio::select! {
            biased;
            p = self.reserved.clone().acquire_owned() => (p, false),
            p = pending.as_mut() => (p, true),
        };
        if from_shared {
            wait.0 = None;
        }
        permit.expect(CLOSED)
    }

    /// Waits for a slot for a retry: a shared one. Cancel-safe (a slot granted to a dropped wait
    /// goes back).
    pub async fn acquire_retry(&self) -> OwnedSemaphorePermit {
        self.shared.clone().acquire_owned().await.expect(CLOSED)
    }

    /// Deliveries holding a slot.
    pub fn in_flight(&self) -> usize {
        self.reserved_n + self.shared_n - self.reserved.available_permits() - self.shared.available_permits()
    }

    /// Waits up to `grace` for every slot to be free; false when the grace ran out first.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let all = async {
            let _r = self.reserved.acquire_many(self.reserved_n as u32).await;
            let _s = self.shared.acquire_many(self.shared_n as u32).await;
        };
        tokio::time::timeout(grace, all).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fresh_keeps_half_the_slots_whatever_the_retries_hold() {
        let lanes = Lanes::new(8);
        let mut wait = FreshWait::default();
        assert_eq!(lanes.reserved_for_fresh(), 4);
        // A backlog of retries takes every slot it may: the shared half.
        let mut retries = Vec::new();
        for _ in 0..4 {
            retries.push(lanes.acquire_retry().await);
        }
        let more = tokio::time::timeout(Duration::from_millis(50), lanes.acquire_retry()).await;
        assert!(more.is_err(), "retries never take a reserved slot");
        // Fresh messages still get the reserved half at once.
        let mut fresh = Vec::new();
        for _ in 0..4 {
            let p = tokio::time::timeout(Duration::from_millis(50), lanes.acquire_fresh(&mut wait)).await;
            fresh.push(p.expect("a reserved slot is free"));
        }
        assert_eq!(lanes.in_flight(), 8);
        assert!(!lanes.wait_idle(Duration::from_millis(20)).await);
        drop(retries);
        drop(fresh);
        assert_eq!(lanes.in_flight(), 0);
        assert!(lanes.wait_idle(Duration::from_millis(20)).await);
    }

    #[tokio::test]
    async fn without_retries_fresh_traffic_uses_every_slot() {
        let lanes = Lanes::new(5);
        let mut wait = FreshWait::default();
        let mut held = Vec::new();
        for _ in 0..5 {
            let p = tokio::time::timeout(Duration::from_millis(50), lanes.acquire_fresh(&mut wait)).await;
            held.push(p.expect("a free slot"));
        }
        assert_eq!(lanes.in_flight(), 5);
        // One slot: nothing to reserve, fresh and retries share it.
        let one = Lanes::new(1);
        let mut wait = FreshWait::default();
        assert_eq!(one.reserved_for_fresh(), 0);
        let p = one.acquire_retry().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), one.acquire_fresh(&mut wait))
                .await
                .is_err()
        );
        drop(p);
        let _p = one.acquire_fresh(&mut wait).await;
    }

    /// Both lanes saturated: the fresh lane keeps its place in the shared queue while it takes
    /// reserved slots, so the shared slots that free up alternate between the lanes.
    #[tokio::test]
    async fn shared_slots_alternate_between_the_lanes() {
        let lanes = Arc::new(Lanes::new(4));
        let mut wait = FreshWait::default();
        let r1 = lanes.acquire_retry().await;
        let r2 = lanes.acquire_retry().await;
        let f1 = lanes.acquire_fresh(&mut wait).await;
        let _f2 = lanes.acquire_fresh(&mut wait).await;
        // The fresh lane waits (queued on the shared pool), then the retry lane.
        let fresh_waiting =
            tokio::time::timeout(Duration::from_millis(20), lanes.acquire_fresh(&mut wait)).await;
        assert!(fresh_waiting.is_err());
        let l = lanes.clone();
        let retry_waiting = tokio::spawn(async move { l.acquire_retry().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A reserved slot frees: the fresh lane takes it, and keeps its place in the shared queue.
        drop(f1);
        let _f3 = lanes.acquire_fresh(&mut wait).await;
        // A shared slot frees: it goes to the fresh lane (first in the queue), not to the retry lane.
        drop(r1);
        let f4 = tokio::time::timeout(Duration::from_millis(50), lanes.acquire_fresh(&mut wait)).await;
        assert!(f4.is_ok(), "the fresh lane kept its place");
        assert!(!retry_waiting.is_finished());
        // The next shared slot goes to the retry lane.
        drop(r2);
        let r3 = tokio::time::timeout(Duration::from_millis(50), retry_waiting).await;
        assert!(r3.is_ok(), "then the retry lane");
    }
}
