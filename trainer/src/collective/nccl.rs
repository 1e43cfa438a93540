//! The GPU collective backend: NCCL, loaded at run time with libloading from the torch wheel's
//! own `libnccl.so.2` (cudarc's loader looks for `libnccl.so`, which
//! the wheel does not ship, and could pick up a different system copy).
//!
//! The library is `$SEGTRAIN_NCCL_LIBRARY` if set, else [`crate::doctor::nccl_library_path`].
//! Operations run in place on the device pointers of contiguous CUDA tensors, on the legacy
//! NULL stream, which is the stream every tch kernel runs on: an operation issued from the
//! training thread is ordered after the kernels that produced the tensor and before the ones
//! that read it, with no extra synchronisation.
//!
//! Timeouts: the communicator is created non-blocking (`ncclCommInitRankConfig`, `blocking =
//! 0`), so init can be polled and abandoned with `ncclCommAbort` when a peer never shows up.
//! After each operation the host polls the NULL stream (`cuStreamQuery`) and the communicator's
//! asynchronous error until the operation is done, for at most the step timeout, then aborts: a
//! dead peer is an error, never a hang. The price is one host wait per operation (one per
//! training step), negligible next to a step.

use super::{check_kind, check_root, Collective, CollectiveError, Timeouts, SUM_KINDS};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

type NcclResult = c_int;
type RawComm = *mut c_void;

const NCCL_SUCCESS: NcclResult = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;

// ncclDataType_t
const NCCL_INT8: c_int = 0;
const NCCL_UINT8: c_int = 1;
const NCCL_INT32: c_int = 2;
const NCCL_INT64: c_int = 4;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9;
// ncclRedOp_t
const NCCL_SUM: c_int = 0;
const NCCL_AVG: c_int = 4;

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// `ncclConfig_t` as NCCL 2.28 declares it (the torch 2.11 wheel ships 2.28.9); `size`, `magic`
/// and `version` tell the library which fields exist, the rest are "undefined" (library
/// defaults), as `NCCL_CONFIG_INITIALIZER` sets them.
#[repr(C)]
struct Config {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
    traffic_class: c_int,
    comm_name: *const c_char,
    collnet_enable: c_int,
    cta_policy: c_int,
    shrink_share: c_int,
    nvls_ctas: c_int,
    n_channels_per_net_peer: c_int,
    nvlink_centric_sched: c_int,
}

impl Config {
    fn non_blocking() -> Config {
        const UNDEF: c_int = c_int::MIN;
        Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: 22800, // NCCL_VERSION(2, 28, 0)
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
            traffic_class: UNDEF,
            comm_name: std::ptr::null(),
            collnet_enable: UNDEF,
            cta_policy: UNDEF,
            shrink_share: UNDEF,
            nvls_ctas: UNDEF,
            n_channels_per_net_peer: UNDEF,
            nvlink_centric_sched: UNDEF,
        }
    }
}

type CollFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    *mut c_void,
) -> NcclResult;

/// The NCCL entry points this backend uses, resolved once per process.
struct Api {
    path: PathBuf,
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank_config:
        unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int, *mut Config) -> NcclResult,
    /// (send, recv, count, datatype, op, comm, stream)
    all_reduce: CollFn,
    /// (send, recv, count, datatype, root, comm, stream)
    broadcast: CollFn,
    comm_finalize: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    get_last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
    _lib: libloading::Library,
}

/// The library this backend loads: `$SEGTRAIN_NCCL_LIBRARY`, else the torch wheel's copy.
pub fn library_path() -> Option<PathBuf> {
    std::env::var_os("SEGTRAIN_NCCL_LIBRARY")
        .map(PathBuf::from)
        .or_else(crate::doctor::nccl_library_path)
}

