//! The dashboard's HTTP API: one route per gRPC method it fronts, JSON in the CLI's `--json`
//! shapes (`segtrain_proto::json`), errors as `{"code", "message"}` with the gRPC message.

use super::{assets, Web};
use crate::auth::{authorize, Caller};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use segtrain_proto::json::{self, JobView};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_server::ClusterService;
use segtrain_proto::v1::job_service_server::JobService;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;
use tonic::{Code, Status};

/// Rate metrics shown for a running job in the list (the newest report's).
const RATE_NAMES: [&str; 2] = ["images_per_s", "step_ms"];

pub fn router(web: Web) -> Router {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/attempts", get(list_attempts))
        .route("/api/v1/jobs/{id}/checkpoints", get(list_checkpoints))
        .route("/api/v1/jobs/{id}/metrics", get(get_metrics))
        .route("/api/v1/jobs/{id}/events", get(watch_job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/workers", get(list_workers))
        .fallback(assets::serve)
        .with_state(web)
}

/// A refused or failed call: the gRPC status, as HTTP.
pub struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> ApiError {
        ApiError(s)
    }
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError(Status::invalid_argument(msg.into()))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let s = self.0;
        let http = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = Json(json!({ "code": code_name(s.code()), "message": s.message() }));
        let mut resp = (http, body).into_response();
        if http == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// `NOT_FOUND`, as gRPC names the code.
fn code_name(c: Code) -> String {
    format!("{c:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, ch)| {
            let sep = (i > 0 && ch.is_ascii_uppercase()).then_some('_');
            sep.into_iter()
                .chain(std::iter::once(ch.to_ascii_uppercase()))
        })
        .collect()
}

type ApiResult = Result<Response, ApiError>;

/// What every handler starts from: the handlers' state, the request's headers (its token) and
/// its query parameters.
pub struct Call {
    web: Web,
    headers: HeaderMap,
    query: Vec<(String, String)>,
}

impl FromRequestParts<Web> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Call, ApiError> {
        let Query(query) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| invalid(format!("query: {}", e.body_text())))?;
        Ok(Call {
            web: web.clone(),
            headers: parts.headers.clone(),
            query,
        })
    }
}

impl Call {
    /// The query's parameters, each of them one of `allowed` (a typo is an error, not ignored).
    fn params(&self, allowed: &[&str]) -> Result<&[(String, String)], ApiError> {
        if let Some((bad, _)) = self
            .query
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            let allowed = if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            };
            return Err(invalid(format!(
                "unknown query parameter {bad:?}; allowed: {allowed}"
            )));
        }
        Ok(&self.query)
    }

    /// `msg` as a request to the gRPC method `service/method` (e.g. `JobService/ListJobs`),
    /// authorised as gRPC authorises it (the `authorization: Bearer` header, the method's
    /// roles), with the caller in its extensions.
    async fn request<T>(&self, method: &str, msg: T) -> Result<tonic::Request<T>, ApiError> {
        let caller = self.caller(method).await?;
        Ok(with_caller(msg, caller))
    }

    /// Who calls `method`, authorised as gRPC authorises it (`None`: authentication is off).
    async fn caller(&self, method: &str) -> Result<Option<Caller>, ApiError> {
        let Some(verifier) = &self.web.verifier else {
            return Ok(None);
        };
        let header = self
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        Ok(authorize(verifier, &format!("/segtrain.v1.{method}"), header).await?)
    }
}

/// `msg` as a gRPC request from `caller`.
fn with_caller<T>(msg: T, caller: Option<Caller>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(c) = caller {
        req.extensions_mut().insert(c);
    }
    req
}

/// The most a cancel's body may hold, and how long it may take to arrive.
const MAX_CANCEL_BODY: usize = 64 * 1024;
const CANCEL_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body, read only after its caller was authorised: at most `max` bytes within
/// [`CANCEL_BODY_TIMEOUT`].
async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(CANCEL_BODY_TIMEOUT, axum::body::to_bytes(body, max)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(invalid(format!(
            "body: at most {max} bytes, sent within {CANCEL_BODY_TIMEOUT:?}"
        ))),
        Err(_) => Err(invalid(format!(
            "body: did not arrive within {CANCEL_BODY_TIMEOUT:?}"
        ))),
    }
}

/// The one value of `name`, if given.
fn single<'a>(pairs: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
    match (values.next(), values.next()) {
        (Some(_), Some(_)) => Err(invalid(format!("{name}: give it once"))),
        (v, _) => Ok(v.map(String::as_str)),
    }
}

