//! `hookfleet-release`: the release of `.github/workflows/release.yml`, run here against a local registry
//! (`make release-local`, root: it ends with an install on the real node).
//!
//! ```text
//! hookfleet-release local [--out DIR] [--platforms linux/amd64,linux/arm64] [--keep]
//! ```
//!
//! 1. the release notes of the workspace version from `CHANGELOG.md`, and the chart's `version` and
//!    `appVersion` equal to it;
//! 2. `cargo auditable build --release` of the worker and operator for every platform (cross-compiled for the
//!    ones that are not this machine's), written as one multi-platform OCI image each;
//! 3. a control plane and a real node, a registry (go-containerregistry's) on the pod network's gateway, the
//!    node's containerd told it speaks plain HTTP;
//! 4. `crane push` of both images; an SPDX SBOM per image and platform (`syft`) and a SLSA provenance, both
//!    attached as signed attestations (`cosign attest`); the images signed (`cosign sign --recursive`, a key
//!    pair: keyless signing needs the public Sigstore services); `helm package` + `helm push` of the chart
//!    as an OCI artifact, signed too;
//! 5. the checks a user makes: `cosign verify` and `verify-attestation` with the public key (and the same
//!    checks made to fail: another key, an unsigned copy);
//! 6. `helm install hookfleet oci://<registry>/charts/hookfleet --version <v>` with the registry's images:
//!    the node's containerd pulls them (nothing is imported), the sample Integration runs and delivers, and
//!    the digests the pods run are the pushed ones.
//!
//! Prints every command's evidence and a summary; exits non-zero when any check fails.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hookfleet_e2e::images::{self, Arch};
use hookfleet_e2e::release::{self, Registry, Signer};
use hookfleet_e2e::{Cluster, ClusterOptions, RabbitMq, install, messages, tools};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams};

const USAGE: &str =
    "usage: hookfleet-release local [--out DIR] [--platforms linux/amd64,linux/arm64] [--keep]";
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[tokio::main]
async fn main() -> ExitCode {
    hookfleet_e2e::init_tracing();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookfleet-release: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    out: PathBuf,
    platforms: Vec<Arch>,
    keep: bool,
}

