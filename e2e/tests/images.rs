//! The OCI archives of `hookfleet_e2e::images` against a real containerd: imported with `ctr images import`,
//! listed by their fully qualified names, and run with `ctr run` (runc). The worker and operator images are
//! also run from their own unpacked root with `chroot`, so a shared library missing from the image fails here.
//!
//! Needs root (containerd, chroot) and Debian's containerd, runc and busybox-static (`hack/deps.sh`).
//! Each test starts its own containerd in a temporary directory and stops it, its tasks and mounts at the end,
//! also on panic.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hookfleet_e2e::images;
use hookfleet_e2e::oci::{Entry, Image, ImageArchive};
use hookfleet_e2e::process::Process;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A containerd of its own (root, state, socket and config in a temp dir), with the CRI plugin off: these
/// tests only import and run images.
struct Containerd {
    dir: tempfile::TempDir,
    process: Process,
}

impl Containerd {
    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("hookfleet-containerd-")
            .tempdir()?;
        let config = dir.path().join("config.toml");
        // Our own config, so /etc/containerd/config.toml (if any) does not apply.
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )?;
        let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
        let process = Process::spawn(
            "containerd",
            Path::new("containerd"),
            &[
                "--config".into(),
                config.to_string_lossy().into_owned(),
                "--root".into(),
                p("root"),
                "--state".into(),
                p("state"),
                "--address".into(),
                p("containerd.sock"),
            ],
            &[],
            &dir.path().join("containerd.log"),
        )?;
        let c = Self { dir, process };
        for _ in 0..100 {
            c.process.check_running()?;
            if c.ctr(&["version"]).is_ok() {
                return Ok(c);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "containerd did not answer within 10 s:\n{}",
            c.process.log_tail(20)
        )
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `ctr --address SOCK -n k8s.io ARGS…`, its stdout, or an error with its stderr.
    fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr images ls -q`: the image names.
    fn image_names(&self) -> Result<Vec<String>> {
        Ok(self
            .ctr(&["images", "ls", "-q"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// `ctr run --rm IMAGE ID CMD…`: the container's stdout (stderr goes to the test's output).
    fn run(&self, image: &str, id: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["run", "--rm", image, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks live in shims outside containerd's process group: kill and delete them first.
        if let Ok(tasks) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in tasks.lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                for _ in 0..50 {
                    if self.ctr(&["tasks", "delete", id]).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if let Ok(containers) = self.ctr(&["containers", "ls", "-q"]) {
            for id in containers.lines() {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        self.process.stop(Duration::from_secs(10));
        // Whatever is still mounted below our dir (a snapshot of an interrupted run), deepest first.
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
    }
}

fn names(archives: &[ImageArchive]) -> Vec<&str> {
    archives.iter().map(|a| a.name.as_str()).collect()
}

#[test]
fn busybox_images_import_and_run_in_containerd() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: containerd needs root");
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let archives = images::test_images(out.path())?;
    assert_eq!(names(&archives), [images::PAUSE_IMAGE, images::TOOLS_IMAGE]);

    let ctd = Containerd::start()?;
    images::import(&ctd.socket(), &archives)?;
    let listed = ctd.image_names()?;
    for a in &archives {
        assert!(
            listed.contains(&a.name),
            "{} not in `ctr images ls`: {listed:?}",
            a.name
        );
        // The digest ctr reports is the manifest we wrote.
        let ls = ctd.ctr(&["images", "ls", &format!("name=={}", a.name)])?;
        assert!(ls.contains(&a.manifest_digest), "{ls}");
    }

    // The tools image: a shell, applets at their usual paths, the users, a writable /tmp.
    let said = ctd.run(
        images::TOOLS_IMAGE,
        "tools",
        &[
            "/bin/sh",
            "-c",
            "echo hello > /tmp/x && cat /tmp/x && which wget nc sleep && id -u nonroot",
        ],
    )?;
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        ["hello", "/usr/bin/wget", "/usr/bin/nc", "/bin/sleep", "65532"]
    );

    // The pause image stays alive until killed.
    ctd.ctr(&["run", "-d", images::PAUSE_IMAGE, "pause"])?;
    std::thread::sleep(Duration::from_secs(2));
    let tasks = ctd.ctr(&["tasks", "ls"])?;
    let line = tasks.lines().find(|l| l.starts_with("pause")).unwrap_or_default();
    assert!(
        line.contains("RUNNING"),
        "pause task not running after 2 s:\n{tasks}"
    );
    ctd.ctr(&["tasks", "kill", "-s", "SIGKILL", "pause"])?;
    Ok(())
}

/// The registry path of a release, without Docker and without the signing tools (`make release-local` adds
/// those): a multi-platform image written as an OCI layout, pushed with `crane` to a local registry, listed
/// there with both platforms under the layout's index digest, then pulled by containerd over plain HTTP and
/// run; the chart pushed as an OCI artifact and read back with `helm show chart oci://…`.
#[tokio::test]
async fn a_multi_platform_image_pushed_to_a_local_registry_is_pulled_by_containerd() -> Result<()> {
    use hookfleet_e2e::release;
    if !is_root() {
        eprintln!("skipped: containerd needs root");
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let registry =
        release::Registry::start(std::net::Ipv4Addr::LOCALHOST, &out.path().join("registry.log")).await?;
    let name = format!("{}/hookfleet/tools:busybox", registry.host);
    let amd64 = images::tools_image(&name)?;
    // The arm64 entry holds the same (amd64) busybox: this test is about the index and the platform a pull
    // selects, not about running arm64 code (`make release-local` cross-compiles the real arm64 images).
    let mut arm64 = amd64.clone();
    arm64.platform = ("linux", "arm64");
    arm64
        .config
        .labels
        .insert("test.hookfleet.io/platform".into(), "arm64".into());
    let layout = hookfleet_e2e::oci::write_layout(&out.path().join("layout"), &name, &[amd64, arm64])?;
    let digest = release::push_image(&layout, &name)?;
    assert_eq!(digest, layout.index_digest);
    let listed = release::platforms(&name)?;
    assert_eq!(
        listed, layout.manifests,
        "the registry's index lists both platforms"
    );

    let ctd = Containerd::start()?;
    ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &name,
    ])?;
    let ls = ctd.ctr(&["images", "ls", &format!("name=={name}")])?;
    assert!(ls.contains(&digest), "containerd holds the index digest: {ls}");
    let said = ctd.run(&name, "pulled", &["/bin/sh", "-c", "echo pulled"])?;
    assert_eq!(said.trim(), "pulled");

    let helm_home = out.path().join("helm");
    let archive = release::package_chart(&helm_home, out.path())?;
    let chart_digest = release::push_chart(&helm_home, &archive, &registry.host)?;
    assert!(chart_digest.starts_with("sha256:"), "{chart_digest}");
    let version = env!("CARGO_PKG_VERSION");
    let shown = hookfleet_e2e::chart::run(
        hookfleet_e2e::chart::helm(&helm_home)?
            .args(["show", "chart", "--plain-http", "--version", version])
            .arg(format!("oci://{}/charts/hookfleet", registry.host)),
    )?;
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("name: hookfleet") && shown.contains(&format!("version: {version}")),
        "{shown}"
    );
    Ok(())
}

