//! `hookfleet-worker test-delivery`: one request sent the way the fleet's workers send it, from a pod that
//! `kubectl hookfleet test-delivery` builds out of the worker Deployment's own pod spec. The plugin renders
//! [`TestDeliveryArgs`] ([`TestDeliveryArgs::to_argv`]) in front of the worker's own arguments; the worker
//! parses both ([`split`]), the worker's part with [`super::WorkerArgs`] (and its environment), so the
//! one-shot reads the same configuration as a worker of the fleet and sends through the same code.
//!
//! The container's arguments: `test-delivery [these flags] -- [the worker's flags]`.

use clap::Parser;

/// The first argument that makes `hookfleet-worker` a one-shot test delivery.
pub const SUBCOMMAND: &str = "test-delivery";

/// HTTP header marking a test delivery (value `true`): a receiver can tell it from real traffic. It is not
/// part of the signed content (Standard Webhooks signs `id.timestamp.body`).
pub const H_TEST_DELIVERY: &str = "hookfleet-test-delivery";

/// Start of a test delivery's message id (`test_<32 hex digits>`, fresh for each one).
pub const ID_PREFIX: &str = "test_";

/// Largest test message body: it travels as one container argument (Linux caps one at 128 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Exit codes of `hookfleet-worker test-delivery` (which `kubectl hookfleet test-delivery` exits with):
/// what the worker would make of the answer.
pub mod exit {
    /// 2xx: the worker would acknowledge the message.
    pub const DELIVERED: i32 = 0;
    /// Nothing was sent: the one-shot could not run (the Webhooks snapshot unreadable, no such Webhook, …).
    pub const NOT_SENT: i32 = 1;
    /// The worker's configuration is invalid (as `hookfleet-worker` itself: [`super::super::exit::INVALID_CONFIG`]).
    pub const INVALID_CONFIG: i32 = super::super::exit::INVALID_CONFIG;
    /// 410 Gone: the worker would stop (single destination) or the operator would pause the Webhook.
    pub const GONE: i32 = super::super::exit::DESTINATION_GONE;
    /// The worker would retry the message (5xx, 408, 425, 429, 3xx, timeout, connection or TLS error).
    pub const RETRY: i32 = 6;
    /// The worker would dead-letter the message (another 4xx, a body the template cannot render, too large).
    pub const DEAD_LETTER: i32 = 7;
}

/// The test message and where it goes; every other setting is the worker's own.
#[derive(Parser, Clone, Debug, Default, PartialEq, Eq)]
#[command(
    name = "hookfleet-worker test-delivery",
    about = "Sends one test delivery the way this worker would (no broker involved), prints request and answer. \
             Arguments: test-delivery [OPTIONS] -- [the worker's flags]"
)]
pub struct TestDeliveryArgs {
    /// With Webhooks: the Webhook to deliver to (else the one Webhook the event matches).
    #[arg(long)]
    pub webhook: Option<String>,
    /// Event name: the message's routing key (and, with an event-name header configured, that header).
    #[arg(long)]
    pub event: Option<String>,
    /// The message body (default `{}`).
    #[arg(long)]
    pub body: Option<String>,
    /// NAME=VALUE: a header of the test message, as a publisher sets it (Webhook header matches, the
    /// event-name header, `traceparent`); repeatable. The request's HTTP headers are the destination's.
    #[arg(long = "header", value_parser = header)]
    pub headers: Vec<(String, String)>,
}

/// `NAME=VALUE` (of `--header`; the plugin's too).
pub fn header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

impl TestDeliveryArgs {
    /// The container's arguments: [`SUBCOMMAND`], these flags, `--`, then `worker` (the worker's flags).
    pub fn to_argv(&self, worker: &[String]) -> Vec<String> {
        let mut out = vec![SUBCOMMAND.to_owned()];
        let mut put = |k: &str, v: &str| {
            out.push(format!("--{k}"));
            out.push(v.to_owned());
        };
        if let Some(w) = &self.webhook {
            put("webhook", w);
        }
        if let Some(e) = &self.event {
            put("event", e);
        }
        if let Some(b) = &self.body {
            put("body", b);
        }
        for (k, v) in &self.headers {
            put("header", &format!("{k}={v}"));
        }
        out.push("--".to_owned());
        out.extend(worker.iter().cloned());
        out
    }
}

/// Splits a command line (without the program name) that starts with [`SUBCOMMAND`] into the test
/// delivery's arguments and the worker's (after the first `--`); `None` when it does not start so.
pub fn split<T: AsRef<str>>(args: &[T]) -> Option<(Vec<String>, Vec<String>)> {
    let (first, rest) = args.split_first()?;
    if first.as_ref() != SUBCOMMAND {
        return None;
    }
    let rest: Vec<String> = rest.iter().map(|a| a.as_ref().to_owned()).collect();
    Some(match rest.iter().position(|a| a == "--") {
        Some(i) => (rest[..i].to_vec(), rest[i + 1..].to_vec()),
        None => (rest, Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::contract::WorkerArgs;

    #[test]
    fn the_command_is_well_formed() {
        TestDeliveryArgs::command().debug_assert();
    }

    #[test]
    fn argv_reads_back_and_the_worker_flags_follow() {
        let args = TestDeliveryArgs {
            webhook: Some("acme".into()),
            event: Some("temperature/basement".into()),
            body: Some(r#"{"data": {"t": 21}, "x": "--"}"#.into()),
            headers: vec![("device".into(), "d-1=a".into())],
        };
        let worker = ["--queue", "q", "--header", "X-Source: hookfleet"].map(String::from);
        let argv = args.to_argv(&worker);
        assert_eq!(argv[0], SUBCOMMAND);
        let (mine, theirs) = split(&argv).unwrap();
        let back = TestDeliveryArgs::try_parse_from(std::iter::once("t".to_owned()).chain(mine)).unwrap();
        assert_eq!(back, args);
        assert_eq!(theirs, worker);
        let w = WorkerArgs::try_parse_from(std::iter::once("w".to_owned()).chain(theirs)).unwrap();
        assert_eq!(w.headers, ["X-Source: hookfleet"]);
    }

    #[test]
    fn split_wants_the_subcommand_first() {
        assert_eq!(split(&["--queue", "q"]), None);
        assert_eq!(split::<&str>(&[]), None);
        assert_eq!(
            split(&["test-delivery", "--event", "e"]),
            Some((vec!["--event".into(), "e".into()], vec![]))
        );
    }

    #[test]
    fn a_header_is_name_equals_value() {
        assert_eq!(header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(header("=b").is_err());
        assert!(header("ab").is_err());
        let e = TestDeliveryArgs::try_parse_from(["t", "--header", "nope"]).unwrap_err();
        assert!(e.to_string().contains("NAME=VALUE"), "{e}");
    }
}
