//! Generates the gRPC code for `proto/sked/v1/*.proto` and a file descriptor
//! set for server reflection and the input boundary (`grpc::boundary`).
//! protoc comes from `protoc-bin-vendored`, so no system protoc is needed.
//!
//! Every generated service and client uses `grpc::codec::BoundaryCodec`
//! (prost underneath): request messages that do not decode are
//! `INVALID_ARGUMENT`, and decoded ones are checked against the limits of
//! `grpc::boundary` before any handler sees them. Messages carry their type
//! name (`prost::Name`) so the codec can find their descriptor.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: [std::path::PathBuf; 8] = [
        "proto/sked/v1/common.proto".into(),
        "proto/sked/v1/definition_service.proto".into(),
        "proto/sked/v1/binding_service.proto".into(),
        "proto/sked/v1/run_service.proto".into(),
        "proto/sked/v1/log_service.proto".into(),
        "proto/sked/v1/admin_service.proto".into(),
        "proto/sked/v1/worker_service.proto".into(),
        "proto/sked/v1/notification_service.proto".into(),
    ];
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sked_descriptor.bin"))
        .codec_path("crate::grpc::codec::BoundaryCodec")
        .compile_with_config(config, &protos, &["proto".into(), include])?;
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time: a new migration
    // must rebuild the crate (as `sqlx migrate build-script` writes).
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
