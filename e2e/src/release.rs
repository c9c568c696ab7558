//! The release steps of `.github/workflows/release.yml`, run on this machine against a local OCI registry
//! (`make release-local`): the tools are the pinned ones of `hack/build-tools.sh` (go-containerregistry's
//! `crane`, which also serves the registry, `cosign`, `syft`, `helm`), signing uses a key pair (keyless signing needs the
//! public Sigstore services), and the registry speaks plain HTTP on the pod network's gateway.
//!
//! Each step is a function that runs one tool and returns what it printed that matters (a digest, a count),
//! so that `hookfleet-release` can print the evidence and fail on a check that does not hold.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::oci::Layout;
use crate::process::{Process, free_port, wait_for};
use crate::tools::{self, Tool};

/// go-containerregistry's registry (`crane registry serve`, blobs in memory) on `address` at a free port.
pub struct Registry {
    _process: Process,
    /// `address:port` as image references name it.
    pub host: String,
}

impl Registry {
    /// Starts it and waits until `GET /v2/` answers on `address`.
    pub async fn start(address: Ipv4Addr, log: &Path) -> Result<Self> {
        let port = free_port()?;
        let process = Process::spawn(
            "registry",
            &tools::path(Tool::Crane)?,
            &[
                "registry".to_owned(),
                "serve".to_owned(),
                "--address".to_owned(),
                format!("{address}:{port}"),
            ],
            &[],
            log,
        )?;
        let host = format!("{address}:{port}");
        wait_for(
            "the local registry to answer /v2/",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let host = host.clone();
                async move { Ok(api_answers(&host).await.then_some(())) }
            },
        )
        .await?;
        Ok(Self {
            _process: process,
            host,
        })
    }
}

/// Whether `GET /v2/` on `host` answers 200 (the registry API's version check).
async fn api_answers(host: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host)).await
    else {
        return false;
    };
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: {host}\r\n\r\n");
    let mut head = [0u8; 12];
    s.write_all(request.as_bytes()).await.is_ok()
        && s.read_exact(&mut head).await.is_ok()
        && head.starts_with(b"HTTP/1.")
        && &head[9..12] == b"200"
}

/// Unpacks the layer of `platform`'s image (`linux/arm64`) in `layout` into `root`.
pub fn unpack_platform(layout: &Layout, platform: &str, root: &Path) -> Result<()> {
    let blob = |digest: &str| {
        layout
            .dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let (_, manifest) = layout
        .manifests
        .iter()
        .find(|(p, _)| p == platform)
        .with_context(|| format!("{}: no {platform} image", layout.name))?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(manifest))?)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("manifest without a layer")?;
    let gz = std::fs::File::open(blob(layer))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    tar.set_preserve_permissions(true);
    tar.unpack(root)
        .with_context(|| format!("unpacking {layer} into {}", root.display()))
}

/// `qemu-<arch> -L <root> <root><program> args…`: a binary of another platform run from its image's own
/// root (its loader and libraries from there, none from this machine). `None` when qemu-user is missing.
pub fn run_foreign(arch: &str, root: &Path, program: &str, args: &[&str]) -> Result<Option<String>> {
    let qemu = format!("qemu-{arch}");
    let Some(qemu_path) = crate::images::which(&qemu) else {
        return Ok(None);
    };
    let out = run(Command::new(qemu_path)
        .arg("-L")
        .arg(root)
        .arg(root.join(program.trim_start_matches('/')))
        .args(args)
        .env_clear())?;
    Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// Runs `cmd` (stdin closed), failing with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<Output> {
    crate::chart::run(cmd.stdin(Stdio::null()))
}

fn tool(t: Tool) -> Result<Command> {
    Ok(Command::new(tools::path(t)?))
}

/// `crane push <layout> <reference>` (plain HTTP): the layout's one entry, the multi-platform image index,
/// under that tag (`--index` would push the layout's own `index.json` around it instead). Returns
/// the digest the registry serves for it, which must be the layout's index digest.
pub fn push_image(layout: &Layout, reference: &str) -> Result<String> {
    run(tool(Tool::Crane)?
        .args(["push", "--insecure"])
        .arg(&layout.dir)
        .arg(reference))?;
    let digest = image_digest(reference)?;
    ensure!(
        digest == layout.index_digest,
        "{reference}: the registry serves {digest}, the layout's index is {}",
        layout.index_digest
    );
    Ok(digest)
}

