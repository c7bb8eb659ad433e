fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tweed/v1/agent.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/tweed/v1/agent.proto"], &["proto"])
        .map_err(|e| format!("compiling proto/tweed/v1/agent.proto (needs protoc: apt-get install protobuf-compiler): {e}").into())
}
