//! Deployment, end to end (issue 7): the GCP provisioning script's dry run, `deploy/install.sh`
//! into a DESTDIR (complete, idempotent, uninstallable, touching nothing outside), and the
//! installed systemd units run as systemd would run them: their `ExecStart=` command lines and
//! environment (`Environment=`, then the `EnvironmentFile=`s an operator wrote) start the
//! installed coordinator (TLS, tokens) against a throwaway PostgreSQL and one CPU worker
//! (`segtrain-worker@cpu`). A tiny job trains to SUCCEEDED; a long one goes through a
//! coordinator restart (its trainer keeps training) and a worker drain (SIGTERM, as
//! `systemctl stop` with `KillMode=mixed` sends it: the trainer checkpoints), resumes from that
//! checkpoint when the worker is back, and is canceled; then tokens and certificates are
//! rotated as docs/operations.md says.
//!
//! No systemd runs here: the test reads the units and does what systemd would do with them, for
//! the subset of unit syntax they use (it fails on anything it does not understand).

use segtrain_proto::client::{self as conn, BearerToken, ClientTls};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{metric_points, wait_until_serving};
use segtrain_tests::daemon::{alive, children_of};
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::wait::poll_until;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The default install prefix, which the units name.
const PREFIX: &str = "/opt/segtrain";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// Where `cargo build --workspace --bins` put the binaries this test runs next to.
fn build_dir() -> PathBuf {
    binaries::path("segtrain-worker")
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf()
}

/// Commands that change a live system. The scripts must never run them in these tests (DESTDIR,
/// --dry-run): each is a stand-in on PATH that records its call and fails.
const GUARDED: [&str; 15] = [
    "useradd",
    "userdel",
    "groupadd",
    "systemctl",
    "psql",
    "createdb",
    "createuser",
    "runuser",
    "ldconfig",
    "apt-get",
    "chown",
    "chgrp",
    "sudo",
    "gcloud",
    "gsutil",
];

/// A directory of guard scripts for [`GUARDED`], and the log they write.
struct Guards {
    dir: tempfile::TempDir,
}

impl Guards {
    fn new() -> Guards {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("calls.log");
        for name in GUARDED {
            let p = dir.path().join(name);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexit 1\n",
                    log.display()
                ),
            )
            .expect("write guard");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Guards { dir }
    }

    /// PATH with the guards first.
    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// The guarded commands that were called (must be none).
    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls.log")).unwrap_or_default()
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// --- (a) GCP provisioning ------------------------------------------------------------------------

/// Splits one line of shell-quoted words (bare, '…', "…", backslash escapes).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => cur.extend(chars.next()),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.extend(chars.next());
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// One printed gcloud command.
#[derive(Debug)]
struct Gcloud {
    /// The words before the first flag after `gcloud`, e.g. `compute instances create NAME`.
    verb: Vec<String>,
    /// `--flag=value` (or `--flag` with an empty value); flags may repeat.
    flags: Vec<(String, String)>,
}

impl Gcloud {
    fn parse(words: &[String]) -> Gcloud {
        assert_eq!(
            words.first().map(String::as_str),
            Some("gcloud"),
            "{words:?}"
        );
        let mut verb = Vec::new();
        let mut flags = Vec::new();
        for w in &words[1..] {
            match w.strip_prefix("--") {
                Some(f) => {
                    let (k, v) = f.split_once('=').unwrap_or((f, ""));
                    flags.push((k.to_string(), v.to_string()));
                }
                None => verb.push(w.clone()),
            }
        }
        Gcloud { verb, flags }
    }

    fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn is(&self, verb: &[&str]) -> bool {
        self.verb.len() >= verb.len() && self.verb.iter().zip(verb).all(|(a, b)| a == b)
    }

