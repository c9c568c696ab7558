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
    release_binaries_for(Arch::host()?, false)
}

/// `cargo build --release` of the worker and operator for `arch` (cross-compiled, with the Debian cross
/// toolchain as linker, when it is not this machine's), with `cargo auditable` when `auditable` (the
/// binaries then carry their dependency list, which an SBOM scanner reads).
pub fn release_binaries_for(arch: Arch, auditable: bool) -> Result<Binaries> {
    // Inside `cargo test`, CARGO names the cargo that runs us: the same toolchain builds the binaries.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = crate::tools::repo_root();
    eprintln!(
        "hookfleet-e2e: cargo {}build --release{} of hookfleet-worker and hookfleet-operator (no-op when fresh)",
        if auditable { "auditable " } else { "" },
        if arch.is_host() {
            String::new()
        } else {
            format!(" --target {}", arch.triple)
        },
    );
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root);
    if auditable {
        cmd.arg("auditable");
    }
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--message-format=json-render-diagnostics",
        "-p",
        "hookfleet-worker",
        "-p",
        "hookfleet-operator",
        "--bin",
        "hookfleet-worker",
        "--bin",
        "hookfleet-operator",
    ]);
    if !arch.is_host() {
        let cc = format!("{}-gcc", arch.gnu);
        if which(&cc).is_none() {
            bail!(
                "cross-compiling for {}: {cc} not found (Debian: apt-get install gcc-{}; and rustup target add {})",
                arch.oci,
                arch.gnu,
                arch.triple
            );
        }
        cmd.args(["--target", arch.triple]);
        let triple_env = arch.triple.replace('-', "_");
        let linker = format!("CARGO_TARGET_{}_LINKER", triple_env.to_uppercase());
        if std::env::var_os(&linker).is_none() {
            cmd.env(&linker, &cc);
        }
        let cc_var = format!("CC_{triple_env}");
        if std::env::var_os(&cc_var).is_none() {
            cmd.env(&cc_var, &cc);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} build in {}", cargo.to_string_lossy(), root.display()))?;
    if !out.status.success() {
        bail!(
            "cargo build --release of the worker and operator for {} failed ({}); its errors are above",
            arch.oci,
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

/// A Linux platform the release images are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// The OCI architecture (`amd64`).
    pub oci: &'static str,
    /// The Rust target (`x86_64-unknown-linux-gnu`).
    pub triple: &'static str,
    /// The GNU triple of Debian's multiarch paths and cross toolchain (`x86_64-linux-gnu`).
    pub gnu: &'static str,
}

impl Arch {
    pub const AMD64: Arch = Arch {
        oci: "amd64",
        triple: "x86_64-unknown-linux-gnu",
        gnu: "x86_64-linux-gnu",
    };
    pub const ARM64: Arch = Arch {
        oci: "arm64",
        triple: "aarch64-unknown-linux-gnu",
        gnu: "aarch64-linux-gnu",
    };
    /// The platforms of a release.
    pub const RELEASE: [Arch; 2] = [Arch::AMD64, Arch::ARM64];

    /// `amd64` or `arm64` (also `linux/amd64`).
    pub fn parse(s: &str) -> Result<Arch> {
        let a = s.strip_prefix("linux/").unwrap_or(s);
        Self::RELEASE
            .into_iter()
            .find(|r| r.oci == a)
            .with_context(|| format!("platform {s:?}: one of linux/amd64, linux/arm64"))
    }

    /// This machine's.
    pub fn host() -> Result<Arch> {
        Self::parse(crate::oci::platform().1)
    }

    pub fn is_host(&self) -> bool {
        crate::oci::platform().1 == self.oci
    }
}

/// `program` as the shell would find it on `PATH`.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// The worker and operator images for every platform of `binaries`, each written as one multi-platform OCI
/// image layout (`out_dir/worker`, `out_dir/operator`) named `<registry>/worker:<version>` and
/// `<registry>/operator:<version>` (`registry` like `ghcr.io/hookfleet`).
pub fn multi_platform(
    out_dir: &Path,
    registry: &str,
    binaries: &[(Arch, Binaries)],
) -> Result<Vec<crate::oci::Layout>> {
    let version = env!("CARGO_PKG_VERSION");
    let mut layouts = Vec::new();
    for (component, bin_name, description) in [
        ("worker", "hookfleet-worker", WORKER_DESCRIPTION),
        ("operator", "hookfleet-operator", OPERATOR_DESCRIPTION),
    ] {
        let name = format!("{registry}/{component}:{version}");
        let images = binaries
            .iter()
            .map(|(arch, bins)| {
                let binary = if component == "worker" {
                    &bins.worker
                } else {
                    &bins.operator
                };
                service_image_for(*arch, &name, bin_name, binary, description)
            })
            .collect::<Result<Vec<_>>>()?;
        let dir = out_dir.join(component);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        layouts.push(crate::oci::write_layout(&dir, &name, &images)?);
    }
    Ok(layouts)
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
    let image = service_image(WORKER_IMAGE, "hookfleet-worker", binary, WORKER_DESCRIPTION)?;
    image.write_archive(&out_dir.join("worker.tar"))
}

/// The operator image from `binary`, written to `out_dir/operator.tar`.
pub fn operator(out_dir: &Path, binary: &Path) -> Result<ImageArchive> {
    let image = service_image(OPERATOR_IMAGE, "hookfleet-operator", binary, OPERATOR_DESCRIPTION)?;
    image.write_archive(&out_dir.join("operator.tar"))
}

const WORKER_DESCRIPTION: &str = "Consumes a RabbitMQ queue and delivers each message as a webhook";
const OPERATOR_DESCRIPTION: &str = "Reconciles hookfleet Integrations into worker fleets";

/// A distroless-like image: `/usr/local/bin/<bin_name>` as entrypoint, its shared libraries, a CA bundle, a
/// `nonroot` user 65532 and a writable `/tmp`.
pub fn service_image(name: &str, bin_name: &str, binary: &Path, description: &str) -> Result<Image> {
    service_image_for(Arch::host()?, name, bin_name, binary, description)
}

/// [`service_image`] for a binary built for `arch`: the shared libraries of another platform come from
/// Debian's cross toolchain (`/usr/<gnu triple>/lib`, package `libc6-<arch>-cross`) and go where that
/// platform's Debian has them (`/lib/<gnu triple>/`).
pub fn service_image_for(
    arch: Arch,
    name: &str,
    bin_name: &str,
    binary: &Path,
    description: &str,
) -> Result<Image> {
    if !binary.is_file() {
        bail!("{bin_name}: binary {} does not exist", binary.display());
    }
    let install = format!("/usr/local/bin/{bin_name}");
    let mut image = Image::new(name);
    image.platform = ("linux", arch.oci);
    image.add(Entry::host_file(&install, binary).mode(0o755));
    let libs = if arch.is_host() {
        shared_libraries(binary)?
            .into_iter()
            .map(|lib| Ok((lib.to_str().context("library path is not UTF-8")?.to_owned(), lib)))
            .collect::<Result<Vec<_>>>()?
    } else {
        foreign_libraries(binary, arch)?
    };
    for (path, host) in libs {
        image.add(Entry::host_file(&path, &host).mode(0o755));
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

/// The shared libraries of `binary`, built for `arch` (not this machine's, so `ldd` cannot run it): its
/// `NEEDED` entries and theirs, as `readelf` reads them, found in `/usr/<gnu triple>/lib`; returned as
/// (path in the image, file on this machine), the program interpreter at the path the binary names.
pub fn foreign_libraries(binary: &Path, arch: Arch) -> Result<Vec<(String, PathBuf)>> {
    let host_dir = PathBuf::from(format!("/usr/{}/lib", arch.gnu));
    if !host_dir.is_dir() {
        bail!(
            "{} libraries: {} missing (Debian: apt-get install gcc-{})",
            arch.oci,
            host_dir.display(),
            arch.gnu
        );
    }
    let readelf = |args: &[&str], file: &Path| -> Result<String> {
        let out = Command::new("readelf")
            .args(args)
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .context("running readelf (Debian: binutils)")?;
        if !out.status.success() {
            bail!(
                "readelf {args:?} {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut out = BTreeSet::new();
    let interp = parse_interpreter(&readelf(&["-W", "-l"], binary)?);
    if let Some(interp) = &interp {
        let file = Path::new(interp)
            .file_name()
            .context("interpreter without a file name")?;
        out.insert((interp.clone(), host_dir.join(file)));
    }
    let mut todo = parse_needed(&readelf(&["-W", "-d"], binary)?);
    let mut seen = BTreeSet::new();
    while let Some(lib) = todo.pop() {
        if !seen.insert(lib.clone()) {
            continue;
        }
        let host = host_dir.join(&lib);
        if !host.is_file() {
            bail!(
                "{}: shared library {lib} of {} not found in {}",
                arch.oci,
                binary.display(),
                host_dir.display()
            );
        }
        if interp.as_deref().and_then(|i| Path::new(i).file_name()) != Some(std::ffi::OsStr::new(&lib)) {
            out.insert((format!("/lib/{}/{lib}", arch.gnu), host.clone()));
        }
        todo.extend(parse_needed(&readelf(&["-W", "-d"], &host)?));
    }
    Ok(out.into_iter().collect())
}

/// `libc.so.6` from `readelf -d` lines like ` 0x… (NEEDED)  Shared library: [libc.so.6]`.
fn parse_needed(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .collect()
}

/// The path of `[Requesting program interpreter: /lib/ld-linux-aarch64.so.1]` in `readelf -l`.
fn parse_interpreter(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split_once("program interpreter: "))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(p, _)| p.trim().to_owned())
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
    tools_image(TOOLS_IMAGE)?.write_archive(&out_dir.join("tools.tar"))
}

/// The [`tools`] image named `name`, not yet written.
pub fn tools_image(name: &str) -> Result<Image> {
    let (mut image, busybox) = busybox_image(name)?;
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
    Ok(image)
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
    fn readelf_output_gives_needed_libraries_and_the_interpreter() {
        let dynamic = " 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]\n                        0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n                        0x000000000000000c (INIT)               0x4a000\n";
        assert_eq!(parse_needed(dynamic), ["libgcc_s.so.1", "libc.so.6"]);
        let headers = "  INTERP         0x0002a8 0x00000000000002a8 0x00000000000002a8 0x00001b 0x00001b R   0x1\n                             [Requesting program interpreter: /lib/ld-linux-aarch64.so.1]\n";
        assert_eq!(
            parse_interpreter(headers).as_deref(),
            Some("/lib/ld-linux-aarch64.so.1")
        );
        assert_eq!(parse_interpreter("no such line"), None);
        assert_eq!(Arch::parse("linux/arm64").unwrap(), Arch::ARM64);
        assert!(Arch::parse("s390x").is_err());
    }

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