fn load() -> Result<Api, String> {
    let path = library_path().ok_or_else(|| {
        "libnccl.so.2 not found: the torch wheel's nvidia/nccl/lib has none and \
         SEGTRAIN_NCCL_LIBRARY is not set"
            .to_string()
    })?;
    // SAFETY: loading NCCL runs no initialisers with preconditions; the symbols are resolved
    // with the C signatures of nccl.h (2.28).
    unsafe {
        let lib = libloading::Library::new(&path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes())
                    .map_err(|e| format!("{}: no {}: {e}", path.display(), $name))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult = sym!("ncclGetVersion");
        let mut version = 0;
        let rc = get_version(&mut version);
        if rc != NCCL_SUCCESS {
            return Err(format!("{}: ncclGetVersion failed ({rc})", path.display()));
        }
        let get_last_error = lib
            .get::<unsafe extern "C" fn(RawComm) -> *const c_char>(b"ncclGetLastError\0")
            .ok()
            .map(|s| *s);
        Ok(Api {
            version,
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank_config: sym!("ncclCommInitRankConfig"),
            all_reduce: sym!("ncclAllReduce"),
            broadcast: sym!("ncclBroadcast"),
            comm_finalize: sym!("ncclCommFinalize"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort: sym!("ncclCommAbort"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            get_error_string: sym!("ncclGetErrorString"),
            get_last_error,
            path,
            _lib: lib,
        })
    }
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

impl Api {
    /// `major.minor.patch` (NCCL >= 2.9 encodes major*10000 + minor*100 + patch).
    fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    }

    fn describe(&self, rc: NcclResult, comm: RawComm) -> String {
        // SAFETY: both return pointers to static or per-communicator C strings (or null).
        unsafe {
            let text = |p: *const c_char| {
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
            };
            let mut s = text((self.get_error_string)(rc)).unwrap_or_else(|| format!("error {rc}"));
            if let Some(last) = self.get_last_error.and_then(|f| text(f(comm))) {
                if !last.is_empty() {
                    s = format!("{s}: {last}");
                }
            }
            s
        }
    }
}

fn need_cuda(op: &'static str, rank: usize) -> Result<(), CollectiveError> {
    if !tch::Cuda::is_available() {
        return Err(CollectiveError::Nccl {
            op,
            rank,
            message: "NCCL needs a CUDA device and this host has none; CPU ranks use the tcp \
                      rendezvous (--rendezvous tcp-listen:HOST:PORT / tcp:HOST:PORT)"
                .to_string(),
        });
    }
    Ok(())
}

/// One rank's NCCL communicator.
pub struct NcclCollective {
    api: &'static Api,
    comm: RawComm,
    rank: usize,
    world: usize,
    ordinal: usize,
    timeouts: Timeouts,
    poisoned: Option<String>,
    /// Keeps the device's primary context bound to this thread (cuStreamQuery needs it).
    _ctx: Arc<cudarc::driver::CudaContext>,
}

// SAFETY: the communicator is only used through `&mut self`, from one thread at a time; NCCL
// communicators may move between threads (they must not be used concurrently).
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.ordinal)
            .finish()
    }
}

impl NcclCollective {
    /// The NCCL version of the library this backend loads (`major.minor.patch`).
    pub fn version() -> Result<String, CollectiveError> {
        api()
            .map(|a| a.version_string())
            .map_err(|message| CollectiveError::Nccl {
                op: "load",
                rank: 0,
                message,
            })
    }

