//! `hookfleet-worker test-delivery [OPTIONS] -- [the worker's flags]`: one test delivery, then exit
//! (`kubectl hookfleet test-delivery` runs it in a pod built from the worker Deployment's own pod spec).
//!
//! The worker's flags and environment are read exactly as `main` reads them ([`WorkerArgs`],
//! [`Config::from_args`]), the request is sent by the worker's own delivery path
//! ([`Worker::test_delivery`]); with Webhooks the fleet's snapshot Secret is read once, with the worker's
//! ServiceAccount. No broker connection, no metrics server, no fd-limit change. The report goes to stdout;
//! the exit code says what a worker would make of the answer (`contract::test_delivery::exit`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hookfleet_crds::contract::WorkerArgs;
use hookfleet_crds::contract::test_delivery::{self, ID_PREFIX, MAX_BODY_BYTES, TestDeliveryArgs, exit};
use hookfleet_crds::contract::webhooks::{SNAPSHOT_KEY, Snapshot};
use k8s_openapi::api::core::v1::Secret;

use crate::config::{Config, ConfigError, WebhooksMode};
use crate::metrics::Metrics;
use crate::worker::Worker;
use crate::worker::probe::TestMessage;

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

/// Runs a test delivery for `args` (the command line without the program name, starting with
/// [`test_delivery::SUBCOMMAND`]), reading variables with `var`.
pub fn main(args: &[String], var: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let Some((mine, theirs)) = test_delivery::split(args) else {
        eprintln!("hookfleet-worker: not a test delivery");
        return code(exit::INVALID_CONFIG);
    };
    let test = match TestDeliveryArgs::try_parse_from(
        std::iter::once("hookfleet-worker test-delivery".to_owned()).chain(mine),
    ) {
        Ok(t) => t,
        Err(e) => {
            let _ = e.print();
            return code(if e.use_stderr() { exit::INVALID_CONFIG } else { 0 });
        }
    };
    let worker_args =
        match WorkerArgs::try_parse_from(std::iter::once("hookfleet-worker".to_owned()).chain(theirs)) {
            Ok(a) => a,
            Err(e) => {
                let line = ConfigError::from_clap(&e).map_or_else(|line| line, |c| c.to_string());
                eprintln!("hookfleet-worker: {line}");
                return code(exit::INVALID_CONFIG);
            }
        };
    let cfg = match Config::from_args(worker_args, var) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hookfleet-worker: {e}");
            return code(exit::INVALID_CONFIG);
        }
    };
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let body = test.body.clone().unwrap_or_else(|| "{}".to_owned()).into_bytes();
    if body.len() > MAX_BODY_BYTES {
        eprintln!(
            "hookfleet-worker: the test body has {} bytes, more than {MAX_BODY_BYTES}",
            body.len()
        );
        return code(exit::INVALID_CONFIG);
    }
    let msg = TestMessage {
        id: format!("{ID_PREFIX}{:032x}", rand::random::<u128>()),
        event: test.event.clone().unwrap_or_default(),
        body,
        headers: test.headers.clone(),
        webhook: test.webhook.clone(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hookfleet-worker: starting the runtime: {e}");
            return code(exit::NOT_SENT);
        }
    };
    rt.block_on(async move {
        let webhooks = cfg.webhooks.clone();
        let worker = match Worker::new(cfg, Arc::new(Metrics::new(""))) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("hookfleet-worker: building the HTTP client: {e}");
                return code(exit::NOT_SENT);
            }
        };
        let snapshot = match &webhooks {
            None => None,
            Some(mode) => match read_snapshot(mode).await {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("test delivery not sent: {e}");
                    return code(exit::NOT_SENT);
                }
            },
        };
        match worker.test_delivery(&msg, snapshot.as_ref()).await {
            Ok(report) => {
                print!("{report}");
                code(report.exit)
            }
            Err(e) => {
                eprintln!("test delivery not sent: {e}");
                code(exit::NOT_SENT)
            }
        }
    })
}

/// The fleet's Webhooks snapshot, read once from its Secret (the worker's Role allows that read).
async fn read_snapshot(mode: &WebhooksMode) -> Result<Snapshot, String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client for the Webhooks snapshot: {e}"))?;
    let api: kube::Api<Secret> = kube::Api::namespaced(client, &mode.namespace);
    let secret = api.get(&mode.secret).await.map_err(|e| {
        format!(
            "reading the Webhooks snapshot Secret {}/{}: {e}",
            mode.namespace, mode.secret
        )
    })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(SNAPSHOT_KEY))
        .ok_or_else(|| {
            format!(
                "Secret {}/{} has no key {SNAPSHOT_KEY}",
                mode.namespace, mode.secret
            )
        })?;
    Snapshot::decode(&bytes.0)
}

/// Warnings and errors only, as text on stderr (`HOOKFLEET_LOG` filters, as for the worker).
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HOOKFLEET_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Whether `args` (without the program name) ask for a test delivery.
pub fn requested(args: &[String]) -> bool {
    args.first().map(String::as_str) == Some(test_delivery::SUBCOMMAND)
}
