//! Elastic world size end to end on the CPU (docs/data-parallel.md, "Elastic world size"): a
//! world_size = 2 job that loses a rank and continues on one, accumulating two micro-batches
//! (`--world 1 --accumulate-steps 2`), then grows back to two ranks, must follow the trajectory
//! of the uninterrupted 2-rank run: every parameter and BatchNorm statistic within 1e-5. With
//! dropout and drop path on (the default): they are seeded per global micro-batch, not per
//! rank. Without SyncBN (its normalisation groups depend on the world size).
//!
//! The train split has 7 images, so with 2 images per step an epoch ends inside a global batch
//! (where the old padded sampler's batches depended on the world size).

mod trainers;

use segtrain_trainer::train::checkpoint;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;
use trainers::{is_buffer, of, s, train_refused};

const MAX_ITERS: u64 = 6;
/// Where the world changes: 2 ranks to here, 1 rank to `SECOND`, 2 ranks to the end.
const FIRST: u64 = 2;
const SECOND: u64 = 4;

/// The job: world_size 2 x batch 1 x accumulation 1, 64x64 crops, a checkpoint every 2
/// iterations (so one lands at each switch), dropout on (the default), no SyncBN, no evaluation.
fn job_file(dir: &Path, data: &Path) -> String {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"elastic\"\ndataset_root = \"{}\"\nworld_size = 2\nbatch_per_gpu = 1\n\
             accumulate_steps = 1\ncrop_height = 64\ncrop_width = 64\nmax_iters = {MAX_ITERS}\n\
             warmup_iters = 2\nbase_lr = 0.001\nlog_interval = 1\neval_interval = 0\n\
             checkpoint_interval = 2\nkeep_last = 10\nkeep_best = false\nloader_threads = 1\n\
             seed = 23\nsync_bn = false\n",
            data.display()
        ),
    )
    .expect("write job file");
    s(&path)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Both ranks of the job on `ck` (rank 1's checkpoint directory is a scratch one: only rank 0
/// writes), with `extra` flags.
fn two_ranks(dir: &Path, config: &str, ck: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    std::fs::create_dir_all(dir).expect("run dir");
    let scratch = dir.join("ck-rank1");
    let (events0, _) = trainers::two_ranks(dir, |rank, rv| {
        let ck = if rank == 0 { s(ck) } else { s(&scratch) };
        let rank = rank.to_string();
        let mut args = strings(&[
            "--config",
            config,
            "--device",
            "cpu",
            "--world",
            "2",
            "--rank",
            &rank,
            "--rendezvous",
            &rv,
            "--rendezvous-token",
            "77",
            "--rendezvous-timeout",
            "300",
            "--checkpoint-dir",
            &ck,
        ]);
        args.extend(strings(extra));
        args
    });
    events0
}

/// Every tensor of a checkpoint's model file by name.
fn model_of(ck: &Path, iteration: u64) -> BTreeMap<String, Tensor> {
    let dir = ck.join(checkpoint::dir_name(iteration));
    let m = checkpoint::read_manifest(&dir).expect("manifest");
    assert_eq!(m.optimizer_steps, iteration);
    Tensor::read_safetensors(dir.join(checkpoint::MODEL_FILE))
        .expect("model.safetensors")
        .into_iter()
        .collect()
}

/// The largest difference over the parameters and over the BatchNorm statistics of two
/// checkpoints' models, with the tensor where each is found.
fn max_diffs(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
) -> ((f64, String), (f64, String)) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same tensors"
    );
    // "-": no tensor differs at all.
    let (mut params, mut buffers) = ((0f64, "-".to_string()), (0f64, "-".to_string()));
    let mut counts = (0i64, 0i64);
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.size(), y.size(), "{name}");
        let d = f64::try_from((x - y).abs().max()).expect("scalar");
        let (acc, n) = if is_buffer(name) {
            (&mut buffers, &mut counts.1)
        } else {
            (&mut params, &mut counts.0)
        };
        *n += x.numel() as i64;
        if d > acc.0 {
            *acc = (d, name.clone());
        }
    }
    assert!(
        counts.0 > 3_000_000,
        "all B0 parameters compared: {}",
        counts.0
    );
    assert!(counts.1 > 0, "the BatchNorm statistics were compared");
    (params, buffers)
}

fn sampler_of(ck: &Path, iteration: u64) -> segtrain_trainer::data::SamplerState {
    checkpoint::read_manifest(&ck.join(checkpoint::dir_name(iteration)))
        .expect("manifest")
        .sampler
}

