//! The loader pool: decodes and augments training samples on worker threads and hands out
//! batches strictly in sampler order; and the evaluation iterator (full images, no augmentation).
//!
//! Work is handed out per sample: a worker takes the next sequence number under the lock (which
//! also advances the sampler), decodes and augments without the lock, then copies its result into
//! the batch's slot. Batches are returned in order whatever the thread timing, and at most
//! `prefetch` batches (finished or in progress) exist ahead of the consumer, which bounds memory
//! to `prefetch · batch` samples plus one sample of scratch per thread. Since only
//! `prefetch · batch` samples can be in flight, choose `prefetch · batch ≥ threads` to keep every
//! thread busy.
//!
//! Determinism: a sample's augmentation RNG is ChaCha8 seeded from (seed, epoch, position in the
//! epoch's permutation) only ([`sample_seed`]), and batches are cut from the sampler's sequence
//! (one batch = one micro-batch of the sampler's layout), so the batches depend neither on the
//! thread count nor on timing, nor on the world size (the sampler gives micro-batch `k` of a
//! step the same images, at the same positions, whichever rank draws it), and a loader started
//! from a saved [`SamplerState`] reproduces the batches that followed it bit for bit.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::augment::{AugmentConfig, Augmenter};
use super::cityscapes::{load, Sample};
use super::error::DataError;
use super::sampler::DistributedSampler;
use super::{Batch, EvalSample, SamplerState};
use crate::seed::splitmix64;

/// The augmentation seed of one sample: a mix of the run's seed, the epoch and the sample's
/// position in the epoch's permutation (unique within the epoch, the same for any world size).
/// Nothing else (no rank, no thread, no time).
pub fn sample_seed(seed: u64, epoch: u64, global_position: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ global_position)
}

/// The training loader: see the module docs. Dropping it stops its threads (each finishes at
/// most the sample it is working on).
pub struct TrainLoader {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TrainLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainLoader")
            .field("samples", &self.shared.samples.len())
            .field("batch", &self.shared.batch)
            .field("prefetch", &self.shared.prefetch)
            .field("threads", &self.threads.len())
            .finish()
    }
}

struct Shared {
    samples: Vec<Sample>,
    cfg: AugmentConfig,
    batch: usize,
    prefetch: u64,
    seed: u64,
    state: Mutex<State>,
    /// Workers wait here for room in the prefetch window (or for stop).
    work: Condvar,
    /// The consumer waits here for the next batch to complete.
    ready: Condvar,
}

struct State {
    sampler: DistributedSampler,
    /// Sequence number of the next sample to hand to a worker (batch = seq / batch size).
    next_seq: u64,
    /// Batches returned by `next_batch`; `pending[0]` is batch number `consumed`.
    consumed: u64,
    pending: VecDeque<Pending>,
    stop: bool,
    live_workers: usize,
}

struct Pending {
    images: Vec<u8>,
    labels: Vec<u8>,
    /// Samples of this batch not finished yet (taken or not).
    remaining: usize,
    /// The sampler state after this batch's last sample was drawn.
    next: SamplerState,
    /// The failure of the lowest slot, so the reported error does not depend on timing.
    error: Option<(usize, DataError)>,
}

struct Job {
    batch_id: u64,
    slot: usize,
    index: usize,
    seed: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock leaves consistent bookkeeping (every
        // update under the lock is a few plain assignments), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sample_bytes(&self) -> (usize, usize) {
        let px = self.cfg.crop_h * self.cfg.crop_w;
        (px * 3, px)
    }
}

