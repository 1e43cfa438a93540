//! Data-parallel training end to end on the CPU through the real TCP collective: two
//! `segtrain-worker train` processes (world 2, batch 1 each) must train, evaluate and save the
//! same model as one process given the same global batch of 2 (docs/data-parallel.md):
//!
//! * without SyncBN, as one process accumulating two micro-batches of 1;
//! * with SyncBN, as one process with a real batch of 2 (its BatchNorm normalises over both).
//!
//! Why they must agree: the sampler gives rank r micro-batch k = r of every global batch, the
//! one the single process takes as its micro-batch k (or as images k of its batch), and the
//! loader seeds each sample's augmentation by its stream position, so the two ranks see exactly
//! the images the single process sees; with dropout and drop path off
//! (--no-dropout), the averaged gradient is the single process's. The BatchNorm running
//! statistics agree too: they move once per step by the mean over micro-batches and ranks.
//! And the mIoU a 2-rank job reports is that of the checkpoint it saves, evaluated by one rank.

mod trainers;

use segtrain_spec::{EvalMode, Precision};
use segtrain_trainer::data::cityscapes;
use segtrain_trainer::data::loader::eval_samples;
use segtrain_trainer::model::{weights, SegFormer, SegFormerConfig};
use segtrain_trainer::train::checkpoint;
use segtrain_trainer::train::eval::{accumulate, EvalConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Tensor};
use trainers::{is_buffer, of, s, train_refused};

const MAX_ITERS: u64 = 4;

/// A job file: 64x64 crops, 4 steps, evaluation at 2 and 4, one checkpoint at 4.
fn config(
    dir: &Path,
    data: &Path,
    name: &str,
    world: u32,
    batch: u32,
    accumulate: u32,
    sync_bn: bool,
) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"ddp\"\ndataset_root = \"{}\"\nworld_size = {world}\ncrop_height = 64\n\
             crop_width = 64\nbatch_per_gpu = {batch}\naccumulate_steps = {accumulate}\n\
             max_iters = {MAX_ITERS}\nwarmup_iters = 2\nbase_lr = 0.001\nlog_interval = 1\n\
             eval_interval = 2\ncheckpoint_interval = 0\nkeep_best = false\neval_mode = \"whole\"\n\
             loader_threads = 1\nseed = 17\nsync_bn = {sync_bn}\n",
            data.display()
        ),
    )
    .expect("write job file");
    s(&path)
}

