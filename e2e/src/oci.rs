//! A small OCI image-layout writer: one layer built from a list of entries, written as a tar archive of an
//! OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) that `ctr images import` (and `docker load`,
//! `kind load image-archive`) take. No Docker, no registry.
//!
//! The output is reproducible: entries are sorted by path, every mtime is [`EPOCH`], owners are numeric,
//! gzip carries no timestamp and JSON is written from structs (fixed key order), so the same inputs give
//! the same digests on every machine.
//!
//! ```no_run
//! use hookfleet_e2e::oci::{Entry, Image};
//! let mut image = Image::new("ghcr.io/example/hello:1");
//! image
//!     .add(Entry::host_file("/bin/busybox", "/bin/busybox").mode(0o755))
//!     .add(Entry::symlink("/bin/sh", "busybox"))
//!     .add(Entry::dir("/tmp").mode(0o1777));
//! image.config.entrypoint = vec!["/bin/sh".into()];
//! let archive = image.write_archive(std::path::Path::new("/tmp/hello.tar"))?;
//! println!("{} {}", archive.name, archive.manifest_digest);
//! # anyhow::Ok(())
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The mtime of every file in the layer and in the archive (1970-01-01): a fixed value keeps digests stable.
pub const EPOCH: u64 = 0;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation containerd's importer names the image by (a full reference, `registry/repo:tag`).
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation for the reference, by convention the tag alone (as `docker save` writes it).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What an entry holds.
#[derive(Clone, Debug)]
pub enum Content {
    /// A regular file copied from the host (read when the archive is written; symlinks are followed).
    HostFile(PathBuf),
    /// A regular file with these bytes.
    Bytes(Vec<u8>),
    Dir,
    /// A symbolic link to this target (relative or absolute inside the image).
    Symlink(String),
}

/// One path in the layer.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Absolute path inside the image.
    pub path: String,
    pub content: Content,
    /// Permission bits (including setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

impl Entry {
    fn new(path: &str, content: Content, mode: u32) -> Self {
        Self {
            path: path.to_owned(),
            content,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    /// A copy of the host file `host` at `path` (mode 0644 unless [`Entry::mode`] says otherwise).
    pub fn host_file(path: &str, host: impl Into<PathBuf>) -> Self {
        Self::new(path, Content::HostFile(host.into()), 0o644)
    }

    /// A file with `bytes` at `path` (mode 0644).
    pub fn file(path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        Self::new(path, Content::Bytes(bytes.into()), 0o644)
    }

    /// A directory (mode 0755). Parents of every entry are created as 0755 root directories anyway;
    /// declare one only to give it another mode or owner.
    pub fn dir(path: &str) -> Self {
        Self::new(path, Content::Dir, 0o755)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(path: &str, target: &str) -> Self {
        Self::new(path, Content::Symlink(target.to_owned()), 0o777)
    }

    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

/// The runtime part of the image config (what `docker inspect` shows under `Config`).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// An image of one layer, to be written with [`Image::write_archive`].
#[derive(Clone, Debug)]
pub struct Image {
    /// Fully qualified reference (`ghcr.io/hookfleet/worker:0.1.0`): the CRI looks images up by the name a
    /// pod spec uses after normalisation, so a short name (`worker:1`) would never match.
    pub name: String,
    pub config: RuntimeConfig,
    /// The OCI platform `(os, architecture)` its binaries are built for: this machine's by default
    /// ([`platform`]).
    pub platform: (&'static str, &'static str),
    entries: Vec<Entry>,
}

/// An archive written by [`Image::write_archive`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageArchive {
    /// The image reference it imports as.
    pub name: String,
    pub path: PathBuf,
    /// `sha256:…` of the manifest (what `ctr images ls` shows as DIGEST).
    pub manifest_digest: String,
    /// `sha256:…` of the config: the image ID the CRI reports.
    pub config_digest: String,
    /// `sha256:…` of the uncompressed layer tar (the config's `rootfs.diff_ids[0]`).
    pub diff_id: String,
    /// `sha256:…` of the gzipped layer blob.
    pub layer_digest: String,
}

impl Image {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            config: RuntimeConfig::default(),
            platform: platform(),
            entries: Vec::new(),
        }
    }

    /// Adds an entry (checked when the layer is written).
    pub fn add(&mut self, entry: Entry) -> &mut Self {
        self.entries.push(entry);
        self
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Writes the gzipped layer to `out` and returns `(diff_id, layer digest, compressed size)`.
    pub fn write_layer(&self, out: impl Write) -> Result<(String, String, u64)> {
        let entries = layer_entries(&self.entries)?;
        let compressed = HashingWriter::new(out);
        // Level 6 (flate2's default) is deterministic for a given flate2 version; a header without mtime or
        // file name keeps the blob independent of when and where it was built.
        let gz = GzEncoder::new(compressed, Compression::default());
        let mut tar = tar::Builder::new(HashingWriter::new(gz));
        for (rel, entry) in &entries {
            append(&mut tar, rel, entry)?;
        }
        let uncompressed = tar.into_inner().context("finishing the layer tar")?;
        let (diff_id, gz, _) = uncompressed.finish();
        let compressed = gz.finish().context("finishing the layer's gzip stream")?;
        let (digest, _, size) = compressed.finish();
        Ok((diff_id, digest, size))
    }

    /// The layer (in a temporary file in `tmp_dir`), config and manifest of the image.
    fn blobs(&self, tmp_dir: &Path) -> Result<Blobs> {
        let mut layer = tempfile::tempfile_in(tmp_dir)
            .with_context(|| format!("creating a temporary layer file in {}", tmp_dir.display()))?;
        let (diff_id, layer_digest, layer_size) = self
            .write_layer(BufWriter::new(&mut layer))
            .with_context(|| format!("writing the layer of {}", self.name))?;
        layer.rewind()?;
        let (os, architecture) = self.platform;
        let config = serde_json::to_vec(&ConfigJson {
            architecture,
            os,
            config: &self.config,
            rootfs: RootFs {
                kind: "layers",
                diff_ids: vec![diff_id.clone()],
            },
        })?;
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&Manifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_MANIFEST,
            config: Descriptor::new(MEDIA_TYPE_CONFIG, &config_digest, config.len() as u64),
            layers: vec![Descriptor::new(MEDIA_TYPE_LAYER_GZIP, &layer_digest, layer_size)],
        })?;
        let manifest_digest = sha256(&manifest);
        Ok(Blobs {
            layer,
            layer_size,
            layer_digest,
            diff_id,
            config,
            config_digest,
            manifest,
            manifest_digest,
        })
    }

