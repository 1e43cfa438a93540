//! The coordinator's limits on what one client may hold, so that a slow or greedy one (or a
//! stranger) cannot take what the daemons need. docs/security.md lists them with their flags:
//!
//! - concurrent HTTP/2 streams per gRPC connection (`--max-streams-per-connection`);
//! - open WatchJob streams per token (`--max-watch-streams-per-token`), the dashboard's
//!   server-sent events included ([`WatchQuota`]);
//! - the TLS handshake, [`HANDSHAKE_TIMEOUT`] on both listeners;
//! - a request's body, [`Limits::request_body`] from its headers to its last byte
//!   ([`BodyDeadlineLayer`]; every segtrain RPC sends one message, so a body still arriving
//!   after that is a client holding a stream open, not a slow network).

use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::codegen::http;
use uuid::Uuid;

/// How long a new connection has to complete its TLS handshake (gRPC and the dashboard).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits, with their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent streams one gRPC connection may open (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    /// A daemon needs three or four; a load generator multiplexing many simulated daemons on one
    /// connection needs more channels instead.
    pub streams_per_connection: u32,
    /// Open WatchJob streams per token (gRPC and the dashboard together).
    pub watch_streams_per_token: usize,
    /// From a request's headers to the end of its body.
    pub request_body: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            streams_per_connection: 256,
            watch_streams_per_token: 64,
            request_body: Duration::from_secs(30),
        }
    }
}

/// Open WatchJob streams per token: [`acquire`](Self::acquire) refuses one over the limit with
/// RESOURCE_EXHAUSTED; the [`WatchSlot`] it returns frees its place when the stream ends.
#[derive(Debug, Clone)]
pub struct WatchQuota {
    limit: usize,
    open: Arc<Mutex<HashMap<Uuid, usize>>>,
}

/// One open WatchJob stream of a token; dropped with the stream.
#[derive(Debug)]
pub struct WatchSlot {
    quota: WatchQuota,
    token: Uuid,
}

impl WatchQuota {
    pub fn new(limit: usize) -> WatchQuota {
        WatchQuota {
            limit,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A place for one more stream of `token` (named `name` in the refusal).
    pub fn acquire(&self, token: Uuid, name: &str) -> Result<WatchSlot, tonic::Status> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| tonic::Status::internal("the WatchJob quota's lock is poisoned"))?;
        let n = open.entry(token).or_insert(0);
        if *n >= self.limit {
            return Err(tonic::Status::resource_exhausted(format!(
                "token {name:?} already has {} open WatchJob streams, the most one token may hold \
                 (--max-watch-streams-per-token); close one first",
                *n
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            quota: self.clone(),
            token,
        })
    }

    /// Open streams of `token` (for tests and metrics).
    pub fn open(&self, token: Uuid) -> usize {
        self.open
            .lock()
            .map(|o| o.get(&token).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.quota.open.lock() {
            if let Some(n) = open.get_mut(&self.token) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.token);
                }
            }
        }
    }
}

/// Puts a deadline on every request body: the layer in front of the gRPC services.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadlineLayer {
    pub limit: Duration,
}

impl<S> tower_layer::Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> BodyDeadline<S> {
        BodyDeadline {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BodyDeadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> tower_service::Service<http::Request<B>> for BodyDeadline<S>
where
    S: tower_service::Service<http::Request<DeadlineBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        self.inner.call(req.map(|b| DeadlineBody::new(b, limit)))
    }
}

/// A request body that fails once its deadline passes before its end.
pub struct DeadlineBody<B> {
    inner: B,
    limit: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, limit: Duration) -> DeadlineBody<B> {
        DeadlineBody {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {:?} of its headers",
                this.limit
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_at_most_its_quota_of_streams_and_a_closed_one_frees_its_place() {
        let q = WatchQuota::new(2);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let s1 = q.acquire(a, "a").expect("first");
        let _s2 = q.acquire(a, "a").expect("second");
        let e = q.acquire(a, "a").expect_err("third");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("--max-watch-streams-per-token"),
            "{}",
            e.message()
        );
        // Another token is counted apart.
        let _t = q.acquire(b, "b").expect("other token");
        drop(s1);
        assert_eq!(q.open(a), 1);
        let _s3 = q.acquire(a, "a").expect("a place was freed");
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_fails_at_its_deadline() {
        use http_body_util::BodyExt;
        // A body that never sends anything.
        let (_tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        let mut slow = DeadlineBody::new(body, Duration::from_millis(50));
        let e = slow.frame().await.expect("a frame").expect_err("timed out");
        assert!(e.to_string().contains("did not arrive within"), "{e}");
        // A body that arrives in time passes untouched.
        let quick = DeadlineBody::new(
            http_body_util::Full::new(Bytes::from_static(b"x")),
            Duration::from_secs(5),
        );
        let got = quick.collect().await.expect("body").to_bytes();
        assert_eq!(&got[..], b"x");
    }
}
