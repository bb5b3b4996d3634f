//! Property tests against an independent model of DBC bit layout.
//!
//! The reference below reads one bit at a time and, for Motorola signals,
//! walks the DBC "sawtooth" literally (down through a byte, then to bit 7 of
//! the next byte). The fast decoder instead linearises bit numbers and does
//! one wide load per signal, so agreement between the two is meaningful.

mod common;

use std::fmt::Write as _;

use edgefleet_can::{ByteOrder, CanFrame, Decoder, MessagePlan, SignalValue, ValueKind};
use proptest::prelude::*;

fn bit(data: &[u8], pos: u32) -> u64 {
    u64::from((data[(pos / 8) as usize] >> (pos % 8)) & 1)
}

fn reference_raw(data: &[u8], start: u32, len: u32, order: ByteOrder) -> u64 {
    let mut v = 0u64;
    match order {
        ByteOrder::LittleEndian => {
            for i in 0..len {
                v |= bit(data, start + i) << i;
            }
        }
        ByteOrder::BigEndian => {
            let mut pos = start;
            for i in 0..len {
                v = (v << 1) | bit(data, pos);
                if i + 1 < len {
                    pos = if pos % 8 == 0 { pos + 15 } else { pos - 1 };
                }
            }
        }
    }
    v
}

/// The physical value the DBC spec gives for `raw`, computed independently.
fn reference_value(kind: ValueKind, len: u32, raw: u64, factor: f64, offset: f64) -> f64 {
    let x: f64 = match kind {
        ValueKind::Unsigned => raw as f64,
        ValueKind::Signed => {
            let r = i128::from(raw);
            let v = if (raw >> (len - 1)) & 1 == 1 {
                r - (1i128 << len)
            } else {
                r
            };
            v as f64
        }
        ValueKind::Float32 => f64::from(f32::from_bits(raw as u32)),
        ValueKind::Float64 => f64::from_bits(raw),
    };
    x * factor + offset
}

/// Checks every signal of one decoded frame against the reference,
/// including which multiplexed signals are present.
fn check_against_reference(plan: &MessagePlan, data: &[u8], decoder: &Decoder) {
    let frame = if data.len() > 8 {
        CanFrame::new_fd(plan.id(), plan.is_extended(), data, false, false).unwrap()
    } else {
        CanFrame::new(plan.id(), plan.is_extended(), data).unwrap()
    };
    let decoded = decoder.decode(&frame).unwrap();
    let mut raws: Vec<Option<u64>> = vec![None; plan.signals().len()];
    let mut expected = Vec::new();
    for (i, s) in plan.signals().iter().enumerate() {
        if let Some((mux, ranges)) = s.multiplexed_by() {
            let Some(sel) = raws[mux] else { continue };
            if !ranges.iter().any(|&(lo, hi)| lo <= sel && sel <= hi) {
                continue;
            }
        }
        let raw = reference_raw(data, u32::from(s.start_bit()), s.size(), s.byte_order());
        raws[i] = Some(raw);
        expected.push((
            s.name().clone(),
            raw,
            reference_value(s.kind(), s.size(), raw, s.factor(), s.offset()),
        ));
    }
    assert_eq!(
        decoded.signals.len(),
        expected.len(),
        "present signals of {}",
        plan.name()
    );
    for (got, (name, raw, value)) in decoded.signals.iter().zip(expected) {
        assert_eq!(got.name, name);
        assert_eq!(got.raw, raw, "{name} raw, data {data:02X?}");
        match got.value {
            SignalValue::Int(v) => {
                // Integers are exact: compare in i128 from the reference raw.
                let s = plan.signal(&name).unwrap().1;
                let r = if s.kind() == ValueKind::Signed && (raw >> (s.size() - 1)) & 1 == 1 {
                    i128::from(raw) - (1i128 << s.size())
                } else {
                    i128::from(raw)
                };
                let want = r * s.factor() as i128 + s.offset() as i128;
                assert_eq!(i128::from(v), want, "{name}");
            }
            SignalValue::Float(v) => {
                assert!(
                    v.to_bits() == value.to_bits() || (v.is_nan() && value.is_nan()),
                    "{name}: fast {v} reference {value}"
                );
            }
        }
    }
}

#[derive(Debug, Clone)]
struct SigSpec {
    order: ByteOrder,
    kind: ValueKind,
    len: u32,
    /// Bit offset inside the signal's own byte region.
    shift: u32,
    factor: f64,
    offset: f64,
}

