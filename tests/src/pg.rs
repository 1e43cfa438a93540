//! A throwaway PostgreSQL cluster for the end-to-end tests and `make demo`.
//!
//! The coordinator keeps all of its state in PostgreSQL, and what the
//! end-to-end tests check (transactions, locking, behaviour while the database
//! is unreachable) only shows against a real server, so the tests run one
//! instead of mocking it. [`TempPostgres::start`] runs `initdb` in a fresh
//! temporary directory and starts `postgres` on a free port on 127.0.0.1 as a
//! child process; dropping the value shuts the server down and deletes the
//! directory, also when a test panics. Every test (and every test binary) can
//! start its own cluster: temporary directories and ports are never shared.
//!
//! PostgreSQL refuses to run as root, and our machines and CI run as root. When
//! the effective uid is 0, the server programs (`initdb`, `postgres`) run as
//! an unprivileged user: `$SEGTRAIN_PG_USER`, or else the `postgres` system
//! user that Debian's `postgresql` package creates. The temporary directory is
//! chowned to that user. Clients (`pg_isready`, `createdb`, `psql`) connect
//! over TCP with trust authentication and run as the current user.
//!
//! The binaries are found in `$SEGTRAIN_PG_BIN`; else in `pg_config --bindir`
//! if that holds `initdb`; else in the highest-numbered
//! `/usr/lib/postgresql/*/bin`.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The superuser role that `initdb` creates; URLs connect as this role.
pub const SUPERUSER: &str = "segtrain";
/// The database created by [`TempPostgres::start`].
pub const DATABASE: &str = "segtrain";
/// The address the server listens on.
pub const HOST: &str = "127.0.0.1";

/// How long the server may take to accept connections after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown ([`TempPostgres::stop`]) may take before escalating.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an immediate shutdown (on drop) may take before `SIGKILL`.
const DROP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a start is tried when the server cannot bind its port.
const BIND_ATTEMPTS: usize = 5;
/// How many lines of the server log go into error messages.
const LOG_TAIL_LINES: usize = 40;
/// Log lines (with `LC_ALL=C`) that mean the port was taken.
const BIND_FAILURE_MARKERS: [&str; 3] = [
    "could not bind",
    "could not create any TCP/IP sockets",
    "Address already in use",
];

/// What can go wrong starting, using or stopping a [`TempPostgres`].
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL server binaries not found (initdb); run `make setup` or set SEGTRAIN_PG_BIN"
    )]
    BinariesNotFound,

    #[error(
        "SEGTRAIN_PG_BIN={} does not contain initdb; point it at PostgreSQL's bin directory \
         (e.g. /usr/lib/postgresql/15/bin) or unset it",
        .0.display()
    )]
    BadBinDir(PathBuf),

    #[error("running as root, which PostgreSQL refuses, and {0}")]
    NoServerUser(String),

    #[error(
        "{} cannot be traversed by user {user}, who runs the PostgreSQL server; set TMPDIR to a \
         directory every user can traverse, such as /tmp",
        dir.display()
    )]
    TempDirNotTraversable { dir: PathBuf, user: String },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("{what} failed ({status}):\n{output}")]
    CommandFailed {
        what: String,
        status: ExitStatus,
        output: String,
    },

    #[error(
        "postgres did not accept connections on {HOST}:{port} within {} s; its log ends with:\n{tail}",
        READY_TIMEOUT.as_secs()
    )]
    NotReady { port: u16, tail: String },

    #[error(
        "postgres exited ({status}) before accepting connections on {HOST}:{port}; \
         its log ends with:\n{tail}"
    )]
    ServerExited {
        port: u16,
        status: ExitStatus,
        tail: String,
    },

    #[error("invalid database name {0:?}: use 1 to 63 characters from [a-z0-9_]")]
    InvalidDatabaseName(String),

    #[error("the PostgreSQL server is already running; call stop() before start_again()")]
    AlreadyRunning,
}

