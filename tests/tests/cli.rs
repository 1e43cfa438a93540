//! The `segtrain` CLI against a real coordinator: job files, flags, JSON output, exit codes, and
//! one-line errors.

use segtrain_coordinator::events::EventPayload;
use segtrain_coordinator::state::JobState;
use segtrain_coordinator::store::Store;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::CoordinatorProcess;
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::service::walk;
use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use uuid::Uuid;

fn segtrain(coord: &str, args: &[&str]) -> Output {
    Command::new(binaries::path("segtrain"))
        .args(args)
        .env("SEGTRAIN_COORDINATOR", coord)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .expect("run segtrain")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure is one clear line: no backtrace, no raw status dump.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    let err = stderr(o);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    for bad in ["panicked", "Status {", "backtrace", "metadata:"] {
        assert!(!err.contains(bad), "{bad} in {err}");
    }
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "command failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

#[tokio::test]
async fn cli_submits_lists_watches_and_cancels() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start(&pg.url()).await;
    let store = Store::connect(&pg.url()).await.expect("store");
    let url = coord.url();
    let dir = tempfile::tempdir().expect("temp dir");

    // The template is a valid job file; flags override it.
    let template = segtrain(&url, &["job-template"]);
    assert!(template.status.success());
    let file = dir.path().join("job.toml");
    std::fs::write(&file, &template.stdout).expect("write job file");
    let file = file.to_str().expect("utf-8 path");
    let submitted = segtrain(
        &url,
        &[
            "--json",
            "submit",
            "-f",
            file,
            "--world-size",
            "2",
            "--name",
            "from-file",
            "--variant",
            "b2",
        ],
    );
    let sub = json(&submitted);
    assert_eq!(sub["existing"], false);
    // The template is the full recipe without pretrained weights: accepted, with a warning on
    // stderr (stdout stays one JSON document, which carries it too).
    let warning = stderr(&submitted);
    assert!(
        warning.starts_with("warning: no pretrained weights: training from random initialisation")
            && warning.contains("spec.pretrained")
            && warning.trim_end().lines().count() == 1,
        "{warning}"
    );
    assert_eq!(
        sub["warnings"][0]
            .as_str()
            .map(|w| format!("warning: {w}\n")),
        Some(warning.clone())
    );
    assert_eq!(sub["job"]["spec"]["sync_bn"], true, "world_size 2: SyncBN");
    assert_eq!(sub["job"]["spec"]["eval_interval"], 16000);
    let id = sub["job"]["id"].as_str().expect("id").to_string();
    assert_eq!(sub["job"]["state"], "QUEUED");
    assert_eq!(sub["job"]["spec"]["world_size"], 2);
    assert_eq!(sub["job"]["spec"]["variant"], "b2");
    assert_eq!(
        sub["job"]["spec"]["max_iters"], 160000,
        "the file's value is kept"
    );
    assert_eq!(sub["job"]["name"], "from-file");

    // Human output.
    let list = segtrain(&url, &["list"]);
    assert!(list.status.success());
    assert!(
        stdout(&list).contains(&id) && stdout(&list).contains("QUEUED"),
        "{}",
        stdout(&list)
    );
    let status = json(&segtrain(&url, &["--json", "status", &id]));
    assert_eq!(status["id"], id.as_str());

    // Idempotent submit through the CLI.
    let nightly = [
        "--json",
        "submit",
        "-f",
        file,
        "--idempotency-key",
        "nightly-1",
    ];
    let a = json(&segtrain(&url, &nightly));
    let b = json(&segtrain(&url, &nightly));
    assert_eq!(a["job"]["id"], b["job"]["id"]);
    assert_eq!(b["existing"], true);

    // With weights, human output: no warning; one rank without SyncBN unless asked.
    let quiet = segtrain(
        &url,
        &[
            "submit",
            "-f",
            file,
            "--pretrained",
            "/weights/mit_b0.safetensors",
            "--world-size",
            "1",
        ],
    );
    assert!(quiet.status.success(), "{}", stderr(&quiet));
    assert_eq!(stderr(&quiet), "", "no warning with pretrained weights");
    assert!(
        stdout(&quiet).starts_with("submitted job "),
        "{}",
        stdout(&quiet)
    );
    let loud = segtrain(&url, &["submit", "-f", file]);
    assert!(loud.status.success(), "{}", stderr(&loud));
    assert!(
        stderr(&loud).starts_with("warning: no pretrained weights"),
        "{}",
        stderr(&loud)
    );

    // Bad input: one line naming the field; nothing created.
    let before = json(&segtrain(&url, &["--json", "list"]))["jobs"]
        .as_array()
        .map(Vec::len);
    assert_one_line_error(
        &segtrain(&url, &["submit", "-f", file, "--crop-height", "100"]),
        "crop_height",
    );
    assert_one_line_error(
        &segtrain(&url, &["submit", "--dataset-root", "relative"]),
        "dataset_root",
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "dataset_root = \"/d\"\ncrop_hieght = 512\n").expect("write");
    assert_one_line_error(
        &segtrain(&url, &["submit", "-f", bad.to_str().expect("utf-8")]),
        "crop_hieght",
    );
    assert_one_line_error(
        &segtrain(&url, &["submit", "-f", "/nonexistent/job.toml"]),
        "/nonexistent/job.toml",
    );
    let after = json(&segtrain(&url, &["--json", "list"]))["jobs"]
        .as_array()
        .map(Vec::len);
    assert_eq!(before, after);

    assert_one_line_error(&segtrain(&url, &["status", "nope"]), "job_id");
    assert_one_line_error(
        &segtrain(&url, &["status", &Uuid::now_v7().to_string()]),
        "not found",
    );
    assert_one_line_error(
        &segtrain("http://127.0.0.1:1", &["list"]),
        "cannot reach the coordinator at http://127.0.0.1:1",
    );
    assert_one_line_error(&segtrain("localhost:50051", &["list"]), "--coordinator");
    assert_one_line_error(&segtrain(&url, &["list", "--state", "sleeping"]), "--state");

    // Cancel, then watch: the events so far, and exit code 3 for a canceled job.
    let c = segtrain(&url, &["cancel", &id, "--reason", "testing"]);
    assert!(c.status.success(), "{}", stderr(&c));
    assert!(stdout(&c).contains("CANCELED"));
    let w = segtrain(&url, &["watch", &id]);
    assert_eq!(w.status.code(), Some(3), "{}{}", stdout(&w), stderr(&w));
    let out = stdout(&w);
    assert!(
        out.contains("state - -> QUEUED") && out.contains("state QUEUED -> CANCELED"),
        "{out}"
    );
    assert!(
        out.contains("note: no pretrained weights: training from random initialisation"),
        "the submit warning is on the job: {out}"
    );

    // watch --json: one JSON object per event line.
    let wj = segtrain(&url, &["--json", "watch", &id]);
    let kinds: Vec<String> = stdout(&wj)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON line")["kind"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["state_change", "note", "state_change"]);

    // A live watch of a job that then runs and succeeds exits 0; one that fails exits 1.
    for (end, code) in [(JobState::Succeeded, 0), (JobState::Failed, 1)] {
        let sub = json(&segtrain(&url, &["--json", "submit", "-f", file]));
        let jid = sub["job"]["id"].as_str().expect("id").to_string();
        let child = Command::new(binaries::path("segtrain"))
            .args(["watch", &jid])
            .env("SEGTRAIN_COORDINATOR", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn watch");
        let uid = Uuid::parse_str(&jid).expect("uuid");
        walk(&store, uid, &[JobState::Scheduled, JobState::Running], "").await;
        let values = BTreeMap::from([
            ("loss".to_string(), Some(0.25)),
            ("lr".to_string(), Some(6e-5)),
        ]);
        store
            .append_event(
                uid,
                1,
                &EventPayload::Metrics {
                    iteration: 50,
                    values,
                },
            )
            .await
            .expect("metrics");
        store.transition_job(uid, end, "done").await.expect("end");
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("watch output");
        assert_eq!(out.status.code(), Some(code), "{}", stdout(&out));
        let text = stdout(&out);
        assert!(
            text.contains("iter      50") && text.contains("loss=0.2500"),
            "{text}"
        );
        assert!(text.contains(&format!("finished {end}")), "{text}");
    }

    // Read-only views.
    let w = json(&segtrain(&url, &["--json", "workers"]));
    assert_eq!(w, serde_json::json!([]));
    assert!(stdout(&segtrain(&url, &["workers"])).contains("no workers registered"));
    assert_eq!(
        json(&segtrain(&url, &["--json", "checkpoints", &id])),
        serde_json::json!([])
    );
    assert_eq!(
        json(&segtrain(&url, &["--json", "metrics", &id])),
        serde_json::json!([])
    );
}

/// A bearer token never travels in the clear to another machine: `http://` to anything but
/// loopback is refused before any connection, naming the address. Without a token there is
/// nothing to protect, and the CLI goes on to connect (and fails to, here, naming the address).
#[test]
fn the_cli_sends_no_token_over_plaintext_to_another_machine() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("client.token");
    std::fs::write(&token_file, "segtrain_0123456789abcdef\n").expect("token file");
    let token = token_file.to_str().expect("utf-8 path");
    for remote in [
        "http://10.255.255.1:50051",
        "http://coordinator.invalid:50051",
    ] {
        let started = std::time::Instant::now();
        let o = segtrain(remote, &["--token-file", token, "list"]);
        assert_one_line_error(&o, "refusing to send the bearer token over plaintext");
        assert!(stderr(&o).contains(remote), "{}", stderr(&o));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "refused before connecting"
        );
    }
    let o = segtrain("http://coordinator.invalid:50051", &["list"]);
    assert!(!o.status.success());
    assert!(
        !stderr(&o).contains("refusing to send the bearer token"),
        "{}",
        stderr(&o)
    );
}
