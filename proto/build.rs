//! Compiles `segtrain/v1/*.proto` with protox (pure Rust, so no system `protoc`) and generates the
//! tonic client and server code. The encoded descriptor set is written next to it for server
//! reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "segtrain/v1/job.proto",
        "segtrain/v1/worker.proto",
        "segtrain/v1/auth.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // Reflection serves the imports (google/protobuf/timestamp.proto) too, so that clients such
    // as grpcurl can resolve every type; code is generated only for our own files.
    let with_imports = protox::Compiler::new(["."])?
        .include_imports(true)
        .open_files(files)?
        .file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("segtrain_descriptor.bin"),
        with_imports.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