impl PgError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> PgError {
        let what = what.into();
        move |source| PgError::Io { what, source }
    }

    /// Whether the server exited because its port was taken.
    fn is_bind_failure(&self) -> bool {
        match self {
            PgError::ServerExited { tail, .. } => BIND_FAILURE_MARKERS
                .iter()
                .any(|marker| tail.contains(marker)),
            _ => false,
        }
    }
}

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone)]
struct ServerUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// A PostgreSQL cluster in a temporary directory, with its server running as a
/// child process on `127.0.0.1:`[`port`](Self::port).
///
/// Dropping it shuts the server down (immediate shutdown) and removes the
/// directory.
#[derive(Debug)]
pub struct TempPostgres {
    bin_dir: PathBuf,
    user: Option<ServerUser>,
    port: u16,
    child: Option<Child>,
    root: PathBuf,
    /// Dropped after `Drop::drop` has stopped the server: removes `root`.
    _dir: TempDir,
}

impl TempPostgres {
    /// Creates a cluster (`initdb`), starts its server on a free port and
    /// creates the database [`DATABASE`].
    pub fn start() -> Result<TempPostgres, PgError> {
        let bin_dir = find_bin_dir()?;
        let user = server_user()?;
        let parent = std::env::temp_dir();
        if let Some(user) = &user {
            check_traversable(&parent, user)?;
        }
        let dir = tempfile::Builder::new()
            .prefix("segtrain-pg-")
            .tempdir_in(&parent)
            .map_err(PgError::io(format!(
                "creating a temporary directory in {}",
                parent.display()
            )))?;
        let root = dir.path().to_path_buf();
        // From here on, an early return drops `pg`, which removes the directory.
        let mut pg = TempPostgres {
            bin_dir,
            user,
            port: 0,
            child: None,
            root,
            _dir: dir,
        };
        fs::create_dir(pg.socket_dir()).map_err(PgError::io(format!(
            "creating {}",
            pg.socket_dir().display()
        )))?;
        if let Some(user) = &pg.user {
            for path in [pg.root.as_path(), pg.socket_dir().as_path()] {
                std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(
                    PgError::io(format!("chown {} to user {}", path.display(), user.name)),
                )?;
            }
        }
        pg.initdb()?;
        pg.launch_on_free_port()?;
        pg.create_database(DATABASE)?;
        Ok(pg)
    }

    /// `postgres://segtrain@127.0.0.1:<port>/segtrain`.
    pub fn url(&self) -> String {
        self.database_url(DATABASE)
    }

