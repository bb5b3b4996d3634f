// Compiles the .proto with protox (a pure-Rust protobuf compiler) so that a
// fresh machine needs no `protoc` to build the workspace.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "edgefleet/telemetry/v1/telemetry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
