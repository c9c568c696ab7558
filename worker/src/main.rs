//! Entry point: flags → config → fd limit → metrics server → delivery loop until SIGTERM/SIGINT; or, with
//! `test-delivery` as the first argument, one test delivery (`hookfleet_worker::oneshot`).
//!
//! Exit codes: 0 after a clean shutdown; 2 for invalid configuration; 3 when the file-descriptor limit
//! cannot be met; 4 when a queue exists on the broker with other arguments (PRECONDITION_FAILED);
//! 5 when the destination answered 410 Gone (after the drain); 1 for other start-up failures. Each failure is one line on stderr and in the
//! termination-message file, so `kubectl describe pod` (and the operator) shows it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hookfleet_crds::contract::{self, WorkerArgs, exit, flag};
use hookfleet_worker::config::{Config, ConfigError, LogFormat};
use hookfleet_worker::fdlimit;
use hookfleet_worker::metrics::{self, Metrics};
use hookfleet_worker::worker::Worker;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// mimalloc instead of glibc's malloc: every delivery allocates and frees its request, its headers and
/// its frames on whichever tokio thread runs it, and glibc's arenas spent about a tenth of the worker's CPU
/// there (`_int_malloc`, `_int_free`, `malloc_consolidate`; docs/benchmarks.md). Built with `no_thp`, so it
/// never asks for transparent huge pages (with them its idle RSS was 33 MiB instead of 20).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `hookfleet-worker test-delivery …`: one test delivery, then exit (`oneshot`).
    let raw: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if hookfleet_worker::oneshot::requested(&raw) {
        return hookfleet_worker::oneshot::main(&raw, &|k| std::env::var(k).ok());
    }
    let args = match WorkerArgs::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let path = termination_log_from_raw_args()
                .or_else(|| std::env::var_os(contract::env::TERMINATION_LOG).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(contract::TERMINATION_LOG));
            let line = ConfigError::from_clap(&e).map_or_else(|line| line, |c| c.to_string());
            return fatal(&path, &line, exit::INVALID_CONFIG);
        }
    };
    let termination_log = args.termination_log.clone();
    let cfg = match Config::from_args(args, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => return fatal(&termination_log, &e.to_string(), exit::INVALID_CONFIG),
    };
    init_tracing(cfg.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let needed = fdlimit::required(cfg.concurrency);
    let limits = match fdlimit::raise(cfg.fd_limit, needed, cfg.concurrency) {
        Ok(l) => l,
        Err(msg) => return fatal(&termination_log, &msg, exit::FD_LIMIT),
    };
    info!(
        soft = limits.soft,
        hard = limits.hard,
        needed,
        "file-descriptor limit"
    );

    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fatal(&termination_log, &format!("starting the runtime: {e}"), 1),
    };
    rt.block_on(run(cfg, limits, termination_log))
}

async fn run(cfg: Config, limits: fdlimit::Limits, termination_log: PathBuf) -> ExitCode {
    let metrics = Arc::new(Metrics::new(&cfg.integration));
    metrics.max_fds.set(limits.soft.min(i64::MAX as u64) as i64);
    let addr = match metrics::serve(cfg.metrics_addr, metrics.clone()).await {
        Ok(a) => a,
        Err(e) => {
            return fatal(
                &termination_log,
                &format!(
                    "{}: cannot listen on {}: {e}",
                    contract::setting(flag::METRICS_ADDR, contract::env::METRICS_ADDR),
                    cfg.metrics_addr
                ),
                1,
            );
        }
    };
    info!(metrics = %addr, config = ?cfg, "hookfleet-worker starting");

    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            error!("cannot install signal handlers");
            return;
        };
        let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        info!(signal = name, "shutting down");
        let _ = tx.send(true);
        // A second signal means "now": unacked messages go back to the queue by the broker's rules.
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        warn!("second signal: exiting without waiting");
        std::process::exit(130);
    });

    let worker = match Worker::new(cfg, metrics) {
        Ok(w) => w,
        Err(e) => return fatal(&termination_log, &format!("building the HTTP client: {e}"), 1),
    };
    match worker.serve(rx).await {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(f) => fatal(&termination_log, &f.message, f.code),
    }
}

/// `--termination-log` from the command line when the flags as a whole did not parse.
fn termination_log_from_raw_args() -> Option<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().enumerate().find_map(|(i, a)| {
        match a
            .strip_prefix("--")
            .and_then(|a| a.strip_prefix(flag::TERMINATION_LOG))
        {
            Some("") => args.get(i + 1).map(PathBuf::from),
            Some(v) => v.strip_prefix('=').map(PathBuf::from),
            None => None,
        }
    })
}

/// One line to stderr and to the termination-message file (best effort: outside Kubernetes the file
/// may not be writable).
fn fatal(termination_log: &Path, line: &str, code: i32) -> ExitCode {
    eprintln!("hookfleet-worker: {line}");
    let _ = std::fs::write(termination_log, format!("{line}\n"));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("HOOKFLEET_LOG").unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}
