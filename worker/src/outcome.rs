//! What came of handling a message: the HTTP attempt's result, classified (delivered, worth a retry,
//! refused, gone), or why there was no attempt. What each outcome means for the message (its fate)
//! is decided in one place, `worker::fate`.

use std::error::Error as StdError;
use std::time::Duration;

/// What came of one handling of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: ack.
    Delivered { status: u16 },
    /// Worth another attempt (through a delay queue), unless attempts are exhausted.
    Retry {
        reason: &'static str,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// Not attempted: the circuit breaker is open. Deferred through a delay queue of about `delay`
    /// without spending an attempt.
    Deferred { delay: Duration },
    /// Retrying cannot help: dead-letter now.
    Reject {
        reason: &'static str,
        status: Option<u16>,
    },
    /// 410 Gone: the destination itself is gone, not this message. The message is handed back and the
    /// worker stops (exit `DESTINATION_GONE`): dead-lettering every message of the queue one by one
    /// would empty it into the dead-letter queue for a URL that will never answer again.
    Gone,
    /// Not attempted: an earlier 410 stopped the worker; the message waits in its queue.
    Stopped,
    /// Not attempted: the body template cannot render this message (`error`, one line), and never
    /// will.
    Unrenderable { error: String },
    /// Not attempted: the body is larger than `--max-message-bytes` (`size` > `max`), and always will be.
    TooLarge { size: usize, max: usize },
    /// Not attempted: with `--topology external` the broker has already redelivered it `count` times
    /// (`x-delivery-count`), at least the delivery limit: the worker's own poison-message limit.
    DeliveryLimit { count: u64, limit: u32 },
    /// Its handling panicked (a bug): whatever was done, it is not settled.
    Panicked,
}

/// Classifies an HTTP status. 408, 425, 429 and 5xx are transient; 410 means the destination is gone
/// (Standard Webhooks); other 4xx are the receiver refusing this message. A 3xx is a failure too (redirects are not followed, so a
/// destination cannot bounce deliveries elsewhere); it is retried, as a moved endpoint is usually a
/// configuration being fixed, and dead-lettered when attempts run out.
pub fn classify_status(status: u16, retry_after: Option<Duration>) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered { status },
        408 | 425 | 429 => Outcome::Retry {
            reason: "http_status",
            status: Some(status),
            retry_after,
        },
        300..=399 => Outcome::Retry {
            reason: "redirect",
            status: Some(status),
            retry_after: None,
        },
        410 => Outcome::Gone,
        400..=499 => Outcome::Reject {
            reason: "http_status",
            status: Some(status),
        },
        _ => Outcome::Retry {
            reason: "http_status",
            status: Some(status),
            retry_after,
        },
    }
}

/// Classifies a transport error (no response). All are transient; the reason tells them apart in
/// metrics, and `fd_exhausted` (EMFILE/ENFILE while connecting) has its own.
pub fn classify_error(err: &reqwest::Error) -> Outcome {
    let reason = if is_fd_exhaustion(err) {
        "fd_exhausted"
    } else if is_tls(err) {
        // The certificate is not trusted, the destination wants a client certificate, … : retried
        // (a CA or certificate Secret being fixed), and logged with the TLS error's own words.
        "tls"
    } else if err.is_timeout() {
        "timeout"
    } else if err.is_connect() {
        "connect"
    } else {
        "transport"
    };
    Outcome::Retry {
        reason,
        status: None,
        retry_after: None,
    }
}

/// Whether an error chain holds EMFILE (process out of descriptors) or ENFILE (system out of them).
pub fn is_fd_exhaustion(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Whether an error chain holds a TLS error (rustls's; hyper-rustls hands it up inside an io::Error,
/// whose `source` skips the error it wraps, so that one is looked into too).
pub fn is_tls(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
            && is_tls(inner)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// An error and its causes on one line (`a: b: c`): reqwest's own message alone says only "error
/// sending request".
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(classify_status(200, None), Outcome::Delivered { status: 200 });
        assert_eq!(classify_status(204, None), Outcome::Delivered { status: 204 });
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert!(
                matches!(classify_status(s, None), Outcome::Retry { status: Some(x), .. } if x == s),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(matches!(classify_status(s, None), Outcome::Reject { .. }), "{s}");
        }
        assert_eq!(classify_status(410, None), Outcome::Gone);
        assert!(matches!(
            classify_status(301, None),
            Outcome::Retry {
                reason: "redirect",
                ..
            }
        ));
        let ra = Some(Duration::from_secs(5));
        assert!(matches!(
            classify_status(429, ra),
            Outcome::Retry {
                retry_after: Some(_),
                ..
            }
        ));
    }

    #[derive(Debug)]
    struct Wrap(std::io::Error);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connect failed")
        }
    }
    impl StdError for Wrap {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn finds_emfile_in_a_chain() {
        let emfile = Wrap(std::io::Error::from_raw_os_error(nix::libc::EMFILE));
        let enfile = Wrap(std::io::Error::from_raw_os_error(nix::libc::ENFILE));
        let refused = Wrap(std::io::Error::from_raw_os_error(nix::libc::ECONNREFUSED));
        assert!(is_fd_exhaustion(&emfile));
        assert!(is_fd_exhaustion(&enfile));
        assert!(!is_fd_exhaustion(&refused));
    }
}