    /// The URL of database `name` on this cluster (which need not exist).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@{HOST}:{}/{name}", self.port)
    }

    /// The TCP port the server listens on; it stays the same across
    /// [`stop`](Self::stop) and [`start_again`](Self::start_again).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` (1 to 63 characters from `[a-z0-9_]`) and
    /// returns its URL, so that tests can share one cluster with a database
    /// each.
    pub fn create_database(&self, name: &str) -> Result<String, PgError> {
        if !valid_database_name(name) {
            return Err(PgError::InvalidDatabaseName(name.to_string()));
        }
        let output = self
            .client_command("createdb")
            .args([
                "-w",
                "-h",
                HOST,
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg(name)
            .output()
            .map_err(self.spawn_error("running", "createdb"))?;
        check_output(&format!("createdb {name}"), output)?;
        Ok(self.database_url(name))
    }

    /// Shuts the server down (fast shutdown: sessions are disconnected) and
    /// waits for it to exit. The data directory is kept, so
    /// [`start_again`](Self::start_again) brings the same data back. Does
    /// nothing if the server is not running.
    pub fn stop(&mut self) -> Result<(), PgError> {
        self.shutdown(libc::SIGINT, STOP_TIMEOUT)
    }

    /// Starts the server again after [`stop`](Self::stop), on the same data
    /// directory and the same port, and waits until it accepts connections.
    pub fn start_again(&mut self) -> Result<(), PgError> {
        if self.is_running() {
            return Err(PgError::AlreadyRunning);
        }
        let mut attempt = 1;
        loop {
            match self.launch() {
                Err(e) if e.is_bind_failure() && attempt < BIND_ATTEMPTS => {
                    attempt += 1;
                    thread::sleep(Duration::from_millis(200));
                }
                result => return result,
            }
        }
    }

    /// [`stop`](Self::stop) followed by [`start_again`](Self::start_again).
    pub fn restart(&mut self) -> Result<(), PgError> {
        self.stop()?;
        self.start_again()
    }

    /// Whether the server process is running (it may still be starting up).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) | None => false,
        }
    }

    /// The pid of the `postgres` server process, while it is started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temporary directory holding the cluster; removed on drop.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The cluster's data directory (inside [`dir`](Self::dir)).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The directory with the binaries in use (`psql` is there too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server's log file (stdout and stderr of `postgres`).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// The last lines of the server log, for diagnostics.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 0)
    }

    fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    fn bin(&self, program: &str) -> PathBuf {
        self.bin_dir.join(program)
    }

    /// The error of failing to `verb` (run, start) `program`, naming its path.
    fn spawn_error(&self, verb: &str, program: &str) -> impl FnOnce(io::Error) -> PgError {
        PgError::io(format!("{verb} {}", self.bin(program).display()))
    }

    /// A command for a server program: runs as the server user, with HOME and
    /// the working directory in the cluster directory and no `PG*` variables.
    fn server_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin(program));
        scrub_pg_env(&mut cmd);
        cmd.env("HOME", &self.root)
            .env("LC_ALL", "C")
            .current_dir(&self.root)
            .stdin(Stdio::null());
        if let Some(user) = &self.user {
            // Without explicit groups, std also drops the supplementary groups
            // (setgroups(0)) before switching uid when it runs as root.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }

    /// A command for a client program: runs as the current user.
    fn client_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin(program));
        scrub_pg_env(&mut cmd);
        cmd.env("PGCONNECT_TIMEOUT", "10").stdin(Stdio::null());
        cmd
    }

    fn initdb(&self) -> Result<(), PgError> {
        let data_dir = self.data_dir();
        let output = self
            .server_command("initdb")
            .arg("-D")
            .arg(&data_dir)
            .args(["-A", "trust", "-U", SUPERUSER, "--no-sync", "-E", "UTF8"])
            .arg("--locale=C")
            .output()
            .map_err(self.spawn_error("running", "initdb"))?;
        let who = match &self.user {
            Some(user) => format!(" (as user {})", user.name),
            None => String::new(),
        };
        check_output(&format!("initdb -D {}{who}", data_dir.display()), output)
    }

    /// Starts the server on a fresh free port, retrying with another port when
    /// the server could not bind the one picked.
    fn launch_on_free_port(&mut self) -> Result<(), PgError> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            match self.launch() {
                Err(e) if e.is_bind_failure() && attempt < BIND_ATTEMPTS => attempt += 1,
                result => return result,
            }
        }
    }

    /// Starts the server on `self.port` and waits until it accepts
    /// connections.
    fn launch(&mut self) -> Result<(), PgError> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(PgError::io(format!("opening {}", log_path.display())))?;
        let log_start = log
            .metadata()
            .map_err(PgError::io(format!("reading {}", log_path.display())))?
            .len();
        let log_err = log
            .try_clone()
            .map_err(PgError::io(format!("opening {}", log_path.display())))?;
        let child = self
            .server_command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-h", HOST, "-k"])
            .arg(self.socket_dir())
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(self.spawn_error("starting", "postgres"))?;
        let pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pause = Duration::from_millis(20);
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(status)) => status,
                Some(Err(e)) => return Err(PgError::io("waiting for postgres")(e)),
                None => unreachable!("the child was just stored"),
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(PgError::ServerExited {
                    port: self.port,
                    status,
                    tail: log_tail(&log_path, log_start),
                });
            }
            // The pid file says "ready" only once *this* server listens, so a
            // different server that holds our port cannot fool the check.
            if self.pid_file_says_ready(pid) && self.pg_isready()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.shutdown(libc::SIGQUIT, DROP_TIMEOUT);
                return Err(PgError::NotReady {
                    port: self.port,
                    tail: log_tail(&log_path, log_start),
                });
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Whether `postmaster.pid` names `pid`, our port, and status "ready".
    fn pid_file_says_ready(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let pid_ok = lines.first() == Some(&pid.to_string().as_str());
        let port_ok = lines.get(3) == Some(&self.port.to_string().as_str());
        // Line 8 is the postmaster status (PostgreSQL 10 and later); it reads
        // "ready" once the server accepts connections.
        let status_ok = lines.get(7) == Some(&"ready");
        pid_ok && port_ok && status_ok
    }

    fn pg_isready(&self) -> Result<bool, PgError> {
        let status = self
            .client_command("pg_isready")
            .args(["-q", "-h", HOST, "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", "postgres", "-t", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(self.spawn_error("running", "pg_isready"))?;
        Ok(status.success())
    }

    /// Sends `signal` to the server and waits up to `grace` for it to exit;
    /// then escalates to an immediate shutdown (SIGQUIT) and finally SIGKILL.
    fn shutdown(&mut self, signal: libc::c_int, grace: Duration) -> Result<(), PgError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let steps = [
            (signal, grace),
            (libc::SIGQUIT, DROP_TIMEOUT),
            (libc::SIGKILL, Duration::MAX),
        ];
        for (signal, grace) in steps {
            send_signal(&child, signal);
            if wait_timeout(&mut child, grace)
                .map_err(PgError::io("waiting for postgres to exit"))?
                .is_some()
            {
                return Ok(());
            }
        }
        unreachable!("SIGKILL ends the process");
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // Immediate shutdown: the data is thrown away anyway. The TempDir field
        // removes the directory once this has returned.
        let _ = self.shutdown(libc::SIGQUIT, DROP_TIMEOUT);
    }
}