    /// A new unique id (rank 0, in the trainer process: it opens NCCL's bootstrap listener in
    /// the calling process). The other ranks get these 128 bytes through the coordinator.
    pub fn unique_id() -> Result<[u8; 128], CollectiveError> {
        need_cuda("ncclGetUniqueId", 0)?;
        let api = api().map_err(|message| CollectiveError::Nccl {
            op: "load",
            rank: 0,
            message,
        })?;
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid ncclUniqueId to fill.
        let rc = unsafe { (api.get_unique_id)(&mut id) };
        if rc != NCCL_SUCCESS {
            return Err(CollectiveError::Nccl {
                op: "ncclGetUniqueId",
                rank: 0,
                message: api.describe(rc, std::ptr::null_mut()),
            });
        }
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the communicator of `id` as `rank` of `world` on CUDA device 0 (one process per
    /// GPU: the daemon sets CUDA_VISIBLE_DEVICES), with the default timeouts.
    pub fn init(id: [u8; 128], rank: usize, world: usize) -> Result<Self, CollectiveError> {
        Self::init_on(id, rank, world, 0, Timeouts::default())
    }

    /// Joins the communicator of `id` as `rank` of `world` on CUDA device `ordinal`; gives up
    /// (aborting the communicator) when the others have not joined within `timeouts.setup`.
    pub fn init_on(
        id: [u8; 128],
        rank: usize,
        world: usize,
        ordinal: usize,
        timeouts: Timeouts,
    ) -> Result<Self, CollectiveError> {
        let op = "ncclCommInitRankConfig";
        if world == 0 || rank >= world {
            return Err(CollectiveError::Nccl {
                op,
                rank,
                message: format!("rank {rank} is not in 0..{world}"),
            });
        }
        need_cuda(op, rank)?;
        let api = api().map_err(|message| CollectiveError::Nccl {
            op: "load",
            rank,
            message,
        })?;
        eprintln!(
            "nccl: {} (version {}), rank {rank} of {world} on cuda:{ordinal}",
            api.path.display(),
            api.version_string()
        );
        // Binds the device's primary context (the one libtorch uses) to this thread, which
        // also makes `ordinal` the current device for NCCL.
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| CollectiveError::Nccl {
            op,
            rank,
            message: format!("cannot use CUDA device {ordinal}: {e}"),
        })?;
        let mut comm: RawComm = std::ptr::null_mut();
        let mut config = Config::non_blocking();
        let uid = UniqueId {
            internal: id.map(|b| b as c_char),
        };
        // SAFETY: `comm` and `config` are valid for the call; the id is passed by value.
        let rc = unsafe {
            (api.comm_init_rank_config)(&mut comm, world as c_int, uid, rank as c_int, &mut config)
        };
        let mut me = NcclCollective {
            api,
            comm,
            rank,
            world,
            ordinal,
            timeouts,
            poisoned: None,
            _ctx: ctx,
        };
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            let message = api.describe(rc, comm);
            me.poison(message.clone());
            return Err(CollectiveError::Nccl { op, rank, message });
        }
        if let Err(e) = me.wait_ready(op, timeouts.setup) {
            me.poison(e.to_string());
            return Err(e);
        }
        Ok(me)
    }

