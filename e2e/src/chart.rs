//! The Helm chart (`charts/hookfleet`) from tests: the pinned `helm` with its own config/cache dirs (a test
//! never reads or writes the user's Helm repositories), `helm template` into parsed objects, and the chart's
//! alert rules as a Prometheus rules file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

use crate::tools::{self, Tool};

/// Path of the chart.
pub fn dir() -> PathBuf {
    tools::repo_root().join("charts/hookfleet")
}

/// A `helm` command whose config, cache and data live in `home` (created if needed).
pub fn helm(home: &Path) -> Result<Command> {
    let mut cmd = Command::new(tools::path(Tool::Helm)?);
    for (var, sub) in [
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_DATA_HOME", "data"),
    ] {
        let d = home.join(sub);
        std::fs::create_dir_all(&d)?;
        cmd.env(var, d);
    }
    Ok(cmd)
}

/// Runs `cmd`, failing with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// `helm template <release> charts/hookfleet -n <namespace> <args…>` as text.
pub fn template_text(home: &Path, release: &str, namespace: &str, args: &[&str]) -> Result<String> {
    let out = run(helm(home)?
        .arg("template")
        .arg(release)
        .arg(dir())
        .args(["--namespace", namespace])
        .args(args))?;
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template …` as parsed objects (empty documents skipped).
pub fn template(
    home: &Path,
    release: &str,
    namespace: &str,
    args: &[&str],
) -> Result<Vec<serde_json::Value>> {
    let text = template_text(home, release, namespace, args)?;
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

/// Writes the chart's alert and recording rules, rendered by `helm template` with
/// `prometheusRule.enabled=true` plus `args` (e.g. `--set prometheusRule.alerts.X.for=10s`), as a Prometheus
/// rules file `<dir>/rules.yaml` (the PrometheusRule's `spec`), and returns its path. Release `hookfleet` in
/// namespace `hookfleet-system`, so the operator's job is `hookfleet-operator-metrics` unless
/// `prometheusRule.operatorSelector` says otherwise.
pub fn rules_file(home: &Path, dir: &Path, args: &[&str]) -> Result<PathBuf> {
    let mut all = vec![
        "--set",
        "prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ];
    all.extend_from_slice(args);
    let objects = template(home, "hookfleet", "hookfleet-system", &all)?;
    let rule = objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .context("helm template rendered no PrometheusRule")?;
    let path = dir.join("rules.yaml");
    std::fs::write(&path, serde_yaml::to_string(&rule["spec"])?)?;
    Ok(path)
}
