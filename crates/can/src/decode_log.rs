//! The library side of `edge-agent decode --dbc FILE... LOG`: a candump log
//! in, one JSON line per decoded frame out, one stderr line per frame that
//! could not be decoded.

use std::io::{self, BufRead, BufWriter, Write};
use std::path::Path;

use crate::candump::{CandumpError, CandumpReader, LogEntry};
use crate::dbc::DbcLoadError;
use crate::decode::{DecodeError, DecodedFrame, Decoder};
use crate::plan::SignalValue;

/// What a `decode_log` run saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Non-blank lines read.
    pub lines: u64,
    /// Frames written as JSON.
    pub decoded: u64,
    /// Frames whose id is in no DBC.
    pub no_dbc_entry: u64,
    /// Frames too short for their message.
    pub short: u64,
    /// Remote and error frames (nothing to decode).
    pub skipped: u64,
    /// Lines that are not valid candump.
    pub malformed: u64,
}

/// Why `decode_log` stopped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeLogError {
    #[error(transparent)]
    Dbc(#[from] DbcLoadError),
    #[error("reading the log at line {line}: {source}")]
    Input {
        line: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing output: {0}")]
    Output(#[source] io::Error),
}

/// Loads the DBC files and decodes the log (see [`decode_log_with`]).
pub fn decode_log<P, R, W, E>(
    dbc_paths: &[P],
    reader: R,
    out: W,
    err: E,
) -> Result<DecodeStats, DecodeLogError>
where
    P: AsRef<Path>,
    R: BufRead,
    W: Write,
    E: Write,
{
    let decoder = Decoder::from_files(dbc_paths)?;
    decode_log_with(&decoder, reader, out, err)
}

/// Decodes every frame of a candump log. Each decoded frame becomes one line
///
/// ```text
/// {"t": 1700000000.123456, "iface": "can0", "id": 291, "message": "EngineData", "signals": {"Rpm": 1250, "Temp": 87.5}, "labels": {"Gear": "Drive"}}
/// ```
///
/// where `t` is the log's timestamp with its own digits, `id` has no flag
/// bits, and `labels` appears only when some signal has a value-table label.
/// Non-finite float values are written as `null` (JSON has no NaN).
/// Anything else (malformed line, unknown id, short, remote or error frame)
/// becomes a `line N: reason` line on `err`, and decoding continues.
pub fn decode_log_with<R, W, E>(
    decoder: &Decoder,
    reader: R,
    out: W,
    err: E,
) -> Result<DecodeStats, DecodeLogError>
where
    R: BufRead,
    W: Write,
    E: Write,
{
    let mut out = BufWriter::new(out);
    let mut err = BufWriter::new(err);
    let mut stats = DecodeStats::default();
    let mut decoded = DecodedFrame::default();
    let mut line = String::with_capacity(256);
    let mut entries = CandumpReader::new(reader);
    while let Some(item) = entries.next() {
        let n = entries.line();
        let entry = match item {
            Ok(e) => e,
            Err(CandumpError::Io { line, source }) => {
                return Err(DecodeLogError::Input { line, source });
            }
            Err(e @ CandumpError::Parse { .. }) => {
                stats.lines += 1;
                stats.malformed += 1;
                writeln!(err, "{e}").map_err(DecodeLogError::Output)?;
                continue;
            }
        };
        stats.lines += 1;
        match decoder.decode_into(&entry.frame, &mut decoded) {
            Ok(()) => {
                line.clear();
                write_json(&entry, &decoded, &mut line);
                line.push('\n');
                out.write_all(line.as_bytes())
                    .map_err(DecodeLogError::Output)?;
                stats.decoded += 1;
            }
            Err(e) => {
                match e {
                    DecodeError::NoDbcEntry { .. } => stats.no_dbc_entry += 1,
                    DecodeError::ShortFrame { .. } => stats.short += 1,
                    DecodeError::RemoteFrame { .. } | DecodeError::ErrorFrame { .. } => {
                        stats.skipped += 1
                    }
                }
                writeln!(err, "line {n}: {e}").map_err(DecodeLogError::Output)?;
            }
        }
    }
    out.flush().map_err(DecodeLogError::Output)?;
    err.flush().map_err(DecodeLogError::Output)?;
    Ok(stats)
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires; serialising a &str
    // cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

fn push_value(out: &mut String, v: SignalValue) {
    use std::fmt::Write as _;
    match v {
        SignalValue::Int(i) => {
            let _ = write!(out, "{i}");
        }
        SignalValue::Float(f) => {
            // serde_json prints the shortest round-tripping form, and `null`
            // for NaN and infinities.
            out.push_str(&serde_json::Value::from(f).to_string());
        }
    }
}

/// One output line (without newline), in the documented key order.
pub fn write_json(entry: &LogEntry, frame: &DecodedFrame, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "{{\"t\": {}, \"iface\": ",
        entry.timestamp.to_json_number()
    );
    push_json_str(out, &entry.iface);
    let _ = write!(out, ", \"id\": {}, \"message\": ", frame.id);
    push_json_str(out, &frame.message);
    out.push_str(", \"signals\": {");
    for (i, s) in frame.signals.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_json_str(out, &s.name);
        out.push_str(": ");
        push_value(out, s.value);
    }
    out.push('}');
    if frame.signals.iter().any(|s| s.label.is_some()) {
        out.push_str(", \"labels\": {");
        let mut first = true;
        for s in &frame.signals {
            if let Some(label) = &s.label {
                if !first {
                    out.push_str(", ");
                }
                first = false;
                push_json_str(out, &s.name);
                out.push_str(": ");
                push_json_str(out, label);
            }
        }
        out.push('}');
    }
    out.push('}');
}
