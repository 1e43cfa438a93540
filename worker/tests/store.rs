//! Checkpoints in an object store, through `object_store`'s in-memory and local-filesystem
//! backends (the same code path as gs://, with no network): upload with the manifest last,
//! retention deleting from the store, and a resume on "another node" (an empty local disk)
//! from a store URI that continues bit for bit.
//!
//! One test function: libtorch's RNG is process-global, and the bit-exact comparison needs
//! the runs to be sequential.

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use segtrain_spec::JobSpecInput;
use segtrain_trainer::data::synth::{generate, SynthOptions};
use segtrain_trainer::train::remote::{RemoteDir, RemoteStore};
use segtrain_trainer::train::{train, ResumeCandidate, TrainEvent, TrainOptions};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tch::Device;

fn spec(data: &Path) -> segtrain_spec::JobSpec {
    JobSpecInput::from_toml_str(&format!(
        "name = \"store\"\ndataset_root = \"{}\"\nworld_size = 1\ncrop_height = 64\ncrop_width = 64\n\
         batch_per_gpu = 1\nmax_iters = 6\nwarmup_iters = 1\nlog_interval = 1\neval_interval = 0\n\
         checkpoint_interval = 2\nkeep_last = 2\nkeep_best = false\nloader_threads = 1\nseed = 3\n",
        data.display()
    ))
    .expect("job file")
    .resolve()
    .expect("valid spec")
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Object names under `prefix`, sorted.
fn names(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let prefix = ObjPath::from(prefix);
    let mut v: Vec<String> = block_on(store.list(Some(&prefix)).try_collect::<Vec<_>>())
        .expect("list")
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    v.sort();
    v
}

fn get(store: &Arc<dyn ObjectStore>, path: &str) -> Vec<u8> {
    block_on(async {
        store
            .get(&ObjPath::from(path))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec()
    })
}

struct Run {
    /// (iteration, uri, sha256) of every checkpoint reported.
    checkpoints: Vec<(u64, String, String)>,
    deleted: Vec<String>,
    pending: Vec<String>,
    resumed: Option<(u64, String)>,
}

fn run(
    spec: &segtrain_spec::JobSpec,
    staging: &Path,
    dir: RemoteDir,
    stop_at: Option<u64>,
    resume: Vec<ResumeCandidate>,
) -> Run {
    let mut opts = TrainOptions::single(spec.clone(), Device::Cpu, staging.to_path_buf());
    opts.stop_at = stop_at;
    opts.checkpoint_remote = Some(dir);
    opts.resume_candidates = resume;
    let mut out = Run {
        checkpoints: Vec::new(),
        deleted: Vec::new(),
        pending: Vec::new(),
        resumed: None,
    };
    let mut sink = |ev: &TrainEvent| match ev {
        TrainEvent::Checkpoint {
            saved,
            uri,
            deleted,
            ..
        } => {
            out.checkpoints
                .push((saved.iteration, uri.clone(), saved.sha256.clone()));
            out.deleted.extend(deleted.iter().cloned());
        }
        TrainEvent::CheckpointPending { uri, .. } => out.pending.push(uri.clone()),
        TrainEvent::Resumed { iteration, uri, .. } => out.resumed = Some((*iteration, uri.clone())),
        _ => {}
    };
    train(opts, &mut sink).expect("training runs");
    out
}

/// Everything the test checks, against one backend.
fn exercise(store: Arc<dyn ObjectStore>, base: &str, data: &Path, tmp: &Path) {
    let spec = spec(data);
    let remote = RemoteStore::new(store.clone(), base);
    let dir = |attempt: u32| RemoteDir {
        store: remote.clone(),
        path: ObjPath::from(format!("ckpts/job/attempt-{attempt}")),
    };

    // Straight through, 6 iterations, a checkpoint every 2, keep the newest 2.
    let straight = run(&spec, &tmp.join("node-a"), dir(1), None, Vec::new());
    let iters: Vec<u64> = straight.checkpoints.iter().map(|c| c.0).collect();
    assert_eq!(iters, [2, 4, 6]);
    assert_eq!(
        straight.checkpoints[0].1,
        format!("{base}/ckpts/job/attempt-1/ckpt-00000002")
    );
    assert_eq!(
        straight.pending,
        straight
            .checkpoints
            .iter()
            .map(|c| c.1.clone())
            .collect::<Vec<_>>(),
        "every checkpoint is announced (PENDING) at its final URI first"
    );
    // Retention deleted the oldest from the store, and reported it.
    assert_eq!(straight.deleted, [straight.checkpoints[0].1.clone()]);
    let objects = names(&store, "ckpts/job/attempt-1");
    assert_eq!(
        objects,
        [
            "ckpts/job/attempt-1/ckpt-00000004/manifest.json",
            "ckpts/job/attempt-1/ckpt-00000004/model.safetensors",
            "ckpts/job/attempt-1/ckpt-00000004/optimizer.safetensors",
            "ckpts/job/attempt-1/ckpt-00000006/manifest.json",
            "ckpts/job/attempt-1/ckpt-00000006/model.safetensors",
            "ckpts/job/attempt-1/ckpt-00000006/optimizer.safetensors",
        ]
    );
    // The recorded digest is the stored manifest's; staging copies were removed.
    let manifest = get(&store, "ckpts/job/attempt-1/ckpt-00000006/manifest.json");
    let digest: String = Sha256::digest(&manifest)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, straight.checkpoints[2].2);
    assert!(!tmp.join("node-a").join("ckpt-00000006").exists());
    let final_straight = get(
        &store,
        "ckpts/job/attempt-1/ckpt-00000006/model.safetensors",
    );

    // A run of 4 iterations as attempt 2 of another job, then "another node" with an empty
    // disk resumes from the store URI of iteration 4 as attempt 3 and finishes.
    let other = |attempt: u32| RemoteDir {
        store: remote.clone(),
        path: ObjPath::from(format!("ckpts/job2/attempt-{attempt}")),
    };
    let first = run(&spec, &tmp.join("node-b"), other(2), Some(4), Vec::new());
    let (it, uri, sha) = first.checkpoints.last().cloned().expect("a checkpoint");
    assert_eq!(it, 4);
    let resumed = run(
        &spec,
        &tmp.join("node-c"),
        other(3),
        None,
        vec![ResumeCandidate {
            uri: uri.clone(),
            iteration: it,
            sha256: sha,
        }],
    );
    assert_eq!(resumed.resumed, Some((4, uri)));
    let final_resumed = get(
        &store,
        "ckpts/job2/attempt-3/ckpt-00000006/model.safetensors",
    );
    assert!(
        final_resumed == final_straight,
        "a resume from the store continues bit for bit"
    );
    // Retention of attempt 3 deletes only its own attempt's checkpoints: attempt 2's, the one
    // it resumed from among them, belong to another attempt (which may still be running, cut
    // off) and stay.
    let left = names(&store, "ckpts/job2");
    for kept in ["attempt-2/ckpt-00000002", "attempt-2/ckpt-00000004"] {
        assert!(
            left.iter()
                .any(|n| *n == format!("ckpts/job2/{kept}/manifest.json")),
            "{kept}: {left:?}"
        );
    }
    assert!(left
        .iter()
        .any(|n| n == "ckpts/job2/attempt-3/ckpt-00000006/manifest.json"));

    // A corrupted object is refused: the candidate is skipped, and with no other the resume
    // fails (deterministically) instead of training on bad weights.
    let bad = "ckpts/job2/attempt-3/ckpt-00000006/model.safetensors";
    let mut bytes = final_resumed.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    block_on(store.put(&ObjPath::from(bad), bytes.into())).expect("put");
    let mut opts = TrainOptions::single(spec.clone(), Device::Cpu, tmp.join("node-d"));
    opts.checkpoint_remote = Some(other(4));
    opts.resume_candidates = vec![ResumeCandidate {
        uri: format!("{base}/ckpts/job2/attempt-3/ckpt-00000006"),
        iteration: 6,
        sha256: String::new(),
    }];
    let err = train(opts, &mut |_: &TrainEvent| {}).expect_err("corrupt checkpoint refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("is corrupt"), "{msg}");
    assert!(segtrain_trainer::train::stop::is_deterministic(&err));
}

#[test]
fn checkpoints_go_to_the_store_and_resume_from_it_on_another_node() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    generate(&SynthOptions {
        out: data.clone(),
        train: 6,
        val: 0,
        width: 64,
        height: 64,
        seed: 1,
    })
    .expect("synthetic data");

    exercise(
        Arc::new(InMemory::new()),
        "memory://bucket",
        &data,
        &tmp.path().join("mem"),
    );

    let root = tmp.path().join("bucket");
    std::fs::create_dir_all(&root).expect("bucket dir");
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(&root).expect("local store"));
    exercise(local, "file-store://bucket", &data, &tmp.path().join("fs"));
    // The local backend really wrote files.
    assert!(root
        .join("ckpts/job/attempt-1/ckpt-00000006/manifest.json")
        .exists());
}
