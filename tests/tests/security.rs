//! Security, end to end: the real coordinator process serving TLS with bearer tokens required,
//! a real PostgreSQL, the real CLI and worker daemon.
//!
//! - who may call what: no token, a made-up token and a revoked token are UNAUTHENTICATED; a
//!   token of the wrong role is PERMISSION_DENIED (client → WorkerService, worker → JobService,
//!   non-admin → TokenService); health and reflection need no token;
//! - PostgreSQL holds only hashes of tokens;
//! - transport: a plaintext client cannot talk to the TLS server, nor a client that does not
//!   trust its CA; mutual TLS refuses a client without a certificate; `--plaintext` and
//!   `--insecure-no-auth` are refused on a non-loopback address, and a coordinator without
//!   transport flags refuses to start;
//! - a daemon with a worker token registers over TLS and runs a job to SUCCEEDED (a daemon with a
//!   client token is refused);
//! - oversized and malformed requests get clean errors and the server keeps serving;
//! - request fields are validated (INVALID_ARGUMENT naming the field);
//! - `segtrain token create / list / revoke` round trip.
//!
//! Stale attempts (ReportEvents of an old attempt refused with FAILED_PRECONDITION, nothing
//! written) are covered by `worker_api.rs::stale_attempts_are_refused_and_write_nothing`.

use prost::bytes::{Buf, BufMut};
use segtrain_proto::client::{self as conn, AuthChannel, BearerToken, ClientTls};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_client::ClusterServiceClient;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_proto::v1::token_service_client::TokenServiceClient;
use segtrain_proto::v1::worker_service_client::WorkerServiceClient;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{
    assert_code, events_until_end, get_job, submit_job, watch_job, CoordinatorProcess,
};
use segtrain_tests::daemon::DaemonProcess;
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::pg::TempPostgres;
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::process::{Command, Output};
use std::time::Duration;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn jobs(coord: &CoordinatorProcess, token: Option<&str>) -> JobServiceClient<AuthChannel> {
    JobServiceClient::new(coord.channel_with_token(token))
}

fn workers(coord: &CoordinatorProcess, token: Option<&str>) -> WorkerServiceClient<AuthChannel> {
    WorkerServiceClient::new(coord.channel_with_token(token))
}

fn tokens(coord: &CoordinatorProcess, token: Option<&str>) -> TokenServiceClient<AuthChannel> {
    TokenServiceClient::new(coord.channel_with_token(token))
}

/// The daemon instance these hand-made worker requests come from.
fn instance() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(segtrain_tests::coordinator::new_instance)
        .clone()
}

fn register_req(host: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        host: host.into(),
        gpu_index: -1,
        gpu_name: "cpu".into(),
        gpu_memory_bytes: 0,
        running: vec![],
        instance_id: instance(),
        ..Default::default()
    }
}

fn submit_req(name: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            name: Some(name.into()),
            dataset_root: Some("/nonexistent".into()),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    }
}

