//! Writes the generated CRD YAML: `crdgen` prints it; `crdgen --write` updates `crds/` and the Helm chart's
//! `charts/hookfleet/crds/` in place (the two copies are identical).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let yaml = hookfleet_crds::crd_yaml();
    if std::env::args().any(|a| a == "--write") {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in [hookfleet_crds::CRD_FILE, hookfleet_crds::CHART_CRD_FILE] {
            let path = dir.join(file);
            std::fs::write(&path, &yaml)?;
            eprintln!("wrote {}", path.display());
        }
    } else {
        print!("{yaml}");
    }
    Ok(())
}
