//! candump -L: write -> parse round trips for every frame kind, and the
//! parser never panics on arbitrary text.

use std::time::Duration;

use edgefleet_can::candump::{
    format_line, parse_line, CandumpReader, CandumpWriter, Direction, LogEntry, Timestamp,
};
use edgefleet_can::CanFrame;
use proptest::prelude::*;

fn frame() -> impl Strategy<Value = CanFrame> {
    let data = prop::collection::vec(any::<u8>(), 0..=64);
    (
        0u8..5,
        any::<u32>(),
        any::<bool>(),
        data,
        any::<bool>(),
        any::<bool>(),
        9u8..=15,
    )
        .prop_map(|(kind, id, ext, data, brs, esi, dlc)| {
            let id = if ext { id & 0x1FFF_FFFF } else { id & 0x7FF };
            match kind {
                0 => CanFrame::new(id, ext, &data[..data.len().min(8)]).unwrap(),
                1 => CanFrame::new_fd(id, ext, &data, brs, esi).unwrap(),
                2 => CanFrame::new_remote(id, ext, (data.len() % 9) as u8).unwrap(),
                3 => CanFrame::new_error(id & 0x1FFF_FFFF, &data[..data.len().min(8)]).unwrap(),
                _ => {
                    let mut d = data;
                    d.resize(8, 0);
                    CanFrame::new(id, ext, &d)
                        .unwrap()
                        .with_len8_dlc(dlc)
                        .unwrap()
                }
            }
        })
}

fn entry() -> impl Strategy<Value = LogEntry> {
    let iface = "[a-z][a-z0-9_-]{0,14}";
    let dir = prop_oneof![
        Just(None),
        Just(Some(Direction::Rx)),
        Just(Some(Direction::Tx))
    ];
    (0u64..20_000_000_000, 0u32..1_000_000, iface, frame(), dir).prop_map(
        |(secs, micros, iface, frame, direction)| LogEntry {
            timestamp: Timestamp::from_duration(Duration::new(secs, micros * 1000)),
            iface: iface.as_str().into(),
            frame,
            direction,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn write_then_parse_is_identity(e in entry()) {
        let mut line = String::new();
        format_line(&e, &mut line);
        let back = parse_line(&line).unwrap();
        prop_assert_eq!(&back, &e, "line {}", line);
        // And formatting the parsed entry reproduces the text byte for byte.
        let mut again = String::new();
        format_line(&back, &mut again);
        prop_assert_eq!(again, line);
    }

    #[test]
    fn parser_never_panics(s in "\\PC{0,80}") {
        let _ = parse_line(&s);
    }

    #[test]
    fn parser_never_panics_on_near_misses(
        ts in "\\([0-9]{0,12}\\.?[0-9]{0,10}\\)?",
        id in "[0-9A-Fa-fxR#_.]{0,12}",
        rest in "[0-9A-Fa-fR#_. ]{0,140}",
    ) {
        let _ = parse_line(&format!("{ts} can0 {id}{rest}"));
    }
}

#[test]
fn writer_and_reader_stream_a_whole_log() {
    let frames = [
        CanFrame::new(0x123, false, &[0xDE, 0xAD, 0xBE, 0xEF]).unwrap(),
        CanFrame::new(0x1ABC_DEF0, true, &[]).unwrap(),
        CanFrame::new_fd(0x7FF, false, &[0x55; 64], true, false).unwrap(),
        CanFrame::new_remote(0x100, true, 3).unwrap(),
    ];
    let mut w = CandumpWriter::new(Vec::new());
    for (i, f) in frames.iter().enumerate() {
        let t = Timestamp::from_duration(Duration::from_micros(
            1_700_000_000_000_000 + i as u64 * 1500,
        ));
        w.write_frame(t, "can0", f).unwrap();
    }
    let text = String::from_utf8(w.into_inner()).unwrap();
    assert_eq!(
        text.lines().next().unwrap(),
        "(1700000000.000000) can0 123#DEADBEEF"
    );
    assert_eq!(
        text.lines().nth(1).unwrap(),
        "(1700000000.001500) can0 1ABCDEF0#"
    );
    assert!(text
        .lines()
        .nth(2)
        .unwrap()
        .starts_with("(1700000000.003000) can0 7FF##1555555"));
    assert_eq!(
        text.lines().nth(3).unwrap(),
        "(1700000000.004500) can0 00000100#R3"
    );
    let back: Vec<CanFrame> = CandumpReader::new(text.as_bytes())
        .map(|e| e.unwrap().frame)
        .collect();
    assert_eq!(back, frames);
}

#[test]
fn accepts_what_candump_writes() {
    // Lines as produced by can-utils candump -L, including CRLF endings.
    let log = "(1436509052.249713) vcan0 044#2A366C2BBA\r\n\
               (1436509052.449847) vcan0 0F6#7ADFE07BD2\n\
               (1436509052.650004) vcan0 1CF#\n\
               (1436509053.050365) vcan0 12345678#R\n\
               (1436509053.250573) vcan0 123##5001122\n";
    let entries: Vec<LogEntry> = CandumpReader::new(log.as_bytes())
        .map(Result::unwrap)
        .collect();
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[0].frame.data(), &[0x2A, 0x36, 0x6C, 0x2B, 0xBA]);
    assert!(entries[2].frame.is_empty());
    assert!(entries[3].frame.is_remote() && entries[3].frame.is_extended());
    // Newer can-utils also set CANFD_FDF (0x4) in the flags digit.
    assert!(entries[4].frame.is_fd() && entries[4].frame.brs() && !entries[4].frame.esi());
    assert_eq!(entries[4].frame.data(), &[0x00, 0x11, 0x22]);
}