impl TrainLoader {
    /// Starts `threads` workers over `samples` (the dataset in scan order), drawing indices from
    /// `sampler` from its current state on (a sampler made `with_state` resumes there). Every
    /// batch is one micro-batch of the sampler's layout (`batch_per_gpu` samples) augmented with
    /// `cfg`; at most `prefetch` batches are prepared ahead. `seed` seeds the augmentation (see
    /// [`sample_seed`]).
    pub fn start(
        samples: Vec<Sample>,
        sampler: DistributedSampler,
        cfg: AugmentConfig,
        threads: usize,
        prefetch: usize,
        seed: u64,
    ) -> Result<TrainLoader, DataError> {
        cfg.validate()?;
        if samples.len() != sampler.len() {
            return Err(DataError::Config(format!(
                "the sampler covers {} samples but the dataset has {}",
                sampler.len(),
                samples.len()
            )));
        }
        // The sampler's layout says which positions form a micro-batch; the batches must be cut
        // the same way.
        let batch = sampler.layout().batch_per_gpu;
        for (name, v) in [("threads", threads), ("prefetch", prefetch)] {
            if v == 0 {
                return Err(DataError::Config(format!(
                    "loader {name} must be at least 1"
                )));
            }
        }
        let shared = Arc::new(Shared {
            samples,
            cfg,
            batch,
            prefetch: prefetch as u64,
            seed,
            state: Mutex::new(State {
                sampler,
                next_seq: 0,
                consumed: 0,
                pending: VecDeque::new(),
                stop: false,
                live_workers: threads,
            }),
            work: Condvar::new(),
            ready: Condvar::new(),
        });
        let mut loader = TrainLoader {
            shared,
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let shared = Arc::clone(&loader.shared);
            let spawned = std::thread::Builder::new()
                .name(format!("loader-{i}"))
                .spawn(move || worker(&shared));
            match spawned {
                Ok(handle) => loader.threads.push(handle),
                Err(e) => {
                    // `loader` drops here and stops the threads already started.
                    loader.shared.lock().live_workers -= threads - i;
                    return Err(DataError::Worker(format!(
                        "cannot start loader thread: {e}"
                    )));
                }
            }
        }
        Ok(loader)
    }

    /// The next batch in sampler order. Blocks until it is ready. A sample that fails to load
    /// makes its batch an error naming the file; the loader goes on with the following batches.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        loop {
            if st.pending.front().is_some_and(|p| p.remaining == 0) {
                break;
            }
            if st.live_workers == 0 {
                return Err(DataError::Worker(
                    "every loader thread has exited".to_string(),
                ));
            }
            st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let Some(p) = st.pending.pop_front() else {
            return Err(DataError::Worker("loader bookkeeping lost a batch".into()));
        };
        st.consumed += 1;
        drop(st);
        shared.work.notify_all();
        if let Some((_, e)) = p.error {
            return Err(e);
        }
        Ok(Batch {
            images: p.images,
            labels: p.labels,
            n: shared.batch,
            height: shared.cfg.crop_h,
            width: shared.cfg.crop_w,
            next: p.next,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.shared.batch
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for TrainLoader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        for handle in self.threads.drain(..) {
            // A worker that panicked outside catch_unwind has nothing left to clean up.
            let _ = handle.join();
        }
    }
}

/// Decrements the live-worker count however the worker ends, and wakes the consumer so that it
/// cannot wait forever on threads that are gone.
struct LiveGuard<'a>(&'a Shared);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().live_workers -= 1;
        self.0.ready.notify_all();
    }
}

fn worker(shared: &Shared) {
    let _live = LiveGuard(shared);
    let (image_bytes, label_bytes) = shared.sample_bytes();
    let mut image_buf = vec![0u8; image_bytes];
    let mut label_buf = vec![0u8; label_bytes];
    let mut augmenter = Augmenter::new(shared.cfg.clone()).ok();
    while let Some(job) = take_job(shared) {
        let sample = &shared.samples[job.index];
        let result = catch_unwind(AssertUnwindSafe(|| {
            // `new` only fails on an invalid config, which `start` has already rejected.
            let aug = match augmenter.as_mut() {
                Some(a) => a,
                None => return Err(DataError::Config("invalid augmentation config".into())),
            };
            let (image, label) = load(sample)?;
            let mut rng = ChaCha8Rng::seed_from_u64(job.seed);
            aug.augment_into(&image, &label, &mut rng, &mut image_buf, &mut label_buf)
        }));
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                // The augmenter may be half-updated; start from a fresh one.
                augmenter = Augmenter::new(shared.cfg.clone()).ok();
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string());
                Err(DataError::Worker(format!(
                    "panic while loading {}: {what}",
                    sample.image.display()
                )))
            }
        };
        let mut st = shared.lock();
        let consumed = st.consumed;
        let Some(p) = st.pending.get_mut((job.batch_id - consumed) as usize) else {
            continue;
        };
        match result {
            Ok(()) => {
                let s = job.slot;
                p.images[s * image_bytes..(s + 1) * image_bytes].copy_from_slice(&image_buf);
                p.labels[s * label_bytes..(s + 1) * label_bytes].copy_from_slice(&label_buf);
            }
            Err(e) => {
                if p.error.as_ref().is_none_or(|(slot, _)| job.slot < *slot) {
                    p.error = Some((job.slot, e));
                }
            }
        }
        p.remaining -= 1;
        let done = p.remaining == 0 && job.batch_id == consumed;
        drop(st);
        if done {
            shared.ready.notify_all();
        }
    }
}

