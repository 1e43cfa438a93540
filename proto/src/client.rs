//! How clients reach the coordinator: the `segtrain` CLI, the worker daemons and the tests all
//! connect through here, so the rules are the same everywhere.
//!
//! - `http://host:port`: plaintext (only for a coordinator started with `--plaintext`, which it
//!   accepts on a loopback address only).
//! - `https://host:port`: TLS (rustls). The server certificate is checked against the CA given
//!   with `--ca` (a private CA, e.g. from `segtrain-coordinator certs`) or, without it, the
//!   system's trusted roots. A client certificate is sent when one is configured (for a
//!   coordinator started with `--tls-client-ca`).
//! - Every request carries `authorization: Bearer <token>` when a token is configured, and a token
//!   is never sent over plaintext to an address other than loopback ([`check_plaintext_token`]).
//! - Requests are at most [`MAX_REQUEST_BYTES`], responses at most [`MAX_RESPONSE_BYTES`]: the
//!   coordinator enforces the same limits.
//! - `--coordinator` may list several addresses, comma-separated: coordinators on one database.
//!   Calls go to one and fail over to the next when it cannot be reached ([`FailoverChannel`]).

pub use crate::failover::FailoverChannel;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// The largest request message the coordinator accepts (4 MiB, gRPC's customary default).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// The largest response message the coordinator sends (16 MiB: a full GetMetrics page of
/// 100 000 points with long names fits).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// The environment variable that holds a bearer token itself (`--token-file` names a file
/// holding one instead).
pub const TOKEN_ENV: &str = "SEGTRAIN_TOKEN";

/// A channel whose requests carry the bearer token, over one or more coordinator addresses.
pub type AuthChannel = InterceptedService<FailoverChannel, BearerToken>;

