//! The committed CRD YAML (in `crds/` and in the Helm chart's `crds/`) must be what the Rust types generate.

use std::path::Path;

fn assert_current(file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `make crds`", path.display()));
    let generated = hookfleet_crds::crd_yaml();
    assert!(
        committed == generated,
        "{} is out of date with crds/src: run `make crds` and commit the result",
        path.display()
    );
}

#[test]
fn committed_crd_matches_the_types() {
    assert_current(hookfleet_crds::CRD_FILE);
}

#[test]
fn chart_crd_matches_the_types() {
    assert_current(hookfleet_crds::CHART_CRD_FILE);
}
