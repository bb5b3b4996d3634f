//! Bad input must produce typed errors with the right position, never a panic.

mod common;

use std::io::Write as _;

use edgefleet_can::candump::{CandumpError, CandumpReader, LineError};
use edgefleet_can::{DbcLoadError, Decoder, DecoderBuilder};

const HEADER: &str = "VERSION \"\"\n\nNS_ :\n\nBS_:\n\nBU_: A B\n\n";

fn load(body: &str) -> DbcLoadError {
    Decoder::from_dbc_str("bad.dbc", &format!("{HEADER}{body}")).unwrap_err()
}

fn pos(e: &DbcLoadError) -> (usize, usize) {
    match e {
        DbcLoadError::Syntax { line, column, .. } | DbcLoadError::Invalid { line, column, .. } => {
            (*line, *column)
        }
        other => panic!("no position: {other}"),
    }
}

#[test]
fn syntax_error_reports_line_and_column() {
    // Header is lines 1-8; BO_ is line 9, the bad signal line 11.
    let e = load(
        "BO_ 100 M: 8 A\n SG_ Ok : 0|8@1+ (1,0) [0|255] \"\" B\n SG_ Bad : 8|8@3+ (1,0) [0|255] \"\" B\n",
    );
    assert!(matches!(e, DbcLoadError::Syntax { .. }), "{e}");
    let (line, column) = pos(&e);
    assert_eq!(line, 11, "{e}");
    assert_eq!(column, 16, "{e}");
    assert!(e.to_string().starts_with("bad.dbc:11:16:"), "{e}");
}

#[test]
fn overflowing_number_reports_its_line() {
    let e = load("BO_ 100 M: 8 A\n SG_ S : 99999999999999999999|8@1+ (1,0) [0|255] \"\" B\n");
    assert_eq!(pos(&e).0, 10, "{e}");
    let e = load("BO_ 1 M: 8 A\n\nBO_ 99999999999 N: 8 A\n");
    assert_eq!(pos(&e).0, 11, "{e}");
}

#[test]
fn semantic_errors_name_the_signal_line() {
    // Signal needs byte 8 of a 4-byte message.
    let e = load("BO_ 100 M: 4 A\n SG_ Fine : 0|8@1+ (1,0) [0|255] \"\" B\n SG_ Over : 28|8@1+ (1,0) [0|255] \"\" B\n");
    assert!(matches!(e, DbcLoadError::Invalid { .. }), "{e}");
    assert_eq!(pos(&e), (11, 6), "{e}");
    assert!(e.to_string().contains("M.Over"), "{e}");

    // Motorola signal running off the end: start bit 0 (byte 0 bit 0) with
    // 16 bits ends in byte 2 of a 2-byte message.
    let e = load("BO_ 100 M: 2 A\n SG_ Moto : 0|16@0+ (1,0) [0|0] \"\" B\n");
    assert_eq!(pos(&e).0, 10, "{e}");

    // Float width mismatch.
    let e =
        load("BO_ 100 M: 8 A\n SG_ F : 0|16@1+ (1,0) [0|0] \"\" B\n\nSIG_VALTYPE_ 100 F : 1;\n");
    assert_eq!(pos(&e).0, 10, "{e}");

    // Multiplexed signal without a multiplexor.
    let e = load("BO_ 100 M: 8 A\n SG_ P m1 : 0|8@1+ (1,0) [0|0] \"\" B\n");
    assert!(e.to_string().contains("no multiplexor"), "{e}");

    // Standard id that needs more than 11 bits.
    let e = load("BO_ 2048 M: 8 A\n");
    assert_eq!(pos(&e).0, 9, "{e}");

    // Zero factor, oversized message, over-wide signal.
    assert_eq!(
        pos(&load(
            "BO_ 100 M: 8 A\n SG_ Z : 0|8@1+ (0,0) [0|0] \"\" B\n"
        ))
        .0,
        10
    );
    assert_eq!(pos(&load("BO_ 100 M: 65 A\n")).0, 9);
    assert_eq!(
        pos(&load(
            "BO_ 100 M: 16 A\n SG_ W : 0|65@1+ (1,0) [0|0] \"\" B\n"
        ))
        .0,
        10
    );
    // Duplicate signal names.
    let e = load(
        "BO_ 100 M: 8 A\n SG_ D : 0|8@1+ (1,0) [0|0] \"\" B\n SG_ D : 8|8@1+ (1,0) [0|0] \"\" B\n",
    );
    assert_eq!(pos(&e).0, 11, "{e}");
}

