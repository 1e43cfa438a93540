//! libtorch switches that tch lacks, through the C++ shim in `csrc/torch_shim.cpp`.

use std::ffi::CStr;
use std::os::raw::c_char;

extern "C" {
    fn segtrain_torch_version() -> *const c_char;
    fn segtrain_cudnn_version() -> std::os::raw::c_long;
    fn segtrain_set_tf32(on: bool);
    fn segtrain_set_cudnn_flags(deterministic: bool, benchmark: bool);
    fn segtrain_autocast_bf16_enter() -> bool;
    fn segtrain_autocast_exit(prev: bool);
    fn segtrain_autocast_enabled() -> bool;
    fn segtrain_autocast_is_bf16() -> bool;
    fn segtrain_tf32_cublas() -> bool;
    fn segtrain_tf32_cudnn() -> bool;
    fn segtrain_cudnn_deterministic() -> bool;
    fn segtrain_cudnn_benchmark() -> bool;
    fn segtrain_cuda_memory(
        device: std::os::raw::c_int,
        allocated: *mut i64,
        peak_allocated: *mut i64,
        reserved: *mut i64,
        peak_reserved: *mut i64,
    ) -> bool;
    fn segtrain_profile_start(cuda: bool, err: *mut c_char, len: usize) -> bool;
    fn segtrain_profile_stop(
        trace: *const c_char,
        events: *const c_char,
        err: *mut c_char,
        len: usize,
    ) -> bool;
    fn segtrain_set_grad(var: *mut torch_sys::C_tensor, grad: *const torch_sys::C_tensor);
    #[allow(clippy::too_many_arguments)]
    fn segtrain_fused_adamw(
        param: *mut torch_sys::C_tensor,
        grad: *const torch_sys::C_tensor,
        exp_avg: *mut torch_sys::C_tensor,
        exp_avg_sq: *mut torch_sys::C_tensor,
        step: *const torch_sys::C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        len: usize,
    ) -> bool;
}

/// The CUDA caching allocator's memory statistics for one device of this process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    /// Held by tensors now.
    pub allocated: i64,
    /// The most held by tensors since the process started.
    pub peak_allocated: i64,
    /// Taken from the driver by the allocator now (cached free blocks included).
    pub reserved: i64,
    pub peak_reserved: i64,
}

/// Memory statistics of CUDA device `index` (as this process numbers it), or `None` without CUDA
/// or before anything was allocated on it.
pub fn cuda_memory(index: usize) -> Option<CudaMemory> {
    let device = std::os::raw::c_int::try_from(index).ok()?;
    let mut m = CudaMemory {
        allocated: 0,
        peak_allocated: 0,
        reserved: 0,
        peak_reserved: 0,
    };
    // SAFETY: the four pointers are valid for writes for the duration of the call; the shim
    // catches C++ exceptions and returns false.
    let ok = unsafe {
        segtrain_cuda_memory(
            device,
            &mut m.allocated,
            &mut m.peak_allocated,
            &mut m.reserved,
            &mut m.peak_reserved,
        )
    };
    ok.then_some(m)
}

/// The libtorch switches in force: (TF32 in cuBLAS, TF32 in cuDNN, cuDNN deterministic,
/// cuDNN benchmark).
pub fn switches() -> (bool, bool, bool, bool) {
    // SAFETY: plain reads of global flags.
    unsafe {
        (
            segtrain_tf32_cublas(),
            segtrain_tf32_cudnn(),
            segtrain_cudnn_deterministic(),
            segtrain_cudnn_benchmark(),
        )
    }
}

/// Whether the CUDA autocast dtype of this thread is bf16.
pub fn autocast_is_bf16() -> bool {
    // SAFETY: reads thread-local autocast state.
    unsafe { segtrain_autocast_is_bf16() }
}

/// The libtorch version this binary runs, e.g. "2.11.0".
pub fn torch_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string literal.
    unsafe { CStr::from_ptr(segtrain_torch_version()) }
        .to_string_lossy()
        .into_owned()
}

/// The cuDNN version at run time (e.g. 91900 for 9.19.0), if CUDA and cuDNN are usable.
pub fn cudnn_version() -> Option<i64> {
    // SAFETY: no arguments; the shim catches C++ exceptions.
    let v = unsafe { segtrain_cudnn_version() };
    (v >= 0).then_some(v as i64)
}

/// Allows TF32 tensor-core math for fp32 matmuls and convolutions on Ampere and newer.
pub fn set_tf32(on: bool) {
    // SAFETY: sets global flags in at::Context.
    unsafe { segtrain_set_tf32(on) }
}

/// cuDNN algorithm selection: deterministic kernels, and/or benchmark (autotune per shape).
pub fn set_cudnn_flags(deterministic: bool, benchmark: bool) {
    // SAFETY: sets global flags in at::Context.
    unsafe { segtrain_set_cudnn_flags(deterministic, benchmark) }
}

