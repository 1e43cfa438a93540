//! Tests of the throwaway-PostgreSQL harness (`segtrain_tests::pg`) and of the
//! `segtrain-devpg` binary, against real PostgreSQL servers.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use segtrain_tests::pg::{PgError, TempPostgres};

fn start() -> TempPostgres {
    TempPostgres::start().unwrap_or_else(|e| panic!("TempPostgres::start failed: {e}"))
}

/// A `psql` command with no `PG*` variables from our environment.
fn psql_command(bin_dir: &Path) -> Command {
    let mut cmd = Command::new(bin_dir.join("psql"));
    for (key, _) in std::env::vars() {
        if key.starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .args(["-X", "-q", "-w", "-v", "ON_ERROR_STOP=1"]);
    cmd
}

fn run_psql(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().expect("running psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `sql` on database `db` with `psql -h 127.0.0.1 -p PORT -U segtrain`.
fn psql(pg: &TempPostgres, db: &str, sql: &str) -> Result<String, String> {
    let mut cmd = psql_command(pg.bin_dir());
    cmd.args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", "segtrain", "-d", db, "-Atc", sql]);
    run_psql(cmd)
}

/// Runs `sql` with `psql -d URL`.
fn psql_url(pg: &TempPostgres, url: &str, sql: &str) -> Result<String, String> {
    let mut cmd = psql_command(pg.bin_dir());
    cmd.args(["-d", url, "-Atc", sql]);
    run_psql(cmd)
}

fn connection_refused(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces and parens.
        let after_comm = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let ppid = after_comm
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// What to check after a cluster has been dropped.
struct Remains {
    dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    pids: Vec<u32>,
}

impl Remains {
    fn of(pg: &TempPostgres) -> Remains {
        let pid = pg.pid().expect("a started cluster has a server pid");
        assert!(process_exists(pid), "postgres {pid} is not running");
        let mut pids = children_of(pid);
        assert!(
            !pids.is_empty(),
            "postgres {pid} has no auxiliary processes"
        );
        pids.push(pid);
        assert!(pg.dir().is_dir() && pg.data_dir().is_dir());
        Remains {
            dir: pg.dir().to_path_buf(),
            data_dir: pg.data_dir(),
            port: pg.port(),
            pids,
        }
    }

    fn assert_gone(&self) {
        assert!(
            !self.data_dir.exists(),
            "{} left behind",
            self.data_dir.display()
        );
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
        for pid in &self.pids {
            assert!(!process_exists(*pid), "process {pid} left running");
        }
        assert!(
            connection_refused(self.port),
            "something still listens on port {}",
            self.port
        );
    }
}

#[test]
fn start_serves_queries_and_creates_databases() {
    let pg = start();
    assert_eq!(psql(&pg, "segtrain", "select 1"), Ok("1".to_string()));
    assert_eq!(
        pg.url(),
        format!("postgres://segtrain@127.0.0.1:{}/segtrain", pg.port())
    );
    assert_eq!(
        psql_url(
            &pg,
            &pg.url(),
            "select current_database() || ' ' || current_user"
        ),
        Ok("segtrain segtrain".to_string())
    );

    let url = pg.create_database("second_db").expect("create_database");
    assert_eq!(
        url,
        format!("postgres://segtrain@127.0.0.1:{}/second_db", pg.port())
    );
    let sql = "create table t (x int); insert into t values (7); \
               select current_database() || ':' || sum(x) from t";
    assert_eq!(psql_url(&pg, &url, sql), Ok("second_db:7".to_string()));
    // The table went into the new database, not the default one.
    assert!(psql(&pg, "segtrain", "select * from t").is_err());

    let longest = "d".repeat(63);
    let url = pg.create_database(&longest).expect("63-character name");
    assert_eq!(psql_url(&pg, &url, "select 2"), Ok("2".to_string()));

    let too_long = "d".repeat(64);
    for bad in [
        "",
        "Upper",
        "has-dash",
        "a;drop",
        "white space",
        "ü",
        &too_long,
    ] {
        match pg.create_database(bad) {
            Err(PgError::InvalidDatabaseName(name)) => assert_eq!(name, bad),
            other => panic!("create_database({bad:?}) gave {other:?}"),
        }
    }
    // A database that already exists is an error from createdb.
    assert!(matches!(
        pg.create_database("second_db"),
        Err(PgError::CommandFailed { .. })
    ));
}

#[test]
fn stop_and_start_again_keep_data_and_port() {
    let mut pg = start();
    let port = pg.port();
    let first_pid = pg.pid().expect("pid");
    psql(
        &pg,
        "segtrain",
        "create table kept (id int primary key, name text); \
         insert into kept values (1, 'a'), (2, 'b'), (3, 'c')",
    )
    .expect("create table");

    pg.stop().expect("stop");
    assert!(!pg.is_running());
    assert_eq!(pg.pid(), None);
    assert!(
        !process_exists(first_pid),
        "postgres {first_pid} still runs"
    );
    assert!(
        psql(&pg, "segtrain", "select 1").is_err(),
        "psql worked while stopped"
    );
    assert!(connection_refused(port));
    pg.stop().expect("a second stop is a no-op");

    pg.start_again().expect("start_again");
    assert!(pg.is_running());
    assert_eq!(pg.port(), port);
    assert_ne!(pg.pid(), Some(first_pid));
    assert_eq!(
        psql(
            &pg,
            "segtrain",
            "select string_agg(name, ',' order by id) from kept"
        ),
        Ok("a,b,c".to_string())
    );
    assert!(matches!(pg.start_again(), Err(PgError::AlreadyRunning)));

    psql(&pg, "segtrain", "insert into kept values (4, 'd')").expect("insert");
    pg.restart().expect("restart");
    assert_eq!(pg.port(), port);
    assert_eq!(
        psql(&pg, "segtrain", "select count(*) from kept"),
        Ok("4".to_string())
    );
}

#[test]
fn start_again_reports_a_taken_port() {
    let mut pg = start();
    psql(
        &pg,
        "segtrain",
        "create table kept (x int); insert into kept values (5)",
    )
    .expect("create table");
    pg.stop().expect("stop");
    let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, pg.port())).expect("bind");
    let err = pg.start_again().expect_err("start_again on a taken port");
    assert!(
        matches!(err, PgError::ServerExited { port, .. } if port == pg.port()),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("could not bind"), "{message}");
    assert!(!pg.is_running());

    drop(squatter);
    pg.start_again().expect("start_again once the port is free");
    assert_eq!(
        psql(&pg, "segtrain", "select x from kept"),
        Ok("5".to_string())
    );
}

#[test]
fn drop_stops_the_server_and_removes_the_directory() {
    let pg = start();
    // An open session must not keep anything alive either.
    let mut session = psql_command(pg.bin_dir());
    session
        .args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args([
            "-U",
            "segtrain",
            "-d",
            "segtrain",
            "-Atc",
            "select pg_sleep(60)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut session = session.spawn().expect("spawn psql");
    let remains = Remains::of(&pg);
    let started = Instant::now();
    drop(pg);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "drop took {:?}",
        started.elapsed()
    );
    remains.assert_gone();
    let status = session.wait().expect("wait for psql");
    assert!(!status.success(), "psql's query survived the shutdown");
}

#[test]
fn drop_during_a_panic_cleans_up() {
    let mut remains = None;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let pg = start();
        remains = Some(Remains::of(&pg));
        panic!("deliberate panic while a TempPostgres is alive");
    }));
    assert!(result.is_err());
    remains.expect("the cluster started").assert_gone();
}

