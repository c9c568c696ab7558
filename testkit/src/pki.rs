//! Certificates and keys for a throwaway API server: a CA, the server's serving certificate for
//! 127.0.0.1/localhost (plus the addresses a real node's pods use, see [`Pki::write_with`]), an admin client
//! certificate in `system:masters`, and the service-account signing key. [`Pki::issue`] signs more serving
//! certificates with the same CA (the kubelet's, so that `kubectl logs` verifies it).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

/// Files written by [`Pki::write`], and the PEM the kubeconfig embeds.
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// The admin client certificate (also what the API server presents to kubelets).
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// Generates everything into `dir`.
    pub fn write(dir: &Path) -> Result<Self> {
        Self::write_with(dir, &[])
    }

    /// Like [`Pki::write`], with `extra_server_ips` in the API server's certificate besides 127.0.0.1: the
    /// address it is advertised at and the `kubernetes` Service IP, which in-cluster clients dial.
    pub fn write_with(dir: &Path, extra_server_ips: &[IpAddr]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = name("hookfleet-local-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut sans: Vec<String> = [
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(str::to_owned)
        .to_vec();
        sans.extend(extra_server_ips.iter().map(IpAddr::to_string));
        let (serving_cert, serving_key) = sign(&issuer, sans, "kube-apiserver", None, true)?;
        let (admin_cert, admin_key) =
            sign(&issuer, vec![], "hookfleet-admin", Some("system:masters"), false)?;

        let sa_key = KeyPair::generate()?;

        let files = Self {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
            admin_cert_pem: admin_cert,
            admin_key_pem: admin_key,
            ca_pem,
            issuer,
        };
        std::fs::write(&files.ca_cert, &files.ca_pem)?;
        std::fs::write(&files.ca_key, ca_key_pem)?;
        std::fs::write(&files.serving_cert, serving_cert)?;
        std::fs::write(&files.serving_key, serving_key)?;
        std::fs::write(&files.admin_cert, &files.admin_cert_pem)?;
        std::fs::write(&files.admin_key, &files.admin_key_pem)?;
        std::fs::write(&files.sa_key, sa_key.serialize_pem())?;
        std::fs::write(&files.sa_pub, sa_key.public_key_pem())?;
        Ok(files)
    }

    /// Signs a serving certificate for `sans` (IP addresses or DNS names) with this CA and writes it as
    /// `<dir>/<file_stem>.crt` and `.key`; returns both paths.
    pub fn issue(
        &self,
        dir: &Path,
        file_stem: &str,
        cn: &str,
        sans: &[String],
    ) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = sign(&self.issuer, sans.to_vec(), cn, None, true)
            .with_context(|| format!("signing the {cn} certificate for {sans:?}"))?;
        let (cert_path, key_path) = (
            dir.join(format!("{file_stem}.crt")),
            dir.join(format!("{file_stem}.key")),
        );
        std::fs::write(&cert_path, cert)?;
        std::fs::write(&key_path, key)?;
        Ok((cert_path, key_path))
    }
}

/// A leaf certificate (server or client auth) and its key, as PEM.
fn sign(
    issuer: &Issuer<'static, KeyPair>,
    sans: Vec<String>,
    cn: &str,
    org: Option<&str>,
    server: bool,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = name(cn, org);
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

/// A certificate authority of its own for a test's TLS endpoints (a webhook sink, a token endpoint):
/// serving certificates for the endpoints and client certificates for mTLS, as PEM.
pub struct TestCa {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(cn: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(cn, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            ca_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A serving certificate for `sans` (IP addresses or DNS names): (certificate, key) PEM.
    pub fn server(&self, sans: &[String]) -> Result<(String, String)> {
        sign(&self.issuer, sans.to_vec(), "hookfleet-test-server", None, true)
    }

    /// A client certificate (mTLS) for `cn`: (certificate, key) PEM.
    pub fn client(&self, cn: &str) -> Result<(String, String)> {
        sign(&self.issuer, vec![], cn, None, false)
    }
}
