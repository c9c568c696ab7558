//! The container images the real node runs, written as OCI archives with [`crate::oci`] (no Docker):
//!
//! - [`WORKER_IMAGE`] and [`OPERATOR_IMAGE`]: the release binaries with the shared libraries `ldd` names
//!   (the dynamic loader included), a CA bundle, `/etc/passwd` and `/etc/group` with the non-root user
//!   65532, a writable `/tmp`; `User: 65532:65532`. The same paths and entrypoints as the Dockerfiles
//!   (`worker/Dockerfile`, `operator/Dockerfile`), so a pod spec works with either. [`build`] makes both.
//! - [`PAUSE_IMAGE`] (containerd's `sandbox_image`: sleeps forever) and [`TOOLS_IMAGE`] (a shell, `wget`,
//!   `nc`, `sleep`, … for node tests), from Debian's busybox-static. [`test_images`] makes both.
//!
//! [`import`] loads archives into a containerd (`ctr -n k8s.io images import`), where the CRI finds them by
//! these names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::oci::{Entry, Image, ImageArchive};

/// The worker image, by the name the operator renders by default (`--worker-image`).
pub const WORKER_IMAGE: &str = concat!("ghcr.io/hookfleet/worker:", env!("CARGO_PKG_VERSION"));
/// The operator image, by the name the chart and the kind scripts use.
pub const OPERATOR_IMAGE: &str = concat!("ghcr.io/hookfleet/operator:", env!("CARGO_PKG_VERSION"));
/// The pod sandbox ("pause") image for containerd's `sandbox_image`.
pub const PAUSE_IMAGE: &str = "ghcr.io/hookfleet/e2e-pause:busybox";
/// A busybox image with a shell and the usual applets, for pods in node tests.
pub const TOOLS_IMAGE: &str = "ghcr.io/hookfleet/e2e-tools:busybox";

/// The non-root user and group of the worker and operator images (distroless's `nonroot`).
pub const NONROOT_ID: u64 = 65532;
/// Where the CA bundle sits in the images (Debian's path, which rustls-native-certs reads).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The two hookfleet binaries the images are made of.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub worker: PathBuf,
    pub operator: PathBuf,
}

/// Builds the release binaries (cargo skips that when they are fresh) and writes the worker and operator
/// images into `out_dir` as `worker.tar` and `operator.tar`.
pub fn build(out_dir: &Path) -> Result<Vec<ImageArchive>> {
    let bins = release_binaries()?;
    Ok(vec![
        worker(out_dir, &bins.worker)?,
        operator(out_dir, &bins.operator)?,
    ])
}

/// Writes the pause and tools images into `out_dir` as `pause.tar` and `tools.tar`.
pub fn test_images(out_dir: &Path) -> Result<Vec<ImageArchive>> {
    Ok(vec![pause(out_dir)?, tools(out_dir)?])
}

/// The release binaries: `HOOKFLEET_WORKER_BIN` / `HOOKFLEET_OPERATOR_BIN` when both are set (binaries built
/// elsewhere), else `cargo build --release` of both packages into the current target dir (`CARGO_TARGET_DIR`
/// or the workspace's `target/`), located from cargo's own build messages.
pub fn release_binaries() -> Result<Binaries> {
    if let (Some(w), Some(o)) = (
        std::env::var_os("HOOKFLEET_WORKER_BIN"),
        std::env::var_os("HOOKFLEET_OPERATOR_BIN"),
    ) {
        return Ok(Binaries {
            worker: w.into(),
            operator: o.into(),
        });
    }
    // Inside `cargo test`, CARGO names the cargo that runs us: the same toolchain builds the binaries.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = crate::tools::repo_root();
    eprintln!(
        "hookfleet-e2e: cargo build --release of hookfleet-worker and hookfleet-operator (no-op when fresh)"
    );
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
            "-p",
            "hookfleet-worker",
            "-p",
            "hookfleet-operator",
            "--bin",
            "hookfleet-worker",
            "--bin",
            "hookfleet-operator",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} build in {}", cargo.to_string_lossy(), root.display()))?;
    if !out.status.success() {
        bail!(
            "cargo build --release of the worker and operator failed ({}); its errors are above",
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let find = |name: &str| {
        executable_from_messages(&stdout, name)
            .with_context(|| format!("cargo built {name} but named no executable for it in its messages"))
    };
    Ok(Binaries {
        worker: find("hookfleet-worker")?,
        operator: find("hookfleet-operator")?,
    })
}

/// The `kubectl-hookfleet` plugin for the host (the suite runs it as a user would): `HOOKFLEET_PLUGIN_BIN` when
/// set, else `cargo build` of it (dev profile) into the current target dir, located from cargo's messages.
pub fn plugin_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HOOKFLEET_PLUGIN_BIN") {
        return Ok(p.into());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(crate::tools::repo_root())
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "-p",
            "kubectl-hookfleet",
            "--bin",
            "kubectl-hookfleet",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} build", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "cargo build of kubectl-hookfleet failed ({}); its errors are above",
            out.status
        );
    }
    executable_from_messages(&String::from_utf8_lossy(&out.stdout), "kubectl-hookfleet")
        .context("cargo built kubectl-hookfleet but named no executable for it in its messages")
}

