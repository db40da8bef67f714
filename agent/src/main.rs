fn main() -> std::process::ExitCode {
    phoenix_agent::cli::main()
}