    /// Polls the communicator's asynchronous state until it is not "in progress".
    fn wait_ready(&self, op: &'static str, timeout: Duration) -> Result<(), CollectiveError> {
        let start = Instant::now();
        loop {
            let mut state = NCCL_SUCCESS;
            // SAFETY: a live communicator and a valid out pointer.
            let rc = unsafe { (self.api.comm_get_async_error)(self.comm, &mut state) };
            if rc != NCCL_SUCCESS {
                return Err(self.error(op, rc));
            }
            match state {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS => {}
                e => return Err(self.error(op, e)),
            }
            if start.elapsed() > timeout {
                return Err(self.timeout(op, timeout));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Polls until every kernel enqueued on the NULL stream (the operation included) is done,
    /// watching the communicator for errors; the step timeout bounds the wait.
    fn wait_done(&self, op: &'static str) -> Result<(), CollectiveError> {
        use cudarc::driver::sys::{cuStreamQuery, CUresult};
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: the NULL stream of the context bound to this thread.
            match unsafe { cuStreamQuery(std::ptr::null_mut()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                e => {
                    return Err(CollectiveError::Nccl {
                        op,
                        rank: self.rank,
                        message: format!("CUDA error while waiting for the operation: {e:?}"),
                    })
                }
            }
            let mut state = NCCL_SUCCESS;
            // SAFETY: as in wait_ready.
            let rc = unsafe { (self.api.comm_get_async_error)(self.comm, &mut state) };
            if rc != NCCL_SUCCESS {
                return Err(self.error(op, rc));
            }
            if state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS {
                return Err(self.error(op, state));
            }
            if start.elapsed() > self.timeouts.step {
                return Err(self.timeout(op, self.timeouts.step));
            }
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn error(&self, op: &'static str, rc: NcclResult) -> CollectiveError {
        CollectiveError::Nccl {
            op,
            rank: self.rank,
            message: self.api.describe(rc, self.comm),
        }
    }

    fn timeout(&self, op: &'static str, t: Duration) -> CollectiveError {
        CollectiveError::Nccl {
            op,
            rank: self.rank,
            message: format!(
                "not finished after {t:?}: a peer of this world of {} is dead, stuck or never \
                 joined; the communicator was aborted",
                self.world
            ),
        }
    }

    fn poison(&mut self, reason: String) {
        if self.poisoned.is_none() && !self.comm.is_null() {
            // SAFETY: a communicator we created and have not destroyed yet.
            unsafe { (self.api.comm_abort)(self.comm) };
            self.comm = std::ptr::null_mut();
        }
        self.poisoned = Some(reason);
    }

    fn check_tensor(
        &self,
        op: &'static str,
        t: &Tensor,
        kinds: &[Kind],
    ) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.poisoned {
            return Err(CollectiveError::Poisoned {
                op,
                reason: reason.clone(),
            });
        }
        check_kind(op, t, kinds)?;
        if t.device() != Device::Cuda(self.ordinal) {
            return Err(CollectiveError::Tensor {
                op,
                message: format!(
                    "NCCL works on tensors on cuda:{}, this one is on {:?}",
                    self.ordinal,
                    t.device()
                ),
            });
        }
        Ok(())
    }

    /// Enqueues one operation on the NULL stream and waits for it; aborts on failure.
    fn run(
        &mut self,
        op: &'static str,
        f: CollFn,
        t: &mut Tensor,
        arg: c_int,
    ) -> Result<(), CollectiveError> {
        let dtype = match t.kind() {
            Kind::Float => NCCL_FLOAT32,
            Kind::Double => NCCL_FLOAT64,
            Kind::Int64 => NCCL_INT64,
            Kind::Int => NCCL_INT32,
            Kind::Int8 => NCCL_INT8,
            Kind::Uint8 | Kind::Bool => NCCL_UINT8,
            Kind::Half => NCCL_FLOAT16,
            Kind::BFloat16 => NCCL_BFLOAT16,
            k => {
                return Err(CollectiveError::Tensor {
                    op,
                    message: format!("dtype {k:?} has no NCCL type"),
                })
            }
        };
        let count = t.numel();
        let ptr = if count == 0 {
            std::ptr::null_mut()
        } else {
            t.data_ptr()
        };
        // SAFETY: `ptr` is the device memory of a contiguous tensor of `count` elements of
        // `dtype`, on this communicator's device; in place (send == recv) is allowed; the NULL
        // stream orders it after the kernels that wrote the tensor.
        let rc = unsafe { f(ptr, ptr, count, dtype, arg, self.comm, std::ptr::null_mut()) };
        let result = if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            Err(self.error(op, rc))
        } else {
            self.wait_ready(op, self.timeouts.step)
                .and_then(|_| self.wait_done(op))
        };
        if let Err(e) = &result {
            self.poison(e.to_string());
        }
        result
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let op = "ncclAllReduce(avg)";
        self.check_tensor(op, t, &[Kind::Float])?;
        let f = self.api.all_reduce;
        self.run(op, f, t, NCCL_AVG)
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let op = "ncclAllReduce(sum)";
        self.check_tensor(op, t, SUM_KINDS)?;
        let f = self.api.all_reduce;
        self.run(op, f, t, NCCL_SUM)
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let op = "ncclBroadcast";
        check_root(op, root, self.world)?;
        let kinds = [
            Kind::Uint8,
            Kind::Int8,
            Kind::Int,
            Kind::Int64,
            Kind::Half,
            Kind::Float,
            Kind::Double,
            Kind::Bool,
            Kind::BFloat16,
        ];
        self.check_tensor(op, t, &kinds)?;
        let f = self.api.broadcast;
        self.run(op, f, t, root as c_int)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut t = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.ordinal)));
        self.check_tensor("barrier", &t, &[Kind::Float])?;
        let f = self.api.all_reduce;
        self.run("barrier", f, &mut t, NCCL_SUM)
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // Finalize (non-blocking: poll it, bounded), then destroy; abort if that fails.
        // SAFETY: a live communicator with nothing in flight (every operation was waited for).
        let finalized = unsafe { (self.api.comm_finalize)(self.comm) };
        let ok = (finalized == NCCL_SUCCESS || finalized == NCCL_IN_PROGRESS)
            && self
                .wait_ready("ncclCommFinalize", self.timeouts.setup)
                .is_ok();
        // SAFETY: as above; the communicator is not used afterwards.
        unsafe {
            if ok {
                (self.api.comm_destroy)(self.comm);
            } else {
                (self.api.comm_abort)(self.comm);
            }
        }
        self.comm = std::ptr::null_mut();
    }
}
