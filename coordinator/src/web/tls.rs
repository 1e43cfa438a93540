//! The dashboard's TLS: the coordinator's own certificate and key (`--tls-cert`, `--tls-key`),
//! and with `--tls-client-ca` the same client-certificate requirement as gRPC.

use crate::server::TlsFiles;
use segtrain_proto::client::read_pem;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn certificates(flag: &str, pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag}: not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("{flag}: holds no certificate");
    }
    Ok(certs)
}

/// The acceptor for `--web-listen`, from the gRPC listener's TLS files (errors name the flag).
pub fn web_tls_config(files: &TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = certificates(
        "--tls-cert",
        &read_pem("--tls-cert", &files.cert, "CERTIFICATE")?,
    )?;
    let key = PrivateKeyDer::from_pem_slice(&read_pem("--tls-key", &files.key, "PRIVATE KEY")?)
        .map_err(|e| anyhow::anyhow!("--tls-key: not a PEM private key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS for --web-listen: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(
                "--tls-client-ca",
                &read_pem("--tls-client-ca", ca, "CERTIFICATE")?,
            )? {
                roots
                    .add(c)
                    .map_err(|e| anyhow::anyhow!("--tls-client-ca: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| anyhow::anyhow!("--tls-client-ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(cert, key).map_err(|e| {
        anyhow::anyhow!(
            "--tls-cert / --tls-key: cannot use them for --web-listen: {e} \
             (is the key the certificate's?)"
        )
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