/// The `executable` of the last `compiler-artifact` message for bin target `name`.
fn executable_from_messages(stdout: &str, name: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

/// The worker image from `binary`, written to `out_dir/worker.tar`.
pub fn worker(out_dir: &Path, binary: &Path) -> Result<ImageArchive> {
    let image = service_image(
        WORKER_IMAGE,
        "hookfleet-worker",
        binary,
        "Consumes a RabbitMQ queue and delivers each message as a webhook",
    )?;
    image.write_archive(&out_dir.join("worker.tar"))
}

/// The operator image from `binary`, written to `out_dir/operator.tar`.
pub fn operator(out_dir: &Path, binary: &Path) -> Result<ImageArchive> {
    let image = service_image(
        OPERATOR_IMAGE,
        "hookfleet-operator",
        binary,
        "Reconciles hookfleet Integrations into worker fleets",
    )?;
    image.write_archive(&out_dir.join("operator.tar"))
}

/// A distroless-like image: `/usr/local/bin/<bin_name>` as entrypoint, its shared libraries, a CA bundle, a
/// `nonroot` user 65532 and a writable `/tmp`.
pub fn service_image(name: &str, bin_name: &str, binary: &Path, description: &str) -> Result<Image> {
    if !binary.is_file() {
        bail!("{bin_name}: binary {} does not exist", binary.display());
    }
    let install = format!("/usr/local/bin/{bin_name}");
    let mut image = Image::new(name);
    image.add(Entry::host_file(&install, binary).mode(0o755));
    for lib in shared_libraries(binary)? {
        let path = lib.to_str().context("library path is not UTF-8")?.to_owned();
        image.add(Entry::host_file(&path, &lib).mode(0o755));
    }
    if !Path::new(CA_BUNDLE).is_file() {
        bail!(
            "{name}: CA bundle {CA_BUNDLE} missing on this machine (Debian: apt-get install ca-certificates)"
        );
    }
    image.add(Entry::host_file(CA_BUNDLE, CA_BUNDLE));
    add_users(&mut image);
    // glibc's default without this file tries DNS before /etc/hosts; pods expect /etc/hosts first.
    image.add(Entry::file("/etc/nsswitch.conf", "hosts: files dns\n"));
    image.add(Entry::dir("/tmp").mode(0o1777));

    let version = env!("CARGO_PKG_VERSION");
    let c = &mut image.config;
    c.entrypoint = vec![install];
    c.user = Some(format!("{NONROOT_ID}:{NONROOT_ID}"));
    c.working_dir = Some("/home/nonroot".into());
    c.env = vec![PATH_ENV.into(), format!("SSL_CERT_FILE={CA_BUNDLE}")];
    for (k, v) in [
        ("org.opencontainers.image.title", bin_name),
        ("org.opencontainers.image.description", description),
        ("org.opencontainers.image.version", version),
        ("org.opencontainers.image.licenses", env!("CARGO_PKG_LICENSE")),
        ("org.opencontainers.image.source", env!("CARGO_PKG_REPOSITORY")),
    ] {
        c.labels.insert(k.into(), v.into());
    }
    Ok(image)
}

/// `/etc/passwd`, `/etc/group` and a home for root and `nonroot` (65532), as distroless has them.
fn add_users(image: &mut Image) {
    image
        .add(Entry::file(
            "/etc/passwd",
            format!(
                "root:x:0:0:root:/root:/sbin/nologin\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n\
                 nonroot:x:{NONROOT_ID}:{NONROOT_ID}:nonroot:/home/nonroot:/sbin/nologin\n"
            ),
        ))
        .add(Entry::file(
            "/etc/group",
            format!("root:x:0:\nnogroup:x:65534:\nnonroot:x:{NONROOT_ID}:\n"),
        ))
        .add(Entry::dir("/root").mode(0o700))
        .add(
            Entry::dir("/home/nonroot")
                .mode(0o700)
                .owner(NONROOT_ID, NONROOT_ID),
        );
}

/// The shared libraries `binary` loads, dynamic loader included, as `ldd` resolves them on this machine
/// (empty for a static binary).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .context("running ldd (Debian: libc-bin)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stdout.contains("statically linked") {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
            || stdout.contains("statically linked")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed ({}): {}",
            binary.display(),
            out.status,
            stderr.trim()
        );
    }
    parse_ldd(&stdout).with_context(|| format!("ldd {}", binary.display()))
}

