//! Writes the generated CRD YAML: `crdgen` prints it; `crdgen --write` updates `crds/` in place.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let yaml = hookfleet_crds::crd_yaml();
    if std::env::args().any(|a| a == "--write") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(hookfleet_crds::CRD_FILE);
        std::fs::write(&path, yaml)?;
        eprintln!("wrote {}", path.display());
    } else {
        print!("{yaml}");
    }
    Ok(())
}