#[test]
fn parallel_clusters_are_independent() {
    let handles: Vec<_> = (0..2).map(|_| thread::spawn(start)).collect();
    let clusters: Vec<TempPostgres> = handles
        .into_iter()
        .map(|h| h.join().expect("start thread"))
        .collect();
    let [a, b] = &clusters[..] else {
        unreachable!()
    };
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    assert_eq!(psql(a, "segtrain", "select 1"), Ok("1".to_string()));
    assert_eq!(psql(b, "segtrain", "select 1"), Ok("1".to_string()));
    psql(a, "segtrain", "create table only_in_a (x int)").expect("create in a");
    assert_eq!(
        psql(a, "segtrain", "select to_regclass('only_in_a') is not null"),
        Ok("t".to_string())
    );
    assert_eq!(
        psql(b, "segtrain", "select to_regclass('only_in_a') is not null"),
        Ok("f".to_string())
    );
}

#[test]
fn devpg_serves_until_sigterm_and_cleans_up() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let url_file = scratch.path().join("pg.url");
    let mut child = Command::new(env!("CARGO_BIN_EXE_segtrain-devpg"))
        .arg("--url-file")
        .arg(&url_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn segtrain-devpg");

    let deadline = Instant::now() + Duration::from_secs(60);
    while !url_file.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("segtrain-devpg exited early: {status}");
        }
        assert!(Instant::now() < deadline, "no url file after 60 s");
        thread::sleep(Duration::from_millis(50));
    }
    let written = std::fs::read_to_string(&url_file).expect("read url file");
    assert!(written.ends_with('\n'), "{written:?}");
    let url = written.trim_end().to_string();
    let port: u16 = url
        .strip_prefix("postgres://segtrain@127.0.0.1:")
        .and_then(|rest| rest.strip_suffix("/segtrain"))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("unexpected URL {url:?}"));
    assert!(!scratch.path().join("pg.url.tmp").exists());

    let bin_dir = segtrain_tests::pg::find_bin_dir().expect("find_bin_dir");
    let mut psql = psql_command(&bin_dir);
    psql.args(["-d", &url, "-Atc", "select 41 + 1"]);
    assert_eq!(run_psql(psql), Ok("42".to_string()));

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let status = child.wait_with_output().expect("wait for segtrain-devpg");
    assert!(status.status.success(), "exit status {}", status.status);
    assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), url);
    assert!(!url_file.exists(), "url file left behind");
    assert!(connection_refused(port), "postgres still listens on {port}");
}

#[test]
fn devpg_rejects_bad_arguments() {
    for args in [&[][..], &["--url-file"][..], &["--bogus"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_segtrain-devpg"))
            .args(args)
            .output()
            .expect("run segtrain-devpg");
        assert_eq!(out.status.code(), Some(2), "args {args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage: segtrain-devpg --url-file PATH"),
            "args {args:?}"
        );
    }
}