fn checkpoint_dirs(root: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(root) {
        Ok(rd) => rd.map(|e| e.expect("entry").path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A synthetic dataset: 8 train and 4 val images of 64x64.
fn synth_data(dir: &Path) -> PathBuf {
    trainers::synth_data(dir, 8, 4)
}

fn run_dir(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).expect("run dir");
    dir
}

/// What a run left: rank 0's events (and rank 1's, for two ranks), rank 0's checkpoint root.
struct Run {
    events0: Vec<serde_json::Value>,
    events1: Vec<serde_json::Value>,
    checkpoints: PathBuf,
}

/// Two ranks of `config` through the TCP collective.
fn two_ranks(dir: &Path, config: &str) -> Run {
    let (ck0, ck1) = (dir.join("ck-rank0"), dir.join("ck-rank1"));
    let ck_of = |rank: usize| if rank == 0 { ck0.clone() } else { ck1.clone() };
    let common = |rank: usize, ck: &Path, rv: String| -> Vec<String> {
        [
            "--config",
            config,
            "--device",
            "cpu",
            "--no-dropout",
            "--world",
            "2",
            "--rank",
            &rank.to_string(),
            "--rendezvous",
            &rv,
            "--rendezvous-token",
            "4242",
            "--rendezvous-timeout",
            "300",
            "--checkpoint-dir",
            &s(ck),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let (events0, events1) = trainers::two_ranks(dir, |rank, rv| common(rank, &ck_of(rank), rv));

    // Only rank 0 reports and writes checkpoints.
    assert_eq!(
        checkpoint_dirs(&ck0),
        vec![ck0.join(checkpoint::dir_name(MAX_ITERS))],
        "rank 0 wrote exactly the final checkpoint"
    );
    assert!(
        checkpoint_dirs(&ck1).is_empty(),
        "rank 1 wrote nothing: {:?}",
        checkpoint_dirs(&ck1)
    );
    Run {
        events0,
        events1,
        checkpoints: ck0,
    }
}

/// One rank of `config`.
fn one_rank(dir: &Path, config: &str) -> Run {
    let ck = dir.join("ck-single");
    let log = dir.join("single.log");
    let events0 = trainers::one_rank(
        &[
            "--config",
            config,
            "--device",
            "cpu",
            "--no-dropout",
            "--checkpoint-dir",
            &s(&ck),
        ]
        .map(String::from),
        &log,
    );
    Run {
        events0,
        events1: Vec::new(),
        checkpoints: ck,
    }
}

fn final_tensors(run: &Run) -> std::collections::BTreeMap<String, Tensor> {
    let dir = run.checkpoints.join(checkpoint::dir_name(MAX_ITERS));
    let m = checkpoint::read_manifest(&dir).expect("manifest");
    assert_eq!(m.optimizer_steps, MAX_ITERS);
    Tensor::read_safetensors(dir.join(checkpoint::MODEL_FILE))
        .expect("model.safetensors")
        .into_iter()
        .collect()
}

/// Every tensor of both final checkpoints, parameters and BatchNorm statistics alike, within
/// 1e-5; returns the largest difference of each kind.
fn assert_same_model(two: &Run, one: &Run, what: &str) {
    let (a, b) = (final_tensors(two), final_tensors(one));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same tensors"
    );
    let (mut params, mut buffers) = ((0f64, String::new(), 0i64), (0f64, String::new(), 0i64));
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.size(), y.size(), "{name}");
        let d = f64::try_from((x - y).abs().max()).expect("scalar");
        if std::env::var_os("DDP_DEBUG").is_some() && d > 1e-6 {
            eprintln!("{name}: {d:e}");
        }
        let acc = if is_buffer(name) {
            &mut buffers
        } else {
            &mut params
        };
        acc.2 += x.numel() as i64;
        if d >= acc.0 {
            (acc.0, acc.1) = (d, name.clone());
        }
    }
    assert!(
        params.2 > 3_000_000,
        "all B0 parameters compared: {}",
        params.2
    );
    assert!(buffers.2 > 0, "the BatchNorm statistics were compared");
    eprintln!(
        "{what}: max abs diff {:e} over {} parameters ({}), {:e} over {} BatchNorm statistics ({})",
        params.0, params.2, params.1, buffers.0, buffers.2, buffers.1
    );
    assert!(
        params.0 <= 1e-5,
        "{what}: parameters differ by {:e} at {}",
        params.0,
        params.1
    );
    assert!(
        buffers.0 <= 1e-5,
        "{what}: BatchNorm statistics differ by {:e} at {}",
        buffers.0,
        buffers.1
    );
    // The statistics really moved away from their initial 0 and 1.
    let moved = a
        .iter()
        .filter(|(n, _)| n.contains("running_mean"))
        .all(|(_, t)| f64::try_from(t.abs().max()).expect("scalar") > 1e-3);
    assert!(moved, "the running means moved");

    // The logged loss is averaged over the ranks, as the single process averages its images.
    let losses = |evs: &[serde_json::Value]| -> Vec<f64> {
        of(evs, "metrics")
            .iter()
            .map(|e| e["values"]["loss"].as_f64().expect("loss"))
            .collect()
    };
    let (l2, l1) = (losses(&two.events0), losses(&one.events0));
    assert_eq!(l2.len(), l1.len());
    for (x, y) in l2.iter().zip(&l1) {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
            "{what}: loss per step: 2 ranks {l2:?}, 1 rank {l1:?}"
        );
    }
}

/// The mIoU the run reported at its last evaluation is that of its final checkpoint evaluated
/// by one process over the whole val set.
fn assert_reported_miou_is_the_checkpoints(run: &Run, data: &Path) {
    let evals = of(&run.events0, "eval");
    assert_eq!(evals.len(), 2, "at iterations 2 and 4");
    for e in &evals {
        assert_eq!(e["images"], 4, "both shards counted: {e}");
    }
    let last = evals.last().expect("eval");
    assert_eq!(last["iteration"], MAX_ITERS);
    let reported = last["miou"].as_f64().expect("miou");

    let vs = nn::VarStore::new(Device::Cpu);
    let model = SegFormer::new(
        &vs.root(),
        SegFormerConfig::variant(segtrain_spec::Variant::B0, 19),
    );
    weights::load_file(
        &vs,
        &run.checkpoints
            .join(checkpoint::dir_name(MAX_ITERS))
            .join(checkpoint::MODEL_FILE),
    )
    .expect("load the checkpoint");
    let val = cityscapes::scan(data, "val").expect("val split");
    let cfg = EvalConfig {
        mode: EvalMode::Whole,
        crop: 64,
        stride: 48,
        precision: Precision::Fp32,
    };
    let r = accumulate(
        &model,
        eval_samples(&val).map(|r| r.map_err(anyhow::Error::from)),
        Device::Cpu,
        &cfg,
    )
    .expect("evaluate")
    .result();
    assert_eq!(r.images, 4);
    eprintln!(
        "reported mIoU {reported}, the checkpoint's {}",
        r.metrics.miou
    );
    assert!(
        (r.metrics.miou - reported).abs() <= 1e-6,
        "the job reported mIoU {reported}; its checkpoint scores {}",
        r.metrics.miou
    );
}

