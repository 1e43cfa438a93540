//! Checkpoints: a directory `ckpt-<iteration>` holding
//!
//! - `model.safetensors`: every model tensor under its HuggingFace key (so `predict` and
//!   `pretrained` take it as it is), BatchNorm statistics included;
//! - `optimizer.safetensors`: the AdamW moments `m` and `v` (flat, in the optimizer's layout);
//! - `manifest.json`: iteration, optimizer steps, sampler position (the world-invariant stream
//!   position since format 2), spec, metrics, the parameter layout, and every file's size and
//!   sha256.
//!
//! It is written under a temporary name, fsynced, and renamed into place, so a reader sees a
//! whole checkpoint or none. The checkpoint's own digest is the sha256 of its manifest, which
//! covers the other files' digests.

use crate::data::SamplerState;
use crate::optim::adamw::Slot;
use anyhow::{bail, Context};
use segtrain_spec::JobSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
/// 2: the sampler state is the global stream position (world-invariant); 1 saved a per-rank
/// position of the padded, interleaved sampler (still read, see [`Manifest::sampler_state`]).
const FORMAT: u32 = 2;
/// The oldest format [`read_manifest`] accepts.
const OLDEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Completed iterations.
    pub iteration: u64,
    pub optimizer_steps: u64,
    /// The training sampler's position after the last batch of `iteration`: in format 2 the
    /// global stream position of the next iteration's first image; in format 1 a per-rank
    /// position. Resume through [`Manifest::sampler_state`], which converts the latter.
    pub sampler: SamplerState,
    pub spec: JobSpec,
    /// Metrics at this iteration (eval results when an evaluation ran here).
    pub metrics: BTreeMap<String, f64>,
    /// The best mIoU seen so far in the run, and the iteration it was seen at.
    pub best: Option<(f64, u64)>,
    pub optimizer_layout: Vec<Slot>,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Where the training stream continues after this checkpoint, for a train split of
    /// `dataset_len` images. Format 1 saved rank r's position p in the padded epoch that the
    /// ranks interleaved (positions r, r + W, ...), with W = the manifest's `spec.world_size`
    /// (format 1 always ran at the spec's world size): the ranks had consumed p · W positions of
    /// the epoch together, so the global state is (epoch, min(p · W, len)).
    pub fn sampler_state(&self, dataset_len: usize) -> SamplerState {
        if self.format == 1 {
            SamplerState::from_per_rank(self.sampler, self.spec.world_size, dataset_len)
        } else {
            self.sampler
        }
    }
}

/// A checkpoint as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub dir: PathBuf,
    pub iteration: u64,
    /// All files, manifest included.
    pub bytes: u64,
    /// sha256 of the manifest.
    pub sha256: String,
}

/// What `load` returns.
pub struct Loaded {
    pub manifest: Manifest,
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

pub fn dir_name(iteration: u64) -> String {
    format!("ckpt-{iteration:08}")
}

fn sha256_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fsync_path(path: &Path) -> anyhow::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", path.display()))
}

/// Writes tensors (moved to the CPU, contiguous, in the given order) as safetensors.
fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&cpu, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Everything needed to write one checkpoint.
pub struct Contents<'a> {
    pub iteration: u64,
    pub optimizer_steps: u64,
    pub sampler: SamplerState,
    pub spec: &'a JobSpec,
    pub metrics: BTreeMap<String, f64>,
    pub best: Option<(f64, u64)>,
    pub optimizer_layout: Vec<Slot>,
    /// Model tensors by HF key.
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

/// A directory removed when dropped, unless [`kept`](Self::kept): a checkpoint write that
/// fails (a full disk) leaves nothing half-written behind.
pub struct Scratch(Option<PathBuf>);

impl Scratch {
    pub fn new(dir: PathBuf) -> Scratch {
        Scratch(Some(dir))
    }