    /// The descriptor of this image's manifest in an index.
    fn manifest_descriptor(&self, blobs: &Blobs) -> Descriptor {
        let (os, architecture) = self.platform;
        Descriptor {
            platform: Some(Platform { architecture, os }),
            ..Descriptor::new(
                MEDIA_TYPE_MANIFEST,
                &blobs.manifest_digest,
                blobs.manifest.len() as u64,
            )
        }
    }

    /// Writes the image as an OCI image layout in a tar archive at `path` (a temporary file next to it holds
    /// the layer while it is built).
    pub fn write_archive(&self, path: &Path) -> Result<ImageArchive> {
        check_reference(&self.name)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut b = self.blobs(dir)?;
        let index = serde_json::to_vec(&Index {
            schema_version: 2,
            media_type: MEDIA_TYPE_INDEX,
            manifests: vec![Descriptor {
                annotations: name_annotations(&self.name),
                ..self.manifest_descriptor(&b)
            }],
        })?;

        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut tar = tar::Builder::new(BufWriter::new(file));
        // Sorted by name, like the layer.
        append_dir(&mut tar, "blobs/")?;
        append_dir(&mut tar, "blobs/sha256/")?;
        let mut blobs: Vec<(&str, Blob)> = vec![
            (&b.config_digest, Blob::Bytes(&b.config)),
            (&b.manifest_digest, Blob::Bytes(&b.manifest)),
            (&b.layer_digest, Blob::File(&mut b.layer, b.layer_size)),
        ];
        blobs.sort_by(|a, b| a.0.cmp(b.0));
        for (digest, blob) in blobs {
            let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
            match blob {
                Blob::Bytes(b) => append_bytes(&mut tar, &name, b)?,
                Blob::File(f, size) => {
                    let mut h = file_header(size, 0o644);
                    tar.append_data(&mut h, &name, f)?;
                }
            }
        }
        append_bytes(&mut tar, "index.json", &index)?;
        append_bytes(&mut tar, "oci-layout", OCI_LAYOUT)?;
        tar.into_inner()
            .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;

        Ok(ImageArchive {
            name: self.name.clone(),
            path: path.to_owned(),
            manifest_digest: b.manifest_digest,
            config_digest: b.config_digest,
            diff_id: b.diff_id,
            layer_digest: b.layer_digest,
        })
    }
}

