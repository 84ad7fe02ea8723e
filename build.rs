//! Compiles the protobuf contract with `protox` (no system `protoc`) and
//! generates the prost messages and tonic services into `OUT_DIR`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/ordertrail/v1/model.proto",
    "proto/ordertrail/v1/service.proto",
    "proto/ordertrail/v1/storage.proto",
    "proto/ordertrail/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC server reflection.
    std::fs::write(out_dir.join("ordertrail_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // A request that cannot be decoded is INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::api::ProtoCodec")
        // Raw bodies are shared, not copied, between the front door and the store.
        .bytes(".ordertrail.v1.RawDelivery.body")
        // Deterministic encoding of the stored headers.
        .btree_map(".ordertrail.v1.RawDelivery.headers")
        .compile_fds(fds)?;
    Ok(())
}
