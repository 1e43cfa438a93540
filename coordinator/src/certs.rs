//! `segtrain-coordinator certs`: a private CA and certificates signed by it, for operators
//! without a PKI and for tests. ECDSA P-256 keys (rcgen with ring).
//!
//! Writes into one directory: `ca.pem` (give to clients: `--ca`), `ca-key.pem` (keep offline),
//! `server.pem` + `server-key.pem` (the coordinator's `--tls-cert` / `--tls-key`, valid for
//! every `--host`), and `client.pem` + `client-key.pem` (a client certificate, for a coordinator
//! started with `--tls-client-ca ca.pem`). Keys are written with mode 0600. Existing files are
//! never overwritten unless asked.

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The names the server certificate is valid for when none are given.
pub const DEFAULT_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];

/// What [`write`] produces.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server: PathBuf,
    pub server_key: PathBuf,
    pub client: PathBuf,
    pub client_key: PathBuf,
}

impl CertFiles {
    pub fn in_dir(dir: &Path) -> CertFiles {
        CertFiles {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    fn all(&self) -> [&Path; 6] {
        [
            &self.ca,
            &self.ca_key,
            &self.server,
            &self.server_key,
            &self.client,
            &self.client_key,
        ]
    }
}

/// Checks a `--host`: an IP address or a DNS name (letters, digits, `-`, `.`, a leading `*.`).
pub fn check_host(h: &str) -> anyhow::Result<()> {
    if h.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !ok {
        bail!("--host {h:?}: not an IP address or DNS name");
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks that are a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// A certificate for `name` (its common name) good for one purpose (`usage`: server or client
/// authentication), signed by `issuer`.
fn leaf(
    mut params: CertificateParams,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    days: u32,
    key: &KeyPair,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
) -> Result<rcgen::Certificate, rcgen::Error> {
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    params.signed_by(key, issuer)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // The mode above applies only to a new file.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Makes a CA and server and client certificates signed by it, valid for `days` (the CA for ten
/// times as long), and writes them into `dir` (created if needed).
pub fn write(dir: &Path, hosts: &[String], days: u32, force: bool) -> anyhow::Result<CertFiles> {
    if hosts.is_empty() {
        bail!("--host: give at least one name");
    }
    for h in hosts {
        check_host(h)?;
    }
    if days == 0 {
        bail!("--days: must be at least 1");
    }
    let files = CertFiles::in_dir(dir);
    if !force {
        if let Some(p) = files.all().into_iter().find(|p| p.exists()) {
            bail!(
                "{} exists; remove it or pass --force to replace every file in {}",
                p.display(),
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "segtrain CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "segtrain");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, days.saturating_mul(10));
    let ca_cert = ca.self_signed(&ca_key).context("cannot sign the CA")?;
    let issuer = Issuer::new(ca, &ca_key);

    let server_key = KeyPair::generate().context("cannot generate the server key")?;
    let server = CertificateParams::new(hosts.to_vec())
        .with_context(|| format!("--host: cannot use {hosts:?} in a certificate"))?;
    let server_cert = leaf(
        server,
        &hosts[0],
        ExtendedKeyUsagePurpose::ServerAuth,
        days,
        &server_key,
        &issuer,
    )
    .context("cannot sign the server certificate")?;

    let client_key = KeyPair::generate().context("cannot generate the client key")?;
    let client_cert = leaf(
        CertificateParams::new(Vec::<String>::new())?,
        "segtrain client",
        ExtendedKeyUsagePurpose::ClientAuth,
        days,
        &client_key,
        &issuer,
    )
    .context("cannot sign the client certificate")?;

    write_file(&files.ca, &ca_cert.pem(), 0o644)?;
    write_file(&files.ca_key, &ca_key.serialize_pem(), 0o600)?;
    write_file(&files.server, &server_cert.pem(), 0o644)?;
    write_file(&files.server_key, &server_key.serialize_pem(), 0o600)?;
    write_file(&files.client, &client_cert.pem(), 0o644)?;
    write_file(&files.client_key, &client_key.serialize_pem(), 0o600)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_pem_files_with_private_keys_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let f = write(dir.path(), &hosts, 30, false).expect("certs");
        for p in [&f.ca, &f.server, &f.client] {
            let s = std::fs::read_to_string(p).expect("cert");
            assert!(
                s.starts_with("-----BEGIN CERTIFICATE-----"),
                "{}",
                p.display()
            );
        }
        for p in [&f.ca_key, &f.server_key, &f.client_key] {
            let s = std::fs::read_to_string(p).expect("key");
            assert!(s.contains("PRIVATE KEY-----"), "{}", p.display());
            let mode = std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let again = write(dir.path(), &hosts, 30, false).expect_err("exists");
        assert!(format!("{again:#}").contains("--force"), "{again:#}");
        write(dir.path(), &hosts, 30, true).expect("forced");
    }

    #[test]
    fn hosts_are_checked() {
        assert!(check_host("coordinator.example.com").is_ok());
        assert!(check_host("*.example.com").is_ok());
        assert!(check_host("10.0.0.5").is_ok());
        assert!(check_host("::1").is_ok());
        assert!(check_host("bad host").is_err());
        assert!(check_host("").is_err());
        assert!(check_host("-x.com").is_err());
    }
}