/// The contents of `oci-layout`.
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The annotations that name an image in an index: containerd's full reference and OCI's tag.
fn name_annotations(name: &str) -> BTreeMap<&'static str, String> {
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    BTreeMap::from([
        (ANNOTATION_CONTAINERD_NAME, name.to_owned()),
        (ANNOTATION_REF_NAME, tag.to_owned()),
    ])
}

/// One image's blobs, before they are written.
struct Blobs {
    layer: File,
    layer_size: u64,
    layer_digest: String,
    diff_id: String,
    config: Vec<u8>,
    config_digest: String,
    manifest: Vec<u8>,
    manifest_digest: String,
}

/// A multi-platform image written by [`write_layout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The reference the index is annotated with (`registry/repository:tag`).
    pub name: String,
    /// The OCI image layout directory.
    pub dir: PathBuf,
    /// `sha256:…` of the image index: what a registry serves for the tag, and what a pull resolves to.
    pub index_digest: String,
    /// `("linux/amd64", "sha256:…")`: each platform's manifest digest, in the order given.
    pub manifests: Vec<(String, String)>,
}

/// Writes `images` (one per platform, all of one name) as one multi-platform image: an OCI image layout
/// directory `dir` whose `index.json` names one image index, which lists each platform's manifest. `crane
/// push DIR REF` pushes it as a multi-platform image; `ctr images import` takes a tar of it. Reproducible like
/// [`Image::write_archive`].
pub fn write_layout(dir: &Path, name: &str, images: &[Image]) -> Result<Layout> {
    check_reference(name)?;
    if images.is_empty() {
        bail!("{name}: a multi-platform image needs at least one platform");
    }
    let mut platforms = std::collections::BTreeSet::new();
    for i in images {
        if !platforms.insert(i.platform) {
            bail!("{name}: platform {}/{} given twice", i.platform.0, i.platform.1);
        }
    }
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).with_context(|| format!("creating {}", blob_dir.display()))?;
    let write_blob = |digest: &str, bytes: &[u8]| -> Result<()> {
        let path = blob_dir.join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    let mut descriptors = Vec::new();
    let mut manifests = Vec::new();
    for image in images {
        let mut b = image.blobs(dir)?;
        let path = blob_dir.join(b.layer_digest.trim_start_matches("sha256:"));
        let mut out = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        io::copy(&mut b.layer, &mut out).with_context(|| format!("writing {}", path.display()))?;
        out.sync_all()?;
        write_blob(&b.config_digest, &b.config)?;
        write_blob(&b.manifest_digest, &b.manifest)?;
        descriptors.push(image.manifest_descriptor(&b));
        manifests.push((
            format!("{}/{}", image.platform.0, image.platform.1),
            b.manifest_digest,
        ));
    }
    let index = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: descriptors,
    })?;
    let index_digest = sha256(&index);
    write_blob(&index_digest, &index)?;
    let top = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: vec![Descriptor {
            annotations: name_annotations(name),
            ..Descriptor::new(MEDIA_TYPE_INDEX, &index_digest, index.len() as u64)
        }],
    })?;
    std::fs::write(dir.join("index.json"), top)?;
    std::fs::write(dir.join("oci-layout"), OCI_LAYOUT)?;
    Ok(Layout {
        name: name.to_owned(),
        dir: dir.to_owned(),
        index_digest,
        manifests,
    })
}

