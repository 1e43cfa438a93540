//! Several coordinators on one database (docs/operations.md, "Several coordinators"): a client
//! given `--coordinator https://a:50051,https://b:50051` sends its calls to one of them and moves
//! to the next when a call fails in transport (refused, reset, timed out): the coordinator is
//! gone, not the request wrong. The call that failed is not repeated here (its body is spent):
//! every caller already retries transport failures, and its retry goes to the next address.
//! It stays there (no flapping back) until that one fails too.
//!
//! A coordinator that answers, even with UNAVAILABLE for its database, is not failed over from:
//! all coordinators share that database.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::transport::Channel;

/// A channel over one or more coordinator addresses; clones share the choice.
#[derive(Clone)]
pub struct FailoverChannel {
    shared: Arc<Shared>,
}

struct Shared {
    urls: Vec<String>,
    channels: Vec<Channel>,
    /// Which address calls go to.
    current: AtomicUsize,
}

impl FailoverChannel {
    /// `channels[i]` reaches `urls[i]`; calls start at the first.
    pub fn new(urls: Vec<String>, channels: Vec<Channel>) -> FailoverChannel {
        assert_eq!(urls.len(), channels.len(), "one channel per address");
        assert!(!urls.is_empty(), "at least one address");
        FailoverChannel {
            shared: Arc::new(Shared {
                urls,
                channels,
                current: AtomicUsize::new(0),
            }),
        }
    }

    /// The address calls go to now.
    pub fn current_url(&self) -> &str {
        &self.shared.urls[self.shared.current.load(Ordering::Relaxed)]
    }
}

impl std::fmt::Debug for FailoverChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverChannel")
            .field("urls", &self.shared.urls)
            .field("current", &self.current_url())
            .finish()
    }
}

impl Shared {
    /// Moves on from address `from` (unless another call already did).
    fn fail_over(&self, from: usize, why: &tonic::transport::Error) {
        let next = (from + 1) % self.urls.len();
        if next != from
            && self
                .current
                .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                from = %self.urls[from],
                to = %self.urls[next],
                error = %why,
                "coordinator unreachable; failing over"
            );
        }
    }
}

impl Service<http::Request<Body>> for FailoverChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    /// Always ready: readiness is awaited on the chosen address's channel inside the call, so
    /// that the choice is made per call.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        let at = shared.current.load(Ordering::Relaxed);
        let mut channel = shared.channels[at].clone();
        Box::pin(async move {
            let result = match std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
                Ok(()) => channel.call(request).await,
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                shared.fail_over(at, e);
            }
            result
        })
    }
}