/// `crane digest <reference>`.
pub fn image_digest(reference: &str) -> Result<String> {
    let out = run(tool(Tool::Crane)?.args(["digest", "--insecure", reference]))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The platforms (`linux/amd64`) and their manifest digests the registry lists for a multi-platform image.
pub fn platforms(reference: &str) -> Result<Vec<(String, String)>> {
    let out = run(tool(Tool::Crane)?.args(["manifest", "--insecure", reference]))?;
    let index: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(index["manifests"]
        .as_array()
        .context("not an image index")?
        .iter()
        .map(|m| {
            (
                format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap_or("?"),
                    m["platform"]["architecture"].as_str().unwrap_or("?")
                ),
                m["digest"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// A cosign key pair, its private key encrypted with a password held here.
pub struct Signer {
    pub key: PathBuf,
    pub public_key: PathBuf,
    password: String,
}

impl Signer {
    /// `cosign generate-key-pair` into `dir` (`cosign.key`, `cosign.pub`).
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let password = format!("{:032x}", rand::random::<u128>());
        run(tool(Tool::Cosign)?
            .current_dir(dir)
            .env("COSIGN_PASSWORD", &password)
            .arg("generate-key-pair"))?;
        Ok(Self {
            key: dir.join("cosign.key"),
            public_key: dir.join("cosign.pub"),
            password,
        })
    }

    fn cosign(&self) -> Result<Command> {
        let mut cmd = tool(Tool::Cosign)?;
        cmd.env("COSIGN_PASSWORD", &self.password)
            // Nothing here reaches the public Sigstore services (Rekor, Fulcio, TUF).
            .env("COSIGN_EXPERIMENTAL", "0")
            .env("TUF_ROOT", std::env::temp_dir().join("hookfleet-cosign-tuf"));
        Ok(cmd)
    }

    /// `cosign sign --key … --recursive` of `reference@digest` (the index and every platform's manifest),
    /// without a transparency-log upload.
    pub fn sign(&self, reference_at_digest: &str, recursive: bool) -> Result<()> {
        let mut cmd = self.cosign()?;
        cmd.args([
            "sign",
            "--yes",
            "--tlog-upload=false",
            "--allow-http-registry",
            "--key",
        ])
        .arg(&self.key);
        if recursive {
            cmd.arg("--recursive");
        }
        run(cmd.arg(reference_at_digest))?;
        Ok(())
    }

    /// `cosign attest --type <kind> --predicate <file>`: a signed in-toto attestation attached to the image.
    pub fn attest(&self, reference_at_digest: &str, kind: &str, predicate: &Path) -> Result<()> {
        run(self
            .cosign()?
            .args([
                "attest",
                "--yes",
                "--tlog-upload=false",
                "--allow-http-registry",
                "--type",
                kind,
            ])
            .arg("--predicate")
            .arg(predicate)
            .arg("--key")
            .arg(&self.key)
            .arg(reference_at_digest))?;
        Ok(())
    }
}

/// `cosign verify --key <public_key>` of `reference_at_digest`, no transparency log: `Ok(())` when a
/// signature by that key is attached, else the error cosign printed.
pub fn verify(public_key: &Path, reference_at_digest: &str) -> Result<()> {
    run(tool(Tool::Cosign)?
        .args([
            "verify",
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
            "--key",
        ])
        .arg(public_key)
        .arg(reference_at_digest))?;
    Ok(())
}

/// `cosign verify-attestation --type <kind>`: the attestation's predicate, once its signature verifies.
pub fn verify_attestation(
    public_key: &Path,
    reference_at_digest: &str,
    kind: &str,
) -> Result<serde_json::Value> {
    let out = run(tool(Tool::Cosign)?
        .args([
            "verify-attestation",
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
            "--type",
            kind,
            "--key",
        ])
        .arg(public_key)
        .arg(reference_at_digest))?;
    // One JSON envelope per line; the payload is the base64 in-toto statement.
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .context("cosign verify-attestation printed no envelope")?
        .to_owned();
    let envelope: serde_json::Value = serde_json::from_str(&line)?;
    let payload = envelope["payload"].as_str().context("envelope without payload")?;
    use base64::Engine as _;
    let statement = base64::engine::general_purpose::STANDARD.decode(payload)?;
    let statement: serde_json::Value = serde_json::from_slice(&statement)?;
    Ok(statement["predicate"].clone())
}

/// What the SBOM of one platform's image lists.
#[derive(Clone, Debug)]
pub struct Sbom {
    pub path: PathBuf,
    pub packages: usize,
    /// Rust crates (`pkg:cargo/…` purls): read from the binary's `cargo auditable` section.
    pub crates: usize,
}

/// `syft scan registry:<reference> -o spdx-json=<out>` (plain HTTP): the SBOM of the image as the registry
/// serves it; `platform` picks one from a multi-platform index (a platform's own manifest needs none).
pub fn sbom(reference: &str, platform: Option<&str>, out: &Path) -> Result<Sbom> {
    let mut cmd = tool(Tool::Syft)?;
    cmd.env("SYFT_CHECK_FOR_APP_UPDATE", "false")
        .env("SYFT_REGISTRY_INSECURE_USE_HTTP", "true")
        .arg("scan")
        .arg(format!("registry:{reference}"));
    if let Some(p) = platform {
        cmd.args(["--platform", p]);
    }
    run(cmd.args(["-q", "-o"]).arg(format!("spdx-json={}", out.display())))?;
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(out)?)?;
    let packages = doc["packages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let crates = packages
        .iter()
        .filter(|p| {
            p["externalRefs"].as_array().is_some_and(|refs| {
                refs.iter().any(|r| {
                    r["referenceLocator"]
                        .as_str()
                        .is_some_and(|l| l.starts_with("pkg:cargo/"))
                })
            })
        })
        .count();
    Ok(Sbom {
        path: out.to_owned(),
        packages: packages.len(),
        crates,
    })
}

/// A SLSA provenance (v1) predicate for the images: what was built from which commit, how, and by what.
pub fn provenance(
    commit: &str,
    dirty: bool,
    cargo_lock_sha256: &str,
    started: &str,
    finished: &str,
) -> serde_json::Value {
    serde_json::json!({
        "buildDefinition": {
            "buildType": "https://github.com/hookfleet/hookfleet/release-local@v1",
            "externalParameters": {
                "source": {"uri": env!("CARGO_PKG_REPOSITORY"), "digest": {"gitCommit": commit}, "dirty": dirty},
                "command": "make release-local",
                "platforms": ["linux/amd64", "linux/arm64"],
            },
            "resolvedDependencies": [
                {"uri": "Cargo.lock", "digest": {"sha256": cargo_lock_sha256}}
            ],
        },
        "runDetails": {
            "builder": {"id": "hookfleet-release (e2e/src/release.rs) on a development machine"},
            "metadata": {"startedOn": started, "finishedOn": finished},
        },
    })
}

/// `helm package` of the chart into `out_dir`; returns the archive.
pub fn package_chart(helm_home: &Path, out_dir: &Path) -> Result<PathBuf> {
    let out = run(crate::chart::helm(helm_home)?
        .arg("package")
        .arg(crate::chart::dir())
        .arg("--destination")
        .arg(out_dir))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .rsplit_once(": ")
        .map(|(_, p)| PathBuf::from(p.trim()))
        .context("helm package named no archive")?;
    ensure!(path.is_file(), "helm package wrote no {}", path.display());
    Ok(path)
}

/// `helm push <archive> oci://<host>/charts --plain-http`; returns the chart's digest.
pub fn push_chart(helm_home: &Path, archive: &Path, host: &str) -> Result<String> {
    let out = run(crate::chart::helm(helm_home)?
        .arg("push")
        .arg(archive)
        .arg(format!("oci://{host}/charts"))
        .arg("--plain-http"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Digest: "))
        .map(|d| d.trim().to_owned())
        .with_context(|| format!("helm push printed no digest: {text}"))
}

/// The section of `CHANGELOG.md` for `version` (`hack/release-notes.sh`): a release's notes.
pub fn release_notes(version: &str) -> Result<String> {
    let out = run(Command::new("bash")
        .arg(tools::repo_root().join("hack/release-notes.sh"))
        .arg(version))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
