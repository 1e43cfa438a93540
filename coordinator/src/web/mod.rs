//! The dashboard (`--web-listen ADDR`): the page and the HTTP API behind it, over HTTPS with the
//! coordinator's certificate (plaintext only with `--plaintext`, on loopback, as for gRPC).
//!
//! The API is a gateway onto the gRPC services, not a second implementation: every route names
//! the gRPC method it calls (`/segtrain.v1.JobService/ListJobs`), is authorised by the same
//! [`auth::authorize`] with that name (same roles, same messages), and calls the same `JobApi` /
//! `ClusterApi`, so validation, store access and errors are the gRPC ones. Live views are
//! WatchJob streams sent as server-sent events. docs/dashboard.md has the routes.

mod api;
mod assets;
mod tls;

use crate::api::{ClusterApi, JobApi};
use crate::auth::Verifier;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

pub use tls::web_tls_config;

/// What the handlers share: the gRPC services they call and the token verifier (`None`: auth
/// off, `--insecure-no-auth`).
#[derive(Clone)]
pub struct Web {
    jobs: Arc<JobApi>,
    cluster: Arc<ClusterApi>,
    verifier: Option<Verifier>,
}

impl Web {
    pub fn new(jobs: JobApi, cluster: ClusterApi, verifier: Option<Verifier>) -> Web {
        Web {
            jobs: Arc::new(jobs),
            cluster: Arc::new(cluster),
            verifier,
        }
    }
}

use crate::limits::HANDSHAKE_TIMEOUT as HANDSHAKE;

/// Binds `addr`, with a clear error naming the flag.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--web-listen {addr}: cannot listen: {e}"))
}

/// Serves the dashboard on `listener` until the task is aborted; `tls` `None` is plaintext.
/// Each connection is its own task, so a slow TLS handshake holds up no other client.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    web: Web,
) -> anyhow::Result<()> {
    let app = api::router(web);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %e, "dashboard: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http1::Builder::new();
            // The timer makes hyper's header read timeout (30 s) apply: a client that opens a
            // connection and sends nothing does not hold it for ever. The handshake gets its own.
            http.timer(hyper_util::rt::TokioTimer::new());
            let served = match tls {
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await
                {
                    Ok(Ok(stream)) => {
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "dashboard: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "dashboard: no TLS handshake within {HANDSHAKE:?}");
                        return;
                    }
                },
                None => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "dashboard: connection ended");
            }
        });
    }
}
