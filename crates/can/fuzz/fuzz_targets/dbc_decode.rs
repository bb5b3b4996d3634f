#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgefleet_can_fuzz::dbc_decode(data));