fn sig_spec() -> impl Strategy<Value = SigSpec> {
    let order = prop_oneof![Just(ByteOrder::LittleEndian), Just(ByteOrder::BigEndian)];
    let kind = prop_oneof![
        4 => Just(ValueKind::Unsigned),
        4 => Just(ValueKind::Signed),
        1 => Just(ValueKind::Float32),
        1 => Just(ValueKind::Float64),
    ];
    let scale = prop_oneof![
        Just((1.0, 0.0)),
        Just((0.5, 0.0)),
        Just((0.1, -40.0)),
        Just((0.25, 0.0)),
        Just((2.0, -100.0)),
        Just((-1.0, 0.0)),
        Just((0.001, 0.0)),
        Just((10.0, 5.0)),
        Just((0.03125, -273.0)),
        Just((1.0, -125.0)),
    ];
    (order, kind, 1u32..=64, 0u32..8, scale).prop_map(
        |(order, kind, len, shift, (factor, offset))| {
            let (len, factor, offset) = match kind {
                ValueKind::Float32 => (32, 1.0, 0.0),
                ValueKind::Float64 => (64, 1.0, 0.0),
                _ => (len, factor, offset),
            };
            SigSpec {
                order,
                kind,
                len,
                shift,
                factor,
                offset,
            }
        },
    )
}

/// Builds a DBC message whose signals each own a disjoint run of bytes (so
/// encoding one never disturbs another), returning the text and the size.
fn build_dbc(specs: &[SigSpec], extended: bool) -> (String, usize) {
    let mut sigs = String::new();
    let mut byte = 0u32;
    for (i, s) in specs.iter().enumerate() {
        let nbytes = (s.shift + s.len).div_ceil(8);
        let start = match s.order {
            ByteOrder::LittleEndian => 8 * byte + s.shift,
            // `shift` counts from the MSB side in transmission order.
            ByteOrder::BigEndian => 8 * byte + (7 - s.shift),
        };
        let (o, sign) = match (s.order, s.kind) {
            (ByteOrder::LittleEndian, ValueKind::Signed) => (1, '-'),
            (ByteOrder::LittleEndian, _) => (1, '+'),
            (ByteOrder::BigEndian, ValueKind::Signed) => (0, '-'),
            (ByteOrder::BigEndian, _) => (0, '+'),
        };
        let _ = writeln!(
            sigs,
            " SG_ S{i} : {start}|{}@{o}{sign} ({},{}) [0|0] \"u{i}\" Vector__XXX",
            s.len, s.factor, s.offset
        );
        byte += nbytes;
    }
    let size = byte as usize;
    let id = if extended {
        0x1234_5678u32 | 0x8000_0000
    } else {
        0x123
    };
    let mut text =
        format!("VERSION \"\"\n\nNS_ :\n\nBS_:\n\nBU_: N\n\nBO_ {id} M: {size} N\n{sigs}\n");
    for (i, s) in specs.iter().enumerate() {
        let t = match s.kind {
            ValueKind::Float32 => 1,
            ValueKind::Float64 => 2,
            _ => continue,
        };
        let _ = writeln!(text, "SIG_VALTYPE_ {id} S{i} : {t};");
    }
    (text, size)
}

