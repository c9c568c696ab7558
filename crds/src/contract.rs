//! What the operator and the worker must agree on beyond the flags: the worker's exit codes. The
//! operator reads a crashed worker's exit code to choose the condition reason it reports.

/// Exit codes of `hookfleet-worker` (docs/worker.md, "Exit codes and the termination message").
pub mod exit {
    /// Invalid configuration.
    pub const INVALID_CONFIG: i32 = 2;
    /// The file-descriptor limit cannot be raised to what the concurrency needs.
    pub const FD_LIMIT: i32 = 3;
    /// A queue exists on the broker with other arguments than the worker declares (type, delivery
    /// limit, dead-letter settings): the broker refused the declaration with PRECONDITION_FAILED.
    pub const QUEUE_MISMATCH: i32 = 4;
    /// The destination answered 410 Gone: the worker handed the message back, stopped taking work,
    /// drained its in-flight deliveries and exited; the termination message names the URL (userinfo
    /// redacted) and the time.
    pub const DESTINATION_GONE: i32 = 5;
}