fn args() -> Result<Args> {
    let mut a = std::env::args().skip(1);
    match a.next().as_deref() {
        Some("local") => {}
        Some("-h" | "--help") => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
    let mut out = tools::repo_root().join("target/release-local");
    let mut platforms = Arch::RELEASE.to_vec();
    let mut keep = false;
    while let Some(arg) = a.next() {
        match arg.as_str() {
            "--out" => out = a.next().context(USAGE)?.into(),
            "--platforms" => {
                platforms = a
                    .next()
                    .context(USAGE)?
                    .split(',')
                    .map(Arch::parse)
                    .collect::<Result<_>>()?
            }
            "--keep" => keep = true,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Args { out, platforms, keep })
}

fn step(n: u32, what: &str) {
    println!("\n== {n}. {what}");
}

fn show(line: impl AsRef<str>) {
    println!("   {}", line.as_ref());
    let _ = std::io::stdout().flush();
}

async fn run() -> Result<()> {
    let args = args()?;
    let t0 = Instant::now();
    let started = k8s_openapi::jiff::Timestamp::now().to_string();
    std::fs::create_dir_all(&args.out)?;
    let root = tools::repo_root();

    step(1, "version and release notes");
    let chart: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        root.join("charts/hookfleet/Chart.yaml"),
    )?)?;
    let (chart_version, app_version) = (
        chart["version"].as_str().unwrap_or_default(),
        chart["appVersion"].as_str().unwrap_or_default(),
    );
    ensure!(
        chart_version == VERSION && app_version == VERSION,
        "Chart.yaml version {chart_version} / appVersion {app_version} differ from the workspace's {VERSION}"
    );
    let notes = release::release_notes(VERSION)?;
    std::fs::write(args.out.join("release-notes.md"), &notes)?;
    show(format!(
        "v{VERSION}: Cargo.toml, Chart.yaml version and appVersion agree; notes: {} lines of CHANGELOG.md → {}",
        notes.lines().count(),
        args.out.join("release-notes.md").display()
    ));

    step(
        2,
        "images: cargo auditable build --release per platform, one multi-platform OCI layout each",
    );
    let mut binaries = Vec::new();
    for arch in &args.platforms {
        let t = Instant::now();
        let bins = images::release_binaries_for(*arch, true)?;
        show(format!(
            "linux/{}: {} and {} ({:.0?})",
            arch.oci,
            bins.worker.display(),
            bins.operator.display(),
            t.elapsed()
        ));
        binaries.push((*arch, bins));
    }

    // Another platform's binaries cannot run here, except under qemu-user: each runs from its image's
    // own root, so a library missing from the image fails here.
    let check_dir = tempfile::Builder::new()
        .prefix("hookfleet-release-roots-")
        .tempdir()?;
    let probe = images::multi_platform(check_dir.path(), "localhost/hookfleet", &binaries)?;
    for layout in &probe {
        for (platform, _) in layout.manifests.iter().filter(|(p, _)| *p != "linux/amd64") {
            let arch = platform.trim_start_matches("linux/");
            let component = if layout.name.contains("/worker:") {
                "worker"
            } else {
                "operator"
            };
            let root = check_dir.path().join(format!("{component}-{arch}-root"));
            release::unpack_platform(layout, platform, &root)?;
            let qemu_arch = if arch == "arm64" { "aarch64" } else { arch };
            let program = format!("/usr/local/bin/hookfleet-{component}");
            match release::run_foreign(qemu_arch, &root, &program, &["--version"])? {
                Some(v) => show(format!(
                    "{platform} {component} image, from its own root under qemu-{qemu_arch}: {v}"
                )),
                None => show(format!(
                    "{platform} {component} image: not run (qemu-user missing)"
                )),
            }
        }
    }

    step(
        3,
        "control plane, real node, local registry on the pod network's gateway",
    );
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let cp = cluster.control_plane();
    let registry = Registry::start(cluster.host_addr(), &args.out.join("registry.log")).await?;
    cluster.trust_registry(&registry.host)?;
    show(format!(
        "registry http://{}/ (go-containerregistry); the node's containerd pulls from it over plain HTTP",
        registry.host
    ));
    let repo = format!("{}/hookfleet", registry.host);
    let layouts = images::multi_platform(&args.out.join("images"), &repo, &binaries)?;

    step(4, "push, SBOM, provenance, signatures, chart");
    let signer = Signer::generate(&args.out.join("keys"))?;
    show(format!(
        "cosign generate-key-pair → {} (public key: {})",
        signer.key.display(),
        signer.public_key.display()
    ));
    let git = |a: &[&str]| -> Result<String> {
        let o = release::run(std::process::Command::new("git").current_dir(&root).args(a))?;
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain"])?.is_empty();
    let lock_sha = hookfleet_e2e::oci::sha256(&std::fs::read(root.join("Cargo.lock"))?);
    let provenance = release::provenance(
        &commit,
        dirty,
        lock_sha.trim_start_matches("sha256:"),
        &started,
        &k8s_openapi::jiff::Timestamp::now().to_string(),
    );
    let provenance_path = args.out.join("provenance.json");
    std::fs::write(&provenance_path, serde_json::to_vec_pretty(&provenance)?)?;
    let mut pushed = Vec::new();
    for layout in &layouts {
        let reference = layout.name.clone();
        let digest = release::push_image(layout, &reference)?;
        let repo_ref = reference
            .rsplit_once(':')
            .map(|(r, _)| r.to_owned())
            .unwrap_or_default();
        let at = format!("{repo_ref}@{digest}");
        show(format!(
            "crane push {} {reference} → {digest}",
            layout.dir.display()
        ));
        for (platform, d) in release::platforms(&reference)? {
            show(format!("  {platform}: {d}"));
        }
        for (platform, manifest) in &layout.manifests {
            let platform_at = format!("{repo_ref}@{manifest}");
            let file = args.out.join(format!(
                "{}-{}.spdx.json",
                repo_ref.rsplit('/').next().unwrap_or("image"),
                platform.replace('/', "-")
            ));
            let sbom = release::sbom(&platform_at, None, &file)?;
            ensure!(
                sbom.crates > 50,
                "{}: the SBOM lists {} crates: the binary's cargo auditable section was not read",
                file.display(),
                sbom.crates
            );
            show(format!(
                "syft scan {platform} → {}: {} packages, {} of them crates",
                file.display(),
                sbom.packages,
                sbom.crates
            ));
            // The SBOM of one platform belongs to that platform's manifest.
            signer.attest(&platform_at, "spdxjson", &file)?;
        }
        signer.attest(&at, "slsaprovenance1", &provenance_path)?;
        signer.sign(&at, true)?;
        show(format!(
            "cosign attest --type spdxjson (each platform's manifest), --type slsaprovenance1 ({at}); \
             cosign sign --recursive {at}"
        ));
        pushed.push((reference, repo_ref, digest));
    }
    let helm_home = args.out.join("helm");
    let chart_archive = release::package_chart(&helm_home, &args.out)?;
    let chart_digest = release::push_chart(&helm_home, &chart_archive, &registry.host)?;
    let chart_ref = format!("oci://{}/charts/hookfleet", registry.host);
    let chart_at = format!("{}/charts/hookfleet@{chart_digest}", registry.host);
    signer.sign(&chart_at, false)?;
    show(format!(
        "helm package + helm push {} {} --plain-http → {chart_digest}; cosign sign {chart_at}",
        chart_archive.display(),
        chart_ref.trim_end_matches("/hookfleet")
    ));

    step(5, "verification, as a user does it");
    for (_, repo_ref, digest) in &pushed {
        let at = format!("{repo_ref}@{digest}");
        release::verify(&signer.public_key, &at)?;
        for (platform, d) in release::platforms(&at)? {
            release::verify(&signer.public_key, &format!("{repo_ref}@{d}"))
                .with_context(|| format!("the {platform} manifest's own signature"))?;
        }
        let predicate = release::verify_attestation(&signer.public_key, &at, "slsaprovenance1")?;
        ensure!(
            predicate["buildDefinition"]["externalParameters"]["source"]["digest"]["gitCommit"]
                == commit.as_str(),
            "the provenance names another commit: {predicate}"
        );
        for (platform, d) in release::platforms(&at)? {
            let sbom =
                release::verify_attestation(&signer.public_key, &format!("{repo_ref}@{d}"), "spdxjson")?;
            ensure!(
                sbom["spdxVersion"].is_string(),
                "the {platform} SBOM attestation holds no SPDX document"
            );
        }
        show(format!(
            "cosign verify --key cosign.pub {at}: the index and every platform signed; verify-attestation: \
             provenance (commit {}) and each platform's SPDX SBOM verified",
            &commit[..12]
        ));
    }
    release::verify(&signer.public_key, &chart_at)?;
    show(format!(
        "cosign verify --key cosign.pub {chart_at}: the chart is signed"
    ));
    // The checks can fail: another key, and an unsigned copy of the same image.
    let stranger = Signer::generate(&args.out.join("keys-other"))?;
    let (_, repo_ref, digest) = &pushed[0];
    let at = format!("{repo_ref}@{digest}");
    ensure!(
        release::verify(&stranger.public_key, &at).is_err(),
        "cosign verify with another key passed"
    );
    let copy = format!("{}/unsigned/worker@{digest}", registry.host);
    release::run(
        std::process::Command::new(tools::path(tools::Tool::Crane)?).args([
            "copy",
            "--insecure",
            &at,
            &format!("{}/unsigned/worker:{VERSION}", registry.host),
        ]),
    )?;
    ensure!(
        release::verify(&signer.public_key, &copy).is_err(),
        "cosign verify of an unsigned copy passed"
    );
    show("refused as they must be: the signature checked with another key; an unsigned copy of the image");

    step(6, "helm install from the registry; the node pulls the images");
    let host = std::net::IpAddr::V4(cluster.host_addr());
    let rmq = RabbitMq::start_on(Some(host)).await?;
    let sink = hookfleet_e2e::sink::Sink::start_on(host, false).await?;
    let chart_args = [chart_ref.as_str(), "--version", VERSION, "--plain-http"];
    let op_repo = format!("image.repository={repo}/operator");
    let worker_repo = format!("worker.image.repository={repo}/worker");
    let t_install = Instant::now();
    let leader = install::helm_install_chart(
        &cp.client(),
        cp.kubeconfig(),
        &helm_home,
        &chart_args,
        &[op_repo.as_str(), worker_repo.as_str(), "operator.logFormat=text"],
    )
    .await?;
    show(format!(
        "helm install hookfleet {chart_ref} --version {VERSION} --plain-http -n {} --set {op_repo} --set \
         {worker_repo}: {leader} leads ({:.1?})",
        install::NAMESPACE,
        t_install.elapsed()
    ));
    let (name, queue) = install::apply_sample(
        &cp.client(),
        &rmq.amqp_uri_for_pods(),
        &format!("{}/devices", sink.url()),
    )
    .await?;
    let ids = messages::ids("release-local", 200);
    messages::publish(&rmq.amqp_uri(), &queue, &ids, Some(200)).await?;
    hookfleet_e2e::process::wait_for(
        "200 deliveries",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            let done = sink.delivered().len() >= ids.len();
            async move { Ok(done.then_some(())) }
        },
    )
    .await?;
    show(format!(
        "the sample Integration {name}: Ready with 2 consumers; 200 published, {} delivered",
        sink.delivered().len()
    ));

    // What the node runs: every hookfleet container's image digest is a pushed one, and it was pulled.
    let pods = Api::<Pod>::all(cp.client()).list(&ListParams::default()).await?;
    let mut checked = 0;
    for p in &pods.items {
        for cs in p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default()
        {
            let Some((reference, _, digest)) = pushed.iter().find(|(r, _, _)| *r == cs.image) else {
                continue;
            };
            ensure!(
                cs.image_id.ends_with(digest.as_str()),
                "pod {}: {} runs {}, not the pushed {digest}",
                p.metadata.name.as_deref().unwrap_or("?"),
                reference,
                cs.image_id
            );
            checked += 1;
        }
    }
    ensure!(checked >= 4, "only {checked} hookfleet containers found");
    show(format!(
        "{checked} containers (operator, workers) run the pushed digests (status.containerStatuses[].imageID)"
    ));
    let pulled: Vec<String> = Api::<Event>::all(cp.client())
        .list(&ListParams::default().fields("reason=Pulled"))
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.message)
        .filter(|m| m.contains(&registry.host))
        .collect();
    ensure!(
        pushed
            .iter()
            .all(|(r, _, _)| pulled.iter().any(|m| m.contains(r.as_str()))),
        "no kubelet Pulled event for each image: {pulled:?}"
    );
    for m in &pulled {
        show(format!("kubelet: {m}"));
    }
    let ctr = cluster.node().ctr().args(["images", "ls"]).output()?;
    for line in String::from_utf8_lossy(&ctr.stdout)
        .lines()
        .filter(|l| l.starts_with(&registry.host))
    {
        show(format!(
            "ctr images ls: {}",
            line.split_whitespace().take(4).collect::<Vec<_>>().join("  ")
        ));
    }

    println!("\n== summary");
    for (reference, _, digest) in &pushed {
        show(format!(
            "{reference}  {digest}  signed, SBOM + provenance attested, pulled by the node"
        ));
    }
    show(format!(
        "{chart_ref}:{VERSION}  {chart_digest}  signed, installed"
    ));
    show(format!(
        "platforms: {}; total {:.0?}",
        args.platforms
            .iter()
            .map(|a| format!("linux/{}", a.oci))
            .collect::<Vec<_>>()
            .join(", "),
        t0.elapsed()
    ));
    if args.keep {
        show("--keep: Ctrl-C tears everything down");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}