fn layouts() -> impl Strategy<Value = (Vec<SigSpec>, bool)> {
    (prop::collection::vec(sig_spec(), 1..8), any::<bool>()).prop_map(|(mut specs, ext)| {
        // Keep the message within 64 bytes.
        let mut total = 0;
        specs.retain(|s| {
            total += (s.shift + s.len).div_ceil(8);
            total <= 64
        });
        (specs, ext)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random layouts, random payloads: fast decoder == bit-by-bit reference.
    #[test]
    fn fast_decoder_matches_reference((specs, ext) in layouts(), seed in any::<u64>()) {
        let (text, size) = build_dbc(&specs, ext);
        let decoder = Decoder::from_dbc_str("prop.dbc", &text).unwrap();
        let plan = &decoder.messages()[0];
        let mut state = seed;
        let data: Vec<u8> = (0..size).map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 56) as u8
        }).collect();
        check_against_reference(plan, &data, &decoder);
    }

    /// Raw values on the grid survive encode -> decode exactly.
    #[test]
    fn encode_decode_round_trip_exact((specs, ext) in layouts(), raws in prop::collection::vec(any::<u64>(), 8)) {
        let (text, _) = build_dbc(&specs, ext);
        let decoder = Decoder::from_dbc_str("prop.dbc", &text).unwrap();
        let plan = &decoder.messages()[0];
        let mut wanted = Vec::new();
        for (i, s) in plan.signals().iter().enumerate() {
            let len = s.size();
            let mask = if len == 64 { u64::MAX } else { (1u64 << len) - 1 };
            let mut raw = raws[i] & mask;
            if s.kind() == ValueKind::Float32 && f32::from_bits(raw as u32).is_nan() { raw = 0; }
            if s.kind() == ValueKind::Float64 && f64::from_bits(raw).is_nan() { raw = 0; }
            let value = if s.is_integer() {
                let r = if s.kind() == ValueKind::Signed && (raw >> (len - 1)) & 1 == 1 {
                    i128::from(raw) - (1i128 << len)
                } else {
                    i128::from(raw)
                };
                SignalValue::Int((r * s.factor() as i128 + s.offset() as i128) as i64)
            } else {
                SignalValue::Float(reference_value(s.kind(), len, raw, s.factor(), s.offset()))
            };
            wanted.push((raw, value));
        }
        let frame = plan.encode_with(|i, _| Some(wanted[i].1)).unwrap();
        let back = decoder.decode(&frame).unwrap();
        for (got, (raw, value)) in back.signals.iter().zip(&wanted) {
            let s = plan.signal(&got.name).unwrap().1;
            // Beyond ~2^48 raw steps, scaling by a non-integral factor
            // in f64 can land more than half a step away.
            let exact = s.is_integer() || s.kind() == ValueKind::Float32
                || s.kind() == ValueKind::Float64 || s.size() <= 48;
            if exact {
                prop_assert_eq!(got.raw, *raw, "{} value {:?}", got.name, value);
                prop_assert_eq!(got.value, *value);
            } else {
                let rel = (got.value.as_f64() - value.as_f64()).abs() / value.as_f64().abs().max(1.0);
                prop_assert!(rel < 1e-14, "{} {:?} vs {:?}", got.name, got.value, value);
            }
        }
    }

    /// Arbitrary physical values inside the encodable range come back within
    /// half a factor step.
    #[test]
    fn physical_values_round_trip_within_resolution(
        (specs, ext) in layouts(),
        fractions in prop::collection::vec(0.0f64..=1.0, 8),
    ) {
        let (text, _) = build_dbc(&specs, ext);
        let decoder = Decoder::from_dbc_str("prop.dbc", &text).unwrap();
        let plan = &decoder.messages()[0];
        let values: Vec<f64> = plan.signals().iter().enumerate().map(|(i, s)| {
            let (lo, hi) = match s.kind() {
                ValueKind::Float32 | ValueKind::Float64 => (-1.0e6, 1.0e6),
                _ => s.representable_range(),
            };
            lo + (hi - lo) * fractions[i]
        }).collect();
        let frame = plan.encode_with(|i, _| Some(SignalValue::Float(values[i]))).unwrap();
        let back = decoder.decode(&frame).unwrap();
        for (i, got) in back.signals.iter().enumerate() {
            let s = &plan.signals()[i];
            let v = values[i];
            let tol = match s.kind() {
                ValueKind::Float32 => v.abs() * 1e-7,
                ValueKind::Float64 => 0.0,
                // Half a step, plus float noise for huge ranges.
                _ => s.factor().abs() / 2.0 + v.abs() * 4.0 * f64::EPSILON,
            };
            prop_assert!((got.value.as_f64() - v).abs() <= tol * (1.0 + 1e-9),
                "{}: sent {} got {:?} (factor {})", got.name, v, got.value, s.factor());
        }
    }
}

#[test]
fn vehicle_dbc_matches_reference_on_random_frames() {
    let decoder = common::vehicle();
    let mut state = 0x5EED_u64;
    for round in 0..200 {
        for plan in decoder.messages() {
            let mut data = vec![0u8; plan.size()];
            for b in &mut data {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (state >> 56) as u8;
            }
            // Exercise every multiplexor page regularly.
            if round % 2 == 0 && plan.is_multiplexed() {
                data[0] = (round / 2 % 4) as u8;
            }
            check_against_reference(plan, &data, &decoder);
        }
    }
}

#[test]
fn out_of_range_values_are_rejected_not_wrapped() {
    let decoder = common::vehicle();
    let plan = decoder.message_by_name("ECM_EngineData").unwrap();
    let (i, _) = plan.signal("CoolantTemp").unwrap();
    let err = plan
        .encode_with(|j, _| Some(SignalValue::Int(if j == i { 300 } else { 0 })))
        .unwrap_err();
    assert!(err.to_string().contains("CoolantTemp"), "{err}");
    let err = plan
        .encode_with(|j, _| Some(SignalValue::Float(if j == i { f64::NAN } else { 0.0 })))
        .unwrap_err();
    assert!(err.to_string().contains("CoolantTemp"), "{err}");
}