#[test]
fn duplicate_ids_name_both_files() {
    let dir = std::env::temp_dir().join(format!("edgefleet-can-dup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.dbc");
    let b = dir.join("b.dbc");
    std::fs::write(&a, format!("{HEADER}BO_ 256 First: 8 A\n")).unwrap();
    std::fs::write(
        &b,
        format!("{HEADER}BO_ 1 Other: 8 A\n\nBO_ 256 Second: 8 A\n"),
    )
    .unwrap();
    let e = Decoder::from_files(&[&a, &b]).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("a.dbc:9") && text.contains("b.dbc:11"),
        "{text}"
    );
    assert!(text.contains("First") && text.contains("Second"), "{text}");
    assert!(matches!(
        e,
        DbcLoadError::DuplicateMessageId {
            id: 0x100,
            extended: false,
            ..
        }
    ));

    // The same id as standard and extended is not a clash.
    std::fs::write(
        &b,
        format!("{HEADER}BO_ {} Ext: 8 A\n", 256u32 | 0x8000_0000),
    )
    .unwrap();
    let d = Decoder::from_files(&[&a, &b]).unwrap();
    assert_eq!(d.messages().len(), 2);

    // Within one file too.
    let e = load("BO_ 5 X: 8 A\n\nBO_ 5 Y: 8 A\n");
    assert!(
        matches!(
            e,
            DbcLoadError::DuplicateMessageId {
                first_line: 9,
                second_line: 11,
                ..
            }
        ),
        "{e}"
    );

    let missing = dir.join("missing.dbc");
    let e = Decoder::from_files(&[&missing]).unwrap_err();
    assert!(
        matches!(e, DbcLoadError::Io { .. }) && e.to_string().contains("missing.dbc"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn windows_1252_dbc_loads() {
    let mut bytes = format!("{HEADER}BO_ 100 M: 8 A\n SG_ T : 0|8@1+ (1,0) [0|0] \"").into_bytes();
    bytes.push(0xB0); // degree sign in Windows-1252, invalid UTF-8
    bytes.extend_from_slice(b"C\" B\n");
    let mut b = DecoderBuilder::new();
    b.add_bytes("cp1252.dbc", &bytes).unwrap();
    let d = b.build();
    assert_eq!(&**d.messages()[0].signals()[0].unit(), "\u{b0}C");
}

#[test]
fn mangled_dbc_files_never_panic() {
    let text = std::fs::read(common::VEHICLE_DBC).unwrap();
    let mut state = 0xC0FFEEu64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for _ in 0..150 {
        let mut bytes = text.clone();
        match next() % 3 {
            0 => bytes.truncate(next() % text.len()),
            1 => {
                for _ in 0..1 + next() % 4 {
                    let i = next() % bytes.len();
                    let alphabet = b"0123456789|@+-()[]\"\n :;,MmxSG_BO_";
                    bytes[i] = alphabet[next() % alphabet.len()];
                }
            }
            _ => {
                let i = next() % bytes.len();
                let j = next() % bytes.len();
                let chunk: Vec<u8> = bytes[i.min(j)..i.max(j)].to_vec();
                let at = next() % bytes.len();
                bytes.splice(at..at, chunk.into_iter().take(500));
            }
        }
        let mut b = DecoderBuilder::new();
        if let Err(e) = b.add_bytes("mangled.dbc", &bytes) {
            // Every error has a usable position inside the file.
            if let Some(line) = e.line() {
                let lines = bytes.split(|&c| c == b'\n').count();
                assert!(line >= 1 && line <= lines + 1, "{e}");
            }
        }
    }
}

#[test]
fn bad_candump_lines_report_their_line_numbers() {
    let log = "(1.000000) can0 123#00\n\
               garbage\n\
               (2.000000) can0 123#0\n\
               (3.000000) can0 123#00\n\
               (4.000000) can0 1234#00\n\
               (5.000000) can0 123##\n";
    let results: Vec<_> = CandumpReader::new(log.as_bytes()).collect();
    let bad: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(CandumpError::line))
        .collect();
    assert_eq!(bad, vec![2, 3, 5, 6]);
    assert!(matches!(
        &results[1],
        Err(CandumpError::Parse {
            kind: LineError::Timestamp(_),
            ..
        })
    ));
    assert!(matches!(
        &results[2],
        Err(CandumpError::Parse {
            kind: LineError::BadData(_),
            ..
        })
    ));
    assert!(matches!(
        &results[4],
        Err(CandumpError::Parse {
            kind: LineError::BadId(_),
            ..
        })
    ));
    assert!(matches!(
        &results[5],
        Err(CandumpError::Parse {
            kind: LineError::BadFdFlags(_),
            ..
        })
    ));
    let msg = results[2].as_ref().unwrap_err().to_string();
    assert!(msg.starts_with("line 3:"), "{msg}");
}

#[test]
fn read_errors_stop_the_reader() {
    struct Failing(u8);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                self.0 = 1;
                let line = b"(1.000000) can0 123#00\n";
                buf[..line.len()].copy_from_slice(line);
                Ok(line.len())
            } else {
                Err(std::io::Error::other("disk on fire"))
            }
        }
    }
    let r = std::io::BufReader::new(Failing(0));
    let items: Vec<_> = CandumpReader::new(r).collect();
    assert_eq!(items.len(), 2);
    assert!(matches!(items[1], Err(CandumpError::Io { line: 2, .. })));
    let _ = std::io::sink().flush();
}
