//! The tower layer in front of every gRPC service: it reads `authorization: Bearer <token>`,
//! verifies the token (asynchronously, against PostgreSQL through the [`Verifier`]'s cache),
//! checks the role the service needs, and either passes the request on with its [`Caller`] in the
//! extensions or answers the gRPC error itself, so the services never see an unauthorised call.

use super::{access, decide, Caller, Verdict, Verifier};
use crate::api::status_of;
use crate::store::StoreError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http;

/// `None` verifier: authentication is off (`--insecure-no-auth`); every request passes.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Option<Verifier>,
}

impl AuthLayer {
    pub fn new(verifier: Option<Verifier>) -> AuthLayer {
        AuthLayer { verifier }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    verifier: Option<Verifier>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for AuthService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(verifier) = self.verifier.clone() else {
            return Box::pin(inner.call(req));
        };
        Box::pin(async move {
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec());
            match authorize(&verifier, req.uri().path(), header.as_deref()).await {
                Ok(caller) => {
                    if let Some(c) = caller {
                        req.extensions_mut().insert(c);
                    }
                    inner.call(req).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The access check of one call to the gRPC method `path` (`/package.Service/Method`) with the
/// `authorization` header `header`: its [`Caller`], `None` for an open service, or the status
/// that refuses it. The gRPC layer and the dashboard's HTTP API (`crate::web`) both ask this.
pub async fn authorize(
    verifier: &Verifier,
    path: &str,
    header: Option<&[u8]>,
) -> Result<Option<Caller>, tonic::Status> {
    let (service, rule) = access(path);
    // Verify first (async), then decide (sync) with the verdict.
    let verdict = match (&rule, header.and_then(bearer)) {
        (super::Access::Roles(_), Some(token)) => Some(verifier.verify(token).await),
        _ => None,
    };
    let decided = decide(&service, rule, header, |_| match verdict {
        Some(Ok(v)) => Ok(v),
        // The token connections are all busy (a flood of made-up tokens, most likely).
        Some(Err(StoreError::Db(sqlx::Error::PoolTimedOut))) => Err(tonic::Status::unavailable(
            "the coordinator is checking too many unknown tokens at once; retry later",
        )),
        Some(Err(e)) => Err(status_of(e)),
        None => Ok(Verdict::Unknown),
    });
    if let Err(status) = &decided {
        tracing::debug!(service = %service, code = ?status.code(), "request refused");
    }
    decided
}

/// The token of a `Bearer <token>` header value.
fn bearer(header: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
