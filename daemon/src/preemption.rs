//! Preemption notices: a spot VM is told about 30 s ahead that it will be stopped. GCP delivers
//! it twice: an ACPI soft-off, which systemd turns into SIGTERM for this daemon, and the metadata
//! server's `instance/preempted` turning `TRUE`. The daemon watches both; either makes its
//! trainers checkpoint the current iteration and exit (their ranks end PREEMPTED), tells the
//! coordinator it is leaving (no new ranks), and ends the daemon.
//!
//! The metadata server speaks plain HTTP on a link-local address, so a few lines of HTTP/1.1
//! here do instead of an HTTP client crate. Its URL is a flag, so tests point it at a stand-in.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GCP's preemption flag (`TRUE` once the VM is being preempted).
pub const GCP_PREEMPTED_URL: &str =
    "http://metadata.google.internal/computeMetadata/v1/instance/preempted";

/// How often the flag is read while the server answers, and after it stopped answering.
const POLL: Duration = Duration::from_secs(1);
const RETRY_UNREACHABLE: Duration = Duration::from_secs(30);
/// One read of the flag, connection included.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The flag is one word; anything much longer is not it.
const MAX_RESPONSE: usize = 16 * 1024;

/// `http://host[:port]/path[?query]`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses the `--preemption-url`: plain `http://` only (the metadata server has no TLS).
pub fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--preemption-url {url:?}: must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("--preemption-url {url:?}: bad port {p:?}"))?,
        ),
        None => (authority, 80),
    };
    if host.is_empty() {
        return Err(format!("--preemption-url {url:?}: no host"));
    }
    Ok(HttpUrl {
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// One read of the flag: `Ok(true)` when the body is `TRUE`.
pub async fn read_flag(url: &HttpUrl) -> Result<bool, String> {
    let exchange = async {
        let mut stream = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n",
            url.path, url.host
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
        let mut body = Vec::new();
        stream
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut body)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        Ok::<Vec<u8>, String>(body)
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP response".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    Ok(body.trim() == "TRUE")
}

/// Resolves once the metadata server at `url` says the VM is preempted. Unreachable or odd
/// answers are logged (once per change) and retried: a VM that is not on GCP simply never
/// resolves, and SIGTERM still counts.
pub async fn wait_for_notice(url: HttpUrl) -> String {
    let mut last_error: Option<String> = None;
    loop {
        match read_flag(&url).await {
            Ok(true) => {
                return format!(
                    "the metadata server says instance/preempted is TRUE (http://{}:{}{})",
                    url.host, url.port, url.path
                )
            }
            Ok(false) => {
                if last_error.take().is_some() {
                    tracing::info!(host = %url.host, "the metadata server answers; watching for a preemption notice");
                }
                tokio::time::sleep(POLL).await;
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::info!(host = %url.host, error = %e, "cannot read the preemption flag from the metadata server; retrying every {} s (SIGTERM still counts as a preemption)", RETRY_UNREACHABLE.as_secs());
                    last_error = Some(e);
                }
                tokio::time::sleep(RETRY_UNREACHABLE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url(GCP_PREEMPTED_URL).expect("gcp"),
            HttpUrl {
                host: "metadata.google.internal".into(),
                port: 80,
                path: "/computeMetadata/v1/instance/preempted".into()
            }
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8080").expect("no path"),
            HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/".into()
            }
        );
        for bad in ["https://x/p", "http://:80/p", "http://h:port/p", "metadata"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn reads_the_flag_from_a_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            for body in ["FALSE", "TRUE"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut req = vec![0u8; 1024];
                let n = s.read(&mut req).await.expect("read");
                let req = String::from_utf8_lossy(&req[..n]).to_string();
                assert!(req.contains("Metadata-Flavor: Google"), "{req}");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).await.expect("write");
            }
        });
        let url = parse_url(&format!("http://127.0.0.1:{port}/preempted")).expect("url");
        assert_eq!(read_flag(&url).await, Ok(false));
        assert_eq!(read_flag(&url).await, Ok(true));
        server.await.expect("server");
        let closed = parse_url("http://127.0.0.1:1/x").expect("url");
        assert!(read_flag(&closed).await.is_err());
    }
}
