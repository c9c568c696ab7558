//! The file-descriptor budget. containerd 2.x starts containers at 1024 soft / 524288 hard and
//! Kubernetes cannot raise it, so the worker raises its own soft `RLIMIT_NOFILE` and refuses to start
//! when even the hard limit cannot hold what its concurrency needs.

use hookfleet_crds::contract::FD_LIMIT_MESSAGE;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept for everything that is not a delivery: the broker connection and its I/O thread,
/// the metrics listener and a few scrapes, DNS lookups, logs, the runtime's own (epoll, eventfds).
pub const RESERVE: u64 = 64;

/// What `concurrency` deliveries can hold open at once: a connection per delivery in flight plus as
/// many idle keep-alive connections in the pool (the pool is capped at `concurrency` idle), plus
/// [`RESERVE`].
pub fn required(concurrency: usize) -> u64 {
    2 * concurrency as u64 + RESERVE
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit towards `wanted` (never above the hard limit, never lowers it), then checks
/// it against `needed`. The error is the line for the termination message, with the numbers.
pub fn raise(wanted: u64, needed: u64, concurrency: usize) -> Result<Limits, String> {
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    let target = wanted.min(hard);
    let soft = if target > soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)
            .map_err(|e| format!("setrlimit(RLIMIT_NOFILE, {target}, {hard}): {e}"))?;
        target
    } else {
        soft
    };
    check(Limits { soft, hard }, wanted, needed, concurrency)?;
    Ok(Limits { soft, hard })
}

/// The refusal, when `limits` cannot hold `needed`.
pub fn check(limits: Limits, wanted: u64, needed: u64, concurrency: usize) -> Result<(), String> {
    if limits.soft >= needed {
        return Ok(());
    }
    Err(format!(
        "{FD_LIMIT_MESSAGE}: RLIMIT_NOFILE is {} (hard limit {}, --fd-limit asked for {wanted}) but \
         --concurrency {concurrency} needs {needed} ({concurrency} in flight + {concurrency} idle pooled + {RESERVE} \
         reserve); lower --concurrency or raise the hard limit",
        limits.soft, limits.hard
    ))
}

/// Open descriptors of this process (entries of `/proc/self/fd`), when readable.
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_and_refusal_say_the_numbers() {
        assert_eq!(required(128), 320);
        assert!(check(Limits { soft: 320, hard: 320 }, 1_048_576, 320, 128).is_ok());
        let err = check(Limits { soft: 256, hard: 256 }, 1_048_576, required(200), 200).unwrap_err();
        for n in ["256", "1048576", "464", "200", "64"] {
            assert!(err.contains(n), "{n} missing in: {err}");
        }
    }

    /// Other tests of this process open and close descriptors at the same time, so "one more than
    /// before" is a race (it failed once in CI); the files held here are a floor no other test can lower.
    #[test]
    fn open_fds_counts_this_process() {
        const HELD: u64 = 200;
        let files: Vec<std::fs::File> = (0..HELD)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        let counted = open_fds().unwrap();
        assert!(
            counted >= HELD,
            "{counted} open fds counted while {HELD} files are held"
        );
        drop(files);
    }
}
