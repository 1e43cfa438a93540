//! `segtrain-devpg --url-file PATH`: a throwaway PostgreSQL for `make demo`.
//!
//! Starts a [`TempPostgres`], writes its URL to PATH (one line, written to
//! `PATH.tmp` and renamed, so readers never see a partial file), prints the
//! URL on stdout and runs until SIGINT, SIGTERM or SIGHUP. Then it stops the
//! server, deletes the cluster and removes PATH. Exits 1 if the server cannot
//! be started or dies on its own, 2 on bad arguments.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use segtrain_tests::pg::TempPostgres;

const USAGE: &str = "\
usage: segtrain-devpg --url-file PATH

Starts a throwaway PostgreSQL cluster on 127.0.0.1, writes its URL to PATH
(one line, replaced atomically), prints the URL on stdout, and runs until
SIGINT or SIGTERM; then it stops the server and deletes the cluster and PATH.

Environment: SEGTRAIN_PG_BIN (directory with initdb, postgres, ...),
SEGTRAIN_PG_USER (user that runs the server when started as root; default
postgres), TMPDIR (where the cluster lives).";

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

enum Args {
    Run { url_file: PathBuf },
    Help,
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let mut url_file = None;
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "-h" || text == "--help" {
            return Ok(Args::Help);
        } else if text == "--url-file" {
            let value = args.next().ok_or("--url-file needs a PATH")?;
            url_file = Some(PathBuf::from(value));
        } else if let Some(value) = text.strip_prefix("--url-file=") {
            url_file = Some(PathBuf::from(value));
        } else {
            return Err(format!("unexpected argument {text:?}"));
        }
    }
    match url_file {
        Some(path) if !path.as_os_str().is_empty() => Ok(Args::Run { url_file: path }),
        _ => Err("--url-file PATH is required".to_string()),
    }
}

fn main() -> ExitCode {
    let url_file = match parse_args(std::env::args_os().skip(1)) {
        Ok(Args::Run { url_file }) => url_file,
        Ok(Args::Help) => {
            // Ignore write errors (e.g. `--help | head`) instead of panicking.
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("segtrain-devpg: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    // Block the signals before anything else, so one that arrives during
    // startup waits for sigtimedwait below instead of killing us before we
    // clean up. (Children start with an empty mask: std resets it.)
    let signals = block_signals();

    let mut pg = match TempPostgres::start() {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("segtrain-devpg: cannot start PostgreSQL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = pg.url();
    if let Err(e) = write_url_file(&url_file, &url) {
        eprintln!(
            "segtrain-devpg: cannot write the URL to {}: {e}",
            url_file.display()
        );
        return ExitCode::FAILURE;
    }
    // A closed stdout must not stop us: the URL file is what counts.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{url}").and_then(|()| stdout.flush());

    let code = loop {
        if wait_for_signal(&signals) {
            break ExitCode::SUCCESS;
        }
        if !pg.is_running() {
            eprintln!(
                "segtrain-devpg: PostgreSQL exited unexpectedly; its log ends with:\n{}",
                pg.log_tail()
            );
            break ExitCode::FAILURE;
        }
    };

    let _ = std::fs::remove_file(&url_file);
    if let Err(e) = pg.stop() {
        eprintln!("segtrain-devpg: stopping PostgreSQL: {e}");
    }
    drop(pg);
    code
}

fn write_url_file(path: &std::path::Path, url: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{url}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Blocks [`SIGNALS`] in this (only) thread and resets their disposition to
/// the default, which a non-interactive shell sets to "ignore" for SIGINT in
/// background jobs (an ignored signal would never reach sigtimedwait).
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data and all-zero bytes are a valid value;
    // sigemptyset then initialises it properly.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the signal
    // numbers are valid; pthread_sigmask only reads `set` and accepts a null
    // old-set pointer; SIG_DFL installs no Rust code as a handler.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        for signal in SIGNALS {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
    set
}

/// Waits up to a second for one of the blocked signals; true if one came.
fn wait_for_signal(set: &libc::sigset_t) -> bool {
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `timeout` are valid for the call; a null siginfo
    // pointer is allowed. Returns a signal number, or -1 on timeout/EINTR.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    signal > 0
}
