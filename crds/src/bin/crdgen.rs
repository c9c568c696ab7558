//! Writes the generated CRDs' YAML (Integration, Webhook): `crdgen` prints them; `crdgen --write` updates `crds/` and the Helm chart's
//! `charts/hookfleet/crds/` in place (the two copies are identical).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let write = std::env::args().any(|a| a == "--write");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, chart_file, yaml) in hookfleet_crds::crds() {
        if !write {
            print!("{yaml}");
            continue;
        }
        for f in [file, chart_file] {
            let path = dir.join(f);
            std::fs::write(&path, &yaml)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
