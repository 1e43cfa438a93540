//! What `grpcurl -plaintext host:port list` / `describe` rely on: server reflection (v1 and
//! v1alpha) and grpc.health.v1 on the coordinator's one port.

use prost::Message;
use segtrain_tests::coordinator::CoordinatorProcess;
use segtrain_tests::pg::TempPostgres;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::{v1, v1alpha};
use v1::server_reflection_request::MessageRequest as Request;

/// One v1 reflection request on its own stream and the server's one answer (what each `grpcurl`
/// step sends).
async fn reflect(
    refl: &mut v1::server_reflection_client::ServerReflectionClient<tonic::transport::Channel>,
    request: Request,
) -> v1::ServerReflectionResponse {
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection v1")
        .into_inner();
    stream.message().await.expect("ok").expect("a response")
}

#[tokio::test]
async fn reflection_lists_and_describes_the_api_and_health_reports_serving() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start(&pg.url()).await;
    let ch = coord.channel().await;

    // v1: list services.
    let mut refl = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let resp = reflect(&mut refl, Request::ListServices(String::new())).await;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("expected a service list, got {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "segtrain.v1.JobService",
        "segtrain.v1.ClusterService",
        "segtrain.v1.WorkerService",
        "segtrain.v1.TokenService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    // v1: describe JobService (file_containing_symbol), as `grpcurl describe` does.
    let resp = reflect(
        &mut refl,
        Request::FileContainingSymbol("segtrain.v1.JobService".into()),
    )
    .await;
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(fds)) =
        resp.message_response
    else {
        panic!("expected file descriptors, got {resp:?}");
    };
    let files: Vec<prost_types::FileDescriptorProto> = fds
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).expect("a descriptor"))
        .collect();
    let job_proto = files
        .iter()
        .find(|f| f.name() == "segtrain/v1/job.proto")
        .expect("job.proto served");
    let svc = job_proto
        .service
        .iter()
        .find(|s| s.name() == "JobService")
        .expect("JobService described");
    let methods: Vec<&str> = svc.method.iter().map(|m| m.name()).collect();
    for m in [
        "SubmitJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
        "ListCheckpoints",
        "GetMetrics",
    ] {
        assert!(methods.contains(&m), "{m} missing: {methods:?}");
    }
    let watch = svc
        .method
        .iter()
        .find(|m| m.name() == "WatchJob")
        .expect("WatchJob");
    assert!(watch.server_streaming(), "WatchJob is a server stream");
    // Clients then fetch each dependency by file name; every one must be served.
    for dep in &job_proto.dependency {
        let resp = reflect(&mut refl, Request::FileByFilename(dep.clone())).await;
        assert!(
            matches!(
                resp.message_response,
                Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
            ),
            "dependency {dep} not served: {resp:?}"
        );
    }
    assert!(job_proto
        .dependency
        .iter()
        .any(|d| d == "google/protobuf/timestamp.proto"));

    // v1alpha (older clients such as Postman, evans).
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let resp = stream.message().await.expect("ok").expect("a response");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("expected a service list, got {resp:?}");
    };
    assert!(list
        .service
        .iter()
        .any(|s| s.name == "segtrain.v1.JobService"));

    // Health: the whole server and each user-facing service.
    let mut health = HealthClient::new(ch);
    for service in ["", "segtrain.v1.JobService", "segtrain.v1.ClusterService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
}