/// A job's name and its (batch per GPU, accumulation steps, SyncBN).
type Setup<'a> = (&'a str, u32, u32, bool);

/// The same data trained by two ranks in `two`'s setup and by one in `one`'s: what each
/// equivalence test compares (the temp dir holds both runs).
fn two_and_one(two: Setup, one: Setup) -> (tempfile::TempDir, PathBuf, Run, Run) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = synth_data(tmp.path());
    let (dir2, dir1) = (run_dir(tmp.path(), "two"), run_dir(tmp.path(), "one"));
    let job = |(name, batch, acc, sync): Setup, world| {
        config(tmp.path(), &data, name, world, batch, acc, sync)
    };
    let two = two_ranks(&dir2, &job(two, 2));
    let one = one_rank(&dir1, &job(one, 1));
    (tmp, data, two, one)
}

#[test]
fn two_cpu_ranks_train_evaluate_and_save_the_model_of_one_rank_accumulating_two_micro_batches() {
    let started = Instant::now();
    let (_tmp, data, two, one) = two_and_one(("w2", 1, 1, false), ("w1-acc2", 1, 2, false));

    assert_eq!(of(&two.events0, "rendezvous").len(), 1);
    assert_eq!(of(&two.events0, "checkpoint").len(), 1);
    assert_eq!(of(&two.events0, "metrics").len(), MAX_ITERS as usize);
    for kind in ["rendezvous", "metrics", "eval", "checkpoint"] {
        assert!(
            of(&two.events1, kind).is_empty(),
            "rank 1 reports no {kind}: {:?}",
            two.events1
        );
    }
    assert_eq!(of(&two.events1, "finished").len(), 1, "{:?}", two.events1);
    // Rank 1 prints its own speed (for its daemon's gauges, never stored with the job).
    let own = of(&two.events1, "rank_metrics");
    assert_eq!(own.len(), MAX_ITERS as usize, "{:?}", two.events1);
    assert!(own
        .iter()
        .all(|e| e["values"]["step_ms"].as_f64() > Some(0.0)));
    assert!(of(&two.events0, "rank_metrics").is_empty());

    assert_same_model(&two, &one, "2 ranks x 1 vs 1 rank x 2 micro-batches");
    assert_reported_miou_is_the_checkpoints(&two, &data);
    eprintln!("{:?}", started.elapsed());
}

#[test]
fn two_cpu_ranks_with_sync_bn_train_the_model_of_one_rank_with_a_batch_of_two() {
    let started = Instant::now();
    let (_tmp, data, two, one) = two_and_one(("w2-sync", 1, 1, true), ("w1-b2", 2, 1, false));
    assert_same_model(
        &two,
        &one,
        "2 ranks x 1 with SyncBN vs 1 rank x a batch of 2",
    );
    assert_reported_miou_is_the_checkpoints(&two, &data);
    eprintln!("{:?}", started.elapsed());
}

#[test]
fn bad_distributed_flags_fail_with_a_named_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("job.toml");
    std::fs::write(&config, "dataset_root = \"/d\"\nworld_size = 2\n").expect("job file");
    let cases: &[(&[&str], &str)] = &[
        (&[], "standalone training runs one rank"),
        (&["--world", "3"], "--world 3 x batch_per_gpu 1"),
        (&["--accumulate-steps", "0"], "--accumulate-steps"),
        (&["--world", "2", "--rank", "2"], "--rank 2"),
        (&["--world", "2"], "--rendezvous"),
        (&["--world", "2", "--rendezvous", "mpi"], "--rendezvous"),
        (&["--world", "2", "--rendezvous", "nccl:AAAA"], "128 bytes"),
        (
            &[
                "--world",
                "2",
                "--rank",
                "1",
                "--rendezvous",
                "tcp-listen:127.0.0.1:0",
            ],
            "rank 1 cannot use rendezvous tcp-listen",
        ),
        (
            &[
                "--world",
                "2",
                "--rendezvous",
                "nccl-create",
                "--device",
                "cpu",
            ],
            "NCCL needs a CUDA device",
        ),
        (
            &[
                "--world",
                "2",
                "--rank",
                "1",
                "--rendezvous",
                "tcp:127.0.0.1:1",
                "--rendezvous-timeout",
                "1",
            ],
            "could not reach rank 0",
        ),
    ];
    for (args, needle) in cases {
        let (_, err) = train_refused(&config, &tmp.path().join("ck"), args);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
    }
}