/// Paths from `ldd` output: `libc.so.6 => /lib/…/libc.so.6 (0x…)` and the loader's `/lib64/ld-….so.2 (0x…)`;
/// the vDSO has no file and is skipped.
fn parse_ldd(stdout: &str) -> Result<Vec<PathBuf>> {
    let mut libs = BTreeSet::new();
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once(" => ") {
            Some((lib, rest)) => {
                let path = rest.split(" (").next().unwrap_or_default().trim();
                if path == "not found" || path.is_empty() {
                    bail!("shared library {lib} not found on this machine");
                }
                path
            }
            None => line.split(" (").next().unwrap_or_default().trim(),
        };
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(libs.into_iter().collect())
}

/// The busybox binary the test images are made of: `HOOKFLEET_BUSYBOX`, else Debian's `/bin/busybox`.
pub fn busybox_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HOOKFLEET_BUSYBOX") {
        return Ok(p.into());
    }
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox not found (Debian: apt-get install busybox-static; or set HOOKFLEET_BUSYBOX)")
}

/// busybox plus the libraries it needs (none for busybox-static, but a dynamic busybox works too).
fn busybox_image(name: &str) -> Result<(Image, PathBuf)> {
    let busybox = busybox_path()?;
    let mut image = Image::new(name);
    image.add(Entry::host_file("/bin/busybox", &busybox).mode(0o755));
    for lib in shared_libraries(&busybox)? {
        let path = lib.to_str().context("library path is not UTF-8")?.to_owned();
        image.add(Entry::host_file(&path, &lib).mode(0o755));
    }
    image.config.env = vec![PATH_ENV.into()];
    Ok((image, busybox))
}

/// The pause image: `sleep inf` as PID 1. The sandbox only holds the pod's namespaces; containerd stops it
/// with SIGKILL, so it needs no signal handling.
pub fn pause(out_dir: &Path) -> Result<ImageArchive> {
    let (mut image, _) = busybox_image(PAUSE_IMAGE)?;
    image.add(Entry::symlink("/bin/sleep", "busybox"));
    image.config.entrypoint = vec!["/bin/sleep".into(), "inf".into()];
    image.config.user = Some("65535:65535".into());
    image.write_archive(&out_dir.join("pause.tar"))
}

/// The tools image: every busybox applet at its usual path (`busybox --list-full`), `/bin/sh` as command,
/// a writable `/tmp`, root and nonroot users.
pub fn tools(out_dir: &Path) -> Result<ImageArchive> {
    let (mut image, busybox) = busybox_image(TOOLS_IMAGE)?;
    let out = Command::new(&busybox)
        .arg("--list-full")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list-full failed ({})", busybox.display(), out.status);
    }
    for applet in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
        // `linuxrc` is an init for initrds; `bin/busybox` is the binary itself.
        if applet.is_empty() || applet == "bin/busybox" || !applet.contains('/') {
            continue;
        }
        image.add(Entry::symlink(&format!("/{applet}"), "/bin/busybox"));
    }
    add_users(&mut image);
    image.add(Entry::dir("/tmp").mode(0o1777));
    image.config.cmd = vec!["/bin/sh".into()];
    image.write_archive(&out_dir.join("tools.tar"))
}

/// Imports `archives` into the `k8s.io` namespace of the containerd at `address` (its socket) with `ctr`,
/// where the CRI (kubelet) finds them by name. Unpacked for the default snapshotter.
pub fn import(address: &Path, archives: &[ImageArchive]) -> Result<()> {
    for a in archives {
        import_archive(address, &a.path).with_context(|| format!("image {}", a.name))?;
    }
    Ok(())
}

/// Imports one OCI archive (an `oci-layout` tar whose index names the image) like [`import`].
pub fn import_archive(address: &Path, archive: &Path) -> Result<()> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(address)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(archive)
        .stdin(Stdio::null())
        .output()
        .context("running ctr (Debian: apt-get install containerd)")?;
    if !out.status.success() {
        bail!(
            "ctr images import of {} into {} failed ({}): {}",
            archive.display(),
            address.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader_without_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd1c5e4000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1a000000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c19e00000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1a2b0000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = "\tlibssl.so.3 => not found\n";
        assert!(format!("{:#}", parse_ldd(missing).unwrap_err()).contains("libssl.so.3 not found"));
    }

    #[test]
    fn cargo_messages_name_the_executable() {
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"hookfleet-crds"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"hookfleet-worker"},"executable":"/t/release/hookfleet-worker"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(msgs, "hookfleet-worker"),
            Some(PathBuf::from("/t/release/hookfleet-worker"))
        );
        assert_eq!(executable_from_messages(msgs, "hookfleet-operator"), None);
    }

    #[test]
    fn image_names_match_the_operator_default() {
        // operator/src/main.rs: --worker-image defaults to ghcr.io/hookfleet/worker:<crate version>; both
        // crates take the workspace version.
        assert_eq!(
            WORKER_IMAGE,
            format!("ghcr.io/hookfleet/worker:{}", env!("CARGO_PKG_VERSION"))
        );
        let main = std::fs::read_to_string(crate::tools::repo_root().join("operator/src/main.rs")).unwrap();
        assert!(main.contains(r#"concat!("ghcr.io/hookfleet/worker:", env!("CARGO_PKG_VERSION"))"#));
    }
}
