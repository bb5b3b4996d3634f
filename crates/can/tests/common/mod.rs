//! Helpers shared by the integration tests.
#![allow(dead_code)]

use edgefleet_can::Decoder;

pub const VEHICLE_DBC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/vehicle.dbc");

pub fn vehicle() -> Decoder {
    Decoder::from_files(&[VEHICLE_DBC]).expect("vehicle.dbc loads")
}
