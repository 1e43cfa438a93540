//! `segtrain-worker doctor`: what this binary runs on.

use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Serialize)]
pub struct Report {
    /// The torch/lib directory the binary was linked against (its rpath).
    pub libtorch_lib: Option<String>,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub cuda_device_count: i64,
    pub cpu_threads: i32,
    /// Where libnccl.so.2 of the torch wheel would be loaded from, if present.
    pub nccl_library: Option<String>,
}

pub fn report() -> Report {
    let libtorch_lib = option_env!("SEGTRAIN_LIBTORCH_LIB").map(str::to_string);
    let nccl_library = libtorch_lib.as_ref().and_then(|lib| {
        // torch/lib/../../nvidia/nccl/lib/libnccl.so.2: the wheel's own NCCL (its RPATH).
        let p = PathBuf::from(lib).join("../../nvidia/nccl/lib/libnccl.so.2");
        p.canonicalize().ok().map(|p| p.display().to_string())
    });
    Report {
        libtorch_lib,
        cuda_available: tch::Cuda::is_available(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cuda_device_count: tch::Cuda::device_count(),
        cpu_threads: tch::get_num_threads(),
        nccl_library,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_none = |o: &Option<String>| o.clone().unwrap_or_else(|| "(not found)".into());
        writeln!(f, "libtorch lib:     {}", or_none(&self.libtorch_lib))?;
        writeln!(f, "cuda available:   {}", self.cuda_available)?;
        writeln!(f, "cudnn available:  {}", self.cudnn_available)?;
        writeln!(f, "cuda devices:     {}", self.cuda_device_count)?;
        writeln!(f, "cpu threads:      {}", self.cpu_threads)?;
        write!(f, "nccl library:     {}", or_none(&self.nccl_library))
    }
}
