//! The bytes a worker holds, and the memory the operator gives it: one formula for both sides.
//!
//! RabbitMQ ignores `basic.qos`'s prefetch in bytes, so what bounds the message bytes a worker holds is
//! the prefetch in messages times the largest message it takes. The worker has two lanes (the work
//! queue and the retry-ready queue), each a consumer with its own prefetch; each lane's prefetch is
//! lowered so that both together hold at most `--in-flight-bytes` of messages no larger than
//! `--max-message-bytes` ([`effective_prefetch`]; at least one message per lane). A message above
//! the maximum is dead-lettered unread (`too_large`), but it is received whole first: its size is
//! bounded only by the broker's `max_message_size` (docs/worker.md, "Memory").
//!
//! The operator renders the container's memory request and limit from the same bound
//! ([`worker_memory_bytes`]): an idle worker's footprint plus the held bytes times the overhead
//! measured for large messages (the frames being assembled, the body's copy in a dead-letter or retry
//! publish, the allocator's slack). `worker/tests/memory.rs` measures the peak RSS against it.

/// Lanes, each a consumer with its own prefetch.
pub const LANES: u64 = 2;

/// What the worker needs besides the messages it holds: its RSS once consuming (35 MiB measured in
/// `worker/tests/memory.rs`), its HTTP and AMQP buffers, with room to spare.
pub const BASE_BYTES: u64 = 64 * MIB;

/// Memory per held message byte, in percent. Each held message may have one copy besides it: the
/// retry or dead-letter copy being published (lapin copies the body into frames), so 200%; measured
/// 190–208% in three runs (peak RSS less the idle RSS, over [`held_bytes`], both lanes full, every
/// message retried once: `worker/tests/memory.rs`, docs/worker.md "Memory"), plus 50 points for the
/// allocator's retained pages and the frames being read.
pub const OVERHEAD_PERCENT: u64 = 250;

const MIB: u64 = 1024 * 1024;

/// Each lane's prefetch: `prefetch`, lowered so that both lanes hold at most `in_flight_bytes` of
/// messages of `max_message_bytes` each; at least 1.
pub fn effective_prefetch(prefetch: u16, max_message_bytes: u32, in_flight_bytes: u64) -> u16 {
    let per_lane = in_flight_bytes / LANES / u64::from(max_message_bytes.max(1));
    u16::try_from(per_lane)
        .unwrap_or(u16::MAX)
        .clamp(1, prefetch.max(1))
}

/// The message bytes a worker holds at most (both lanes at their effective prefetch, every message at
/// the maximum size).
pub fn held_bytes(prefetch: u16, max_message_bytes: u32, in_flight_bytes: u64) -> u64 {
    LANES
        * u64::from(effective_prefetch(prefetch, max_message_bytes, in_flight_bytes))
        * u64::from(max_message_bytes)
}

/// The memory a worker needs, rounded up to a MiB: [`BASE_BYTES`] plus [`held_bytes`] times
/// [`OVERHEAD_PERCENT`].
pub fn worker_memory_bytes(prefetch: u16, max_message_bytes: u32, in_flight_bytes: u64) -> u64 {
    let held = held_bytes(prefetch, max_message_bytes, in_flight_bytes);
    let bytes = BASE_BYTES + held.saturating_mul(OVERHEAD_PERCENT).div_ceil(100);
    bytes.div_ceil(MIB) * MIB
}

/// [`worker_memory_bytes`] as a Kubernetes quantity (`<n>Mi`).
pub fn worker_memory_quantity(prefetch: u16, max_message_bytes: u32, in_flight_bytes: u64) -> String {
    let mib = worker_memory_bytes(prefetch, max_message_bytes, in_flight_bytes) / MIB;
    format!("{mib}Mi")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integration::{WorkersSpec, default_max_message_bytes};

    #[test]
    fn the_prefetch_is_lowered_to_the_budget_never_below_one() {
        let (m, budget) = (
            default_max_message_bytes(),
            WorkersSpec::default().in_flight_bytes as u64,
        );
        assert_eq!(
            effective_prefetch(64, m, budget),
            64,
            "the defaults keep the default prefetch"
        );
        assert_eq!(effective_prefetch(200, m, budget), 64);
        assert_eq!(effective_prefetch(64, 16 * MIB as u32, budget), 4);
        assert_eq!(effective_prefetch(2, 16 * MIB as u32, budget), 2);
        assert_eq!(effective_prefetch(64, 128 * MIB as u32, MIB), 1);
        assert_eq!(effective_prefetch(u16::MAX, 1024, 1 << 40), u16::MAX);
    }

    #[test]
    fn the_memory_is_the_base_plus_the_held_bytes_with_their_overhead() {
        let held = held_bytes(64, 16 * MIB as u32, 128 * MIB);
        assert_eq!(held, 128 * MIB);
        let want = BASE_BYTES + held * OVERHEAD_PERCENT / 100;
        assert_eq!(worker_memory_bytes(64, 16 * MIB as u32, 128 * MIB), want);
        assert_eq!(
            worker_memory_quantity(64, 16 * MIB as u32, 128 * MIB),
            format!("{}Mi", want / MIB)
        );
        // Rounded up to a MiB.
        assert_eq!(worker_memory_bytes(1, 1024, MIB) % MIB, 0);
    }
}
