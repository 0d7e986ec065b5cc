//! Compiles the .proto files with protox (pure Rust), so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/workload.proto",
        "proto/node.proto",
        "proto/admin.proto",
        "proto/spire/api/agent/delegatedidentity/v1/delegatedidentity.proto",
        "proto/envoy/service/secret/v3/sds.proto",
        "proto/envoy/extensions/transport_sockets/tls/v3/secret.proto",
        "proto/envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
