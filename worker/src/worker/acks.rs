//! Acks on one consume channel, coalesced into `multiple` acks where that is safe.
//!
//! A delivery task that wants its message acked hands the delivery tag to the channel's acker task
//! and waits for the frame that carries it. The acker sends one round of frames for every tag
//! waiting, and while a frame is on its way the next tags pile up (as in a group commit): under load
//! one `basic.ack` covers many messages, and with one message in flight it goes out at once. Nothing
//! waits for a timer.
//!
//! The rule that keeps this safe: `basic.ack(T, multiple)` settles *every* unacked tag up to T on
//! the channel, so it is sent only when every tag up to T that this consumer received and has not
//! settled yet is one whose ack is wanted. A tag still being delivered, one left unacked to go back
//! with the channel (a hand-back) or one whose nack is on its way blocks the run: the tags above it
//! are acked one by one, never with `multiple`. Every tag the consume loop receives is registered
//! ([`Acks::received`]) before its task starts, and a tag settled otherwise (nack) is removed only
//! after its frame was sent ([`Acks::nacked`]), so no ack can cover it by accident.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// One `basic.ack` frame: `tag`, and whether it covers every unacked tag below it as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub tag: u64,
    pub multiple: bool,
}

/// What the consume loop and the delivery tasks know about the channel's unsettled tags.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Received and not settled yet (in delivery, waiting for an ack frame, or left unacked).
    unsettled: BTreeSet<u64>,
    /// Tags whose ack is wanted and not yet sent.
    wanted: BTreeSet<u64>,
}

impl Ledger {
    pub fn received(&mut self, tag: u64) {
        self.unsettled.insert(tag);
    }

    pub fn want(&mut self, tag: u64) {
        debug_assert!(
            self.unsettled.contains(&tag),
            "ack of a tag never received: {tag}"
        );
        self.wanted.insert(tag);
    }

    /// Settled by another frame (a nack that was sent).
    pub fn settled(&mut self, tag: u64) {
        self.unsettled.remove(&tag);
        self.wanted.remove(&tag);
    }

    /// The frames that ack every wanted tag, and the tags they settle: one `multiple` ack for the
    /// wanted tags below the lowest unsettled tag that is not wanted (the first blocker), one single
    /// ack for each wanted tag above it. The tags are settled from here on.
    pub fn plan(&mut self) -> (Vec<Frame>, Vec<u64>) {
        let wanted = std::mem::take(&mut self.wanted);
        if wanted.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let blocker = self.unsettled.iter().copied().find(|t| !wanted.contains(t));
        let mut frames = Vec::new();
        let (run, above): (Vec<u64>, Vec<u64>) = wanted.iter().partition(|&&t| blocker.is_none_or(|b| t < b));
        if let Some(&top) = run.last() {
            // A run of one needs no `multiple`: keep the frame plain, as a lone ack would be.
            frames.push(Frame {
                tag: top,
                multiple: run.len() > 1,
            });
        }
        frames.extend(above.iter().map(|&tag| Frame { tag, multiple: false }));
        for t in &wanted {
            self.unsettled.remove(t);
        }
        (frames, wanted.into_iter().collect())
    }
}

/// The coalescing acker of one consume channel: a task that owns the [`Ledger`] and sends the frames.
/// The consume loop and the delivery tasks talk to it through one queue, so a tag's `received`
/// always comes before its `ack` (the consume loop sends it before it spawns the delivery task).
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Note>,
    timeout: Duration,
}

enum Note {
    Received(u64),
    Nacked(u64),
    Ack(u64, oneshot::Sender<bool>),
}

impl Acks {
    /// Starts the acker of `ch`; it ends when the last handle is dropped. `timeout` bounds the wait
    /// for a frame: a connection the broker blocks (flow control) writes nothing, and a task must
    /// not hold its slot forever.
    pub fn start(ch: Channel, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_frames(ch, rx, timeout));
        Self { tx, timeout }
    }

    /// The consume loop received `tag` (call before its task can settle it).
    pub fn received(&self, tag: u64) {
        let _ = self.tx.send(Note::Received(tag));
    }

    /// `tag` was nacked (the frame is sent): it no longer blocks a `multiple` ack.
    pub fn nacked(&self, tag: u64) {
        let _ = self.tx.send(Note::Nacked(tag));
    }

    /// Acks `tag`; true once a frame carrying it was sent, false when the channel is gone or the
    /// frame was not sent within the timeout (the broker then redelivers the message: a duplicate
    /// with the same webhook-id).
    pub async fn ack(&self, tag: u64) -> bool {
        let (tx, rx) = oneshot::channel();
        // If the acker has stopped, the note (and `tx` in it) is dropped and `rx` says so.
        let _ = self.tx.send(Note::Ack(tag, tx));
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(sent)) => sent,
            Ok(Err(_)) => {
                warn!("ack not sent: the session's acker has stopped; the broker will redeliver");
                false
            }
            Err(_) => {
                warn!(timeout = ?self.timeout, "ack not sent in time (connection blocked?); the broker will redeliver");
                false
            }
        }
    }
}

