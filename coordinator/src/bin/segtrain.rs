fn main() -> std::process::ExitCode {
    segtrain_coordinator::cli::main()
}
