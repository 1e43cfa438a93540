//! The crate boundaries of ARCHITECTURE.md, checked on `cargo metadata`'s resolved graph: each
//! workspace crate's normal dependencies, transitively (build scripts and dev-dependencies are
//! not part of what a crate is made of), must not reach what the design keeps away from it.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// What each crate must not depend on, directly or through others, and why.
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "segtrain-trainer",
        &[
            "tonic",
            "sqlx",
            "axum",
            "segtrain-proto",
            "segtrain-daemon",
            "segtrain-coordinator",
        ],
        "the training core knows nothing of gRPC, HTTP serving or the database",
    ),
    (
        "segtrain-wire",
        &["tch", "torch-sys", "tonic", "sqlx", "segtrain-proto"],
        "the daemon-trainer contract links neither libtorch nor gRPC",
    ),
    (
        "segtrain-spec",
        &["tch", "torch-sys", "tonic", "sqlx", "segtrain-proto"],
        "the job spec is plain data every crate may use",
    ),
    (
        "segtrain-daemon",
        &["tch", "torch-sys", "sqlx", "segtrain-trainer"],
        "the daemon never runs tch: trainers are child processes",
    ),
    (
        "segtrain-coordinator",
        &["tch", "torch-sys", "segtrain-trainer", "segtrain-daemon"],
        "the coordinator service has no tch",
    ),
    (
        "segtrain-cli",
        &[
            "sqlx",
            "tch",
            "torch-sys",
            "segtrain-coordinator",
            "segtrain-trainer",
        ],
        "the CLI is a pure gRPC client: no database, no tch",
    ),
    (
        "segtrain-loadgen",
        &[
            "sqlx",
            "tch",
            "torch-sys",
            "segtrain-coordinator",
            "segtrain-daemon",
        ],
        "the load generator measures the service from outside, through its gRPC API only",
    ),
    (
        "segtrain-telemetry",
        &["tch", "sqlx", "tonic"],
        "logging and /metrics serve both services and depend on neither",
    ),
    (
        "segtrain-proto",
        &["tch", "sqlx"],
        "the API crate is shared by clients and the server",
    ),
];

/// Crates on the worker side that may not talk gRPC themselves: the daemon is the only
/// worker-side client (these may reach tonic only through `segtrain-daemon`).
const WORKER_SIDE: &[&str] = &["segtrain-worker", "segtrain-trainer", "segtrain-wire"];
const GRPC: &[&str] = &["tonic", "segtrain-proto"];

/// Package name by id, and each package's normal (non-dev, non-build) dependencies by id.
struct Graph {
    names: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
}

impl Graph {
    fn from_metadata(m: &Value) -> Graph {
        let names = m["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| {
                (
                    p["id"].as_str().expect("id").to_string(),
                    p["name"].as_str().expect("name").to_string(),
                )
            })
            .collect();
        let deps = m["resolve"]["nodes"]
            .as_array()
            .expect("resolve.nodes")
            .iter()
            .map(|n| {
                let normal = n["deps"]
                    .as_array()
                    .expect("deps")
                    .iter()
                    .filter(|d| {
                        d["dep_kinds"]
                            .as_array()
                            .expect("dep_kinds")
                            .iter()
                            .any(|k| k["kind"].is_null())
                    })
                    .map(|d| d["pkg"].as_str().expect("pkg").to_string())
                    .collect();
                (n["id"].as_str().expect("id").to_string(), normal)
            })
            .collect();
        Graph { names, deps }
    }

    fn id(&self, name: &str) -> Option<&String> {
        self.names
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(id, _)| id)
    }

    /// Every package `name` reaches through normal dependencies, each with one path to it.
    fn reach(&self, name: &str, through: Option<&str>) -> BTreeMap<String, Vec<String>> {
        let mut seen = BTreeMap::new();
        let Some(start) = self.id(name) else {
            return seen;
        };
        let mut stack = vec![(start.clone(), vec![name.to_string()])];
        let mut visited = BTreeSet::new();
        while let Some((id, path)) = stack.pop() {
            if !visited.insert(id.clone()) {
                continue;
            }
            for d in self.deps.get(&id).into_iter().flatten() {
                let dep_name = self.names[d].clone();
                if through == Some(dep_name.as_str()) {
                    continue;
                }
                let mut p = path.clone();
                p.push(dep_name.clone());
                seen.entry(dep_name).or_insert_with(|| p.clone());
                stack.push((d.clone(), p));
            }
        }
        seen
    }
}