/// Whether CUDA autocast is on in this thread.
pub fn autocast_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { segtrain_autocast_enabled() }
}

/// Runs `f` with CUDA autocast to bf16 in this thread (autocast state is thread-local in
/// libtorch), restoring the previous state afterwards, also if `f` panics. CPU ops are unaffected.
pub fn with_bf16_autocast<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: pairs with the enter below on the same thread.
            unsafe { segtrain_autocast_exit(self.0) }
        }
    }
    // SAFETY: sets thread-local autocast state; undone by `Restore`.
    let _restore = Restore(unsafe { segtrain_autocast_bf16_enter() });
    f()
}

/// Makes `grad` the `.grad` of `var`; autograd then accumulates into it in place. Refuses a
/// `grad` of another shape, kind or device.
pub fn set_grad(var: &mut tch::Tensor, grad: &tch::Tensor) -> Result<(), String> {
    if var.size() != grad.size() || var.kind() != grad.kind() || var.device() != grad.device() {
        return Err(format!(
            "a gradient must match its variable: {:?} {:?} {:?} vs {:?} {:?} {:?}",
            var.size(),
            var.kind(),
            var.device(),
            grad.size(),
            grad.kind(),
            grad.device()
        ));
    }
    // SAFETY: both handles are live tch tensors (at::Tensor pointers) for the whole call.
    unsafe { segtrain_set_grad(var.as_mut_ptr(), grad.as_ptr()) };
    Ok(())
}

/// Hyper-parameters of one fused AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW update of `param` in place through torch's fused kernel (the one
/// `torch.optim.AdamW(fused=True)` runs): one pass over parameter, gradient and both moments.
/// `step` is a float tensor on the parameter's device holding the update's number (1-based).
pub fn fused_adamw(
    param: &mut tch::Tensor,
    grad: &tch::Tensor,
    exp_avg: &mut tch::Tensor,
    exp_avg_sq: &mut tch::Tensor,
    step: &tch::Tensor,
    h: AdamWStep,
) -> Result<(), String> {
    // SAFETY: every handle is a live tch tensor for the whole call; `err` is a live buffer of
    // the length passed.
    shim_call(|err, len| unsafe {
        segtrain_fused_adamw(
            param.as_mut_ptr(),
            grad.as_ptr(),
            exp_avg.as_mut_ptr(),
            exp_avg_sq.as_mut_ptr(),
            step.as_ptr(),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            err,
            len,
        )
    })
}

/// Runs a shim call that reports failure as false plus a message written into the buffer it is
/// given.
fn shim_call(f: impl FnOnce(*mut c_char, usize) -> bool) -> Result<(), String> {
    let mut err = [0 as c_char; 512];
    if f(err.as_mut_ptr(), err.len()) {
        Ok(())
    } else {
        // SAFETY: the shim wrote a NUL-terminated message into `err` when it returned false.
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }
}

fn c_path(p: &std::path::Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", p.display()))
}

/// Starts libtorch's Kineto profiler (as torch.profiler): CPU operators of this thread and, with
/// `cuda`, every CUDA kernel. Stop it with [`profile_stop`].
pub fn profile_start(cuda: bool) -> Result<(), String> {
    // SAFETY: `err` is a live buffer of the length passed.
    shim_call(|err, len| unsafe { segtrain_profile_start(cuda, err, len) })
}

/// One profiled event: where it ran, how long, what.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfiledEvent {
    pub cuda: bool,
    pub duration_ns: u64,
    pub name: String,
}

/// Stops the profiler, writes the Chrome trace to `trace` (if given) and returns the events.
pub fn profile_stop(trace: Option<&std::path::Path>) -> Result<Vec<ProfiledEvent>, String> {
    let events_path =
        std::env::temp_dir().join(format!("segtrain-profile-{}.tsv", std::process::id()));
    let events = c_path(&events_path)?;
    let trace = trace.map(c_path).transpose()?.unwrap_or_default();
    // SAFETY: both paths are NUL-terminated and live for the call; `err` as above.
    shim_call(|err, len| unsafe {
        segtrain_profile_stop(trace.as_ptr(), events.as_ptr(), err, len)
    })?;
    let text = std::fs::read_to_string(&events_path)
        .map_err(|e| format!("{}: {e}", events_path.display()));
    let _ = std::fs::remove_file(&events_path);
    let text = text?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            let (device, ns, name) = (f.next()?, f.next()?, f.next()?);
            Some(ProfiledEvent {
                cuda: device == "cuda",
                duration_ns: ns.parse().ok()?,
                name: name.to_string(),
            })
        })
        .collect())
}
