//! Known frames of testdata/vehicle.dbc decoded against values worked out by
//! hand (the working is in the comments), and encoded back to the same bytes.

mod common;

use edgefleet_can::{CanFrame, DecodeError, DecodedFrame, SignalValue};

fn decode(id: u32, extended: bool, data: &[u8]) -> DecodedFrame {
    let frame = if data.len() > 8 {
        CanFrame::new_fd(id, extended, data, true, false).unwrap()
    } else {
        CanFrame::new(id, extended, data).unwrap()
    };
    common::vehicle().decode(&frame).unwrap()
}

fn int(f: &DecodedFrame, name: &str) -> i64 {
    match f
        .signal(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .value
    {
        SignalValue::Int(v) => v,
        other => panic!("{name}: expected an integer, got {other:?}"),
    }
}

fn float(f: &DecodedFrame, name: &str) -> f64 {
    match f
        .signal(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .value
    {
        SignalValue::Float(v) => v,
        other => panic!("{name}: expected a float, got {other:?}"),
    }
}

fn label<'a>(f: &'a DecodedFrame, name: &str) -> Option<&'a str> {
    f.signal(name).unwrap().label.as_deref()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn intel_engine_data() {
    let data = [0x40, 0x1F, 0x7D, 0xFA, 0x64, 0x4B, 0x22, 0x5A];
    let f = decode(0x0C8, false, &data);
    assert_eq!(
        (f.id, f.extended, &*f.message),
        (0x0C8, false, "ECM_EngineData")
    );
    // bytes 0-1 little endian: 0x1F40 = 8000 * 0.25
    assert!(close(float(&f, "EngineSpeed"), 2000.0));
    assert_eq!(f.signal("EngineSpeed").unwrap().unit.as_ref(), "rpm");
    // 0x7D = 125, offset -40; integral factor and offset -> integer
    assert_eq!(int(&f, "CoolantTemp"), 85);
    assert!(close(float(&f, "ThrottlePosition"), 100.0)); // 250 * 0.4
    assert!(close(float(&f, "EngineLoad"), 50.0)); // 100 * 0.5
    assert_eq!(int(&f, "OilPressure"), 300); // 75 * 4
                                             // byte 6 = 0b0010_0010: bits 0-1 = 2, bit 2 = 0, bits 4-7 = 2
    assert_eq!(int(&f, "EngineState"), 2);
    assert_eq!(label(&f, "EngineState"), Some("Running"));
    assert_eq!(int(&f, "MilOn"), 0);
    assert_eq!(label(&f, "MilOn"), Some("Off"));
    assert_eq!(int(&f, "EngineDataCounter"), 2);
    assert_eq!(label(&f, "EngineDataCounter"), None);
    assert_eq!(int(&f, "EngineDataChecksum"), 0x5A);
    assert_eq!(f.signals.len(), 9);

    // Every bit is covered by a signal, so encoding gives the same bytes.
    let plan = common::vehicle();
    let plan = plan.message(0x0C8, false).unwrap();
    let values: Vec<(&str, SignalValue)> = f.signals.iter().map(|s| (&*s.name, s.value)).collect();
    assert_eq!(plan.encode(&values).unwrap().data(), &data);
}

#[test]
fn motorola_torque() {
    let data = [0xFC, 0x18, 0x01, 0xF4, 0xAB, 0xC8, 0x96, 0x00];
    let f = decode(0x0C9, false, &data);
    // start 7, 16 bits big endian: 0xFC18 = -1000 signed, * 0.1
    assert!(close(float(&f, "ActualTorque"), -100.0));
    // start 23: bytes 2-3 = 0x01F4 = 500
    assert!(close(float(&f, "RequestedTorque"), 50.0));
    // start 39, 12 bits: byte 4 then the high nibble of byte 5 -> 0xABC
    assert_eq!(int(&f, "TorqueLimit"), 0xABC);
    // start 43: byte 5 bit 3 of 0xC8 = 1
    assert_eq!(int(&f, "TorqueReductionActive"), 1);
    assert!(close(float(&f, "DriverDemandPct"), 75.0)); // 0x96 = 150 * 0.5
    let d = common::vehicle();
    let values: Vec<(&str, SignalValue)> = f.signals.iter().map(|s| (&*s.name, s.value)).collect();
    // Bits 4-0 of byte 5 and byte 7 are unused (zero in the sample too).
    assert_eq!(d.encode("ECM_Torque", &values).unwrap().data(), &data);
}

#[test]
fn signed_nibble_with_negative_label_and_motorola_bytes() {
    let f = decode(0x1A0, false, &[0xF3, 0x02, 0x73, 0x0F, 0xA0, 0, 0, 0]);
    assert_eq!(int(&f, "GearSelected"), 3);
    assert_eq!(label(&f, "GearSelected"), Some("D"));
    // high nibble 0xF as a signed 4-bit value is -1
    assert_eq!(int(&f, "CurrentGear"), -1);
    assert_eq!(label(&f, "CurrentGear"), Some("Reverse"));
    assert_eq!(int(&f, "ShiftInProgress"), 0);
    assert_eq!(int(&f, "TorqueConverterLock"), 1);
    assert_eq!(int(&f, "TransOilTemp"), 0x73 - 40);
    assert!(close(float(&f, "OutputShaftSpeed"), 2000.0)); // 0x0FA0 * 0.5
}

#[test]
fn motorola_sub_byte_fields() {
    let f = decode(0x502, false, &[0x2D, 0x1E, 0xC5, 0xFF, 0x38, 0x64, 0, 0]);
    assert!(close(float(&f, "CabinTemp"), 22.5)); // 45 * 0.5
    assert!(close(float(&f, "TargetTemp"), 25.0)); // 30 * 0.5 + 10
                                                   // byte 2 = 0b1100_0101: bit 7 AcOn, bit 6 Recirculation, bits 3-0 FanSpeed
    assert_eq!(int(&f, "AcOn"), 1);
    assert_eq!(int(&f, "Recirculation"), 1);
    assert_eq!(int(&f, "FanSpeed"), 5);
    assert!(close(float(&f, "OutsideTemp"), -2.0)); // 0xFF38 = -200 * 0.01
    assert!(close(float(&f, "Humidity"), 50.0));
}

#[test]
fn simple_multiplexing_selects_one_page() {
    // Page 2 holds cells 9-12, 12 bits each from bit 8:
    // 3700 | 3650 << 12 | 4095 << 24 | 1 << 36, little endian.
    let data = [0x02, 0x74, 0x2E, 0xE4, 0xFF, 0x1F, 0x00, 0x00];
    let f = decode(0x302, false, &data);
    let names: Vec<&str> = f.signals.iter().map(|s| &*s.name).collect();
    assert_eq!(
        names,
        [
            "CellMuxIndex",
            "CellVoltage09",
            "CellVoltage10",
            "CellVoltage11",
            "CellVoltage12"
        ]
    );
    assert!(close(float(&f, "CellVoltage09"), 3.7));
    assert!(close(float(&f, "CellVoltage10"), 3.65));
    assert!(close(float(&f, "CellVoltage11"), 4.095));
    assert!(close(float(&f, "CellVoltage12"), 0.001));

    let d = common::vehicle();
    let values: Vec<(&str, SignalValue)> = f.signals.iter().map(|s| (&*s.name, s.value)).collect();
    assert_eq!(d.encode("BMS_CellVoltages", &values).unwrap().data(), &data);
    // A signal of another page is rejected when encoding page 2.
    let mut wrong = values.clone();
    wrong.push(("CellVoltage01", SignalValue::Float(3.0)));
    assert!(d.encode("BMS_CellVoltages", &wrong).is_err());
    // Every selected signal must be given (signals of other pages need not be).
    assert!(
        d.encode("BMS_CellVoltages", &values[..4]).is_err(),
        "CellVoltage12 missing"
    );
}

#[test]
fn extended_multiplexing_with_ranges() {
    // ServiceId 34 selects SubFunction; SubFunction in 1-3 or 8-9 selects the DID value.
    let f = decode(0x540, false, &[0x22, 0x02, 0x78, 0x56, 0x34, 0x12, 0, 0]);
    let names: Vec<&str> = f.signals.iter().map(|s| &*s.name).collect();
    assert_eq!(names, ["ServiceId", "SubFunction", "DataIdentifierValue"]);
    assert_eq!(int(&f, "DataIdentifierValue"), 0x1234_5678);

    let f = decode(0x540, false, &[0x22, 0x09, 1, 0, 0, 0, 0, 0]);
    assert_eq!(int(&f, "DataIdentifierValue"), 1);

    let f = decode(0x540, false, &[0x22, 0x05, 0x78, 0x56, 0x34, 0x12, 0, 0]);
    let names: Vec<&str> = f.signals.iter().map(|s| &*s.name).collect();
    assert_eq!(names, ["ServiceId", "SubFunction"]);

    // ServiceId 127 selects ResponseCode (from SG_MUL_VAL_).
    let f = decode(0x540, false, &[0x7F, 0x78, 0, 0, 0, 0, 0, 0]);
    let names: Vec<&str> = f.signals.iter().map(|s| &*s.name).collect();
    assert_eq!(names, ["ServiceId", "ResponseCode"]);
    assert_eq!(label(&f, "ResponseCode"), Some("ResponsePending"));

    // SessionType has no SG_MUL_VAL_: its m16 refers to the one plain `M`.
    let f = decode(0x540, false, &[0x10, 0x03, 0, 0, 0, 0, 0, 0]);
    assert_eq!(label(&f, "SessionType"), Some("Extended"));
    assert!(f.signal("SubFunction").is_none());
}

#[test]
fn extended_ids_drop_the_flag_bit() {
    let d = common::vehicle();
    let plan = d.message(0x0CF0_0400, true).unwrap();
    assert_eq!(&**plan.name(), "EEC1");
    let f = decode(
        0x0CF0_0400,
        true,
        &[0xF1, 0x91, 0x8C, 0x68, 0x13, 0x00, 0xFF, 0xFF],
    );
    assert_eq!((f.id, f.extended), (0x0CF0_0400, true));
    assert_eq!(int(&f, "EngTorqueMode"), 1);
    assert_eq!(int(&f, "DriverDemandTorque"), 0x91 - 125);
    assert_eq!(int(&f, "ActualEngTorque"), 0x8C - 125);
    assert!(close(float(&f, "EngSpeed"), 621.0)); // 0x1368 * 0.125
                                                  // The same number as a standard id, or a standard id as extended, is unknown.
    let std_frame = CanFrame::new(0x0C8, true, &[0; 8]).unwrap();
    assert_eq!(
        d.decode(&std_frame),
        Err(DecodeError::NoDbcEntry {
            id: 0x0C8,
            extended: true
        })
    );
}

#[test]
fn ieee_float_and_double() {
    // 12.5f32 = 0x41480000 little endian; FuelLevel 200 * 0.4; FuelTemp 90 - 40
    let f = decode(0x0D0, false, &[0x00, 0x00, 0x48, 0x41, 0xC8, 0x5A, 0, 0]);
    assert_eq!(float(&f, "FuelRate"), 12.5);
    assert!(close(float(&f, "FuelLevel"), 80.0));
    assert_eq!(int(&f, "FuelTemp"), 50);

    let f = decode(0x304, false, &12345.678f64.to_le_bytes());
    assert_eq!(float(&f, "EnergyThroughput"), 12345.678);
}

#[test]
fn wide_integers() {
    // 64-bit unsigned cannot always be an i64: it is a float by rule.
    let f = decode(0x1CFF_0010, true, &[0xFF; 8]);
    assert_eq!(float(&f, "UptimeNs"), u64::MAX as f64);
    assert_eq!(f.signal("UptimeNs").unwrap().raw, u64::MAX);
    // 56-bit unsigned fits: an integer.
    let mut data = [0u8; 8];
    data[1..].copy_from_slice(b"WVWZZZ1");
    let f = decode(0x530, false, &data);
    assert_eq!(int(&f, "VinChars1"), 13_891_617_968_051_799);
    assert!(f.signal("VinChars2").is_none());
}

#[test]
fn can_fd_payload() {
    let mut data = [0u8; 64];
    data[62] = 0x10; // CellFD32 = 0x2710 = 10000 * 0.0001 V
    data[63] = 0x27;
    data[0] = 0x88; // CellFD01 = 0x1388 = 5000
    data[1] = 0x13;
    let f = decode(0x400, false, &data);
    assert_eq!(f.signals.len(), 32);
    assert!(close(float(&f, "CellFD32"), 1.0));
    assert!(close(float(&f, "CellFD01"), 0.5));
}

#[test]
fn short_frames_are_errors() {
    let d = common::vehicle();
    let seven = CanFrame::new(0x0C8, false, &[0; 7]).unwrap();
    assert!(matches!(
        d.decode(&seven),
        Err(DecodeError::ShortFrame {
            needed: 8,
            got: 7,
            ..
        })
    ));
    let fd48 = CanFrame::new_fd(0x400, false, &[0; 48], false, false).unwrap();
    assert!(matches!(
        d.decode(&fd48),
        Err(DecodeError::ShortFrame {
            needed: 64,
            got: 48,
            ..
        })
    ));
    // BMS_Temperatures: the mux byte is there, the selected page is not.
    let one = CanFrame::new(0x303, false, &[0x00]).unwrap();
    match d.decode(&one) {
        Err(DecodeError::ShortFrame {
            signal: Some(s),
            needed: 2,
            got: 1,
            ..
        }) => {
            assert_eq!(&*s, "ModuleTemp01")
        }
        other => panic!("{other:?}"),
    }
    // decode_with emits nothing for a failing frame.
    let mut n = 0;
    assert!(d.decode_with(&one, |_, _, _| n += 1).is_err());
    assert_eq!(n, 0);
}

#[test]
fn unknown_remote_and_error_frames() {
    let d = common::vehicle();
    let unknown = CanFrame::new(0x7FF, false, &[1, 2]).unwrap();
    let err = d.decode(&unknown).unwrap_err();
    assert!(err.is_no_dbc_entry());
    let remote = CanFrame::new_remote(0x0C8, false, 8).unwrap();
    assert_eq!(
        d.decode(&remote),
        Err(DecodeError::RemoteFrame { id: 0x0C8 })
    );
    let error = CanFrame::new_error(0x80, &[0; 8]).unwrap();
    assert!(matches!(
        d.decode(&error),
        Err(DecodeError::ErrorFrame { .. })
    ));
}

#[test]
fn decode_into_reuses_the_buffer() {
    let d = common::vehicle();
    let mut out = DecodedFrame::default();
    let a = CanFrame::new(0x0C8, false, &[1; 8]).unwrap();
    let b = CanFrame::new(0x1A0, false, &[1; 8]).unwrap();
    d.decode_into(&a, &mut out).unwrap();
    let cap = out.signals.capacity();
    d.decode_into(&b, &mut out).unwrap();
    assert_eq!(&*out.message, "TCM_Status");
    d.decode_into(&a, &mut out).unwrap();
    assert_eq!(out.signals.capacity(), cap);
    assert_eq!(out, d.decode(&a).unwrap());
}

#[test]
fn cycle_times_and_metadata() {
    let d = common::vehicle();
    assert_eq!(d.messages().len(), 33);
    let m = d.message_by_name("ECM_EngineData").unwrap();
    assert_eq!(m.cycle_time(), Some(std::time::Duration::from_millis(10)));
    assert_eq!(m.transmitter().map(|t| &**t), Some("ECM"));
    // BCM_Seats has no GenMsgCycleTime and the default is 0 (event driven).
    assert_eq!(d.message_by_name("BCM_Seats").unwrap().cycle_time(), None);
    assert!(d
        .message_by_name("BMS_CellVoltages")
        .unwrap()
        .is_multiplexed());
}