/// A connection problem a person can fix: the message names the flag or file.
#[derive(Debug, Clone)]
pub struct ConnectError(pub String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

fn err(msg: impl Into<String>) -> ConnectError {
    ConnectError(msg.into())
}

/// TLS settings of a client. All optional: an `https://` URL without a CA trusts the system's
/// roots, and a client certificate is only needed for a coordinator that asks for one.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM file of the CA that signed the coordinator's certificate (`--ca`).
    pub ca: Option<PathBuf>,
    /// PEM files of this client's certificate and key (`--client-cert`, `--client-key`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// Reads a PEM file and checks that it holds what `what` says (`CERTIFICATE`, `PRIVATE KEY`),
/// so that a wrong file is reported by name instead of as a failed handshake later.
pub fn read_pem(flag: &str, path: &Path, what: &str) -> Result<Vec<u8>, ConnectError> {
    let bytes = std::fs::read(path)
        .map_err(|e| err(format!("{flag} {}: cannot read it: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{what}-----")));
    if !found {
        return Err(err(format!(
            "{flag} {}: not a PEM file with a {what} (expected a line such as -----BEGIN {what}-----)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// An endpoint for `url` with TLS set up as `tls` says. Nothing connects yet.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, ConnectError> {
    let https = url.starts_with("https://");
    if !(https || url.starts_with("http://")) {
        return Err(err(format!(
            "--coordinator: expected https://host:port (TLS) or http://host:port (plaintext), got {url:?}"
        )));
    }
    if !https && tls.any() {
        return Err(err(format!(
            "--coordinator {url}: a CA or client certificate is set but the URL is http:// \
             (plaintext); use https:// to connect with TLS"
        )));
    }
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|_| err(format!("--coordinator: not a valid URL: {url:?}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if https {
        let mut cfg = ClientTlsConfig::new();
        cfg = match &tls.ca {
            Some(ca) => {
                cfg.ca_certificate(Certificate::from_pem(read_pem("--ca", ca, "CERTIFICATE")?))
            }
            None => cfg.with_native_roots(),
        };
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let cert = read_pem("--client-cert", cert, "CERTIFICATE")?;
                let key = read_pem("--client-key", key, "PRIVATE KEY")?;
                cfg = cfg.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => {
                return Err(err(
                    "--client-cert and --client-key: give both or neither".to_string()
                ))
            }
        }
        ep = ep
            .tls_config(cfg)
            .map_err(|e| err(format!("--coordinator {url}: cannot set up TLS: {e}")))?;
    }
    Ok(ep)
}

/// Adds `authorization: Bearer <token>` to every request (nothing when there is no token).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str(if self.0.is_some() {
            "BearerToken(<set>)"
        } else {
            "BearerToken(<none>)"
        })
    }
}

impl BearerToken {
    /// No token: for a coordinator started with `--insecure-no-auth`.
    pub fn none() -> BearerToken {
        BearerToken(None)
    }

    /// `where_from` names the flag or file, for the error.
    pub fn new(token: &str, where_from: &str) -> Result<BearerToken, ConnectError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(err(format!("{where_from}: the token is empty")));
        }
        if !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(err(format!(
                "{where_from}: a token is printable ASCII without spaces; this one is not"
            )));
        }
        let mut v: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            err(format!(
                "{where_from}: the token cannot be sent in a header"
            ))
        })?;
        // Keeps it out of HTTP/2 header compression tables and debug output.
        v.set_sensitive(true);
        Ok(BearerToken(Some(v)))
    }

    /// The token from `file` (`--token-file`) if given, else from the `SEGTRAIN_TOKEN` value
    /// `env` if set, else none.
    pub fn from_sources(
        file: Option<&Path>,
        env: Option<&str>,
    ) -> Result<BearerToken, ConnectError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                err(format!(
                    "--token-file {}: cannot read it: {e}",
                    path.display()
                ))
            })?;
            return BearerToken::new(&text, &format!("--token-file {}", path.display()));
        }
        match env {
            Some(t) if !t.trim().is_empty() => BearerToken::new(t, TOKEN_ENV),
            _ => Ok(BearerToken::none()),
        }
    }

    /// The token from `--token-file` or the `SEGTRAIN_TOKEN` environment variable.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<BearerToken, ConnectError> {
        let env = std::env::var(TOKEN_ENV).ok();
        BearerToken::from_sources(file, env.as_deref())
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The addresses of `--coordinator`: one URL, or several separated by commas (coordinators on
/// one database), each checked as [`endpoint`] checks it.
pub fn coordinator_urls(list: &str) -> Result<Vec<String>, ConnectError> {
    let urls: Vec<String> = list.split(',').map(|u| u.trim().to_string()).collect();
    if urls.iter().any(String::is_empty) {
        return Err(err(format!(
            "--coordinator: expected one or more comma-separated URLs such as https://host:port, got {list:?}"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = urls.iter().find(|u| !seen.insert(u.as_str())) {
        return Err(err(format!("--coordinator: {dup} is listed twice")));
    }
    Ok(urls)
}

/// Whether `url` (`http://host:port`) names this machine: `localhost`, 127.0.0.0/8 or `[::1]`.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => rest.split([':', '/']).next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses to send a bearer token over plaintext (`http://`) to an address other than this
/// machine's: anyone on the path would read it. `http://` is for a coordinator on the same
/// machine (which accepts `--plaintext` on loopback only).
pub fn check_plaintext_token(urls: &[String], token: &BearerToken) -> Result<(), ConnectError> {
    if token.0.is_none() {
        return Ok(());
    }
    match urls
        .iter()
        .find(|u| u.starts_with("http://") && !is_loopback_url(u))
    {
        Some(u) => Err(err(format!(
            "--coordinator {u}: refusing to send the bearer token over plaintext to another \
             machine; use https:// (TLS), or http:// only for a coordinator on this machine \
             (127.0.0.1, localhost, [::1])"
        ))),
        None => Ok(()),
    }
}

/// A lazy channel (the first RPC connects) to the coordinator(s) of `urls` (see
/// [`coordinator_urls`]) that sends `token` with every request.
pub fn connect_lazy(
    urls: &str,
    tls: &ClientTls,
    token: BearerToken,
) -> Result<AuthChannel, ConnectError> {
    let urls = coordinator_urls(urls)?;
    check_plaintext_token(&urls, &token)?;
    let channels = urls
        .iter()
        .map(|u| endpoint(u, tls).map(|e| e.connect_lazy()))
        .collect::<Result<Vec<Channel>, _>>()?;
    Ok(InterceptedService::new(
        FailoverChannel::new(urls, channels),
        token,
    ))
}

/// [`connect_lazy`] for a client that makes a few calls and exits (the CLI): with several
/// addresses it first connects to them in order and starts with the first that answers, so a
/// dead coordinator costs one failed connect, not the command. With one address, or when none
/// answers, it is [`connect_lazy`] (the call then reports the address it could not reach).
pub async fn connect_first_reachable(
    urls: &str,
    tls: &ClientTls,
    token: BearerToken,
) -> Result<AuthChannel, ConnectError> {
    let mut list = coordinator_urls(urls)?;
    check_plaintext_token(&list, &token)?;
    if list.len() > 1 {
        for i in 0..list.len() {
            if let Ok(channel) = endpoint(&list[i], tls)?.connect().await {
                list.rotate_left(i);
                let mut channels = vec![channel];
                for u in &list[1..] {
                    channels.push(endpoint(u, tls)?.connect_lazy());
                }
                return Ok(InterceptedService::new(
                    FailoverChannel::new(list, channels),
                    token,
                ));
            }
        }
    }
    connect_lazy(urls, tls, token)
}

/// A status's message followed by its causes (a transport error's message alone is often just
/// "transport error"; the cause says e.g. "invalid peer certificate: UnknownIssuer").
pub fn status_detail(s: &Status) -> String {
    let mut out = s.message().to_string();
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out.replace(['\n', '\r'], " ")
}

/// Whether a failed call failed in the TLS handshake (an untrusted or mismatched certificate, a
/// missing client certificate, plaintext against TLS).
pub fn is_tls_failure(s: &Status) -> bool {
    let d = status_detail(s).to_ascii_lowercase();
    ["certificate", "tls", "alert", "handshake", "invalid peer"]
        .iter()
        .any(|k| d.contains(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_over_plaintext_to_this_machine_only() {
        let token = BearerToken::new("segtrain_x", "test").expect("token");
        let urls = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for local in [
            "http://127.0.0.1:50051",
            "http://127.77.3.1:50051",
            "http://localhost:50051",
            "http://[::1]:50051",
            "https://coordinator.example:50051",
        ] {
            assert!(
                check_plaintext_token(&urls(&[local]), &token).is_ok(),
                "{local}"
            );
        }
        for remote in ["http://10.0.0.5:50051", "http://coordinator:50051"] {
            let e = check_plaintext_token(&urls(&["http://127.0.0.1:1", remote]), &token)
                .expect_err(remote);
            assert!(
                e.0.contains("refusing to send the bearer token over plaintext"),
                "{}",
                e.0
            );
        }
        // Without a token there is nothing to protect.
        assert!(check_plaintext_token(&urls(&["http://10.0.0.5:1"]), &BearerToken::none()).is_ok());
    }
}