fn number<T: std::str::FromStr>(
    pairs: &[(String, String)],
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    single(pairs, name)?
        .map(|v| {
            v.parse()
                .map_err(|_| invalid(format!("{name}: must be {what}, got {v:?}")))
        })
        .transpose()
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

async fn list_jobs(call: Call) -> ApiResult {
    let q = call.params(&["state", "page_size", "page_token", "team"])?;
    let states = q
        .iter()
        .filter(|(k, _)| k == "state")
        .map(|(_, v)| {
            json::parse_state_name(v)
                .map(|s| s as i32)
                .map_err(|e| invalid(format!("state: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let msg = pb::ListJobsRequest {
        states,
        page_size: number(q, "page_size", "a number 1..=1000")?.unwrap_or(0),
        page_token: single(q, "page_token")?.unwrap_or_default().to_string(),
        team: single(q, "team")?.unwrap_or_default().to_string(),
    };
    let req = call.request("JobService/ListJobs", msg).await?;
    let resp = call.web.jobs.list_jobs(req).await?.into_inner();
    let mut jobs = Vec::with_capacity(resp.jobs.len());
    for j in &resp.jobs {
        let mut v = serde_json::to_value(JobView::from(j)).unwrap_or(Value::Null);
        if j.state == pb::JobState::Running as i32 {
            v["rates"] = rates(&call.web, j).await;
        }
        jobs.push(v);
    }
    ok(json!({ "jobs": jobs, "next_page_token": resp.next_page_token }))
}

/// The newest `images_per_s` and `step_ms` of a running job (the page's speed and ETA), from
/// the points at or after one log interval before its iteration; `{}` when there are none yet.
async fn rates(web: &Web, j: &pb::Job) -> Value {
    let log_interval = j.spec.as_ref().and_then(|s| s.log_interval).unwrap_or(50);
    let msg = pb::GetMetricsRequest {
        job_id: j.id.clone(),
        names: RATE_NAMES.iter().map(|n| n.to_string()).collect(),
        since_iteration: j.iteration.saturating_sub(log_interval),
        limit: 16,
    };
    let Ok(resp) = web.jobs.get_metrics(tonic::Request::new(msg)).await else {
        return json!({});
    };
    let mut out = serde_json::Map::new();
    for p in resp.into_inner().points {
        out.insert(p.name.clone(), json::num(p.value));
    }
    Value::Object(out)
}

async fn get_job(call: Call, Path(job_id): Path<String>) -> ApiResult {
    call.params(&[])?;
    let req = call
        .request("JobService/GetJob", pb::GetJobRequest { job_id })
        .await?;
    let job = call.web.jobs.get_job(req).await?.into_inner();
    let classes = job.spec.as_ref().and_then(|s| s.num_classes).unwrap_or(0) as usize;
    let mut v = serde_json::to_value(JobView::from(&job)).unwrap_or(Value::Null);
    // The names of an evaluation's per-class IoU entries, as its class_iou/NAME points have them.
    v["class_names"] = if classes == segtrain_spec::CITYSCAPES_CLASSES.len() {
        json!(segtrain_spec::CITYSCAPES_CLASSES)
    } else {
        json!((0..classes).map(|i| i.to_string()).collect::<Vec<_>>())
    };
    ok(v)
}

async fn list_attempts(call: Call, Path(job_id): Path<String>) -> ApiResult {
    let q = call.params(&["page_size", "page_token"])?;
    let (page_size, page_token) = page(q)?;
    let msg = pb::ListAttemptsRequest {
        job_id,
        page_size,
        page_token,
    };
    let req = call.request("JobService/ListAttempts", msg).await?;
    let resp = call.web.jobs.list_attempts(req).await?.into_inner();
    let v: Vec<Value> = resp.attempts.iter().map(json::attempt).collect();
    ok(json!({ "attempts": v, "next_page_token": resp.next_page_token }))
}

/// `page_size` and `page_token`, as the list calls take them.
fn page(q: &[(String, String)]) -> Result<(u32, String), ApiError> {
    Ok((
        number(q, "page_size", "a number 1..=10000")?.unwrap_or(0),
        single(q, "page_token")?.unwrap_or_default().to_string(),
    ))
}

async fn list_checkpoints(call: Call, Path(job_id): Path<String>) -> ApiResult {
    let q = call.params(&["include_deleted", "page_size", "page_token"])?;
    let (page_size, page_token) = page(q)?;
    let msg = pb::ListCheckpointsRequest {
        job_id,
        include_deleted: number(q, "include_deleted", "true or false")?.unwrap_or(false),
        page_size,
        page_token,
    };
    let req = call.request("JobService/ListCheckpoints", msg).await?;
    let resp = call.web.jobs.list_checkpoints(req).await?.into_inner();
    let v: Vec<Value> = resp.checkpoints.iter().map(json::checkpoint).collect();
    ok(json!({ "checkpoints": v, "next_page_token": resp.next_page_token }))
}

async fn get_metrics(call: Call, Path(job_id): Path<String>) -> ApiResult {
    let q = call.params(&["name", "since_iteration", "limit"])?;
    let msg = pb::GetMetricsRequest {
        job_id,
        names: q
            .iter()
            .filter(|(k, _)| k == "name")
            .map(|(_, v)| v.clone())
            .collect(),
        since_iteration: number(q, "since_iteration", "an iteration (a whole number)")?
            .unwrap_or(0),
        limit: number(q, "limit", "a number 1..=100000")?.unwrap_or(0),
    };
    let req = call.request("JobService/GetMetrics", msg).await?;
    let resp = call.web.jobs.get_metrics(req).await?.into_inner();
    let v: Vec<Value> = resp.points.iter().map(json::point).collect();
    ok(json!({ "points": v }))
}

/// WatchJob as server-sent events: `job_event` per event (its `id` the event id, to resume with
/// `?after_event_id=`), `error` if the stream fails, and `end` once the job is terminal and its
/// last event sent.
async fn watch_job(call: Call, Path(job_id): Path<String>) -> ApiResult {
    let q = call.params(&["after_event_id"])?;
    let msg = pb::WatchJobRequest {
        job_id,
        after_event_id: number(q, "after_event_id", "an event id (a whole number)")?.unwrap_or(0),
    };
    let req = call.request("JobService/WatchJob", msg).await?;
    let events = call.web.jobs.watch_job(req).await?.into_inner();
    let stream = events
        .map(|r| match r {
            Ok(ev) => Event::default()
                .id(ev.id.to_string())
                .event("job_event")
                .data(json::event(&ev).to_string()),
            Err(s) => Event::default()
                .event("error")
                .data(json!({ "code": code_name(s.code()), "message": s.message() }).to_string()),
        })
        .chain(futures::stream::once(async {
            Event::default().event("end").data("{}")
        }))
        .map(Ok::<_, Infallible>);
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    Ok(sse.into_response())
}

async fn cancel_job(call: Call, Path(job_id): Path<String>, body: Body) -> ApiResult {
    call.params(&[])?;
    // The token first: a stranger's body is never read.
    let caller = call.caller("JobService/CancelJob").await?;
    let reason = cancel_reason(&call.headers, body).await?;
    let msg = pb::CancelJobRequest { job_id, reason };
    let req = with_caller(msg, caller);
    let resp = call.web.jobs.cancel_job(req).await?.into_inner();
    let job = resp
        .job
        .ok_or_else(|| Status::internal("CancelJob returned no job"))?;
    ok(serde_json::to_value(JobView::from(&job)).unwrap_or(Value::Null))
}

/// A cancel's reason, from a JSON body `{"reason": "..."}` (or `{}`).
async fn cancel_reason(headers: &HeaderMap, body: Body) -> Result<String, ApiError> {
    // A JSON body only: a cross-site form post cannot send one without asking first (CORS),
    // which matters where authentication is off.
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return Err(invalid(
            "Content-Type: must be application/json (a body {\"reason\": \"...\"}, or {})",
        ));
    }
    let body = read_body(body, MAX_CANCEL_BODY).await?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(o)) => match o.get("reason") {
            None => Ok(String::new()),
            Some(Value::String(r)) => Ok(r.clone()),
            Some(other) => Err(invalid(format!("reason: must be a string, got {other}"))),
        },
        Ok(other) => Err(invalid(format!("body: must be a JSON object, got {other}"))),
        Err(e) => Err(invalid(format!("body: not JSON: {e}"))),
    }
}

async fn list_workers(call: Call) -> ApiResult {
    let (page_size, page_token) = page(call.params(&["page_size", "page_token"])?)?;
    let msg = pb::ListWorkersRequest {
        page_size,
        page_token,
    };
    let req = call.request("ClusterService/ListWorkers", msg).await?;
    let resp = call.web.cluster.list_workers(req).await?.into_inner();
    let v: Vec<Value> = resp.workers.iter().map(json::worker).collect();
    ok(json!({ "workers": v, "next_page_token": resp.next_page_token }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Ok), "OK");
    }
}
