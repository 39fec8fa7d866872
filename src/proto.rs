//! Generated protobuf and gRPC code for `sked.v1`, and its file descriptor set
//! (served by reflection so `grpcurl` needs no proto files).

#![allow(missing_docs, clippy::all)]

/// `sked.v1`: messages, clients (`*_client`) and servers (`*_server`).
pub mod v1 {
    tonic::include_proto!("sked.v1");
}

/// Encoded `FileDescriptorSet` of every `sked.v1` file and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sked_descriptor");
