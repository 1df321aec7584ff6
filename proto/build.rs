//! Compiles the protobuf surfaces with protox (pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "custody/v1/api.proto",
        "custody/cluster/v1/cluster.proto",
        "custody/tunnel/v1/tunnel.proto",
        "custody/evidence/v1/evidence.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".custody.cluster.v1")
        .bytes(".custody.tunnel.v1")
        .bytes(".custody.evidence.v1")
        .bytes(".custody.v1.ExecInput")
        .bytes(".custody.v1.ExecOutput")
        .boxed(".custody.v1.ExecOutput.kind.approval_required")
        .compile_fds(fds)?;
    Ok(())
}
