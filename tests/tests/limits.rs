//! What one client may hold on the coordinator's listeners (docs/security.md, "Limits"), seen
//! from a raw HTTP/2 or TCP client as a slow or greedy one would behave: the streams it may open
//! on one connection, how long its request body may take, and how long its TLS handshake may.

use segtrain_tests::coordinator::{coordinator_command, CoordinatorProcess};
use segtrain_tests::pg::TempPostgres;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn a_connection_gets_its_stream_quota_and_a_body_that_never_comes_is_cut_off() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let admin = coordinator_command(&[
        "token",
        "create",
        "--database-url",
        &pg.url(),
        "--role",
        "admin",
        "--name",
        "admin",
    ]);
    let coord = CoordinatorProcess::start_plaintext_with_auth(
        &pg.url(),
        &[
            "--max-streams-per-connection",
            "16",
            "--request-body-timeout-seconds",
            "1",
        ],
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", coord.port()))
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2");
    tokio::spawn(connection);
    // The server's SETTINGS arrive with its first frames; ask once they have.
    client = client.ready().await.expect("ready");
    let request = || {
        http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://127.0.0.1:{}/segtrain.v1.JobService/ListJobs",
                coord.port()
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {}", admin.trim()))
            .body(())
            .expect("request")
    };
    // Headers, and then no body at all (the stream stays open from this side).
    let (response, _body_sender) = client.send_request(request(), false).expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = response.await?;
        let status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_string());
        let mut body = resp.into_body();
        while body.data().await.transpose()?.is_some() {}
        let trailers = body.trailers().await?;
        let trailer_status = trailers.and_then(|t| {
            t.get("grpc-status")
                .map(|v| v.to_str().unwrap_or("").to_string())
        });
        Ok::<_, h2::Error>(status.or(trailer_status))
    })
    .await
    .expect("the coordinator answers a body that never comes within 10 s");
    // Refused or reset: either way the stream is over and nothing was served.
    match outcome {
        Ok(Some(code)) => assert_ne!(code, "0", "a request without its body succeeded"),
        Ok(None) => panic!("an answer without a gRPC status"),
        Err(_reset) => {}
    }
    assert!(Instant::now() < deadline);
    assert_eq!(
        client.current_max_send_streams(),
        16,
        "the connection's stream quota (SETTINGS_MAX_CONCURRENT_STREAMS)"
    );
}

#[tokio::test]
async fn a_tls_handshake_that_never_starts_is_closed() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", coord.port()))
        .await
        .expect("connect");
    // Send nothing: the coordinator must close the connection after its handshake timeout
    // (10 s), not hold it for ever.
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf))
        .await
        .expect("the connection was closed within 20 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed at once?"
    );
}
