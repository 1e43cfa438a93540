//! Finds the workspace's binaries (`segtrain-coordinator`, `segtrain`, `segtrain-worker`).
//!
//! Integration tests of this crate cannot name other packages' binaries through
//! `CARGO_BIN_EXE_*`, so they look next to their own executable: `target/<profile>/deps/<test>`
//! has the binaries in `target/<profile>/`. `make test` builds them first.

use std::path::PathBuf;

/// The path of a workspace binary, or a panic that says how to build it.
pub fn path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found; build the binaries first: cargo build --workspace --bins",
        p.display()
    );
    p
}

/// Runs `cmd` to completion and returns its output, or panics with `what` and its stderr when it
/// fails: the check every test that runs a command to the end makes.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed: {stderr}");
    out
}

/// The Python of the project's venv (`make setup` makes it and links its torch package as
/// `.torch` in the checkout: `<venv>/lib/pythonX.Y/site-packages/torch`).
pub fn venv_python() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let torch = std::fs::canonicalize(repo.join(".torch"))
        .unwrap_or_else(|e| panic!(".torch in the checkout: {e}; run `make setup`"));
    let venv = torch
        .ancestors()
        .nth(4)
        .unwrap_or_else(|| panic!("{} is not inside a venv", torch.display()));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} not found; run `make setup`",
        python.display()
    );
    python
}
