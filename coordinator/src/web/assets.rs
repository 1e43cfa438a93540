//! The page's files, embedded at build time (`coordinator/build.rs` checks they are there):
//! ours from `web/`, uPlot's from `web/node_modules` as `npm ci` installed it from
//! `web/package-lock.json`. Nothing is fetched at run time.

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

macro_rules! web_file {
    ($path:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../web/", $path))
    };
}

/// (path, content type, bytes)
const FILES: &[(&str, &str, &[u8])] = &[
    ("/", "text/html; charset=utf-8", web_file!("index.html")),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        web_file!("app.js"),
    ),
    ("/app.css", "text/css; charset=utf-8", web_file!("app.css")),
    (
        "/uplot.js",
        "text/javascript; charset=utf-8",
        web_file!("node_modules/uplot/dist/uPlot.iife.min.js"),
    ),
    (
        "/uplot.css",
        "text/css; charset=utf-8",
        web_file!("node_modules/uplot/dist/uPlot.min.css"),
    ),
];

/// Scripts and styles from this origin only; no inline script, no frames.
const CSP: &str =
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'";

pub async fn serve(uri: Uri) -> Response {
    let path = uri.path();
    match FILES.iter().find(|(p, _, _)| *p == path) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *bytes,
        )
            .into_response(),
        None if path.starts_with("/api/") => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({
                "code": "NOT_FOUND",
                "message": format!("no API route {path}; see docs/dashboard.md"),
            })),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, format!("not found: {path}\n")).into_response(),
    }
}
