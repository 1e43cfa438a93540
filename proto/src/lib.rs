//! The `segtrain.v1` API. Generated from `proto/segtrain/v1/*.proto`; see those files for the
//! meaning of every message and field. [`client`] is how clients connect (TLS, bearer token,
//! message limits); [`refusal`] the machine-readable reasons some refusals carry; [`job_spec`]
//! converts the `segtrain-spec` types to and from `segtrain.v1.JobSpec`.

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
    tonic::include_proto!("segtrain.v1");

    /// The encoded `FileDescriptorSet` of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("segtrain_descriptor");
}

pub use prost_types::Timestamp;

pub mod client;
mod failover;
pub mod job_spec;
pub mod json;
pub mod names;
pub mod refusal;
pub mod text;