    /// The write succeeded: the directory stays.
    pub fn kept(mut self) {
        self.0 = None;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Writes `root/ckpt-<iteration>` atomically and returns its size and digest. On failure the
/// temporary directory is removed.
pub fn save(root: &Path, c: Contents<'_>) -> anyhow::Result<Saved> {
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = dir_name(c.iteration);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let scratch = Scratch::new(tmp.clone());

    let mut model = c.model;
    model.sort_by(|a, b| a.0.cmp(&b.0)); // byte-identical files for identical states
    let mut files = Vec::new();
    for (file, tensors) in [(MODEL_FILE, &model), (OPTIMIZER_FILE, &c.optimizer)] {
        let path = tmp.join(file);
        write_tensors(&path, tensors)?;
        fsync_path(&path)?;
        let (bytes, sha256) = sha256_file(&path)?;
        files.push(FileEntry {
            name: file.to_string(),
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        iteration: c.iteration,
        optimizer_steps: c.optimizer_steps,
        sampler: c.sampler,
        spec: c.spec.clone(),
        metrics: c.metrics,
        best: c.best,
        optimizer_layout: c.optimizer_layout,
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest)?;
    test_write_delay();
    let manifest_path = tmp.join(MANIFEST_FILE);
    {
        let mut f = File::create(&manifest_path)
            .with_context(|| format!("cannot create {}", manifest_path.display()))?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    fsync_path(&tmp)?;
    if final_dir.exists() {
        // A rerun reaching the same iteration replaces the old checkpoint.
        fs::remove_dir_all(&final_dir)
            .with_context(|| format!("cannot replace {}", final_dir.display()))?;
    }
    fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), final_dir.display()))?;
    scratch.kept();
    fsync_path(root)?;
    let bytes = manifest.files.iter().map(|f| f.bytes).sum::<u64>() + json.len() as u64;
    Ok(Saved {
        dir: final_dir,
        iteration: c.iteration,
        bytes,
        sha256: hex(&Sha256::digest(&json)),
    })
}

/// Fault-injection hook for the tests that stop a trainer in the middle of a checkpoint write:
/// `SEGTRAIN_TEST_CHECKPOINT_DELAY_MS` pauses between the tensor files and the manifest.
fn test_write_delay() {
    if let Some(ms) = std::env::var("SEGTRAIN_TEST_CHECKPOINT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

pub fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path)
        .with_context(|| format!("cannot read checkpoint manifest {}", path.display()))?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a segtrain checkpoint manifest", path.display()))?;
    if !(OLDEST_FORMAT..=FORMAT).contains(&m.format) {
        bail!(
            "{}: checkpoint format {} is not supported (this version reads formats \
             {OLDEST_FORMAT} to {FORMAT})",
            path.display(),
            m.format
        );
    }
    Ok(m)
}

/// Reads a checkpoint, verifying every file's size and sha256 against the manifest.
pub fn load(dir: &Path) -> anyhow::Result<Loaded> {
    let manifest = read_manifest(dir)?;
    let read = |name: &str| -> anyhow::Result<Vec<(String, Tensor)>> {
        let entry = manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .with_context(|| format!("{}: manifest lists no {name}", dir.display()))?;
        let path = dir.join(name);
        let (bytes, sha) = sha256_file(&path)?;
        if bytes != entry.bytes || sha != entry.sha256 {
            bail!(
                "{} is corrupt: {bytes} bytes with sha256 {sha}, the manifest says {} bytes with sha256 {}",
                path.display(),
                entry.bytes,
                entry.sha256
            );
        }
        Tensor::read_safetensors(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let model = read(MODEL_FILE)?;
    let optimizer = read(OPTIMIZER_FILE)?;
    Ok(Loaded {
        manifest,
        model,
        optimizer,
    })
}

/// Complete checkpoints under `root` (temporary directories are not), oldest first.
pub fn list(root: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", root.display())),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(it) = name
            .strip_prefix("ckpt-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join(MANIFEST_FILE).exists() {
                out.push((it, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes this run's checkpoints beyond the newest `keep_last` iterations, sparing the one at
/// `best_iteration`. Returns the deleted directories.
///
/// Only `root`'s own: when it is `…/attempt-<k>`, the job's other attempts' directories are
/// never touched. A trainer cut off from its coordinator may still be running when the job has
/// moved on, and the checkpoint a later attempt resumed from (or would resume from after
/// another failure) lies in an earlier attempt's directory: no trainer may delete it. Each
/// attempt keeps at most `keep_last` (docs/security.md, "Nothing acknowledged is lost").
pub fn retain(
    root: &Path,
    keep_last: usize,
    best_iteration: Option<u64>,
) -> anyhow::Result<Vec<PathBuf>> {
    // (iteration, attempt, dir)
    let all: Vec<(u64, u32, PathBuf)> = list(root)?.into_iter().map(|(it, d)| (it, 0, d)).collect();
    let doomed = retention(all, keep_last, best_iteration);
    let mut deleted = Vec::new();
    for dir in doomed {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot delete {}", dir.display()))?;
        deleted.push(dir);
    }
    Ok(deleted)
}

/// Which checkpoints retention removes, from (iteration, attempt, location) of every checkpoint
/// it may consider: older copies of an iteration re-done by a later attempt, then everything
/// beyond the newest `keep_last` iterations except `best_iteration`. Shared by the local and
/// the object-store retention.
pub fn retention<T>(
    mut all: Vec<(u64, u32, T)>,
    keep_last: usize,
    best_iteration: Option<u64>,
) -> Vec<T> {
    all.sort_by_key(|(it, attempt, _)| (*it, *attempt));
    let mut doomed: Vec<T> = Vec::new();
    // Newest copy of each iteration; older copies are superseded.
    let mut newest: Vec<(u64, T)> = Vec::new();
    for (it, _, loc) in all {
        match newest.last_mut() {
            Some((last, kept)) if *last == it => doomed.push(std::mem::replace(kept, loc)),
            _ => newest.push((it, loc)),
        }
    }
    let cut = newest.len().saturating_sub(keep_last);
    for (it, loc) in newest.into_iter().take(cut) {
        if Some(it) != best_iteration {
            doomed.push(loc);
        }
    }
    doomed
}

/// Checks that the manifest in `dir` has the sha256 the coordinator recorded for it when the
/// checkpoint completed (the manifest holds every other file's digest, which [`load`] checks).
pub fn verify_manifest_digest(dir: &Path, expected: &str) -> anyhow::Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "{} is missing or unreadable (an incomplete checkpoint)",
            path.display()
        )
    })?;
    let got = hex(&Sha256::digest(&bytes));
    if !expected.is_empty() && !got.eq_ignore_ascii_case(expected) {
        bail!(
            "{} has sha256 {got}, but {expected} was recorded when the checkpoint completed",
            path.display()
        );
    }
    Ok(())
}
