//! `segtrain-worker`: the worker's one program. `daemon` runs the per-GPU daemon
//! (`segtrain-daemon`, no tch); `train` and the tools run the training core
//! (`segtrain-trainer`, no gRPC). The daemon starts trainers as `segtrain-worker train`.

use clap::Parser;
use segtrain_daemon::command::DaemonArgs;
use segtrain_trainer::command::{tools::Tool, train::TrainArgs};
use std::process::ExitCode;

/// segtrain worker: per-GPU daemon and SegFormer trainer
#[derive(Parser, Debug)]
#[command(name = "segtrain-worker", version)]
enum Command {
    /// Train a job from the same job file `segtrain submit -f` takes: standalone on the CPU or
    /// one GPU (world_size 1), or as one rank of a distributed job (--rank, --world,
    /// --rendezvous; the worker daemon starts trainers this way).
    Train(Box<TrainArgs>),
    /// Run the worker daemon for one GPU (or the CPU): register with the coordinator and run the
    /// ranks it assigns, each in a child trainer process.
    Daemon(DaemonArgs),
    #[command(flatten)]
    Tool(Tool),
}

/// The model name of GPU `index`, for the daemon's registration.
fn gpu_name(index: u32) -> String {
    let report = segtrain_trainer::doctor::report();
    let gpu = report
        .gpus
        .iter()
        .find(|g| g.index == index as usize)
        .or(report.gpus.first());
    gpu.map(|g| g.name.clone()).unwrap_or_default()
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`segtrain-worker ... | head`) like other Unix tools, instead
    // of panicking in println!.
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let result = match Command::parse() {
        Command::Train(args) => return segtrain_trainer::command::train::run(*args),
        Command::Daemon(args) => segtrain_daemon::command::run(args, &gpu_name),
        Command::Tool(tool) => tool.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
