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

    // The same `Telemetry.Stream` route once more, with the agent's messages
    // read as `encoded::AgentFrame` (records left encoded; see src/encoded.rs).
    let stream = tonic_build::manual::Method::builder()
        .name("stream")
        .route_name("Stream")
        .input_type("crate::encoded::AgentFrame")
        .output_type("crate::IngestMessage")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("Telemetry")
        .package("edgefleet.telemetry.v1")
        .comment("`Telemetry` with record batches left encoded.")
        .method(stream)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    Ok(())
}
