fn main() -> std::process::ExitCode {
    phoenix_control_plane::demo::main()
}