#[test]
fn a_job_that_shrinks_to_one_rank_and_grows_back_follows_the_uninterrupted_trajectory() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = trainers::synth_data(tmp.path(), 7, 0);
    let config = job_file(tmp.path(), &data);

    // (a) Two ranks straight to the end.
    let straight = tmp.path().join("straight");
    let ck_a = straight.join("ck");
    two_ranks(&straight, &config, &ck_a, &[]);

    // (b) Two ranks to FIRST; one rank accumulating two micro-batches to SECOND; two ranks again.
    let elastic = tmp.path().join("elastic");
    let ck_b = elastic.join("ck");
    two_ranks(
        &elastic.join("leg1"),
        &config,
        &ck_b,
        &["--stop-at", &FIRST.to_string()],
    );
    let leg2 = elastic.join("leg2");
    std::fs::create_dir_all(&leg2).expect("leg2 dir");
    let first = s(&ck_b.join(checkpoint::dir_name(FIRST)));
    let events = trainers::one_rank(
        &strings(&[
            "--config",
            &config,
            "--device",
            "cpu",
            "--world",
            "1",
            "--accumulate-steps",
            "2",
            "--resume-from",
            &first,
            "--stop-at",
            &SECOND.to_string(),
            "--checkpoint-dir",
            &s(&ck_b),
        ]),
        &leg2.join("single.log"),
    );
    let resumed = of(&events, "resumed");
    assert_eq!(resumed.len(), 1, "{events:?}");
    assert_eq!(resumed[0]["iteration"], FIRST);
    let second = s(&ck_b.join(checkpoint::dir_name(SECOND)));
    let events = two_ranks(
        &elastic.join("leg3"),
        &config,
        &ck_b,
        &["--resume-from", &second],
    );
    assert_eq!(of(&events, "resumed").len(), 1, "{events:?}");

    // The one-rank leg already matches the two-rank run where it hands back, and the end does.
    for it in [SECOND, MAX_ITERS] {
        let ((p, pn), (b, bn)) = max_diffs(&model_of(&ck_a, it), &model_of(&ck_b, it));
        eprintln!(
            "iteration {it}: max abs diff {p:e} over the parameters ({pn}), {b:e} over the \
             BatchNorm statistics ({bn})"
        );
        assert!(
            p <= 1e-5,
            "iteration {it}: parameters differ by {p:e} at {pn}"
        );
        assert!(
            b <= 1e-5,
            "iteration {it}: BatchNorm statistics differ by {b:e} at {bn}"
        );
    }
    // The sampler stands at the same global stream position at every checkpoint.
    for it in [FIRST, SECOND, MAX_ITERS] {
        assert_eq!(
            sampler_of(&ck_a, it),
            sampler_of(&ck_b, it),
            "iteration {it}"
        );
    }
    assert_eq!(
        sampler_of(&ck_a, SECOND),
        segtrain_trainer::data::SamplerState {
            epoch: 1,
            position: 1
        },
        "8 images of a 7-image epoch"
    );

    // The model did train (so the comparison says something): the parameters moved.
    let ((moved, _), _) = max_diffs(&model_of(&ck_a, FIRST), &model_of(&ck_a, MAX_ITERS));
    assert!(moved > 1e-3, "the parameters moved by {moved:e}");
    eprintln!("{:?}", started.elapsed());
}

/// A run whose world × batch_per_gpu × accumulate_steps is not the job's global batch is
/// refused before it starts, naming the flags, the spec fields and both products.
#[test]
fn an_accumulation_that_changes_the_global_batch_is_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("job.toml");
    std::fs::write(
        &config,
        "dataset_root = \"/nonexistent\"\nworld_size = 2\nbatch_per_gpu = 3\naccumulate_steps = 2\n",
    )
    .expect("job file");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--world", "1", "--accumulate-steps", "2"],
            &[
                "--world 1",
                "--accumulate-steps 2",
                "= 6 images",
                "= 12",
                "--accumulate-steps 4",
            ],
        ),
        (
            &[
                "--world",
                "2",
                "--accumulate-steps",
                "3",
                "--rendezvous",
                "tcp-listen:127.0.0.1:0",
            ],
            &[
                "--world 2",
                "--accumulate-steps 3",
                "= 18 images",
                "= 12",
                "--accumulate-steps 2",
            ],
        ),
        (
            &["--world", "5", "--rendezvous", "tcp-listen:127.0.0.1:0"],
            &[
                "--world 5",
                "= 30 images",
                "= 12",
                "does not divide 4 micro-batches",
            ],
        ),
    ];
    for (args, needles) in cases {
        let (code, err) = train_refused(&config, &tmp.path().join("ck"), args);
        assert_eq!(code, Some(3), "{args:?}: a bad job, not retried: {err}");
        for needle in
            needles
                .iter()
                .chain(&["world_size 2", "batch_per_gpu 3", "accumulate_steps 2"])
        {
            assert!(
                err.contains(needle),
                "{args:?}: expected {needle:?} in: {err}"
            );
        }
        assert!(!tmp.path().join("ck").exists(), "nothing was written");
    }
    // The job's own layout, or one rank carrying the whole global batch, passes the check (and
    // fails later, on the missing dataset).
    for args in [
        &["--world", "1", "--accumulate-steps", "4"][..],
        &["--accumulate-steps", "4"],
    ] {
        let (_, err) = train_refused(&config, &tmp.path().join("ck"), args);
        assert!(
            err.contains("/nonexistent") && !err.contains("global batch"),
            "{args:?}: {err}"
        );
    }
}