    /// The instance metadata as key → value.
    fn metadata(&self) -> BTreeMap<String, String> {
        self.flag("metadata")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// A release SHA-256 to pin in the dry runs.
const SHA: &str = "9f2c1e7a54b0d3c8e6f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";

fn gcp_dry_run(script: &str, args: &[&str]) -> (Vec<Gcloud>, Guards) {
    let guards = Guards::new();
    let out = Command::new(repo().join("deploy/gcp").join(script))
        .args(args)
        .arg("--dry-run")
        .env("PATH", guards.path())
        .output()
        .expect("run the GCP script");
    assert!(
        out.status.success(),
        "{script} --dry-run failed: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let cmds = stdout
        .lines()
        .map(|l| Gcloud::parse(&shell_words(l)))
        .collect();
    (cmds, guards)
}

#[test]
fn gcp_dry_run_prints_every_gcloud_command_with_the_required_flags() {
    let (cmds, guards) = gcp_dry_run(
        "create-cluster.sh",
        &[
            "--project",
            "seg-proj",
            "--zone",
            "us-central1-a",
            "--bucket",
            "gs://seg-ckpts",
            "--create-bucket",
            "--workers",
            "2",
            "--worker-machine-type=a3-highgpu-8g",
            "--gpu-type",
            "nvidia-h100-80gb",
            "--gpus-per-worker",
            "8",
            "--admin-cidr",
            "203.0.113.0/24",
            "--collective-timeout",
            "900",
            "--release-sha256",
            SHA,
        ],
    );
    assert_eq!(guards.calls(), "", "a dry run must not run gcloud");
    for c in &cmds {
        assert_eq!(c.flag("project"), Some("seg-proj"), "{c:?}");
    }
    let index = |verb: &[&str]| {
        cmds.iter()
            .position(|c| c.is(verb))
            .unwrap_or_else(|| panic!("no `gcloud {}` in {cmds:#?}", verb.join(" ")))
    };
    let find = |verb: &[&str]| &cmds[index(verb)];

    let apis = find(&["services", "enable"]);
    for api in [
        "compute.googleapis.com",
        "storage.googleapis.com",
        "iam.googleapis.com",
    ] {
        assert!(apis.verb.iter().any(|v| v == api), "{apis:?}");
    }
    // One service account per side, each with only what it needs on the bucket.
    let coordinator_sa = "segtrain-coordinator@seg-proj.iam.gserviceaccount.com";
    let worker_sa = "segtrain-worker@seg-proj.iam.gserviceaccount.com";
    let sa_create = index(&["iam", "service-accounts", "create", "segtrain-worker"]);
    index(&["iam", "service-accounts", "create", "segtrain-coordinator"]);
    let bucket = find(&["storage", "buckets", "create", "gs://seg-ckpts"]);
    assert_eq!(bucket.flag("location"), Some("us-central1"));
    let bindings: Vec<(usize, &Gcloud)> = cmds
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.is(&[
                "storage",
                "buckets",
                "add-iam-policy-binding",
                "gs://seg-ckpts",
            ])
        })
        .collect();
    let binding_at = bindings.last().map(|(i, _)| *i).expect("bindings");
    let grants = |sa: &str| -> Vec<(String, String)> {
        let member = format!("serviceAccount:{sa}");
        bindings
            .iter()
            .filter(|(_, b)| b.flag("member") == Some(member.as_str()))
            .map(|(_, b)| {
                let cond = b.flag("condition").unwrap_or_default().to_string();
                (b.flag("role").unwrap_or_default().to_string(), cond)
            })
            .collect()
    };
    let objects =
        |p: &str| format!("resource.name.startsWith(\"projects/_/buckets/seg-ckpts/objects/{p}\")");
    let worker = grants(worker_sa);
    // Names: everyone (listing a job's checkpoints); objects: by prefix only.
    assert!(
        worker
            .iter()
            .any(|(r, c)| r == "roles/storage.legacyBucketReader" && c.is_empty()),
        "{worker:?}"
    );
    let writes: Vec<&(String, String)> = worker
        .iter()
        .filter(|(r, _)| {
            r != "roles/storage.legacyBucketReader" && r != "roles/storage.objectViewer"
        })
        .collect();
    assert_eq!(
        writes.len(),
        1,
        "the workers write in one place: {worker:?}"
    );
    assert_eq!(writes[0].0, "roles/storage.objectUser");
    assert!(
        writes[0].1.contains(&objects("segtrain/checkpoints/")) && !writes[0].1.contains("release"),
        "{worker:?}"
    );
    let reads = worker
        .iter()
        .find(|(r, _)| r == "roles/storage.objectViewer")
        .expect("the workers read the release");
    assert!(
        reads.1.contains(&objects("segtrain/release/"))
            && reads.1.contains(&objects("segtrain/bootstrap/"))
    );
    let coordinator = grants(coordinator_sa);
    assert!(
        coordinator
            .iter()
            .all(|(r, c)| r == "roles/storage.legacyBucketReader" || !c.is_empty()),
        "{coordinator:?}"
    );
    assert!(coordinator
        .iter()
        .any(|(r, c)| r == "roles/storage.objectAdmin"
            && c.contains(&objects("segtrain/bootstrap/"))));
    // Nobody here may write a release: the operator's account uploads it.
    for (r, c) in coordinator.iter().chain(&worker) {
        assert!(
            !(c.contains("segtrain/release/") && r != "roles/storage.objectViewer"),
            "{r} on the release: {c}"
        );
    }
    assert!(
        sa_create < bindings[0].0,
        "the account exists before its binding"
    );

    let grpc = find(&["compute", "firewall-rules", "create", "segtrain-grpc"]);
    assert_eq!(grpc.flag("rules"), Some("tcp:50051"));
    assert_eq!(grpc.flag("direction"), Some("INGRESS"));
    assert_eq!(grpc.flag("action"), Some("ALLOW"));
    assert_eq!(grpc.flag("target-tags"), Some("segtrain-coordinator"));
    assert_eq!(grpc.flag("source-tags"), Some("segtrain-worker"));
    assert_eq!(grpc.flag("source-ranges"), Some("203.0.113.0/24"));
    assert_eq!(grpc.flag("network"), Some("default"));
    let nccl = find(&["compute", "firewall-rules", "create", "segtrain-nccl"]);
    let rules: Vec<&str> = nccl.flag("rules").unwrap_or_default().split(',').collect();
    assert!(
        rules.contains(&"tcp"),
        "all TCP ports between workers: {rules:?}"
    );
    assert_eq!(nccl.flag("target-tags"), Some("segtrain-worker"));
    assert_eq!(nccl.flag("source-tags"), Some("segtrain-worker"));
    assert_eq!(nccl.flag("source-ranges"), None, "internal only: {nccl:?}");

    let startup = |c: &Gcloud| -> PathBuf {
        let v = c.flag("metadata-from-file").unwrap_or_default();
        let path = v
            .strip_prefix("startup-script=")
            .unwrap_or_else(|| panic!("no startup-script in {c:?}"));
        let p = PathBuf::from(path);
        assert!(p.is_file(), "startup script {path} does not exist");
        p
    };
    let coord_at = index(&["compute", "instances", "create", "segtrain-coordinator"]);
    let coord = &cmds[coord_at];
    assert_eq!(coord.flag("zone"), Some("us-central1-a"));
    assert_eq!(coord.flag("service-account"), Some(coordinator_sa));
    assert_eq!(coord.flag("scopes"), Some("cloud-platform"));
    assert_eq!(coord.flag("tags"), Some("segtrain-coordinator"));
    assert!(coord.flag("machine-type").is_some());
    assert_eq!(
        startup(coord),
        repo().join("deploy/gcp/startup-coordinator.sh")
    );
    let md = coord.metadata();
    assert_eq!(
        md.get("segtrain-bucket").map(String::as_str),
        Some("seg-ckpts")
    );
    assert_eq!(
        md.get("segtrain-release").map(String::as_str),
        Some("gs://seg-ckpts/segtrain/release/segtrain.tar.gz")
    );
    assert_eq!(
        md.get("segtrain-release-sha256").map(String::as_str),
        Some(SHA)
    );

    let workers: Vec<(usize, &Gcloud)> = cmds
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is(&["compute", "instances", "create"]))
        .filter(|(_, c)| {
            c.verb
                .get(3)
                .is_some_and(|n| n.starts_with("segtrain-worker-"))
        })
        .collect();
    assert_eq!(
        workers
            .iter()
            .map(|(_, c)| c.verb[3].as_str())
            .collect::<Vec<_>>(),
        ["segtrain-worker-0", "segtrain-worker-1"]
    );
    for (at, w) in &workers {
        assert!(
            *at > binding_at && *at > sa_create,
            "VMs after their account"
        );
        assert_eq!(w.flag("zone"), Some("us-central1-a"));
        assert_eq!(w.flag("machine-type"), Some("a3-highgpu-8g"));
        assert_eq!(w.flag("accelerator"), Some("type=nvidia-h100-80gb,count=8"));
        assert_eq!(w.flag("maintenance-policy"), Some("TERMINATE"));
        assert_eq!(w.flag("image-family"), Some("debian-12"));
        assert_eq!(w.flag("image-project"), Some("debian-cloud"));
        assert_eq!(w.flag("service-account"), Some(worker_sa));
        assert_eq!(w.flag("scopes"), Some("cloud-platform"));
        assert_eq!(w.flag("tags"), Some("segtrain-worker"));
        assert!(
            w.flag("network-interface")
                .is_some_and(|n| n.contains("nic-type=GVNIC")),
            "{w:?}"
        );
        assert_eq!(startup(w), repo().join("deploy/gcp/startup-worker.sh"));
        let md = w.metadata();
        let get = |k: &str| md.get(k).map(String::as_str);
        assert_eq!(
            get("segtrain-coordinator"),
            Some("segtrain-coordinator:50051")
        );
        assert_eq!(get("segtrain-bucket"), Some("seg-ckpts"));
        assert_eq!(get("segtrain-driver-branch"), Some("580"));
        assert_eq!(get("segtrain-collective-timeout"), Some("900"));
        assert_eq!(get("segtrain-gpus"), Some("8"));
        assert_eq!(get("segtrain-release-sha256"), Some(SHA));
    }
    // Firewall rules exist before any VM.
    let last_rule = cmds
        .iter()
        .rposition(|c| c.is(&["compute", "firewall-rules", "create"]))
        .expect("firewall rules");
    assert!(last_rule < coord_at && workers.iter().all(|(at, _)| *at > last_rule));
    assert_eq!(
        cmds.len(),
        15,
        "APIs, 2 accounts, bucket, 6 bindings, 2 rules, 3 VMs: {cmds:#?}"
    );

