//! Compiles the .proto files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile(["proto/gateway.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `connect()` helper: the appliance dials through its own pinned-TLS connector, and
        // without it this crate needs no tonic transport at all.
        .build_transport(false)
        .codec_path("crate::codec::SmallBufferCodec")
        // Artifact chunks are large: decoded as a slice of the receive buffer, not copied out.
        .bytes(".airlock.gateway.v1.ArtifactChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