/// The acker's task: takes every note waiting, sends the frames the ledger plans, answers the tasks
/// whose tags they carried; while a frame is on its way, the next acks pile up for the next round.
async fn send_frames(ch: Channel, mut rx: mpsc::UnboundedReceiver<Note>, timeout: Duration) {
    let mut ledger = Ledger::default();
    let mut waiters: BTreeMap<u64, oneshot::Sender<bool>> = BTreeMap::new();
    let note = |n: Note, ledger: &mut Ledger, waiters: &mut BTreeMap<u64, oneshot::Sender<bool>>| match n {
        Note::Received(t) => ledger.received(t),
        Note::Nacked(t) => ledger.settled(t),
        Note::Ack(t, w) => {
            ledger.want(t);
            waiters.insert(t, w);
        }
    };
    while let Some(n) = rx.recv().await {
        note(n, &mut ledger, &mut waiters);
        while let Ok(n) = rx.try_recv() {
            note(n, &mut ledger, &mut waiters);
        }
        let (frames, tags) = ledger.plan();
        if frames.is_empty() {
            continue;
        }
        let mut sent = true;
        for f in &frames {
            let frame = ch.basic_ack(f.tag, BasicAckOptions { multiple: f.multiple });
            match tokio::time::timeout(timeout, frame).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, messages = tags.len(), "ack failed; the broker will redeliver");
                    sent = false;
                    break;
                }
                Err(_) => {
                    sent = false;
                    break;
                }
            }
        }
        for t in &tags {
            if let Some(w) = waiters.remove(t) {
                let _ = w.send(sent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u64, multiple: bool) -> Frame {
        Frame { tag, multiple }
    }

    #[test]
    fn a_contiguous_run_is_one_multiple_ack() {
        let mut l = Ledger::default();
        (1..=5).for_each(|t| l.received(t));
        [3, 1, 2].into_iter().for_each(|t| l.want(t));
        assert_eq!(l.plan(), (vec![frame(3, true)], vec![1, 2, 3]));
        // 4 and 5 are still in delivery; nothing more to send.
        assert_eq!(l.plan(), (vec![], vec![]));
        l.want(5);
        // 4 blocks nothing below 5 any more but is below it: 5 alone, plain.
        assert_eq!(l.plan(), (vec![frame(5, false)], vec![5]));
        l.want(4);
        assert_eq!(l.plan(), (vec![frame(4, false)], vec![4]));
    }

    #[test]
    fn a_tag_in_delivery_blocks_multiple_above_it() {
        let mut l = Ledger::default();
        (1..=6).for_each(|t| l.received(t));
        [1, 2, 4, 5, 6].into_iter().for_each(|t| l.want(t));
        // 3 is still being delivered: acking 6 with `multiple` would settle it.
        assert_eq!(
            l.plan(),
            (
                vec![frame(2, true), frame(4, false), frame(5, false), frame(6, false)],
                vec![1, 2, 4, 5, 6]
            )
        );
    }

    #[test]
    fn a_handed_back_tag_is_never_covered() {
        let mut l = Ledger::default();
        (1..=4).for_each(|t| l.received(t));
        // 1 is handed back without a nack (left unacked until the channel closes): it stays
        // unsettled for good, and every ack above it is single.
        for round in [vec![2, 3], vec![4]] {
            round.iter().for_each(|&t| l.want(t));
            let (frames, _) = l.plan();
            assert!(frames.iter().all(|f| !f.multiple), "{frames:?}");
        }
        assert!(l.unsettled.contains(&1));
    }

    #[test]
    fn a_nacked_tag_stops_blocking_once_its_nack_is_sent() {
        let mut l = Ledger::default();
        (1..=4).for_each(|t| l.received(t));
        [1, 3, 4].into_iter().for_each(|t| l.want(t));
        // 2's nack is on its way: it still blocks.
        assert_eq!(
            l.plan(),
            (
                vec![frame(1, false), frame(3, false), frame(4, false)],
                vec![1, 3, 4]
            )
        );
        l.settled(2);
        (5..=7).for_each(|t| l.received(t));
        [5, 6, 7].into_iter().for_each(|t| l.want(t));
        assert_eq!(l.plan(), (vec![frame(7, true)], vec![5, 6, 7]));
        assert!(l.unsettled.is_empty());
    }

    /// Plans a round and checks it against the broker's view: every frame covers only wanted tags (a
    /// `multiple` frame covers every unsettled tag up to its own), each at most once; `acked` collects them.
    fn plan_and_check(l: &mut Ledger, acked: &mut BTreeSet<u64>) {
        let before = l.unsettled.clone();
        let wanted = l.wanted.clone();
        let (frames, tags) = l.plan();
        assert_eq!(tags.iter().copied().collect::<BTreeSet<_>>(), wanted);
        for f in frames {
            let covered: Vec<u64> = if f.multiple {
                before.range(..=f.tag).copied().collect()
            } else {
                vec![f.tag]
            };
            for c in covered {
                assert!(wanted.contains(&c), "frame {f:?} covers {c}, not wanted");
                assert!(acked.insert(c), "{c} acked twice");
            }
        }
    }

    #[test]
    fn every_wanted_tag_is_planned_exactly_once() {
        // Random interleavings: every planned frame covers only wanted tags (a `multiple` frame
        // covers every unsettled tag up to its own), and every wanted tag is covered once.
        use rand::Rng;
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        for _ in 0..500 {
            let n = rng.random_range(1..40u64);
            let mut l = Ledger::default();
            let mut order: Vec<u64> = (1..=n).collect();
            order.shuffle(&mut rng);
            (1..=n).for_each(|t| l.received(t));
            let mut acked = BTreeSet::new();
            let mut kept_back = BTreeSet::new();
            for t in order {
                if rng.random_bool(0.1) {
                    kept_back.insert(t); // handed back, never acked
                } else {
                    l.want(t);
                }
                if rng.random_bool(0.3) {
                    plan_and_check(&mut l, &mut acked);
                }
            }
            plan_and_check(&mut l, &mut acked);
            assert!(acked.is_disjoint(&kept_back));
            assert_eq!(acked.len() + kept_back.len(), n as usize);
        }
    }
}
