//! The simulator: deterministic, at the DBC's rates, decodable, in range.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use edgefleet_can::candump::CandumpReader;
use edgefleet_can::simulate::{run, simulate_to_candump, Pattern, SimConfig, Simulator};
use edgefleet_can::{CanFrame, SignalValue};

fn log(seed: u64, secs: u64) -> Vec<u8> {
    let d = common::vehicle();
    let cfg = SimConfig {
        seed,
        ..SimConfig::default()
    };
    let mut out = Vec::new();
    simulate_to_candump(&d, &cfg, Duration::from_secs(secs), &mut out, "vcan0").unwrap();
    out
}

#[test]
fn same_seed_same_log_different_seed_different_log() {
    assert_eq!(log(7, 3), log(7, 3));
    assert_ne!(log(7, 3), log(8, 3));
}

#[test]
fn rates_follow_cycle_times_and_every_frame_decodes() {
    let d = common::vehicle();
    let text = log(42, 10);
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut pages: HashMap<u64, ()> = HashMap::new();
    let mut last = Duration::ZERO;
    for e in CandumpReader::new(&text[..]) {
        let e = e.unwrap();
        assert!(e.timestamp.as_duration() >= last, "time order");
        last = e.timestamp.as_duration();
        let f = d.decode(&e.frame).unwrap();
        *counts.entry(f.message.to_string()).or_default() += 1;
        for s in &f.signals {
            let plan = d.message(f.id, f.extended).unwrap();
            let sp = plan.signal(&s.name).unwrap().1;
            if sp.min() < sp.max() {
                let v = s.value.as_f64();
                let slack = sp.factor().abs();
                assert!(
                    v >= sp.min() - slack && v <= sp.max() + slack,
                    "{}.{} = {v}",
                    f.message,
                    s.name
                );
            }
        }
        if &*f.message == "BMS_CellVoltages" {
            pages.insert(f.signal("CellMuxIndex").unwrap().raw, ());
        }
    }
    // 10 s at 10 ms = 1000 frames, 1 s cycle = 10, no cycle time -> default 100 ms.
    assert_eq!(counts["ECM_EngineData"], 1000);
    assert_eq!(counts["BMS_Energy"], 10);
    assert_eq!(counts["BCM_Seats"], 100);
    assert_eq!(counts["EEC1"], 500);
    assert_eq!(counts.len(), 33, "every message appears");
    assert_eq!(pages.len(), 4, "all multiplexor pages appear");
}

#[test]
fn configured_patterns_and_sinks() {
    let d = common::vehicle();
    let mut cfg = SimConfig {
        only: vec!["ECM_EngineData".into()],
        ..SimConfig::default()
    };
    cfg.patterns
        .insert("ECM_EngineData.CoolantTemp".into(), Pattern::Constant(90.0));
    cfg.patterns.insert(
        "EngineSpeed".into(),
        Pattern::Ramp {
            period: Duration::from_secs(1),
        },
    );
    cfg.patterns
        .insert("OilPressure".into(), Pattern::RandomWalk { step: 0.05 });
    cfg.periods
        .insert("ECM_EngineData".into(), Duration::from_millis(50));
    let mut frames: Vec<(Duration, CanFrame)> = Vec::new();
    let n = run(&d, &cfg, Duration::from_secs(1), &mut |at, f: &CanFrame| {
        frames.push((at, *f));
        Ok::<(), ()>(())
    })
    .unwrap();
    assert_eq!(n, 20);
    let mut speeds = Vec::new();
    for (_, f) in &frames {
        let f = d.decode(f).unwrap();
        assert_eq!(f.signal("CoolantTemp").unwrap().value, SignalValue::Int(90));
        speeds.push(f.signal("EngineSpeed").unwrap().value.as_f64());
    }
    // A ramp over 1 s sampled every 50 ms rises monotonically within the period.
    assert!(speeds.windows(2).all(|w| w[1] > w[0]), "{speeds:?}");
    assert_eq!(Simulator::new(&d, &cfg).take(5).count(), 5);
}
