//! The edgefleet wire contract, `edgefleet.telemetry.v1`, as Rust types and a
//! tonic client and server. The protocol itself is documented in
//! `edgefleet/telemetry/v1/telemetry.proto`.

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::derive_partial_eq_without_eq)]
    tonic::include_proto!("edgefleet.telemetry.v1");
}

pub use v1::*;

pub mod batch_zstd;
pub mod encoded;
mod record_writer;
pub mod stored_zstd;

pub use record_writer::{EncodedRecord, EncodedRecords, RecordWriter, SignalValue};

/// The protocol revision this crate describes (`Hello.protocol_revision`).
pub const PROTOCOL_REVISION: u32 = 1;

impl Record {
    /// Size of the record as encoded on the wire, used for byte caps.
    pub fn encoded_size(&self) -> usize {
        prost::Message::encoded_len(self)
    }
}

impl Signal {
    pub fn f64(name: impl Into<String>, value: f64) -> Self {
        Self::with(name, signal::Value::F64(value))
    }
    pub fn i64(name: impl Into<String>, value: i64) -> Self {
        Self::with(name, signal::Value::I64(value))
    }
    pub fn bool(name: impl Into<String>, value: bool) -> Self {
        Self::with(name, signal::Value::Bool(value))
    }
    pub fn str(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self::with(name, signal::Value::Str(value.into()))
    }
    fn with(name: impl Into<String>, value: signal::Value) -> Self {
        Signal {
            name: name.into(),
            value: Some(value),
            unit: String::new(),
            label: String::new(),
        }
    }
}
