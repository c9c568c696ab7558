//! For the contract tests of the crds, worker and operator crates (feature `testing`): the Integrations
//! they run on, and what the kubelet does with a rendered container.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use k8s_openapi::api::core::v1::EnvVar;

use crate::Integration;
use crate::contract::WorkerArgs;
use crate::integration::{SecretKeyRef, SourceSpec};

/// Every Integration of `crds/examples/` and of the operator's fixtures (`operator/tests/fixtures/`),
/// with what the API server would fill in (namespace, uid).
pub fn integrations() -> Vec<(PathBuf, Integration)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in [root.join("examples"), root.join("../operator/tests/fixtures")] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension() == Some(OsStr::new("yaml")))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let raw: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            if raw["kind"].as_str() != Some("Integration") {
                continue;
            }
            let mut intg: Integration =
                serde_yaml::from_value(raw).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Examples are written for `kubectl apply`: the API server would fill these in.
            intg.metadata.namespace.get_or_insert_with(|| "default".into());
            intg.metadata
                .uid
                .get_or_insert_with(|| "6f1c0a8e-0000-4000-8000-0000000000ff".into());
            out.push((path, intg));
        }
    }
    assert!(out.len() >= 5, "examples and fixtures found: {}", out.len());
    out
}

/// A shutdown grace as the operator might render it: the request timeout (10 s with Webhooks) plus 15 s.
pub fn shutdown_grace(intg: &Integration) -> std::time::Duration {
    let timeout = intg
        .spec
        .destination
        .as_ref()
        .map_or(std::time::Duration::from_secs(10), |d| d.timeout.into());
    timeout + std::time::Duration::from_secs(15)
}

/// `NAMESPACE/NAME` of `intg`.
pub fn integration_name(intg: &Integration) -> String {
    let ns = intg.metadata.namespace.as_deref().unwrap_or("default");
    format!("{ns}/{}", intg.metadata.name.as_deref().unwrap_or_default())
}

/// What the kubelet would put in a variable filled from `r`: distinct per reference; for the connection
/// Secret of `source`, a broker URI (or with `source.nats`, a NATS server URL).
pub fn secret_value(r: &SecretKeyRef, source: &SourceSpec) -> String {
    if *r == source.connection_secret_ref {
        match source.nats {
            Some(_) => format!("nats://user:pw@nats-{}.example:4222", r.key),
            None => format!("amqp://user:pw@rabbitmq-{}.example:5672/%2f", r.key),
        }
    } else {
        format!("value-of-{}-{}", r.name, r.key)
    }
}

/// A container as the worker process meets it.
#[derive(Debug)]
pub struct Started {
    /// The command line, the program name first; the variables clap reads are passed as their
    /// flags, so the test process's own environment stays out of the parse.
    pub argv: Vec<String>,
    /// The other variables (what the worker looks up itself), with their values.
    pub env: BTreeMap<String, String>,
}

/// What the kubelet does with a container's `args` and `env`: each variable gets its value (a literal,
/// or [`secret_value`] of its `secretKeyRef`). Panics on what a worker container must not hold: a
/// variable that is also a flag, a variable twice, a source other than a Secret key.
pub fn kubelet(args: &[String], env: &[EnvVar], source: &SourceSpec) -> Started {
    let cmd = WorkerArgs::command();
    let mut argv = vec!["hookfleet-worker".to_string()];
    argv.extend(args.iter().cloned());
    let mut rest = BTreeMap::new();
    for e in env {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(src)) => {
                let s = src
                    .secret_key_ref
                    .as_ref()
                    .unwrap_or_else(|| panic!("{}: only secretKeyRef sources are rendered", e.name));
                let r = SecretKeyRef {
                    name: s.name.clone(),
                    key: s.key.clone(),
                };
                secret_value(&r, source)
            }
            other => panic!("{}: value and valueFrom {other:?}", e.name),
        };
        match cmd
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(&e.name)))
        {
            Some(arg) => {
                let long = arg.get_long().expect("every worker setting has a long flag");
                assert!(
                    !argv.contains(&format!("--{long}")),
                    "{} is rendered both as --{long} and as its variable",
                    e.name
                );
                argv.push(format!("--{long}"));
                argv.push(value);
            }
            None => {
                assert!(rest.insert(e.name.clone(), value).is_none(), "{} twice", e.name);
            }
        }
    }
    Started { argv, env: rest }
}
