//! The Prometheus `/metrics` endpoint: plain HTTP/1.1 (no TLS, no token), for a scraper on an
//! internal network.

use std::net::SocketAddr;
use std::sync::Arc;

/// Makes the text exposition page, fresh on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` for `/metrics`, so that a bad `--metrics-listen` fails the start, not later.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-listen: cannot listen on {addr}: {e}"))
}

/// Serves `GET /metrics` (the page `render` makes) and `GET /` (one line naming `service`) on
/// `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, service: &'static str, render: Render) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        render(),
                    )
                }
            }),
        )
        .route(
            "/",
            get(move || async move { format!("{service}: metrics at /metrics\n") }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics endpoint stopped");
    }
}
