fn main() -> std::process::ExitCode {
    segtrain_cli::main()
}