/// Every broken rule, as "crate -> ... -> forbidden (why)".
fn violations(g: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    for (krate, forbidden, why) in RULES {
        let reach = g.reach(krate, None);
        for f in *forbidden {
            if let Some(path) = reach.get(*f) {
                out.push(format!("{} ({why})", path.join(" -> ")));
            }
        }
    }
    for krate in WORKER_SIDE {
        let reach = g.reach(krate, Some("segtrain-daemon"));
        for f in GRPC {
            if let Some(path) = reach.get(*f) {
                out.push(format!(
                    "{} (the daemon is the only worker-side gRPC client)",
                    path.join(" -> ")
                ));
            }
        }
    }
    out
}

/// The platform this test runs on (the project builds for Linux only).
const HOST: &str = if cfg!(target_arch = "aarch64") {
    "aarch64-unknown-linux-gnu"
} else {
    "x86_64-unknown-linux-gnu"
};

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "metadata",
        "--format-version",
        "1",
        "--offline",
        // This platform's graph only: the build fetched its crates, so no network is needed.
        "--filter-platform",
        HOST,
        "--manifest-path",
    ])
    .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"));
    let out = segtrain_tests::binaries::run_ok(&mut cmd, "cargo metadata");
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

#[test]
fn no_crate_depends_on_what_the_design_keeps_from_it() {
    let g = Graph::from_metadata(&metadata());
    for (krate, _, _) in RULES {
        assert!(g.id(krate).is_some(), "{krate} is not in the workspace");
    }
    let v = violations(&g);
    assert!(v.is_empty(), "forbidden dependencies:\n{}", v.join("\n"));
    // The split is real: the training core has tch, the daemon tonic, the coordinator sqlx.
    assert!(g.reach("segtrain-trainer", None).contains_key("tch"));
    assert!(g.reach("segtrain-daemon", None).contains_key("tonic"));
    assert!(g.reach("segtrain-coordinator", None).contains_key("sqlx"));
}

/// The check itself finds a forbidden edge, direct or transitive, and the daemon exemption
/// covers only paths through the daemon.
#[test]
fn a_forbidden_dependency_is_reported_with_its_path() {
    let pkg = |n: &str| serde_json::json!({"id": format!("{n} 0.1.0"), "name": n});
    let node = |n: &str, deps: &[&str]| {
        serde_json::json!({"id": format!("{n} 0.1.0"), "deps": deps.iter().map(|d| serde_json::json!({
            "pkg": format!("{d} 0.1.0"), "dep_kinds": [{"kind": null}]})).collect::<Vec<_>>()})
    };
    let names = [
        "segtrain-trainer",
        "segtrain-wire",
        "segtrain-daemon",
        "segtrain-worker",
        "helper",
        "tonic",
        "tch",
    ];
    let m = serde_json::json!({
        "packages": names.iter().map(|n| pkg(n)).collect::<Vec<_>>(),
        "resolve": {"nodes": [
            node("segtrain-trainer", &["helper", "tch"]),
            node("helper", &["tonic"]),
            node("segtrain-worker", &["segtrain-daemon", "segtrain-trainer"]),
            node("segtrain-daemon", &["tonic"]),
            node("segtrain-wire", &[]),
            node("tonic", &[]),
            node("tch", &[]),
        ]},
    });
    let v = violations(&Graph::from_metadata(&m));
    assert!(
        v.iter()
            .any(|l| l.starts_with("segtrain-trainer -> helper -> tonic (the training core")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|l| l.starts_with("segtrain-worker -> segtrain-trainer -> helper -> tonic")),
        "{v:?}"
    );
    // tonic through the daemon alone would be allowed; here it also comes through the trainer.
    assert_eq!(v.len(), 3, "{v:?}");
}