/// Finds the directory with `initdb` and the other PostgreSQL binaries.
pub fn find_bin_dir() -> Result<PathBuf, PgError> {
    if let Some(dir) = std::env::var_os("SEGTRAIN_PG_BIN").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.join("initdb").is_file() {
            Ok(dir)
        } else {
            Err(PgError::BadBinDir(dir))
        };
    }
    if let Ok(output) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout);
            let dir = PathBuf::from(text.trim());
            if !text.trim().is_empty() && dir.join("initdb").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut candidates: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            if let Some(version) = parse_version(&entry.file_name()) {
                if bin.join("initdb").is_file() {
                    candidates.push((version, bin));
                }
            }
        }
    }
    candidates
        .into_iter()
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
        .ok_or(PgError::BinariesNotFound)
}

/// `15` → `[15]`, `9.6` → `[9, 6]`; anything else → `None`.
fn parse_version(name: &OsStr) -> Option<Vec<u64>> {
    name.to_str()?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

/// Whether `name` is 1 to 63 characters from `[a-z0-9_]`.
pub fn valid_database_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The user to run the server as: `None` (the current user) unless we are root.
fn server_user() -> Result<Option<ServerUser>, PgError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let from_env = std::env::var("SEGTRAIN_PG_USER")
        .ok()
        .filter(|name| !name.is_empty());
    let name = from_env.clone().unwrap_or_else(|| "postgres".to_string());
    let found = lookup_user(&name).map_err(PgError::io(format!("looking up user {name:?}")))?;
    match (found, from_env) {
        (Some((0, _)), _) => Err(PgError::NoServerUser(format!(
            "user {name:?} has uid 0; set SEGTRAIN_PG_USER to an unprivileged user"
        ))),
        (Some((uid, gid)), _) => Ok(Some(ServerUser { name, uid, gid })),
        (None, Some(_)) => Err(PgError::NoServerUser(format!(
            "SEGTRAIN_PG_USER={name} does not exist; create that user or set SEGTRAIN_PG_USER \
             to an existing unprivileged user"
        ))),
        (None, None) => Err(PgError::NoServerUser(
            "there is no `postgres` system user to run it as; install the `postgresql` package \
             (`make setup`) or set SEGTRAIN_PG_USER to an unprivileged user"
                .to_string(),
        )),
    }
}