    // Another GPU type and count; Spot workers.
    let (cmds, _) = gcp_dry_run(
        "create-cluster.sh",
        &[
            "--project=p2",
            "--zone=europe-west4-b",
            "--bucket=b2",
            "--worker-machine-type=g2-standard-48",
            "--gpu-type=nvidia-l4",
            "--gpus-per-worker=4",
            "--spot",
            "--name=seg2",
            "--release-sha256",
            SHA,
        ],
    );
    let w = cmds
        .iter()
        .find(|c| c.is(&["compute", "instances", "create", "seg2-worker-0"]))
        .expect("one worker");
    assert_eq!(w.flag("machine-type"), Some("g2-standard-48"));
    assert_eq!(w.flag("accelerator"), Some("type=nvidia-l4,count=4"));
    assert_eq!(w.flag("provisioning-model"), Some("SPOT"));
    assert!(
        !cmds.iter().any(|c| c.is(&["storage", "buckets", "create"])),
        "no bucket without --create-bucket"
    );

    // The teardown and the release upload print theirs too.
    let (cmds, guards) = gcp_dry_run(
        "delete-cluster.sh",
        &[
            "--project",
            "p",
            "--zone",
            "us-central1-a",
            "--bucket",
            "b",
            "--workers",
            "2",
        ],
    );
    assert_eq!(guards.calls(), "");
    let del = cmds
        .iter()
        .find(|c| c.is(&["compute", "instances", "delete"]))
        .expect("instances delete");
    assert_eq!(
        del.verb[3..],
        [
            "segtrain-worker-0",
            "segtrain-worker-1",
            "segtrain-coordinator"
        ]
    );
    assert!(cmds.iter().any(|c| c.is(&[
        "compute",
        "firewall-rules",
        "delete",
        "segtrain-grpc",
        "segtrain-nccl"
    ])));
    for side in ["coordinator", "worker"] {
        let sa = format!("segtrain-{side}@p.iam.gserviceaccount.com");
        assert!(cmds
            .iter()
            .any(|c| c.is(&["iam", "service-accounts", "delete", sa.as_str()])));
    }
    let (cmds, _) = gcp_dry_run("upload-release.sh", &["--bucket", "gs://b"]);
    assert!(
        cmds.len() == 1 && cmds[0].is(&["storage", "cp"]),
        "{cmds:?}"
    );
    assert_eq!(cmds[0].verb[3], "gs://b/segtrain/release/segtrain.tar.gz");

    // Bad flags are refused before anything is printed, naming the flag.
    for (script, bad, says) in [
        (
            "create-cluster.sh",
            "--zone us-central1-a --bucket b",
            "--project is required",
        ),
        (
            "create-cluster.sh",
            "--project p --zone us-central1-a --bucket b",
            "--release-sha256 is required",
        ),
        (
            "create-cluster.sh",
            "--project p --zone us-central1-a --bucket b --release-sha256 abc",
            "--release-sha256: 64 lower-case hex digits",
        ),
        (
            "create-cluster.sh",
            "--project p --zone us-central1-a --bucket b --workers 0 --release-sha256 0000000000000000000000000000000000000000000000000000000000000000",
            "--workers: 1..64, got 0",
        ),
        (
            "create-cluster.sh",
            "--project p --zone nowhere --bucket b --release-sha256 0000000000000000000000000000000000000000000000000000000000000000",
            "--zone: a zone such as",
        ),
        (
            "create-cluster.sh",
            "--project p --zone us-central1-a --bucket b --release-sha256 0000000000000000000000000000000000000000000000000000000000000000 --bogus",
            "unknown argument --bogus",
        ),
        ("create-cluster.sh", "--project", "--project needs a value"),
        (
            "delete-cluster.sh",
            "--project p --zone=",
            "--zone needs a value",
        ),
        // Only the scripts that use a zone take one.
        (
            "upload-release.sh",
            "--bucket b --zone z",
            "unknown argument --zone",
        ),
    ] {
        let out = Command::new(repo().join("deploy/gcp").join(script))
            .args(bad.split(' '))
            .arg("--dry-run")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{script} {bad}: accepted");
        assert!(out.stdout.is_empty(), "{script} {bad}: printed commands");
        assert!(stderr.contains(says), "{script} {bad}: said {stderr:?}");
    }
}

#[test]
fn gcp_scripts_help_is_their_header_comment_and_nothing_else() {
    for script in [
        "create-cluster.sh",
        "delete-cluster.sh",
        "upload-release.sh",
    ] {
        let path = repo().join("deploy/gcp").join(script);
        let text = std::fs::read_to_string(&path).expect("script");
        let header: String = text
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.strip_prefix("# ").unwrap_or(&l[1..]).to_string() + "\n")
            .collect();
        let out = Command::new(&path).arg("--help").output().expect("run");
        assert!(out.status.success(), "{script} --help failed");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            header,
            "{script} --help"
        );
    }
}

/// A VM's startup script run here, with the metadata server and `gcloud storage cp` played by
/// stand-ins (the release is `tarball`, its pinned SHA-256 `pin`) and everything that changes a
/// system guarded: its output and the guarded calls it made.
fn startup(script: &str, tarball: &Path, pin: &str) -> (Output, String) {
    let guards = Guards::new();
    let bin = guards.dir.path();
    let metadata = [
        ("segtrain-bucket", "b".to_string()),
        (
            "segtrain-release",
            "gs://b/segtrain/release/segtrain.tar.gz".to_string(),
        ),
        ("segtrain-release-sha256", pin.to_string()),
        (
            "segtrain-coordinator",
            "segtrain-coordinator:50051".to_string(),
        ),
    ];
    let cases: String = metadata
        .iter()
        .map(|(k, v)| format!("  */{k}) echo '{v}' ;;\n"))
        .collect();
    let stand_ins = [
        // curl -fsS -H ... URL: the metadata server.
        (
            "curl",
            format!(
                "#!/bin/sh\nfor a; do url=$a; done\ncase $url in\n{cases}  *) exit 22 ;;\nesac\n"
            ),
        ),
        // gcloud storage cp SRC DST: the release from the bucket.
        (
            "gcloud",
            format!(
                "#!/bin/sh\n[ \"$1 $2\" = 'storage cp' ] || exit 1\ncp '{}' \"$4\"\n",
                tarball.display()
            ),
        ),
    ];
    for (name, body) in stand_ins {
        let p = bin.join(name);
        std::fs::write(&p, body).expect("stand-in");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let cache = tempfile::tempdir().expect("cache");
    let out = Command::new("bash")
        .arg(repo().join("deploy/gcp").join(script))
        .env("PATH", guards.path())
        .env("SEGTRAIN_STARTUP_CACHE", cache.path())
        .output()
        .expect("run the startup script");
    (out, guards.calls())
}

#[test]
fn gcp_startup_scripts_install_nothing_but_the_pinned_release() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let tarball = tmp.path().join("segtrain.tar.gz");
    std::fs::write(&tarball, b"a release someone replaced in the bucket").expect("tarball");
    let actual = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(std::fs::read(&tarball).expect("read"));
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    for script in ["startup-worker.sh", "startup-coordinator.sh"] {
        // Another tarball than the pinned one: nothing runs as root past the check.
        let (out, calls) = startup(script, &tarball, SHA);
        let text = text(&out);
        assert!(!out.status.success(), "{script}: {text}");
        assert!(
            text.contains(&format!("SHA-256 is {actual}, not the pinned {SHA}"))
                && text.contains("not installing it"),
            "{script}: {text}"
        );
        assert_eq!(calls, "", "{script} went on: {text}");
        // The pinned one passes the check (and the script goes on to its next step).
        let (out, _) = startup(script, &tarball, &actual);
        let text = self::text(&out);
        assert!(text.contains("release verified"), "{script}: {text}");
    }
}

