//! `segtrain-worker doctor`: what this binary runs on: libtorch, CUDA, cuDNN, GPUs, NCCL.

use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Serialize)]
pub struct Gpu {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub torch_version: String,
    /// The torch/lib directory the binary was linked against (its rpath).
    pub libtorch_lib: Option<String>,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub cudnn_version: Option<i64>,
    pub gpus: Vec<Gpu>,
    pub cpu_threads: i32,
    /// The NCCL library the collectives load: the torch wheel's own `libnccl.so.2`.
    pub nccl_library: Option<String>,
    /// Its version as `major.minor.patch`, read by loading it.
    pub nccl_version: Option<String>,
    /// Why NCCL could not be used, if so.
    pub nccl_error: Option<String>,
}

/// Where the torch wheel keeps NCCL: `torch/lib/../../nvidia/nccl/lib/libnccl.so.2` (the
/// libraries' own RPATH). cudarc would look for `libnccl.so`, which the wheel does not ship, and
/// could pick a different system copy.
pub fn nccl_library_path() -> Option<PathBuf> {
    let lib = PathBuf::from(option_env!("SEGTRAIN_LIBTORCH_LIB")?);
    let candidates = [
        std::env::var_os("SEGTRAIN_NCCL_LIBRARY").map(PathBuf::from),
        Some(lib.join("../../nvidia/nccl/lib/libnccl.so.2")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find_map(|p| p.canonicalize().ok())
}

/// Loads the library and asks it its version (works without a GPU).
fn nccl_version(path: &std::path::Path) -> Result<String, String> {
    // SAFETY: loading NCCL runs no user-visible initialisers; we call one plain C function.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
        let get: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> i32> =
            lib.get(b"ncclGetVersion\0").map_err(|e| e.to_string())?;
        let mut v = 0i32;
        let rc = get(&mut v);
        if rc != 0 {
            return Err(format!("ncclGetVersion returned {rc}"));
        }
        // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
        Ok(format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100))
    }
}

/// GPU names and memory from the CUDA driver. Only called when libtorch found CUDA, so the
/// driver library is present (cudarc would panic trying to load a missing one).
fn gpus(count: i64) -> Vec<Gpu> {
    use cudarc::driver::result;
    if result::init().is_err() {
        return Vec::new();
    }
    (0..count.max(0) as usize)
        .filter_map(|i| {
            let dev = result::device::get(i as i32).ok()?;
            let name = result::device::get_name(dev).ok()?;
            // SAFETY: `dev` is a valid device handle from the initialised driver.
            let memory_bytes = unsafe { result::device::total_mem(dev) }.ok()? as u64;
            Some(Gpu {
                index: i,
                name,
                memory_bytes,
            })
        })
        .collect()
}

pub fn report() -> Report {
    let cuda_available = tch::Cuda::is_available();
    let nccl_path = nccl_library_path();
    let (nccl_version, nccl_error) = match &nccl_path {
        Some(p) => match nccl_version(p) {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        },
        None => (
            None,
            Some("libnccl.so.2 not found next to torch".to_string()),
        ),
    };
    Report {
        torch_version: crate::torch_ext::torch_version(),
        libtorch_lib: option_env!("SEGTRAIN_LIBTORCH_LIB").map(str::to_string),
        cuda_available,
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cudnn_version: crate::torch_ext::cudnn_version(),
        gpus: if cuda_available {
            gpus(tch::Cuda::device_count())
        } else {
            Vec::new()
        },
        cpu_threads: tch::get_num_threads(),
        nccl_library: nccl_path.map(|p| p.display().to_string()),
        nccl_version,
        nccl_error,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or = |o: &Option<String>, none: &str| o.clone().unwrap_or_else(|| none.to_string());
        writeln!(f, "torch:            {}", self.torch_version)?;
        writeln!(
            f,
            "libtorch lib:     {}",
            or(&self.libtorch_lib, "(unknown)")
        )?;
        writeln!(f, "cuda available:   {}", self.cuda_available)?;
        let cudnn = match self.cudnn_version {
            Some(v) => format!(
                "{} ({}.{}.{})",
                self.cudnn_available,
                v / 10000,
                (v % 10000) / 100,
                v % 100
            ),
            None => self.cudnn_available.to_string(),
        };
        writeln!(f, "cudnn available:  {cudnn}")?;
        if self.gpus.is_empty() {
            writeln!(f, "gpus:             none")?;
        }
        for g in &self.gpus {
            writeln!(
                f,
                "gpu {}:            {}, {:.1} GiB",
                g.index,
                g.name,
                g.memory_bytes as f64 / (1u64 << 30) as f64
            )?;
        }
        writeln!(f, "cpu threads:      {}", self.cpu_threads)?;
        writeln!(
            f,
            "nccl library:     {}",
            or(&self.nccl_library, "(not found)")
        )?;
        match (&self.nccl_version, &self.nccl_error) {
            (Some(v), _) => write!(f, "nccl version:     {v}"),
            (None, Some(e)) => write!(f, "nccl version:     unavailable ({e})"),
            (None, None) => write!(f, "nccl version:     unavailable"),
        }
    }
}