enum Blob<'a> {
    Bytes(&'a [u8]),
    File(&'a mut File, u64),
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The OCI platform of this machine (`linux`, `amd64`/`arm64`/…), which the images' binaries are built for.
pub fn platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

/// A reference containerd and the CRI resolve to itself: `host/path:tag`, the host with a dot or a port.
fn check_reference(name: &str) -> Result<()> {
    let (repo, tag) = name
        .rsplit_once(':')
        .filter(|(repo, tag)| !tag.contains('/') && !repo.is_empty())
        .with_context(|| format!("image name {name:?}: needs a tag (registry/repository:tag)"))?;
    let host = repo.split('/').next().unwrap_or_default();
    if !repo.contains('/') || !(host.contains('.') || host.contains(':') || host == "localhost") {
        bail!(
            "image name {name:?}: not fully qualified (e.g. ghcr.io/org/{}:{tag}); the CRI would look for \
             docker.io/library/… and never find it",
            repo.rsplit('/').next().unwrap_or(repo)
        );
    }
    if tag.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_ascii_uppercase()) {
        bail!("image name {name:?}: empty tag, whitespace or upper case");
    }
    Ok(())
}

/// The entries as tar paths (`a/b`, directories with a trailing `/`), sorted, with missing parents added and
/// duplicates refused.
fn layer_entries(entries: &[Entry]) -> Result<BTreeMap<String, Entry>> {
    let mut out: BTreeMap<String, Entry> = BTreeMap::new();
    for e in entries {
        let rel = relative(&e.path)?;
        if e.mode > 0o7777 {
            bail!("image entry {}: mode {:o} has bits beyond 07777", e.path, e.mode);
        }
        if let Content::Symlink(t) = &e.content
            && t.is_empty()
        {
            bail!("image entry {}: empty symlink target", e.path);
        }
        if out.insert(key(&rel, &e.content), e.clone()).is_some() {
            bail!("image entry {}: added twice", e.path);
        }
    }
    let mut parents = BTreeMap::new();
    for rel in out.keys() {
        let mut p = rel.trim_end_matches('/');
        while let Some((parent, _)) = p.rsplit_once('/') {
            let k = format!("{parent}/");
            if !out.contains_key(&k) {
                parents.insert(k, Entry::dir(&format!("/{parent}")));
            }
            p = parent;
        }
    }
    out.extend(parents);
    // A path declared both as a directory and as something else.
    for k in out.keys() {
        if let Some(file) = k.strip_suffix('/')
            && out.contains_key(file)
        {
            bail!(
                "image entry /{file}: both a directory and a file or symlink (or the parent of another entry)"
            );
        }
    }
    Ok(out)
}

fn key(rel: &str, content: &Content) -> String {
    match content {
        Content::Dir => format!("{rel}/"),
        _ => rel.to_owned(),
    }
}

/// `/a/b` → `a/b`, refusing relative paths, `..`, `.` and empty components.
fn relative(path: &str) -> Result<String> {
    let Some(rest) = path.strip_prefix('/') else {
        bail!("image entry {path:?}: path must be absolute");
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        bail!("image entry {path:?}: the root itself cannot be an entry");
    }
    if rest.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("image entry {path:?}: empty, '.' or '..' component");
    }
    Ok(rest.to_owned())
}

fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(EPOCH);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut h = file_header(bytes.len() as u64, 0o644);
    tar.append_data(&mut h, name, bytes)
        .with_context(|| format!("adding {name}"))
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, name: &str) -> Result<()> {
    let mut h = file_header(0, 0o755);
    h.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut h, name, io::empty())
        .with_context(|| format!("adding {name}"))
}

fn append<W: Write>(tar: &mut tar::Builder<W>, rel: &str, e: &Entry) -> Result<()> {
    let mut h = file_header(0, e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    match &e.content {
        Content::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            tar.append_data(&mut h, rel, io::empty())
        }
        Content::Symlink(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            tar.append_link(&mut h, rel, target)
        }
        Content::Bytes(b) => {
            h.set_size(b.len() as u64);
            tar.append_data(&mut h, rel, b.as_slice())
        }
        Content::HostFile(host) => {
            let f = File::open(host)
                .with_context(|| format!("image entry {}: opening host file {}", e.path, host.display()))?;
            let size = f.metadata()?.len();
            h.set_size(size);
            // `take` guards against a file that grows while it is read: the header's size is what counts.
            tar.append_data(&mut h, rel, f.take(size))
        }
    }
    .with_context(|| format!("image entry {}: adding it to the layer", e.path))
}

