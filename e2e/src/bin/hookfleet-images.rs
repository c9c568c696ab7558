//! `hookfleet-images`: the worker and operator images as OCI archives, without Docker (`make images`).
//!
//! ```text
//! hookfleet-images [--out DIR] [--test-images] [--import SOCKET]
//! ```
//! builds the release binaries when they are stale (`cargo build --release`), writes `worker.tar` and
//! `operator.tar` into DIR (default `target/images`), with `--test-images` also the busybox `pause.tar` and
//! `tools.tar` of the node tests, and with `--import` loads them into the containerd listening on SOCKET
//! (`ctr -n k8s.io images import`). Prints one line per image: name, manifest digest, archive path.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hookfleet_e2e::images;

const USAGE: &str = "usage: hookfleet-images [--out DIR] [--test-images] [--import CONTAINERD_SOCKET]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookfleet-images: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut out = hookfleet_e2e::tools::repo_root().join("target/images");
    let mut test_images = false;
    let mut import: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().context(USAGE)?.into(),
            "--test-images" => test_images = true,
            "--import" => import = Some(args.next().context(USAGE)?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let mut archives = images::build(&out)?;
    if test_images {
        archives.extend(images::test_images(&out)?);
    }
    if let Some(socket) = &import {
        images::import(socket, &archives)?;
    }
    for a in &archives {
        println!("{}\t{}\t{}", a.name, a.manifest_digest, a.path.display());
    }
    if let Some(socket) = import {
        eprintln!(
            "hookfleet-images: imported into {} (namespace k8s.io)",
            socket.display()
        );
    }
    Ok(())
}