/// Looks `name` up in the user database: `Some((uid, gid))` if it exists.
fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: `passwd` is a C struct of integers and pointers, for which
        // all-zero bytes are a valid value; getpwnam_r overwrites it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call, and
        // `buf.len()` is the true size of `buf`. getpwnam_r (unlike getpwnam)
        // is thread-safe; the strings it stores in `buf` are not used.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some((pwd.pw_uid, pwd.pw_gid))),
            libc::ERANGE if buf.len() < (1 << 20) => buf.resize(buf.len() * 2, 0),
            // Some libcs report "no such user" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Checks that `user` can traverse `dir` and all its ancestors (the server
/// has to reach the cluster directory that will be created in `dir`).
fn check_traversable(dir: &Path, user: &ServerUser) -> Result<(), PgError> {
    for path in dir.ancestors() {
        let meta =
            fs::metadata(path).map_err(PgError::io(format!("inspecting {}", path.display())))?;
        let mode = meta.mode();
        let ok = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(PgError::TempDirNotTraversable {
                dir: path.to_path_buf(),
                user: user.name.clone(),
            });
        }
    }
    Ok(())
}

/// Removes every `PG*` variable (PGHOST, PGDATA, ...), so the caller's
/// environment cannot redirect the programs to another server or directory.
fn scrub_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"PG") {
            cmd.env_remove(key);
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, PgError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(PgError::io("binding 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(PgError::io("reading the port bound on 127.0.0.1"))?
        .port();
    Ok(port)
}

fn check_output(what: &str, output: Output) -> Result<(), PgError> {
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    Err(PgError::CommandFailed {
        what: what.to_string(),
        status: output.status,
        output: text.trim().to_string(),
    })
}

/// The last [`LOG_TAIL_LINES`] lines of the log written after byte `start`.
fn log_tail(path: &Path, start: u64) -> String {
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(start))?;
        file.read_to_end(&mut bytes)
    });
    if let Err(e) = read {
        return format!("(could not read {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    if tail.trim().is_empty() {
        "(empty)".to_string()
    } else {
        tail
    }
}

fn send_signal(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions. `pid` is our child and
    // has not been reaped yet (we hold its `Child`), so it cannot have been
    // reused by an unrelated process.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    if timeout == Duration::MAX {
        return child.wait().map(Some);
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names() {
        assert!(valid_database_name("segtrain"));
        assert!(valid_database_name("t_01"));
        assert!(valid_database_name(&"a".repeat(63)));
        for bad in ["", "Segtrain", "a-b", "a b", "a;drop", "é", "a.b"] {
            assert!(!valid_database_name(bad), "{bad:?} accepted");
        }
        assert!(!valid_database_name(&"a".repeat(64)));
    }

    #[test]
    fn versions_order_numerically() {
        let v = |s: &str| parse_version(OsStr::new(s));
        assert_eq!(v("15"), Some(vec![15]));
        assert_eq!(v("9.6"), Some(vec![9, 6]));
        assert_eq!(v("common"), None);
        assert!(v("15") > v("9.6"));
        assert!(v("16") > v("15"));
    }

    #[test]
    fn bind_failures_are_recognised() {
        let exited = |tail: &str| PgError::ServerExited {
            port: 1,
            status: Command::new("false").status().expect("run false"),
            tail: tail.to_string(),
        };
        assert!(
            exited("LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use")
                .is_bind_failure()
        );
        assert!(!exited("FATAL:  data directory has wrong ownership").is_bind_failure());
    }
}
