//! Compiles `phoenix/v1/*.proto` with the `protoc` shipped inside `protoc-bin-vendored`, so
//! no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let protos = ["phoenix/v1/agent.proto", "phoenix/v1/fleet.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // `AgentService.Connect` would clash with the generated `connect` constructor: clients
    // are built with `new(channel)` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