// --- (b) install.sh ------------------------------------------------------------------------------

/// Runs deploy/install.sh with DESTDIR and the guards on PATH.
fn install(destdir: &Path, guards: &Guards, args: &[&str]) -> Output {
    let home = destdir.with_extension("home");
    std::fs::create_dir_all(&home).expect("home");
    let out = Command::new("bash")
        .arg(repo().join("deploy/install.sh"))
        .args(args)
        .env("DESTDIR", destdir)
        .env("PATH", guards.path())
        .env("HOME", &home)
        .env_remove("SEGTRAIN_PREFIX")
        .env_remove("SEGTRAIN_BUILD_DIR")
        .env_remove("SEGTRAIN_TORCH_DIR")
        .output()
        .expect("run install.sh");
    assert_eq!(
        guards.calls(),
        "",
        "install.sh ran live-system commands under DESTDIR"
    );
    out
}

fn install_ok(destdir: &Path, guards: &Guards, args: &[&str]) -> String {
    let out = install(destdir, guards, args);
    assert!(out.status.success(), "install.sh {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn install_all(destdir: &Path, guards: &Guards) -> String {
    let build = build_dir();
    let build = build.to_string_lossy();
    install_ok(
        destdir,
        guards,
        &["--role", "all", "--build-dir", &build, "--link"],
    )
}

/// Every file and link under `root`: relative path → (inode, size, mtime, mode).
fn tree(root: &Path) -> BTreeMap<PathBuf, (u64, u64, i64, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, u64, i64, u32)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
                out.insert(rel, (m.ino(), m.size(), m.mtime(), m.mode()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Live paths install.sh would write without DESTDIR: none may appear because of a test.
const LIVE_PATHS: [&str; 6] = [
    "/opt/segtrain",
    "/etc/segtrain",
    "/etc/systemd/system/segtrain-coordinator.service",
    "/etc/systemd/system/segtrain-worker@.service",
    "/usr/local/bin/segtrain",
    "/var/lib/segtrain",
];

#[test]
fn install_into_destdir_is_complete_idempotent_and_uninstallable() {
    let live_before: Vec<bool> = LIVE_PATHS.iter().map(|p| Path::new(p).exists()).collect();
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("root");
    let guards = Guards::new();
    let out = install_all(&root, &guards);
    assert!(out.contains("done: all in /opt/segtrain"), "{out}");

    // Binaries, executable.
    for b in ["segtrain", "segtrain-coordinator", "segtrain-worker"] {
        let p = root.join("opt/segtrain/bin").join(b);
        let mode = std::fs::metadata(&p).expect(b).permissions().mode();
        assert!(
            mode & 0o111 == 0o111,
            "{} not executable ({mode:o})",
            p.display()
        );
    }
    // The torch runtime: libtorch and the NVIDIA libraries in the wheel's layout, no Python.
    let lib = root.join("opt/segtrain/lib");
    for l in [
        "torch/lib/libtorch_cpu.so",
        "torch/lib/libtorch_cuda.so",
        "torch/lib/libc10.so",
        "torch/lib/libtorch.so",
        "nvidia/nccl/lib/libnccl.so.2",
        "nvidia/cudnn/lib/libcudnn.so.9",
    ] {
        assert!(lib.join(l).is_file(), "{l} missing");
    }
    assert!(!lib.join("torch/lib/libtorch_python.so").exists());
    // Units, the GPU starter, configuration skeletons (0640), commands on PATH, the guide.
    let units = root.join("etc/systemd/system");
    for u in [
        "segtrain-coordinator.service",
        "segtrain-worker@.service",
        "segtrain-workers.target",
        "segtrain-worker-gpus.service",
    ] {
        let body = std::fs::read_to_string(units.join(u)).unwrap_or_else(|_| panic!("{u}"));
        assert!(body.contains("[Unit]"), "{u}");
    }
    let starter = root.join("opt/segtrain/libexec/segtrain-workers-enable");
    assert!(
        std::fs::metadata(&starter)
            .expect("starter")
            .permissions()
            .mode()
            & 0o111
            != 0
    );
    for c in ["coordinator.env", "worker.env"] {
        let p = root.join("etc/segtrain").join(c);
        let mode = std::fs::metadata(&p).expect(c).permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{c}");
    }
    let wrapper =
        std::fs::read_to_string(root.join("usr/local/bin/segtrain-worker")).expect("wrapper");
    assert!(
        wrapper.contains("LD_LIBRARY_PATH=/opt/segtrain/lib/torch/lib"),
        "{wrapper}"
    );
    assert_eq!(
        std::fs::read_link(root.join("usr/local/bin/segtrain")).expect("link"),
        Path::new("/opt/segtrain/bin/segtrain")
    );
    assert!(root
        .join("opt/segtrain/share/doc/segtrain/operations.md")
        .is_file());

    // Every SEGTRAIN_* variable the skeletons mention is one the binaries read.
    let help = |args: &[&str]| {
        let bin = if args[0] == "coordinator" {
            "segtrain-coordinator"
        } else {
            "segtrain-worker"
        };
        let out = Command::new(root.join("opt/segtrain/bin").join(bin))
            .args(&args[1..])
            .arg("--help")
            .output()
            .expect("--help");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coordinator_help = help(&["coordinator"]);
    let worker_help = help(&["worker", "daemon"]) + &help(&["worker", "train"]);
    for (file, known) in [
        ("coordinator.env", &coordinator_help),
        ("worker.env", &worker_help),
    ] {
        let body = std::fs::read_to_string(root.join("etc/segtrain").join(file)).expect(file);
        for line in body.lines() {
            let l = line.trim_start_matches('#');
            let Some((key, _)) = l.split_once('=') else {
                continue;
            };
            if !key.starts_with("SEGTRAIN_") || key.contains(' ') {
                continue;
            }
            // SEGTRAIN_GPUS is read by segtrain-workers-enable, not a binary.
            if key == "SEGTRAIN_GPUS" {
                continue;
            }
            assert!(
                known.contains(&format!("[env: {key}=")),
                "{file} names {key}, which no flag reads"
            );
        }
    }

    // The per-GPU starter: one instance per GPU `nvidia-smi -L` lists, or SEGTRAIN_GPUS.
    let fake = tmp.path().join("fake-bin");
    std::fs::create_dir_all(&fake).expect("fake bin");
    std::fs::write(
        fake.join("nvidia-smi"),
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-b)'\n",
    )
    .expect("fake nvidia-smi");
    std::fs::set_permissions(
        fake.join("nvidia-smi"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let starter_run = |gpus: Option<&str>| {
        let mut cmd = Command::new(&starter);
        cmd.arg("--dry-run")
            .env("PATH", format!("{}:{}", fake.display(), guards.path()))
            .env_remove("SEGTRAIN_GPUS");
        if let Some(g) = gpus {
            cmd.env("SEGTRAIN_GPUS", g);
        }
        let out = cmd.output().expect("segtrain-workers-enable");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        starter_run(None),
        "systemctl start --no-block segtrain-worker@0.service segtrain-worker@1.service"
    );
    assert_eq!(
        starter_run(Some("cpu")),
        "systemctl start --no-block segtrain-worker@cpu.service"
    );
    assert_eq!(guards.calls(), "");

    // Idempotent: a second run changes no file.
    let before = tree(&root);
    let out = install_all(&root, &guards);
    assert!(
        out.contains("kept /etc/segtrain/coordinator.env (exists)"),
        "{out}"
    );
    assert_eq!(tree(&root), before, "the second run changed files");

    // Configuration is never overwritten.
    let worker_env = root.join("etc/segtrain/worker.env");
    let edited =
        std::fs::read_to_string(&worker_env).expect("worker.env") + "SEGTRAIN_HOST=edited\n";
    std::fs::write(&worker_env, &edited).expect("edit");
    install_all(&root, &guards);
    assert_eq!(
        std::fs::read_to_string(&worker_env).expect("worker.env"),
        edited
    );

    // Another prefix is written into the units.
    let other = tmp.path().join("other");
    let build = build_dir();
    install_ok(
        &other,
        &guards,
        &[
            "--role",
            "worker",
            "--prefix",
            "/usr/local/segtrain",
            "--build-dir",
            &build.to_string_lossy(),
            "--link",
        ],
    );
    let unit = std::fs::read_to_string(other.join("etc/systemd/system/segtrain-worker@.service"))
        .expect("unit");
    assert!(
        unit.contains("ExecStart=/usr/local/segtrain/bin/segtrain-worker daemon --gpu %i"),
        "{unit}"
    );
    assert!(unit.contains("LD_LIBRARY_PATH=/usr/local/segtrain/lib/torch/lib"));
    assert!(!unit.contains(PREFIX), "{unit}");
    assert!(
        !other
            .join("etc/systemd/system/segtrain-coordinator.service")
            .exists(),
        "worker role only"
    );
    assert!(!other
        .join("usr/local/segtrain/bin/segtrain-coordinator")
        .exists());

    // --uninstall removes what it installed and keeps the edited configuration; --purge the rest.
    let out = install_ok(&root, &guards, &["--uninstall"]);
    assert!(out.contains("kept /etc/segtrain/worker.env"), "{out}");
    let left: Vec<PathBuf> = tree(&root).into_keys().collect();
    assert_eq!(
        left,
        [PathBuf::from("etc/segtrain/worker.env")],
        "left after --uninstall"
    );
    install_ok(&root, &guards, &["--uninstall", "--purge"]);
    assert!(
        tree(&root).is_empty(),
        "left after --purge: {:?}",
        tree(&root)
    );
    // The hard links' sources are untouched.
    assert!(binaries::path("segtrain-worker").is_file());
    assert!(repo().join(".torch/lib/libtorch_cpu.so").exists());
    install_ok(
        &other,
        &guards,
        &["--uninstall", "--prefix", "/usr/local/segtrain"],
    );
    assert!(tree(&other).is_empty(), "left: {:?}", tree(&other));

    // Nothing outside DESTDIR was created.
    for (p, was) in LIVE_PATHS.iter().zip(live_before) {
        assert_eq!(Path::new(p).exists(), was, "{p} changed outside DESTDIR");
    }
    // A bad flag is refused, naming it, before anything is done.
    let out = install(&root, &guards, &["--role", "nonsense"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--role"));
}

// --- (c) the units, run as systemd would ---------------------------------------------------------

/// What the test needs of a unit file: its [Service] settings, in order.
struct Unit {
    settings: Vec<(String, String)>,
}

impl Unit {
    fn read(path: &Path) -> Unit {
        let body =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut section = String::new();
        let mut settings = Vec::new();
        let mut pending = String::new();
        for raw in body.lines() {
            let line = raw.trim();
            if pending.is_empty()
                && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
            {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            let line = std::mem::take(&mut pending) + line;
            if line.starts_with('[') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_string();
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not a setting: {line}", path.display()));
            if section == "Service" {
                settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Unit { settings }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key).as_slice() {
            [v] => v,
            other => panic!("expected one {key}=, got {other:?}"),
        }
    }
}

/// Unit specifiers: %i (the instance) and %%; anything else is beyond this test.
fn specifiers(s: &str, instance: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('i') => out.push_str(instance),
            Some('%') => out.push('%'),
            other => panic!("specifier %{other:?} in {s:?} is not handled by this test"),
        }
    }
    out
}

/// An EnvironmentFile: KEY=VALUE lines, # and ; comments, optional quotes.
fn read_env_file(path: &Path) -> Vec<(String, String)> {
    let body = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not KEY=VALUE: {l}", path.display()));
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// Sets KEY=VALUE lines in an env file the way an operator edits it: an active line is replaced,
/// a commented-out default is uncommented, anything else appended; comments stay.
fn edit_env_file(path: &Path, set: &[(&str, String)]) {
    let body = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = body.lines().map(String::from).collect();
    for (k, v) in set {
        let active = format!("{k}=");
        let commented = format!("#{k}=");
        let at = lines
            .iter()
            .position(|l| l.starts_with(&active))
            .or_else(|| lines.iter().position(|l| l.starts_with(&commented)));
        let line = format!("{k}={v}");
        match at {
            Some(i) => lines[i] = line,
            None => lines.push(line),
        }
    }
    std::fs::write(path, lines.join("\n") + "\n").expect("write env file");
}

/// A unit's process as systemd starts it: ExecStart= split into words after specifiers, with
/// `$VAR`/`${VAR}` from the environment; the environment is Environment= then each
/// EnvironmentFile= in order (a leading `-` makes a missing file fine), over systemd's own
/// minimal one. Paths under the install prefix and /etc/segtrain are read from DESTDIR.
struct UnitCommand {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
}

impl UnitCommand {
    fn from_unit(unit: &Unit, instance: &str, root: &Path, home: &Path) -> UnitCommand {
        let rooted = |v: &str| -> String {
            v.split(':')
                .map(|part| {
                    if part.starts_with(PREFIX) {
                        format!("{}{part}", root.display())
                    } else {
                        part.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(":")
        };
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
        env.insert("HOME".to_string(), home.display().to_string());
        for e in unit.all("Environment") {
            for assignment in shell_words(&specifiers(e, instance)) {
                let (k, v) = assignment
                    .split_once('=')
                    .unwrap_or_else(|| panic!("Environment={e}: not KEY=VALUE"));
                env.insert(k.to_string(), rooted(v));
            }
        }
        for f in unit.all("EnvironmentFile") {
            let f = specifiers(f, instance);
            let (optional, f) = match f.strip_prefix('-') {
                Some(rest) => (true, rest.to_string()),
                None => (false, f),
            };
            let path = root.join(f.trim_start_matches('/'));
            if !path.exists() {
                assert!(optional, "EnvironmentFile={f} is required and missing");
                continue;
            }
            for (k, v) in read_env_file(&path) {
                env.insert(k, v);
            }
        }
        let exec = specifiers(unit.one("ExecStart"), instance);
        assert!(
            !exec.starts_with(['-', '@', '+', '!', ':']),
            "ExecStart prefixes are not handled by this test: {exec}"
        );
        let mut argv = Vec::new();
        for w in shell_words(&exec) {
            if let Some(name) = w.strip_prefix('$').filter(|n| !n.starts_with('{')) {
                // $VAR alone: split into words (systemd semantics).
                argv.extend(
                    env.get(name)
                        .map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
                        .unwrap_or_default(),
                );
                continue;
            }
            let mut word = w.clone();
            while let Some(start) = word.find("${") {
                let end = word[start..].find('}').expect("closing brace") + start;
                let value = env.get(&word[start + 2..end]).cloned().unwrap_or_default();
                word.replace_range(start..=end, &value);
            }
            argv.push(word);
        }
        argv[0] = rooted(&argv[0]);
        UnitCommand { argv, env }
    }

    fn spawn(&self, log: &Path) -> Child {
        let err = std::fs::File::create(log).expect("log file");
        Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", self.argv))
    }
}

/// Sends SIGTERM (what `systemctl stop` sends the main process) and waits at most `timeout`
/// (the unit's TimeoutStopSec) for the exit.
fn stop(child: &mut Child, timeout: Duration) -> ExitStatus {
    // SAFETY: signalling our own child by pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not stop within {timeout:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn seconds(v: &str) -> Duration {
    let n: u64 = v
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("a duration in seconds, got {v}"));
    Duration::from_secs(n)
}

fn terminal(s: pb::JobState) -> bool {
    matches!(
        s,
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Canceled
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_serving(url: &str, tls: &ClientTls, coordinator: &mut Running) {
    let timeout = Duration::from_secs(60);
    wait_until_serving(url, tls, &mut coordinator.child, &coordinator.log, timeout).await;
}

/// Runs an installed binary to completion with a unit's environment; its stdout.
fn run_installed(cmd: &UnitCommand, program: &str, args: &[&str]) -> String {
    let bin = Path::new(&cmd.argv[0])
        .parent()
        .expect("bin dir")
        .join(program);
    let out = Command::new(&bin)
        .args(args)
        .env_clear()
        .envs(&cmd.env)
        .output()
        .expect("run installed binary");
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_units_run_a_job_through_a_coordinator_restart_and_a_worker_drain() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("root");
    let guards = Guards::new();
    install_all(&root, &guards);
    let pg = TempPostgres::start().expect("PostgreSQL");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).expect("home");

    let coord_unit = Unit::read(&root.join("etc/systemd/system/segtrain-coordinator.service"));
    let worker_unit = Unit::read(&root.join("etc/systemd/system/segtrain-worker@.service"));
    // Stopping a worker unit stops its trainers through the daemon, within TimeoutStopSec.
    assert_eq!(worker_unit.one("KillMode"), "mixed");
    assert_eq!(worker_unit.one("Restart"), "always");
    assert_eq!(coord_unit.one("Restart"), "always");
    // Different users: the daemons run code a job's owner brought (docs/security.md).
    assert_eq!(worker_unit.one("User"), "segtrain-worker");
    assert_eq!(coord_unit.one("User"), "segtrain");
    let worker_stop = seconds(worker_unit.one("TimeoutStopSec"));
    let grace = Duration::from_secs(20);
    assert!(
        worker_stop >= grace + Duration::from_secs(15),
        "TimeoutStopSec too short for the grace"
    );

    // The operator's part: certificates, tokens, the two environment files.
    let tls_dir = tmp.path().join("tls");
    let pre = UnitCommand::from_unit(&coord_unit, "", &root, &home);
    run_installed(
        &pre,
        "segtrain-coordinator",
        &["certs", "--out", &tls_dir.to_string_lossy()],
    );
    let token = |role: &str| -> PathBuf {
        let secret = run_installed(
            &pre,
            "segtrain-coordinator",
            &[
                "token",
                "create",
                "--database-url",
                &pg.url(),
                "--role",
                role,
                "--name",
                &format!("deploy-{role}"),
            ],
        );
        let p = tmp.path().join(format!("{role}.token"));
        std::fs::write(&p, secret).expect("token file");
        p
    };
    let worker_token = token("worker");
    let client_token = token("client");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let ca = tls_dir.join("ca.pem");
    let etc = root.join("etc/segtrain");
    edit_env_file(
        &etc.join("coordinator.env"),
        &[
            ("SEGTRAIN_LISTEN", format!("127.0.0.1:{port}")),
            ("SEGTRAIN_DATABASE_URL", pg.url()),
            (
                "SEGTRAIN_TLS_CERT",
                tls_dir.join("server.pem").display().to_string(),
            ),
            (
                "SEGTRAIN_TLS_KEY",
                tls_dir.join("server-key.pem").display().to_string(),
            ),
            ("SEGTRAIN_RESTART_BACKOFF_MS", "500".to_string()),
        ],
    );
    edit_env_file(
        &etc.join("worker.env"),
        &[
            ("SEGTRAIN_COORDINATOR", url.clone()),
            ("SEGTRAIN_CA", ca.display().to_string()),
            ("SEGTRAIN_TOKEN_FILE", worker_token.display().to_string()),
            ("SEGTRAIN_HOST", "deploy-test".to_string()),
            ("SEGTRAIN_GRACE_SECONDS", grace.as_secs().to_string()),
        ],
    );
    // This instance's own file: a CPU worker's work dir and thread count.
    let work = tmp.path().join("work");
    edit_env_file(
        &etc.join("worker-cpu.env"),
        &[
            ("SEGTRAIN_WORK_DIR", work.display().to_string()),
            ("SEGTRAIN_TORCH_THREADS", "2".to_string()),
        ],
    );

    let coord_cmd = UnitCommand::from_unit(&coord_unit, "", &root, &home);
    let worker_cmd = UnitCommand::from_unit(&worker_unit, "cpu", &root, &home);
    assert_eq!(
        coord_cmd.argv,
        [root
            .join("opt/segtrain/bin/segtrain-coordinator")
            .display()
            .to_string()]
    );
    assert_eq!(
        worker_cmd.argv[1..],
        ["daemon", "--gpu", "cpu"],
        "the template with instance cpu"
    );
    assert_eq!(
        worker_cmd.env["SEGTRAIN_WORK_DIR"],
        work.display().to_string(),
        "worker-cpu.env wins"
    );
    assert_eq!(worker_cmd.env["SEGTRAIN_LOG_FORMAT"], "json");
    let start_coordinator = |name: &str| Running {
        log: tmp.path().join(name),
        child: coord_cmd.spawn(&tmp.path().join(name)),
    };
    let start_worker = |name: &str| Running {
        log: tmp.path().join(name),
        child: worker_cmd.spawn(&tmp.path().join(name)),
    };
    let tls = ClientTls {
        ca: Some(ca.clone()),
        cert: None,
        key: None,
    };

    let mut coordinator = start_coordinator("coordinator-1.log");
    wait_serving(&url, &tls, &mut coordinator).await;
    let mut worker = start_worker("worker-1.log");

    // The worker runs on the installed torch runtime (LD_LIBRARY_PATH from the unit).
    let data = tmp.path().join("data");
    run_installed(
        &worker_cmd,
        "segtrain-worker",
        &[
            "synth-data",
            "--train",
            "8",
            "--val",
            "2",
            "--size",
            "64x64",
            "--out",
            &data.to_string_lossy(),
        ],
    );
    let maps =
        std::fs::read_to_string(format!("/proc/{}/maps", worker.child.id())).unwrap_or_default();
    let installed_torch = root.join("opt/segtrain/lib/torch/lib/libtorch_cpu.so");
    assert!(
        maps.contains(&installed_torch.display().to_string()),
        "the daemon did not load {}",
        installed_torch.display()
    );

    // The CLI as a user runs it: the client token, the CA.
    let cli = |token: &Path, ca: &Path, args: &[&str]| -> Output {
        let mut child = Command::new(root.join("opt/segtrain/bin/segtrain"))
            .args(args)
            .env("SEGTRAIN_COORDINATOR", &url)
            .env("SEGTRAIN_CA", ca)
            .env("SEGTRAIN_TOKEN_FILE", token)
            .env_remove("SEGTRAIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("segtrain");
        let deadline = Instant::now() + Duration::from_secs(300);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("segtrain {args:?} did not end within 300 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("segtrain output")
    };
    let ckpts = tmp.path().join("checkpoints");
    let submit = |name: &str, max_iters: u64| -> String {
        let (data, ckpts, iters) = (
            data.display().to_string(),
            ckpts.display().to_string(),
            max_iters.to_string(),
        );
        let out = cli(
            &client_token,
            &ca,
            &[
                "submit",
                "--json",
                "--name",
                name,
                "--dataset-root",
                &data,
                "--checkpoint-root",
                &ckpts,
                "--world-size",
                "1",
                "--batch-per-gpu",
                "1",
                "--crop-height",
                "64",
                "--crop-width",
                "64",
                "--max-iters",
                &iters,
                "--warmup-iters",
                "1",
                "--log-interval",
                "1",
                "--eval-interval",
                "0",
                "--checkpoint-interval",
                "0",
                "--eval-mode",
                "whole",
                "--loader-threads",
                "1",
            ],
        );
        assert!(out.status.success(), "submit: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("submit --json");
        v["job"]["id"].as_str().expect("job id").to_string()
    };

    // A tiny job to SUCCEEDED, watched live: `segtrain watch` exits 0 when the job succeeded.
    let tiny = submit("tiny", 6);
    let watched = cli(&client_token, &ca, &["watch", &tiny]);
    assert!(
        watched.status.success(),
        "watch: {}\nworker:\n{}",
        text(&watched),
        worker.log_text()
    );

    // A long job through a coordinator restart and a worker drain. (Long, so that it is still
    // training whatever the speed of this machine; it is canceled at the end.)
    let job_id = submit("deploy", 100_000);
    let channel = conn::connect_lazy(
        &url,
        &tls,
        BearerToken::new(
            std::fs::read_to_string(&client_token)
                .expect("token")
                .trim(),
            "test",
        )
        .expect("token"),
    )
    .expect("channel");
    let jobs = JobServiceClient::new(channel);
    let get = |mut jobs: JobServiceClient<conn::AuthChannel>, id: String| async move {
        jobs.get_job(pb::GetJobRequest { job_id: id })
            .await
            .map(|r| r.into_inner())
    };
    let wait_for =
        |what: &'static str, cond: Box<dyn Fn(&pb::Job) -> bool + Send>, logs: Vec<PathBuf>| {
            let jobs = jobs.clone();
            let id = job_id.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(300);
                loop {
                    if let Ok(j) = get(jobs.clone(), id.clone()).await {
                        if cond(&j) {
                            return j;
                        }
                        assert!(
                            !terminal(j.state()),
                            "job ended {:?} ({}) while waiting for {what}",
                            j.state(),
                            j.reason
                        );
                    }
                    if Instant::now() > deadline {
                        let logs: Vec<String> = logs
                            .iter()
                            .map(|l| {
                                format!(
                                    "{}:\n{}",
                                    l.display(),
                                    std::fs::read_to_string(l).unwrap_or_default()
                                )
                            })
                            .collect();
                        panic!("no {what} within 300 s\n{}", logs.join("\n"));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
    let logs = || {
        vec![
            tmp.path().join("coordinator-1.log"),
            tmp.path().join("worker-1.log"),
        ]
    };

    // Training: the trainer is the daemon's child.
    wait_for("iteration 2", Box::new(|j| j.iteration >= 2), logs()).await;
    let trainers = children_of(worker.child.id());
    assert_eq!(trainers.len(), 1, "one trainer: {trainers:?}");
    let trainer = trainers[0];

    // Restart the coordinator (systemctl restart: SIGTERM, start again): the trainer goes on.
    let status = stop(
        &mut coordinator.child,
        seconds(coord_unit.one("TimeoutStopSec")),
    );
    assert!(
        status.success(),
        "coordinator exit {status}:\n{}",
        coordinator.log_text()
    );
    drop(coordinator);
    let mut coordinator = start_coordinator("coordinator-2.log");
    wait_serving(&url, &tls, &mut coordinator).await;
    assert!(
        alive(trainer),
        "the trainer died with the coordinator\nworker:\n{}",
        worker.log_text()
    );
    let before = get(jobs.clone(), job_id.clone())
        .await
        .expect("job")
        .iteration;
    wait_for(
        "progress after the restart",
        Box::new(move |j| j.iteration > before),
        logs(),
    )
    .await;
    assert!(alive(trainer), "the trainer died");

    // Drain the worker (systemctl stop: SIGTERM to the daemon only): the trainer checkpoints
    // and exits, then the daemon, within TimeoutStopSec.
    let status = stop(&mut worker.child, worker_stop);
    assert!(
        status.success(),
        "worker exit {status}:\n{}",
        worker.log_text()
    );
    // A daemon past its drain deadline leaves its trainer to PDEATHSIG, which ends it in the
    // kernel's time, not the daemon's.
    segtrain_tests::wait::poll_until(
        Duration::from_secs(10),
        "the trainer ends with its daemon",
        || worker.log_text(),
        || async { !alive(trainer) },
    )
    .await;
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    let cps: Vec<(i64, String)> = sqlx::query_as(
        "SELECT iteration, state FROM checkpoints WHERE job_id = $1::uuid ORDER BY iteration",
    )
    .bind(&job_id)
    .fetch_all(&pool)
    .await
    .expect("checkpoints");
    let [(stopped_at, state)] = cps.as_slice() else {
        panic!(
            "expected the one checkpoint written on stop, got {cps:?}\nworker:\n{}",
            worker.log_text()
        );
    };
    let stopped_at = *stopped_at as u64;
    assert_eq!(state, "COMPLETE");
    assert!(stopped_at > before, "stop checkpoint at {stopped_at}");
    let job = get(jobs.clone(), job_id.clone()).await.expect("job");
    assert!(
        matches!(job.state(), pb::JobState::Restarting | pb::JobState::Queued),
        "a drained job waits for a worker: {:?} ({})",
        job.state(),
        job.reason
    );
    drop(worker);

    // The worker comes back (systemctl start): the job resumes from that checkpoint.
    let worker = start_worker("worker-2.log");
    let logs2 = vec![
        tmp.path().join("coordinator-2.log"),
        tmp.path().join("worker-2.log"),
    ];
    let resumed = wait_for(
        "training resumed from the drain's checkpoint",
        Box::new(move |j| {
            j.state() == pb::JobState::Running
                && j.resumed_from_iteration.is_some()
                && j.iteration > stopped_at + 2
        }),
        logs2,
    )
    .await;
    assert_eq!(
        resumed.resumed_from_iteration,
        Some(stopped_at),
        "{resumed:?}"
    );
    assert!(resumed.attempt >= 2, "{resumed:?}");

    // Cancel: the trainer stops gracefully and the job ends CANCELED.
    let canceled = cli(
        &client_token,
        &ca,
        &["cancel", &job_id, "--reason", "deploy test done"],
    );
    assert!(canceled.status.success(), "{}", text(&canceled));
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let j = get(jobs.clone(), job_id.clone()).await.expect("job");
        if terminal(j.state()) {
            break j;
        }
        assert!(Instant::now() < deadline, "not canceled: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.state(), pb::JobState::Canceled, "{done:?}");

    // Every iteration's loss once, across both attempts.
    let points = metric_points(&mut jobs.clone(), &job_id, &["loss"], 0).await;
    let iterations: Vec<u64> = points.iter().map(|p| p.iteration).collect();
    let last = iterations.last().copied().unwrap_or_default();
    assert!(last > stopped_at);
    assert_eq!(
        iterations,
        (1..=last).collect::<Vec<_>>(),
        "one loss per iteration"
    );

    // Logs are JSON lines (SEGTRAIN_LOG_FORMAT=json), as journald would store them, with the
    // job's id in the trainer events.
    for log in [coordinator.log_text(), worker.log_text()] {
        let first = log.lines().next().expect("a log line");
        let v: serde_json::Value =
            serde_json::from_str(first).unwrap_or_else(|_| panic!("not JSON: {first}"));
        assert!(v.get("level").is_some(), "{first}");
    }
    assert!(
        worker.log_text().lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["fields"]["job"].as_str() == Some(job_id.as_str()))
        }),
        "no worker log line with fields.job"
    );

    // Rotating tokens (docs/operations.md): an admin makes a new client token with the CLI and
    // revokes the old one, which is refused from then on.
    let admin_token = token("admin");
    let listed = cli(&admin_token, &ca, &["token", "list", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let old_id = listed
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "deploy-client"))
        .and_then(|t| t["id"].as_str())
        .expect("the client token is listed")
        .to_string();
    let created = cli(
        &admin_token,
        &ca,
        &[
            "token",
            "create",
            "--role",
            "client",
            "--name",
            "deploy-client-2",
        ],
    );
    assert!(created.status.success(), "{}", text(&created));
    let new_client_token = tmp.path().join("client-2.token");
    std::fs::write(&new_client_token, &created.stdout).expect("token file");
    let revoked = cli(&admin_token, &ca, &["token", "revoke", &old_id]);
    assert!(revoked.status.success(), "{}", text(&revoked));
    let refused = cli(&client_token, &ca, &["list"]);
    assert!(!refused.status.success(), "a revoked token still works");
    let ok = cli(&new_client_token, &ca, &["list"]);
    assert!(ok.status.success(), "{}", text(&ok));

    // Rotating certificates: a new CA and server certificate; workers and clients trust both CAs
    // (a bundle) before the coordinator switches, then the old CA is refused.
    let tls2 = tmp.path().join("tls2");
    run_installed(
        &pre,
        "segtrain-coordinator",
        &["certs", "--out", &tls2.to_string_lossy()],
    );
    let bundle = tmp.path().join("ca-bundle.pem");
    let both = std::fs::read_to_string(&ca).expect("ca")
        + &std::fs::read_to_string(tls2.join("ca.pem")).expect("ca2");
    std::fs::write(&bundle, both).expect("bundle");
    edit_env_file(
        &etc.join("worker.env"),
        &[("SEGTRAIN_CA", bundle.display().to_string())],
    );
    let mut worker = worker;
    let status = stop(&mut worker.child, worker_stop);
    assert!(status.success(), "worker exit {status}");
    drop(worker);
    let worker_cmd = UnitCommand::from_unit(&worker_unit, "cpu", &root, &home);
    let worker = Running {
        log: tmp.path().join("worker-3.log"),
        child: worker_cmd.spawn(&tmp.path().join("worker-3.log")),
    };
    edit_env_file(
        &etc.join("coordinator.env"),
        &[
            (
                "SEGTRAIN_TLS_CERT",
                tls2.join("server.pem").display().to_string(),
            ),
            (
                "SEGTRAIN_TLS_KEY",
                tls2.join("server-key.pem").display().to_string(),
            ),
        ],
    );
    let status = stop(
        &mut coordinator.child,
        seconds(coord_unit.one("TimeoutStopSec")),
    );
    assert!(status.success(), "coordinator exit {status}");
    drop(coordinator);
    let coord_cmd = UnitCommand::from_unit(&coord_unit, "", &root, &home);
    let mut coordinator = Running {
        log: tmp.path().join("coordinator-3.log"),
        child: coord_cmd.spawn(&tmp.path().join("coordinator-3.log")),
    };
    let new_tls = ClientTls {
        ca: Some(bundle.clone()),
        cert: None,
        key: None,
    };
    wait_serving(&url, &new_tls, &mut coordinator).await;
    assert!(
        conn::endpoint(&url, &tls)
            .expect("endpoint")
            .connect()
            .await
            .is_err(),
        "a client trusting only the old CA still connects"
    );
    // The worker reconnects through the new certificate: heartbeats after the switch.
    let (switched,): (String,) = sqlx::query_as("SELECT now()::text")
        .fetch_one(&pool)
        .await
        .expect("now");
    let reconnected = || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM workers WHERE host = 'deploy-test' AND last_heartbeat > $1::timestamptz",
        )
        .bind(&switched)
        .fetch_one(&pool)
        .await
        .expect("workers");
        n == 1
    };
    let what = "the worker to reconnect after the certificate switch";
    poll_until(
        Duration::from_secs(60),
        what,
        || worker.log_text(),
        reconnected,
    )
    .await;
    let workers = cli(&new_client_token, &bundle, &["workers", "--json"]);
    assert!(workers.status.success(), "{}", text(&workers));
    assert!(String::from_utf8_lossy(&workers.stdout).contains("deploy-test"));
    assert_eq!(guards.calls(), "");
}