async fn health(coord: &CoordinatorProcess) -> i32 {
    HealthClient::new(coord.channel_with_token(None))
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token")
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_decide_who_may_call_what() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let admin = coord.admin_token().expect("admin token").to_string();
    let (client, client_id) = coord.create_token(pb::TokenRole::Client, "ci").await;
    let (worker, _) = coord
        .create_token(pb::TokenRole::Worker, "gpu-host-1")
        .await;
    let (other_client, _) = coord.create_token(pb::TokenRole::Client, "other").await;

    // Health and reflection are open.
    assert_eq!(health(&coord).await, ServingStatus::Serving as i32);

    // No token, a made-up token, a header that is not Bearer.
    let list = || pb::ListJobsRequest::default();
    assert_code(
        jobs(&coord, None).list_jobs(list()).await,
        Code::Unauthenticated,
        "authorization: Bearer",
    );
    assert_code(
        jobs(&coord, Some("segtrain_madeup"))
            .list_jobs(list())
            .await,
        Code::Unauthenticated,
        "not valid",
    );
    assert_code(
        workers(&coord, None).register(register_req("h")).await,
        Code::Unauthenticated,
        "a worker or admin token",
    );
    let mut basic = tonic::Request::new(list());
    basic.metadata_mut().insert(
        "authorization",
        "Basic dXNlcjpwYXNz".parse().expect("header"),
    );
    assert_code(
        JobServiceClient::new(coord.channel_with_token(None))
            .list_jobs(basic)
            .await,
        Code::Unauthenticated,
        "Bearer <token>",
    );

    // A client token: jobs and the cluster view, not the worker API, not tokens.
    let mut c = jobs(&coord, Some(&client));
    c.list_jobs(list()).await.expect("client lists jobs");
    let job = c
        .submit_job(submit_req("by-client"))
        .await
        .expect("client submits")
        .into_inner()
        .job
        .expect("job");
    ClusterServiceClient::new(coord.channel_with_token(Some(&client)))
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .expect("client lists workers");
    assert_code(
        workers(&coord, Some(&client))
            .register(register_req("h"))
            .await,
        Code::PermissionDenied,
        "segtrain.v1.WorkerService needs a worker or admin token",
    );
    assert_code(
        workers(&coord, Some(&client))
            .report_events(pb::ReportEventsRequest {
                worker_id: uuid::Uuid::now_v7().to_string(),
                events: vec![],
                instance_id: instance(),
                instance_secret: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "is a client token",
    );
    assert_code(
        tokens(&coord, Some(&client))
            .create_token(pb::CreateTokenRequest {
                name: "escalate".into(),
                role: pb::TokenRole::Admin as i32,
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "needs an admin token",
    );
    assert_code(
        tokens(&coord, Some(&client))
            .list_tokens(pb::ListTokensRequest::default())
            .await,
        Code::PermissionDenied,
        "needs an admin token",
    );

    // A worker token: the worker API only.
    let mut w = workers(&coord, Some(&worker));
    let reg = w
        .register(register_req("secure-host"))
        .await
        .expect("worker registers")
        .into_inner();
    w.heartbeat(pb::HeartbeatRequest {
        worker_id: reg.worker_id.clone(),
        running: vec![],
        instance_id: instance(),
        leaving: false,
        instance_secret: reg.instance_secret.clone(),
    })
    .await
    .expect("worker heartbeats");
    assert_code(
        jobs(&coord, Some(&worker))
            .submit_job(submit_req("by-worker"))
            .await,
        Code::PermissionDenied,
        "segtrain.v1.JobService needs a client or admin token",
    );
    assert_code(
        jobs(&coord, Some(&worker))
            .cancel_job(pb::CancelJobRequest {
                job_id: job.id.clone(),
                reason: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "is a worker token",
    );
    assert_code(
        tokens(&coord, Some(&worker))
            .revoke_token(pb::RevokeTokenRequest {
                token_id: client_id.clone(),
            })
            .await,
        Code::PermissionDenied,
        "needs an admin token",
    );

    // Admin: everything.
    jobs(&coord, Some(&admin))
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("admin reads jobs");
    workers(&coord, Some(&admin))
        .register(register_req("admin-host"))
        .await
        .expect("admin may register");
    let listed = tokens(&coord, Some(&admin))
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .expect("admin lists tokens")
        .into_inner()
        .tokens;
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["test-admin", "ci", "gpu-host-1", "other"]);
    assert!(
        listed
            .iter()
            .all(|t| t.last_used_at.is_some() || t.name == "other"),
        "{listed:?}"
    );

    // Revocation takes effect at once on this coordinator; the other tokens keep working.
    let revoked = tokens(&coord, Some(&admin))
        .revoke_token(pb::RevokeTokenRequest {
            token_id: client_id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner()
        .token
        .expect("token");
    assert!(revoked.revoked_at.is_some());
    assert_code(
        c.list_jobs(list()).await,
        Code::Unauthenticated,
        "\"ci\" has been revoked",
    );
    jobs(&coord, Some(&other_client))
        .list_jobs(list())
        .await
        .expect("another client token still works");
    let active = tokens(&coord, Some(&admin))
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .expect("list")
        .into_inner()
        .tokens;
    assert!(active.iter().all(|t| t.id != client_id), "{active:?}");
    let all = tokens(&coord, Some(&admin))
        .list_tokens(pb::ListTokensRequest {
            include_revoked: true,
        })
        .await
        .expect("list all")
        .into_inner()
        .tokens;
    assert!(all
        .iter()
        .any(|t| t.id == client_id && t.revoked_at.is_some()));

    // Invalid TokenService requests name the field.
    let mut admin_tokens = tokens(&coord, Some(&admin));
    for (req, field) in [
        (
            pb::CreateTokenRequest {
                name: String::new(),
                role: pb::TokenRole::Client as i32,
                ..Default::default()
            },
            "name:",
        ),
        (
            pb::CreateTokenRequest {
                name: "x".repeat(65),
                role: pb::TokenRole::Client as i32,
                ..Default::default()
            },
            "name:",
        ),
        (
            pb::CreateTokenRequest {
                name: "a\u{7}b".into(),
                role: pb::TokenRole::Client as i32,
                ..Default::default()
            },
            "name:",
        ),
        (
            pb::CreateTokenRequest {
                name: "ok".into(),
                role: 0,
                ..Default::default()
            },
            "role:",
        ),
        (
            pb::CreateTokenRequest {
                name: "ok".into(),
                role: 42,
                ..Default::default()
            },
            "role:",
        ),
    ] {
        assert_code(
            admin_tokens.create_token(req).await,
            Code::InvalidArgument,
            field,
        );
    }
    assert_code(
        admin_tokens
            .revoke_token(pb::RevokeTokenRequest {
                token_id: "nope".into(),
            })
            .await,
        Code::InvalidArgument,
        "token_id:",
    );
    assert_code(
        admin_tokens
            .revoke_token(pb::RevokeTokenRequest {
                token_id: uuid::Uuid::now_v7().to_string(),
            })
            .await,
        Code::NotFound,
        "token",
    );

    // PostgreSQL holds each token's SHA-256 and nothing from which a token can be read.
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    let rows: Vec<(String, Vec<u8>, String)> = sqlx::query_as(
        "SELECT name, sha256, row_to_json(t)::text FROM tokens t ORDER BY created_at",
    )
    .fetch_all(&pool)
    .await
    .expect("token rows");
    assert_eq!(rows.len(), 4);
    for secret in [&admin, &client, &worker, &other_client] {
        let digest = Sha256::digest(secret.as_bytes()).to_vec();
        assert!(rows.iter().any(|r| r.1 == digest), "hash of a token stored");
        let body = secret.trim_start_matches("segtrain_");
        for (name, _, json) in &rows {
            assert!(
                !json.contains(body),
                "token {name} appears in the table: {json}"
            );
        }
    }
    // Every column of the table: no column could hold a token by another name.
    let cols: Vec<(String,)> = sqlx::query_as(
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'tokens' ORDER BY ordinal_position",
    )
    .fetch_all(&pool)
    .await
    .expect("columns");
    let cols: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        cols,
        [
            "id",
            "name",
            "role",
            "sha256",
            "created_at",
            "revoked_at",
            "last_used_at",
            "host",
            "principal",
            "team"
        ]
    );
    // Nor does the coordinator log them.
    let log = coord.log_text();
    for secret in [&admin, &client, &worker, &other_client] {
        assert!(!log.contains(secret.as_str()), "a token in the log");
    }
}

fn coordinator_refuses(args: &[&str], needle: &str) {
    let out = Command::new(binaries::path("segtrain-coordinator"))
        .args(args)
        .env_remove("SEGTRAIN_TLS_CERT")
        .env_remove("SEGTRAIN_TLS_KEY")
        .env_remove("SEGTRAIN_PLAINTEXT")
        .env_remove("SEGTRAIN_INSECURE_NO_AUTH")
        .output()
        .expect("run segtrain-coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} started: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_security_is_required_and_checked() {
    // Configuration errors come before the database is needed: this URL never answers.
    let db = "postgres://nobody@127.0.0.1:1/none";
    coordinator_refuses(
        &["--database-url", db, "--listen", "0.0.0.0:0", "--plaintext"],
        "--plaintext is accepted only with a loopback --listen address",
    );
    coordinator_refuses(
        &[
            "--database-url",
            db,
            "--listen",
            "10.9.8.7:50051",
            "--plaintext",
            "--insecure-no-auth",
        ],
        "--plaintext is accepted only with a loopback",
    );
    coordinator_refuses(
        &["--database-url", db, "--listen", "127.0.0.1:0"],
        "pass --tls-cert PATH --tls-key PATH",
    );
    // The dashboard's listener has the same rules as gRPC's.
    coordinator_refuses(
        &[
            "--database-url",
            db,
            "--listen",
            "127.0.0.1:0",
            "--plaintext",
            "--web-listen",
            "0.0.0.0:0",
        ],
        "--plaintext is accepted only with a loopback --web-listen address",
    );
    coordinator_refuses(
        &[
            "--database-url",
            db,
            "--tls-cert",
            "/nonexistent/server.pem",
            "--tls-key",
            "/nonexistent/server-key.pem",
        ],
        "--tls-cert /nonexistent/server.pem: cannot read it",
    );

    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let cert_dir = coord.secure().expect("secure").cert_dir.clone();
    let key = cert_dir.join("server-key.pem");
    let cert = cert_dir.join("server.pem");
    coordinator_refuses(
        &[
            "--database-url",
            db,
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
            "--insecure-no-auth",
        ],
        "--insecure-no-auth is accepted only with a loopback --listen address",
    );
    coordinator_refuses(
        &[
            "--database-url",
            db,
            "--tls-cert",
            key.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
        ],
        &format!(
            "--tls-cert {}: not a PEM file with a CERTIFICATE",
            key.display()
        ),
    );
    let admin = coord.admin_token().expect("admin").to_string();

    // The right CA and token: fine.
    jobs(&coord, Some(&admin))
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("TLS with the private CA");

    // Plaintext to the TLS port fails (and never gets an answer from a service).
    let plain = format!("http://127.0.0.1:{}", coord.port());
    let ch = conn::connect_lazy(&plain, &ClientTls::default(), bearer(&admin)).expect("channel");
    let e = list_jobs_refused(ch, "plaintext to a TLS server").await;
    assert_failed_handshake(&e);

    // TLS without trusting the private CA (the system roots do not know it): refused.
    match conn::connect_lazy(&coord.url(), &ClientTls::default(), bearer(&admin)) {
        Ok(ch) => {
            let e = list_jobs_refused(ch, "an untrusted server certificate").await;
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        }
        // A host without any system roots cannot even set TLS up this way.
        Err(e) => assert!(e.to_string().contains("TLS"), "{e}"),
    }

    // A CA that is a file of something else is named before anything connects.
    let e = conn::connect_lazy(
        &coord.url(),
        &ClientTls {
            ca: Some(key.clone()),
            ..Default::default()
        },
        BearerToken::none(),
    )
    .expect_err("a key is not a CA");
    assert!(e.to_string().contains("--ca"), "{e}");
    // http:// with a CA is a mistake worth naming.
    let e = conn::connect_lazy(&plain, &coord.client_tls(), BearerToken::none())
        .expect_err("http with a CA");
    assert!(e.to_string().contains("use https://"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], true).await;
    let admin = coord.admin_token().expect("admin").to_string();
    // The harness's client carries client.pem: fine.
    jobs(&coord, Some(&admin))
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("with a client certificate");
    // The same CA and token without a client certificate: the handshake fails.
    let tls = ClientTls {
        ca: coord.ca(),
        ..Default::default()
    };
    let ch = conn::connect_lazy(&coord.url(), &tls, bearer(&admin)).expect("channel");
    let e = list_jobs_refused(ch, "no client certificate").await;
    // TLS 1.3 finishes the client's side of the handshake before the server checks the
    // certificate, so the refusal (alert CertificateRequired) arrives as a failed or canceled
    // call rather than a failed connect.
    assert_failed_handshake(&e);
}

fn bearer(token: &str) -> BearerToken {
    BearerToken::new(token, "test").expect("token")
}

/// A ListJobs call that must fail; its status.
async fn list_jobs_refused(ch: AuthChannel, why: &str) -> Status {
    JobServiceClient::new(ch)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err(why)
}

/// A call refused by the TLS handshake: the transport's codes, never a service's answer.
fn assert_failed_handshake(e: &Status) {
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{e:?}"
    );
}

/// Sends and receives raw bytes, so that a test can put anything on the wire.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

async fn raw_call(ch: AuthChannel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_clean_errors_and_the_server_keeps_serving() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let (client, _) = coord.create_token(pb::TokenRole::Client, "c").await;
    let (worker, _) = coord.create_token(pb::TokenRole::Worker, "w").await;

    // Garbage that is not protobuf (a varint that never ends).
    let e = raw_call(
        coord.channel_with_token(Some(&client)),
        "/segtrain.v1.JobService/GetJob",
        vec![0xff; 32],
    )
    .await
    .expect_err("garbage");
    assert!(
        matches!(e.code(), Code::Internal | Code::InvalidArgument),
        "{e:?}"
    );
    assert!(e.message().to_lowercase().contains("decode"), "{e:?}");
    // A truncated field (length 100, then 3 bytes).
    let e = raw_call(
        coord.channel_with_token(Some(&worker)),
        "/segtrain.v1.WorkerService/Register",
        vec![0x0a, 100, b'a', b'b', b'c'],
    )
    .await
    .expect_err("truncated");
    assert!(
        matches!(e.code(), Code::Internal | Code::InvalidArgument),
        "{e:?}"
    );
    // Without a token, garbage is refused before it is even decoded.
    let e = raw_call(
        coord.channel_with_token(None),
        "/segtrain.v1.JobService/GetJob",
        vec![0xff; 32],
    )
    .await
    .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // 5 MiB: over the 4 MiB request limit, raw and as a real message.
    let big = 5 << 20;
    let e = raw_call(
        coord.channel_with_token(Some(&client)),
        "/segtrain.v1.JobService/GetJob",
        vec![0u8; big],
    )
    .await
    .expect_err("oversized");
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    assert!(e.message().contains("4194304"), "{e:?}");
    let e = JobServiceClient::new(coord.channel_with_token(Some(&client)))
        .max_encoding_message_size(64 << 20)
        .cancel_job(pb::CancelJobRequest {
            job_id: uuid::Uuid::now_v7().to_string(),
            reason: "x".repeat(big),
        })
        .await
        .expect_err("oversized cancel");
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    // Still serving, on new connections and for real requests.
    assert_eq!(health(&coord).await, ServingStatus::Serving as i32);
    let job = jobs(&coord, Some(&client))
        .submit_job(submit_req("after-abuse"))
        .await
        .expect("still serving")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.state(), pb::JobState::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_fields_are_validated_and_named() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let admin = coord.admin_token().expect("admin").to_string();
    let mut j = jobs(&coord, Some(&admin));
    let mut w = workers(&coord, Some(&admin));
    let uuid = || uuid::Uuid::now_v7().to_string();

    // JobService.
    assert_code(
        j.get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await,
        Code::InvalidArgument,
        "job_id:",
    );
    assert_code(
        j.submit_job(pb::SubmitJobRequest {
            idempotency_key: "k".repeat(129),
            ..submit_req("x")
        })
        .await,
        Code::InvalidArgument,
        "idempotency_key:",
    );
    assert_code(
        j.submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                name: Some("n".repeat(10_000)),
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "spec.name",
    );
    assert_code(
        j.list_jobs(pb::ListJobsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_size:",
    );
    assert_code(
        j.list_jobs(pb::ListJobsRequest {
            states: vec![99],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "states:",
    );
    assert_code(
        j.list_jobs(pb::ListJobsRequest {
            states: vec![1; 17],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "states:",
    );
    assert_code(
        j.cancel_job(pb::CancelJobRequest {
            job_id: uuid(),
            reason: "r".repeat(1025),
        })
        .await,
        Code::InvalidArgument,
        "reason:",
    );
    assert_code(
        j.get_metrics(pb::GetMetricsRequest {
            job_id: uuid(),
            names: vec!["lo\nss".into()],
            since_iteration: 0,
            limit: 0,
        })
        .await,
        Code::InvalidArgument,
        "names:",
    );
    assert_code(
        j.get_metrics(pb::GetMetricsRequest {
            job_id: uuid(),
            names: vec![],
            since_iteration: 0,
            limit: 1_000_000,
        })
        .await,
        Code::InvalidArgument,
        "limit:",
    );

    // WorkerService.
    assert_code(
        w.register(register_req(&"h".repeat(256))).await,
        Code::InvalidArgument,
        "host:",
    );
    assert_code(
        w.register(pb::RegisterRequest {
            gpu_name: "g".repeat(256),
            ..register_req("h")
        })
        .await,
        Code::InvalidArgument,
        "gpu_name:",
    );
    assert_code(
        w.register(pb::RegisterRequest {
            gpu_index: 5000,
            ..register_req("h")
        })
        .await,
        Code::InvalidArgument,
        "gpu_index:",
    );
    let reg = w
        .register(register_req("valid-host"))
        .await
        .expect("register")
        .into_inner();
    let event = |seq: u64, attempt: u32| pb::WorkerEvent {
        seq,
        job_id: uuid(),
        attempt,
        rank: 0,
        time: None,
        payload: Some(pb::worker_event::Payload::Note(pb::Note {
            text: "n".into(),
        })),
    };
    assert_code(
        w.report_events(pb::ReportEventsRequest {
            worker_id: reg.worker_id.clone(),
            events: (1..=10_001).map(|s| event(s, 1)).collect(),
            instance_id: instance(),
            instance_secret: reg.instance_secret.clone(),
        })
        .await,
        Code::InvalidArgument,
        "events: at most 10000",
    );
    assert_code(
        w.report_events(pb::ReportEventsRequest {
            worker_id: reg.worker_id.clone(),
            events: vec![pb::WorkerEvent {
                time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..event(1, 1)
            }],
            instance_id: instance(),
            instance_secret: reg.instance_secret.clone(),
        })
        .await,
        Code::InvalidArgument,
        "events[0].time:",
    );
    assert_code(
        w.report_events(pb::ReportEventsRequest {
            worker_id: "w".into(),
            events: vec![],
            instance_id: instance(),
            instance_secret: reg.instance_secret.clone(),
        })
        .await,
        Code::InvalidArgument,
        "worker_id:",
    );
    assert_code(
        w.await_rendezvous(pb::AwaitRendezvousRequest {
            worker_id: reg.worker_id.clone(),
            job_id: uuid(),
            attempt: 1,
            timeout_seconds: 0,
            instance_id: instance(),
            instance_secret: reg.instance_secret.clone(),
        })
        .await,
        Code::InvalidArgument,
        "timeout_seconds:",
    );
    assert_code(
        w.publish_rendezvous(pb::PublishRendezvousRequest {
            worker_id: reg.worker_id.clone(),
            job_id: uuid(),
            attempt: 1,
            endpoint: Some(pb::publish_rendezvous_request::Endpoint::NcclUniqueId(
                vec![0; 7],
            )),
            instance_id: instance(),
            instance_secret: reg.instance_secret.clone(),
        })
        .await,
        Code::InvalidArgument,
        "nccl_unique_id:",
    );
}

fn segtrain(
    coord: &CoordinatorProcess,
    token_file: Option<&std::path::Path>,
    args: &[&str],
) -> Output {
    let mut cmd = Command::new(binaries::path("segtrain"));
    cmd.arg("--coordinator").arg(coord.url());
    if let Some(ca) = coord.ca() {
        cmd.arg("--ca").arg(ca);
    }
    if let Some(f) = token_file {
        cmd.arg("--token-file").arg(f);
    }
    cmd.args(args)
        .env_remove("SEGTRAIN_TOKEN")
        .env_remove("SEGTRAIN_TOKEN_FILE")
        .env_remove("SEGTRAIN_CA")
        .output()
        .expect("run segtrain")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "segtrain failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_token_create_list_revoke_round_trip() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let admin_file = CoordinatorProcess::token_file(
        tmp.path(),
        "admin.token",
        coord.admin_token().expect("admin"),
    );

    // Create: the token alone on stdout.
    let out = segtrain(
        &coord,
        Some(&admin_file),
        &["token", "create", "--role", "client", "--name", "ci"],
    );
    let client = ok(&out).trim().to_string();
    assert!(
        client.starts_with("segtrain_") && client.len() == 52,
        "{client:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown only now"));
    let client_file = CoordinatorProcess::token_file(tmp.path(), "client.token", &client);

    // JSON create has the token and the id.
    let v: serde_json::Value = serde_json::from_str(&ok(&segtrain(
        &coord,
        Some(&admin_file),
        &[
            "--json", "token", "create", "--role", "worker", "--name", "w1",
        ],
    )))
    .expect("json");
    assert_eq!(v["role"], "worker");
    assert!(v["token"]
        .as_str()
        .is_some_and(|t| t.starts_with("segtrain_")));

    // The client token works for jobs, not for tokens.
    ok(&segtrain(&coord, Some(&client_file), &["list"]));
    let denied = segtrain(&coord, Some(&client_file), &["token", "list"]);
    assert_eq!(denied.status.code(), Some(1));
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        err.contains("not allowed") && err.contains("needs an admin token"),
        "{err}"
    );
    // SEGTRAIN_TOKEN works as well as --token-file.
    let via_env = Command::new(binaries::path("segtrain"))
        .args(["--coordinator", &coord.url(), "list"])
        .arg("--ca")
        .arg(coord.ca().expect("ca"))
        .env("SEGTRAIN_TOKEN", &client)
        .env_remove("SEGTRAIN_TOKEN_FILE")
        .output()
        .expect("segtrain");
    ok(&via_env);
    // Without --ca the private CA is not trusted: one line saying what to check.
    let no_ca = Command::new(binaries::path("segtrain"))
        .args(["--coordinator", &coord.url(), "--token-file"])
        .arg(&client_file)
        .arg("list")
        .env_remove("SEGTRAIN_CA")
        .output()
        .expect("segtrain");
    assert_eq!(no_ca.status.code(), Some(1));
    let err = String::from_utf8_lossy(&no_ca.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot connect securely") && err.contains("--ca"),
        "{err}"
    );
    // No token at all: refused, saying how to give one.
    let none = segtrain(&coord, None, &["list"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("--token-file or SEGTRAIN_TOKEN"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );

    // List (JSON): the admin, ci and w1; no secrets.
    let listed = ok(&segtrain(
        &coord,
        Some(&admin_file),
        &["--json", "token", "list"],
    ));
    let v: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let names: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["test-admin", "ci", "w1"]);
    assert!(!listed.contains(&client));
    let id = v[1]["id"].as_str().expect("id").to_string();

    // Revoke; the token stops working at once; list hides it unless --all.
    let out = ok(&segtrain(
        &coord,
        Some(&admin_file),
        &["token", "revoke", &id],
    ));
    assert!(out.contains("revoked client token \"ci\""), "{out}");
    let refused = segtrain(&coord, Some(&client_file), &["list"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let text = ok(&segtrain(&coord, Some(&admin_file), &["token", "list"]));
    assert!(!text.contains(&id), "{text}");
    let text = ok(&segtrain(
        &coord,
        Some(&admin_file),
        &["token", "list", "--all"],
    ));
    assert!(text.contains(&id), "{text}");
    let bad = segtrain(
        &coord,
        Some(&admin_file),
        &["token", "create", "--role", "root", "--name", "x"],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--role"));

    // The offline commands on the database agree.
    let offline = segtrain_tests::coordinator::coordinator_command(&[
        "token",
        "list",
        "--all",
        "--json",
        "--database-url",
        &pg.url(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&offline).expect("json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(3));
    assert!(v
        .as_array()
        .expect("array")
        .iter()
        .any(|t| t["id"] == id.as_str() && !t["revoked_at"].is_null()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_a_worker_token_runs_a_job_over_tls() {
    let (tmp, data) = synth_dir(4, 2);

    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let (worker, _) = coord.create_token(pb::TokenRole::Worker, "cpu-host").await;
    let (client, _) = coord.create_token(pb::TokenRole::Client, "user").await;
    let worker_file = CoordinatorProcess::token_file(tmp.path(), "worker.token", &worker);
    let client_file = CoordinatorProcess::token_file(tmp.path(), "client.token", &client);
    let ca = coord.ca().expect("ca");
    let flags = |token: &std::path::Path| -> Vec<std::ffi::OsString> {
        vec![
            "--ca".into(),
            ca.clone().into(),
            "--token-file".into(),
            token.into(),
        ]
    };
    let good_flags = flags(&worker_file);
    let good: Vec<&OsStr> = good_flags.iter().map(|s| s.as_os_str()).collect();
    let daemon =
        DaemonProcess::start_with_args(&coord.url(), "cpu-secure", &tmp.path().join("w"), &good);
    // A daemon holding a client token is refused and never registers.
    let bad_flags = flags(&client_file);
    let bad: Vec<&OsStr> = bad_flags.iter().map(|s| s.as_os_str()).collect();
    let refused = DaemonProcess::start_with_args(
        &coord.url(),
        "cpu-wrong-token",
        &tmp.path().join("x"),
        &bad,
    );

    let mut j = jobs(&coord, Some(&client));
    let job = submit_job(
        &mut j,
        pb::JobSpec {
            eval_interval: Some(2),
            checkpoint_interval: Some(2),
            ..tiny_job("tls-e2e", &data, &tmp.path().join("ckpt"), 1, 2)
        },
    )
    .await;
    let mut stream = watch_job(&mut j, &job.id, 0).await;
    let logs = || {
        format!(
            "coordinator:\n{}\ndaemon:\n{}",
            coord.log_text(),
            daemon.log_text()
        )
    };
    events_until_end(&mut stream, Duration::from_secs(300), logs).await;
    let done = get_job(&mut j, &job.id).await;
    assert_eq!(
        done.state(),
        pb::JobState::Succeeded,
        "{}\ndaemon:\n{}",
        done.reason,
        daemon.log_text()
    );

    let ws = ClusterServiceClient::new(coord.channel_with_token(Some(&client)))
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .expect("workers")
        .into_inner()
        .workers;
    let hosts: Vec<&str> = ws.iter().map(|w| w.host.as_str()).collect();
    assert_eq!(hosts, ["cpu-secure"]);
    // The refused daemon keeps retrying and logging: wait for its line.
    segtrain_tests::wait::poll_until(
        Duration::from_secs(30),
        "the refused daemon logs why",
        || refused.log_text(),
        || async {
            let log = refused.log_text();
            log.contains("refused this daemon's token")
                && log.contains("needs a worker or admin token")
        },
    )
    .await;
    for secret in [&worker, &client] {
        assert!(!daemon.log_text().contains(secret.as_str()));
        assert!(!coord.log_text().contains(secret.as_str()));
    }
}