/// Unpacks the image's layer (from the archive, found through the manifest) into `root`.
fn unpack(archive: &ImageArchive, root: &Path) -> Result<()> {
    let mut outer = tar::Archive::new(std::fs::File::open(&archive.path)?);
    let want = format!(
        "blobs/sha256/{}",
        archive.layer_digest.trim_start_matches("sha256:")
    );
    for e in outer.entries()? {
        let mut e = e?;
        if e.path()?.to_string_lossy() == want {
            let mut gz = Vec::new();
            e.read_to_end(&mut gz)?;
            let mut layer = tar::Archive::new(flate2::read::GzDecoder::new(gz.as_slice()));
            layer.set_preserve_permissions(true);
            layer.set_preserve_ownerships(true);
            layer.unpack(root)?;
            return Ok(());
        }
    }
    bail!("{want} not in {}", archive.path.display())
}

/// `chroot ROOT PROGRAM ARGS…` with a clean environment (no LD_LIBRARY_PATH or LD_PRELOAD from the host).
fn chroot(root: &Path, program: &str, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("chroot")
        .arg(root)
        .arg(program)
        .args(args)
        .env_clear()
        // Only to find chroot itself.
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .output()?)
}

#[test]
fn worker_and_operator_images_run_from_their_own_root() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: chroot and containerd need root");
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let archives = images::build(out.path())?;
    assert_eq!(names(&archives), [images::WORKER_IMAGE, images::OPERATOR_IMAGE]);

    for (archive, bin) in archives.iter().zip(["hookfleet-worker", "hookfleet-operator"]) {
        // chroot into the unpacked layer: nothing from the host's root is visible, so every library the
        // binary loads has to be in the image.
        let root = out.path().join(format!("{bin}-root"));
        unpack(archive, &root)?;
        let run = chroot(&root, &format!("/usr/local/bin/{bin}"), &["--help"])?;
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success() && stdout.contains("Usage:"),
            "{bin} --help in its own root failed ({}): {}{}",
            run.status,
            stdout,
            String::from_utf8_lossy(&run.stderr)
        );
        for f in [
            "etc/ssl/certs/ca-certificates.crt",
            "etc/passwd",
            "etc/group",
            "tmp",
        ] {
            assert!(root.join(f).exists(), "{bin} image lacks /{f}");
        }
    }

    // The check above can fail: the worker binary alone, without the libraries ldd named, does not start.
    let mut bare = Image::new("ghcr.io/hookfleet/bare-worker:test");
    let worker_bin = out
        .path()
        .join("hookfleet-worker-root/usr/local/bin/hookfleet-worker");
    bare.add(Entry::host_file("/usr/local/bin/hookfleet-worker", &worker_bin).mode(0o755));
    let bare = bare.write_archive(&out.path().join("bare.tar"))?;
    let bare_root = out.path().join("bare-root");
    unpack(&bare, &bare_root)?;
    let run = chroot(&bare_root, "/usr/local/bin/hookfleet-worker", &["--help"])?;
    assert!(
        !run.status.success(),
        "a worker without its libraries ran: {run:?}"
    );

    // Through containerd and runc, with the image's own config: user 65532, entrypoint the binary.
    let ctd = Containerd::start()?;
    images::import(&ctd.socket(), &archives)?;
    let listed = ctd.image_names()?;
    for a in &archives {
        assert!(
            listed.contains(&a.name),
            "{} not in `ctr images ls`: {listed:?}",
            a.name
        );
    }
    // The image config as containerd reads it into a container's OCI spec (what the CRI starts from too):
    // entrypoint, user 65532, working dir and environment.
    for (image, bin) in [
        (images::WORKER_IMAGE, "hookfleet-worker"),
        (images::OPERATOR_IMAGE, "hookfleet-operator"),
    ] {
        let id = format!("{bin}-spec");
        ctd.ctr(&["containers", "create", image, &id])?;
        let info: serde_json::Value = serde_json::from_str(&ctd.ctr(&["containers", "info", &id])?)?;
        let process = &info["Spec"]["process"];
        assert_eq!(
            process["args"],
            serde_json::json!([format!("/usr/local/bin/{bin}")]),
            "{info}"
        );
        assert_eq!(process["user"]["uid"], 65532, "{info}");
        assert_eq!(process["user"]["gid"], 65532, "{info}");
        assert_eq!(process["cwd"], "/home/nonroot", "{info}");
        let env = process["env"].to_string();
        assert!(
            env.contains("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"),
            "{env}"
        );
        ctd.ctr(&["containers", "delete", &id])?;
    }
    // ctr run takes the entrypoint from the image only with no command given; --version prints and exits.
    let version = ctd.ctr(&[
        "run",
        "--rm",
        images::WORKER_IMAGE,
        "worker",
        "/usr/local/bin/hookfleet-worker",
        "--version",
    ])?;
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let ids = ctd.ctr(&[
        "run",
        "--rm",
        images::OPERATOR_IMAGE,
        "operator-id",
        "/usr/local/bin/hookfleet-operator",
        "--version",
    ])?;
    assert!(ids.contains(env!("CARGO_PKG_VERSION")), "{ids}");
    Ok(())
}
