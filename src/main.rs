fn main() -> std::process::ExitCode {
    anomalyd::cli::main()
}