/// Waits for room in the prefetch window and takes the next sample, or returns None on stop.
fn take_job(shared: &Shared) -> Option<Job> {
    let mut st = shared.lock();
    loop {
        if st.stop {
            return None;
        }
        if st.next_seq / (shared.batch as u64) < st.consumed + shared.prefetch {
            break;
        }
        st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    let seq = st.next_seq;
    st.next_seq += 1;
    let batch_id = seq / shared.batch as u64;
    let slot = (seq % shared.batch as u64) as usize;
    let draw = st.sampler.next_draw();
    if slot == 0 {
        let (image_bytes, label_bytes) = shared.sample_bytes();
        let n = shared.batch;
        st.pending.push_back(Pending {
            images: vec![0u8; n * image_bytes],
            labels: vec![0u8; n * label_bytes],
            remaining: n,
            next: SamplerState::default(),
            error: None,
        });
    }
    if slot + 1 == shared.batch {
        let next = st.sampler.state();
        let consumed = st.consumed;
        if let Some(p) = st.pending.get_mut((batch_id - consumed) as usize) {
            p.next = next;
        }
    }
    Some(Job {
        batch_id,
        slot,
        index: draw.index,
        seed: sample_seed(shared.seed, draw.epoch, draw.global_position),
    })
}

/// Evaluation samples in order: full images and trainId labels, no augmentation. A background
/// thread decodes up to two samples ahead; dropping the iterator stops it.
pub fn eval_samples(samples: &[Sample]) -> EvalSamples {
    let owned = samples.to_vec();
    let (tx, rx) = sync_channel(2);
    let spawned = std::thread::Builder::new()
        .name("eval-loader".into())
        .spawn(move || {
            for sample in &owned {
                if tx.send(load_eval(sample)).is_err() {
                    return; // the iterator was dropped
                }
            }
        });
    let inner = match spawned {
        Ok(handle) => EvalInner::Threaded {
            rx: Some(rx),
            handle: Some(handle),
        },
        // No thread to be had: decode on the caller's thread instead.
        Err(_) => EvalInner::Sequential {
            samples: samples.to_vec(),
            next: 0,
        },
    };
    EvalSamples {
        inner,
        remaining: samples.len(),
    }
}

fn load_eval(sample: &Sample) -> Result<EvalSample, DataError> {
    let (image, label) = load(sample)?;
    Ok(EvalSample {
        image: image.data,
        label: label.data,
        height: image.height,
        width: image.width,
        path: sample.image.clone(),
    })
}

/// The iterator of [`eval_samples`].
pub struct EvalSamples {
    inner: EvalInner,
    remaining: usize,
}

enum EvalInner {
    Threaded {
        rx: Option<Receiver<Result<EvalSample, DataError>>>,
        handle: Option<JoinHandle<()>>,
    },
    Sequential {
        samples: Vec<Sample>,
        next: usize,
    },
}

impl Iterator for EvalSamples {
    type Item = Result<EvalSample, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = match &mut self.inner {
            EvalInner::Threaded { rx, .. } => rx.as_ref().and_then(|rx| rx.recv().ok()),
            EvalInner::Sequential { samples, next } => {
                let item = samples.get(*next).map(load_eval);
                *next += 1;
                item
            }
        };
        if item.is_some() {
            self.remaining = self.remaining.saturating_sub(1);
        }
        item
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl Drop for EvalSamples {
    fn drop(&mut self) {
        if let EvalInner::Threaded { rx, handle } = &mut self.inner {
            // Dropping the receiver makes the thread's next send fail, so it ends after at most
            // the sample it is decoding.
            drop(rx.take());
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}
