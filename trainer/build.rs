//! Link arguments every tch binary of ours needs (docs/libtorch.md says why each is there).
//!
//! rustc links with `--as-needed`, and nothing in libtch calls into libtorch_cuda, so without
//! `--no-as-needed -ltorch` the CUDA half of libtorch is silently dropped and
//! `Cuda::is_available()` is false on a GPU machine. The rpath lets the binary find the wheel's
//! torch/lib without LD_LIBRARY_PATH on the machine it was built on.
fn main() {
    build_shim();
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.to_string_lossy());
        // For `doctor`: which torch/lib this binary was linked against.
        println!(
            "cargo:rustc-env=SEGTRAIN_LIBTORCH_LIB={}",
            lib.to_string_lossy()
        );
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}

/// Compiles csrc/torch_shim.cpp (bf16 autocast, TF32, cuDNN flags) against the wheel's headers,
/// with the flags libtch itself uses.
fn build_shim() {
    println!("cargo:rerun-if-changed=csrc/torch_shim.cpp");
    let lib = std::path::PathBuf::from(
        std::env::var_os("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports its libtorch lib dir"),
    );
    let include = lib.join("../include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/torch_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("segtrain_torch_shim");
}