/// Passes bytes through to `inner` while hashing and counting them.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    /// `(sha256:…, inner, bytes written)`.
    fn finish(self) -> (String, W, u64) {
        (format!("sha256:{:x}", self.hash.finalize()), self.inner, self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

// ---- JSON documents (field order is the serialisation order: stable digests) ----------------------------------

#[derive(Serialize)]
struct ConfigJson<'a> {
    architecture: &'a str,
    os: &'a str,
    config: &'a RuntimeConfig,
    rootfs: RootFs,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
}

impl Descriptor {
    fn new(media_type: &'static str, digest: &str, size: u64) -> Self {
        Self {
            media_type,
            digest: digest.to_owned(),
            size,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }
}

#[derive(Serialize)]
struct Platform {
    architecture: &'static str,
    os: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use serde_json::Value;

    fn sample(dir: &Path) -> Image {
        let host = dir.join("host-bin");
        std::fs::write(&host, b"#!/bin/sh\necho hi\n").unwrap();
        let mut image = Image::new("ghcr.io/hookfleet/test:1.2.3");
        image
            .add(Entry::host_file("/usr/local/bin/hello", &host).mode(0o755))
            .add(Entry::file(
                "/etc/passwd",
                "nonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n",
            ))
            .add(Entry::dir("/tmp").mode(0o1777))
            .add(Entry::dir("/home/nonroot").mode(0o700).owner(65532, 65532))
            .add(Entry::symlink("/bin/hello", "../usr/local/bin/hello"));
        image.config.entrypoint = vec!["/usr/local/bin/hello".into()];
        image.config.user = Some("65532:65532".into());
        image.config.env = vec!["PATH=/usr/local/bin:/bin".into()];
        image
            .config
            .labels
            .insert("org.opencontainers.image.version".into(), "1.2.3".into());
        image
    }

    /// The archive's files by name.
    fn read_archive(path: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut a = tar::Archive::new(File::open(path).unwrap());
        let mut out = BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut buf = Vec::new();
            e.read_to_end(&mut buf).unwrap();
            out.insert(name, buf);
        }
        out
    }

    fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
        let name = format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap());
        files
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing from the archive"))
    }

    #[test]
    fn digests_match_content_and_diff_id_matches_the_uncompressed_layer() {
        let dir = tempfile::tempdir().unwrap();
        let image = sample(dir.path());
        let out = image.write_archive(&dir.path().join("img.tar")).unwrap();
        let files = read_archive(&out.path);

        // Every blob is named by the sha256 of its bytes.
        for (name, bytes) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(sha256(bytes), format!("sha256:{hex}"), "{name}");
            }
        }
        assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);

        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(desc["digest"], out.manifest_digest.as_str());
        assert_eq!(
            desc["annotations"][ANNOTATION_CONTAINERD_NAME],
            "ghcr.io/hookfleet/test:1.2.3"
        );
        assert_eq!(desc["annotations"][ANNOTATION_REF_NAME], "1.2.3");
        let manifest_bytes = blob(&files, &out.manifest_digest);
        assert_eq!(desc["size"], manifest_bytes.len() as u64);

        let manifest: Value = serde_json::from_slice(manifest_bytes).unwrap();
        assert_eq!(manifest["config"]["digest"], out.config_digest.as_str());
        assert_eq!(manifest["layers"][0]["digest"], out.layer_digest.as_str());
        let gz = blob(&files, &out.layer_digest);
        assert_eq!(manifest["layers"][0]["size"], gz.len() as u64);

        let config: Value = serde_json::from_slice(blob(&files, &out.config_digest)).unwrap();
        let mut uncompressed = Vec::new();
        GzDecoder::new(gz).read_to_end(&mut uncompressed).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&uncompressed).as_str());
        assert_eq!(config["rootfs"]["diff_ids"][0], out.diff_id.as_str());
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/hello");
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.version"],
            "1.2.3"
        );
        assert!(config["config"].get("Cmd").is_none(), "empty Cmd is left out");
        assert_eq!(config["os"], "linux");
    }

    #[test]
    fn a_layout_names_one_index_listing_each_platform_and_every_blob_matches_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let amd = sample(dir.path());
        let mut arm = sample(dir.path());
        arm.platform = ("linux", "arm64");
        arm.config.env.push("ARCH=arm64".into());
        let out_dir = dir.path().join("layout");
        let name = "localhost:5000/hookfleet/test:1.2.3";
        let layout = write_layout(&out_dir, name, &[amd.clone(), arm.clone()]).unwrap();
        let read = |d: &str| {
            let p = out_dir
                .join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap());
            std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        for e in std::fs::read_dir(out_dir.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            assert_eq!(
                sha256(&bytes),
                format!("sha256:{}", e.file_name().to_string_lossy())
            );
        }
        let top: Value = serde_json::from_slice(&std::fs::read(out_dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(top["manifests"].as_array().unwrap().len(), 1);
        let d = &top["manifests"][0];
        assert_eq!(d["mediaType"], MEDIA_TYPE_INDEX);
        assert_eq!(d["digest"], layout.index_digest.as_str());
        assert_eq!(d["annotations"][ANNOTATION_CONTAINERD_NAME], name);
        assert_eq!(d["annotations"][ANNOTATION_REF_NAME], "1.2.3");
        let index: Value = serde_json::from_slice(&read(&layout.index_digest)).unwrap();
        let platforms: Vec<String> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap(),
                    m["platform"]["architecture"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
        assert_eq!(layout.manifests.len(), 2);
        for (i, (platform, digest)) in layout.manifests.iter().enumerate() {
            assert_eq!(&platforms[i], platform);
            assert_eq!(index["manifests"][i]["digest"], digest.as_str());
            let manifest: Value = serde_json::from_slice(&read(digest)).unwrap();
            let config: Value =
                serde_json::from_slice(&read(manifest["config"]["digest"].as_str().unwrap())).unwrap();
            assert_eq!(
                format!("linux/{}", config["architecture"].as_str().unwrap()),
                *platform
            );
        }
        // The same inputs give the same index; a platform twice is refused.
        let again = write_layout(&dir.path().join("again"), name, &[amd.clone(), arm]).unwrap();
        assert_eq!(again.index_digest, layout.index_digest);
        let err = write_layout(&dir.path().join("twice"), name, &[amd.clone(), amd]).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }

    #[test]
    fn layer_holds_the_entries_sorted_with_parents_modes_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = Vec::new();
        sample(dir.path()).write_layer(&mut gz).unwrap();
        let mut a = tar::Archive::new(GzDecoder::new(gz.as_slice()));
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            assert_eq!(h.mtime().unwrap(), EPOCH, "{path}");
            seen.push((path, h.mode().unwrap(), h.uid().unwrap(), link, body));
        }
        let paths: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin/",
                "bin/hello",
                "etc/",
                "etc/passwd",
                "home/",
                "home/nonroot/",
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/hello"
            ]
        );
        let get = |p: &str| seen.iter().find(|s| s.0 == p).unwrap();
        assert_eq!(get("tmp/").1, 0o1777);
        assert_eq!((get("home/nonroot/").1, get("home/nonroot/").2), (0o700, 65532));
        assert_eq!(get("bin/hello").3.as_deref(), Some("../usr/local/bin/hello"));
        assert_eq!(get("usr/local/bin/hello").1, 0o755);
        assert_eq!(get("usr/local/bin/hello").4, "#!/bin/sh\necho hi\n");
        assert_eq!(get("usr/").1, 0o755);
    }

    #[test]
    fn same_inputs_give_the_same_digests() {
        let dir = tempfile::tempdir().unwrap();
        let a = sample(dir.path())
            .write_archive(&dir.path().join("a.tar"))
            .unwrap();
        let b = sample(dir.path())
            .write_archive(&dir.path().join("b.tar"))
            .unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(std::fs::read(&a.path).unwrap(), std::fs::read(&b.path).unwrap());
        // And a change in content changes them.
        let mut c = sample(dir.path());
        c.add(Entry::file("/etc/group", "nonroot:x:65532:\n"));
        let c = c.write_archive(&dir.path().join("c.tar")).unwrap();
        assert_ne!(a.diff_id, c.diff_id);
        assert_ne!(a.manifest_digest, c.manifest_digest);
    }

    #[test]
    fn bad_entries_and_names_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = |image: Image| {
            format!(
                "{:#}",
                image.write_archive(&dir.path().join("x.tar")).unwrap_err()
            )
        };
        let one = |e: Entry| {
            let mut i = Image::new("ghcr.io/a/b:1");
            i.add(e);
            i
        };
        assert!(err(one(Entry::file("etc/x", ""))).contains("\"etc/x\": path must be absolute"));
        assert!(err(one(Entry::file("/etc/../x", ""))).contains("'..' component"));
        assert!(err(one(Entry::host_file("/x", "/nonexistent/file"))).contains("/nonexistent/file"));
        let mut twice = one(Entry::file("/a", "1"));
        twice.add(Entry::file("/a", "2"));
        assert!(err(twice).contains("/a: added twice"));
        let mut clash = one(Entry::file("/a", "1"));
        clash.add(Entry::file("/a/b", "2"));
        assert!(err(clash).contains("/a: both a directory and a file"));
        assert!(err(Image::new("worker:1")).contains("not fully qualified"));
        assert!(err(Image::new("ghcr.io/a/b")).contains("needs a tag"));
        assert!(
            Image::new("localhost:5000/a/b:1")
                .write_archive(&dir.path().join("ok.tar"))
                .is_ok()
        );
    }
}
