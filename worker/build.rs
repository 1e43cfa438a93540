//! Link arguments every tch binary of ours needs (reference/rust-stack.md §1.1).
//!
//! rustc links with `--as-needed`, and nothing in libtch calls into libtorch_cuda, so without
//! `--no-as-needed -ltorch` the CUDA half of libtorch is silently dropped and
//! `Cuda::is_available()` is false on a GPU machine. The rpath lets the binary find the wheel's
//! torch/lib without LD_LIBRARY_PATH on the machine it was built on.
fn main() {
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
