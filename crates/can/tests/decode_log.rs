//! The `decode` command's library function: exact JSON lines on stdout,
//! reasons with line numbers on stderr.

mod common;

use edgefleet_can::{decode_log, DecodeLogError, DecodeStats};

#[test]
fn json_lines_and_stderr_reasons() {
    let log = "\
(1700000000.123456) can0 0C8#401F7DFA644B225A
(1700000000.223456) can0 1A0#F302730FA0000000
(1700000000.323456) can1 7FF#0102
garbage line
(1700000000.423456) can0 0C8#401F
(1700000000.523456) can0 0C8#R

(1700000000.623456) can0 0CF00400#F1918C681300FFFF
(1700000000.723456) can0 0D0#00004841C85A0000
";
    let mut out = Vec::new();
    let mut err = Vec::new();
    let stats = decode_log(&[common::VEHICLE_DBC], log.as_bytes(), &mut out, &mut err).unwrap();
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0],
        r#"{"t": 1700000000.123456, "iface": "can0", "id": 200, "message": "ECM_EngineData", "signals": {"EngineSpeed": 2000.0, "CoolantTemp": 85, "ThrottlePosition": 100.0, "EngineLoad": 50.0, "OilPressure": 300, "EngineState": 2, "MilOn": 0, "EngineDataCounter": 2, "EngineDataChecksum": 90}, "labels": {"EngineState": "Running", "MilOn": "Off"}}"#
    );
    assert_eq!(
        lines[1],
        r#"{"t": 1700000000.223456, "iface": "can0", "id": 416, "message": "TCM_Status", "signals": {"GearSelected": 3, "CurrentGear": -1, "ShiftInProgress": 0, "TorqueConverterLock": 1, "TransOilTemp": 75, "OutputShaftSpeed": 2000.0}, "labels": {"GearSelected": "D", "CurrentGear": "Reverse"}}"#
    );
    // Extended id printed without the flag bit; no labels key without labels.
    assert_eq!(
        lines[2],
        r#"{"t": 1700000000.623456, "iface": "can0", "id": 217056256, "message": "EEC1", "signals": {"EngTorqueMode": 1, "DriverDemandTorque": 20, "ActualEngTorque": 15, "EngSpeed": 621.0, "SourceAddress": 0}}"#
    );
    assert!(lines[3].contains(r#""FuelRate": 12.5"#), "{}", lines[3]);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).expect("valid JSON");
        assert!(v["t"].is_f64() && v["signals"].is_object());
    }

    let err = String::from_utf8(err).unwrap();
    let errs: Vec<&str> = err.lines().collect();
    assert_eq!(errs.len(), 4, "{err}");
    assert!(errs[0].starts_with("line 3: no DBC entry"), "{}", errs[0]);
    assert!(errs[1].starts_with("line 4: "), "{}", errs[1]);
    assert!(
        errs[2].starts_with("line 5: ECM_EngineData") && errs[2].contains("needs 8"),
        "{}",
        errs[2]
    );
    assert!(errs[3].starts_with("line 6: remote frame"), "{}", errs[3]);

    assert_eq!(
        stats,
        DecodeStats {
            lines: 8,
            decoded: 4,
            no_dbc_entry: 1,
            short: 1,
            skipped: 1,
            malformed: 1
        }
    );
}

#[test]
fn bad_dbc_is_an_error_before_any_output() {
    let dir = std::env::temp_dir().join(format!("edgefleet-can-dl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.dbc");
    std::fs::write(&bad, "VERSION \"\"\nBO_ x\n").unwrap();
    let mut out = Vec::new();
    let e = decode_log(&[&bad], &b""[..], &mut out, std::io::sink()).unwrap_err();
    assert!(matches!(e, DecodeLogError::Dbc(_)));
    assert!(e.to_string().contains("bad.dbc:2:"), "{e}");
    assert!(out.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn non_finite_floats_become_null() {
    // FuelRate = NaN (0x7FC00000 little endian).
    let log = "(0000000001.5) can0 0D0#0000C07F00000000\n";
    let mut out = Vec::new();
    decode_log(
        &[common::VEHICLE_DBC],
        log.as_bytes(),
        &mut out,
        std::io::sink(),
    )
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with(r#"{"t": 1.5, "#), "{out}");
    assert!(out.contains(r#""FuelRate": null"#), "{out}");
    serde_json::from_str::<serde_json::Value>(out.trim()).unwrap();
}
