//! The `candump -L` log format of can-utils:
//!
//! ```text
//! (1700000000.123456) can0 123#DEADBEEF        classical, standard id (3 hex digits)
//! (1700000000.123456) can0 12345678#DEADBEEF   extended id (8 hex digits)
//! (1700000000.123456) can0 123#R               remote request (optionally #R<len>)
//! (1700000000.123456) can0 123##1DEADBEEF      CAN FD, flags digit (1 = BRS, 2 = ESI)
//! (1700000000.123456) can0 20000080#00...      error frame (CAN_ERR_FLAG in the id)
//! (1700000000.123456) can0 123#1122334455667788_E   classical DLC 9..15
//! ```
//!
//! Data bytes may be separated by `.`; an optional trailing `R`/`T` marks the
//! direction (as some candump versions write). Parsing never panics: each
//! malformed line is an error carrying its line number.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::frame::{CanFrame, FrameError, CANFD_MAX_LEN, CAN_MAX_LEN, EFF_MAX_ID, SFF_MAX_ID};

const CAN_ERR_FLAG: u32 = 0x2000_0000;
const FD_BRS: u8 = 0x1;
const FD_ESI: u8 = 0x2;
/// Longer lines cannot be candump output; they are skipped, not buffered.
const MAX_LINE: usize = 4096;

/// A log timestamp, kept exactly as written so it can be echoed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    secs: u64,
    nanos: u32,
    /// Fraction digits as written (1..=9); candump writes 6.
    digits: u8,
}

impl Timestamp {
    /// A timestamp printed with microsecond precision, like candump.
    pub fn from_duration(d: Duration) -> Self {
        Self {
            secs: d.as_secs(),
            nanos: d.subsec_micros() * 1000,
            digits: 6,
        }
    }
    /// As a duration since the epoch (or whatever origin the log used).
    pub fn as_duration(&self) -> Duration {
        Duration::new(self.secs, self.nanos)
    }
    pub fn as_secs_f64(&self) -> f64 {
        self.secs as f64 + f64::from(self.nanos) / 1e9
    }
    pub fn secs(&self) -> u64 {
        self.secs
    }
    pub fn subsec_nanos(&self) -> u32 {
        self.nanos
    }

    /// `seconds.fraction` without candump's zero padding of the seconds, so
    /// the text is a valid JSON number with the log's own precision.
    pub fn to_json_number(&self) -> String {
        let digits = u32::from(self.digits.clamp(1, 9));
        let frac = self.nanos / 10u32.pow(9 - digits);
        format!("{}.{:0width$}", self.secs, frac, width = digits as usize)
    }
}

impl fmt::Display for Timestamp {
    /// `seconds.fraction` as candump writes it: seconds zero-padded to 10
    /// digits, the fraction with its original number of digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = u32::from(self.digits.clamp(1, 9));
        let frac = self.nanos / 10u32.pow(9 - digits);
        write!(
            f,
            "{:010}.{:0width$}",
            self.secs,
            frac,
            width = digits as usize
        )
    }
}

/// Direction marker some candump versions append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Rx,
    Tx,
}

/// One line of a candump log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub timestamp: Timestamp,
    pub iface: Arc<str>,
    pub frame: CanFrame,
    pub direction: Option<Direction>,
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("expected `(seconds.fraction)` timestamp, found {0:?}")]
    Timestamp(String),
    #[error("missing interface name")]
    MissingInterface,
    #[error("missing frame after interface")]
    MissingFrame,
    #[error("expected `<id>#<data>`, found {0:?}")]
    NoSeparator(String),
    #[error("identifier {0:?} must be 3 (standard) or 8 (extended) hex digits")]
    BadId(String),
    #[error("invalid frame: {0}")]
    Frame(#[from] FrameError),
    #[error("invalid hex data {0:?}")]
    BadData(String),
    #[error("invalid CAN FD flags digit {0:?}")]
    BadFdFlags(String),
    #[error("invalid remote frame length {0:?}")]
    BadRemote(String),
    #[error("invalid classical DLC suffix {0:?}")]
    BadDlcSuffix(String),
    #[error("CAN XL frames (`###`) are not supported")]
    CanXl,
    #[error("unexpected trailing text {0:?}")]
    Trailing(String),
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
}

/// A log line that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum CandumpError {
    #[error("line {line}: {kind}")]
    Parse { line: u64, kind: LineError },
    #[error("line {line}: read error: {source}")]
    Io {
        line: u64,
        #[source]
        source: io::Error,
    },
}

impl CandumpError {
    pub fn line(&self) -> u64 {
        match self {
            CandumpError::Parse { line, .. } | CandumpError::Io { line, .. } => *line,
        }
    }
}

/// Parses one non-empty log line.
pub fn parse_line(line: &str) -> Result<LogEntry, LineError> {
    let (timestamp, iface, frame, direction) = parse_parts(line)?;
    Ok(LogEntry {
        timestamp,
        iface: Arc::from(iface),
        frame,
        direction,
    })
}

type Parts<'a> = (Timestamp, &'a str, CanFrame, Option<Direction>);

fn parse_parts(line: &str) -> Result<Parts<'_>, LineError> {
    let mut fields = line.split_ascii_whitespace();
    let ts = fields.next().unwrap_or("");
    let timestamp = parse_timestamp(ts).ok_or_else(|| LineError::Timestamp(clip(ts)))?;
    let iface = fields.next().ok_or(LineError::MissingInterface)?;
    let frame_text = fields.next().ok_or(LineError::MissingFrame)?;
    let frame = parse_frame(frame_text)?;
    let direction = match fields.next() {
        None => None,
        Some("R") => Some(Direction::Rx),
        Some("T") => Some(Direction::Tx),
        Some(other) => return Err(LineError::Trailing(clip(other))),
    };
    if let Some(extra) = fields.next() {
        return Err(LineError::Trailing(clip(extra)));
    }
    Ok((timestamp, iface, frame, direction))
}

/// Keeps error messages short when a line is garbage.
fn clip(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn parse_timestamp(s: &str) -> Option<Timestamp> {
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    let (secs, frac) = inner.split_once('.')?;
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(secs) || !all_digits(frac) || frac.len() > 9 {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let digits = frac.len() as u32;
    let nanos = frac.parse::<u32>().ok()? * 10u32.pow(9 - digits);
    Some(Timestamp {
        secs,
        nanos,
        digits: digits as u8,
    })
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Hex byte pairs, optionally separated by single dots, at most `max` bytes.
fn parse_data(s: &str, max: usize) -> Result<([u8; CANFD_MAX_LEN], usize), LineError> {
    let mut out = [0u8; CANFD_MAX_LEN];
    let mut n = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    let bad = || LineError::BadData(clip(s));
    while i < bytes.len() {
        if bytes[i] == b'.' && i > 0 && i + 1 < bytes.len() && bytes[i - 1] != b'.' {
            i += 1;
            continue;
        }
        let hi = hex_digit(bytes[i]).ok_or_else(bad)?;
        let lo = bytes
            .get(i + 1)
            .copied()
            .and_then(hex_digit)
            .ok_or_else(bad)?;
        if n == max {
            return Err(LineError::Frame(FrameError::TooLong { len: n + 1, max }));
        }
        out[n] = hi << 4 | lo;
        n += 1;
        i += 2;
    }
    Ok((out, n))
}

/// Parses the `<id>#<data>` field.
pub fn parse_frame(s: &str) -> Result<CanFrame, LineError> {
    let (id_text, rest) = s
        .split_once('#')
        .ok_or_else(|| LineError::NoSeparator(clip(s)))?;
    let bad_id = || LineError::BadId(clip(id_text));
    if !id_text.bytes().all(|b| hex_digit(b).is_some()) {
        return Err(bad_id());
    }
    let raw_id = u32::from_str_radix(id_text, 16).map_err(|_| bad_id())?;
    let (id, extended, error) = match id_text.len() {
        3 if raw_id <= SFF_MAX_ID => (raw_id, false, false),
        8 if raw_id & CAN_ERR_FLAG != 0 && raw_id <= (CAN_ERR_FLAG | EFF_MAX_ID) => {
            (raw_id & EFF_MAX_ID, false, true)
        }
        8 if raw_id <= EFF_MAX_ID => (raw_id, true, false),
        _ => return Err(bad_id()),
    };

    if let Some(fd) = rest.strip_prefix('#') {
        if fd.starts_with('#') {
            return Err(LineError::CanXl);
        }
        let flags = fd
            .bytes()
            .next()
            .and_then(hex_digit)
            .ok_or_else(|| LineError::BadFdFlags(clip(fd)))?;
        if error {
            return Err(bad_id());
        }
        let (data, n) = parse_data(&fd[1..], CANFD_MAX_LEN)?;
        return Ok(CanFrame::new_fd(
            id,
            extended,
            &data[..n],
            flags & FD_BRS != 0,
            flags & FD_ESI != 0,
        )?);
    }

    if let Some(r) = rest.strip_prefix(['R', 'r']) {
        if error {
            return Err(bad_id());
        }
        let dlc = match r.as_bytes() {
            [] => 0,
            [d @ b'0'..=b'8'] => d - b'0',
            _ => return Err(LineError::BadRemote(clip(r))),
        };
        return Ok(CanFrame::new_remote(id, extended, dlc)?);
    }

    let (data_text, dlc) = match rest.split_once('_') {
        Some((d, suffix)) => {
            let dlc = match suffix.as_bytes() {
                [c] => hex_digit(*c).filter(|v| (9..=15).contains(v)),
                _ => None,
            };
            (
                d,
                Some(dlc.ok_or_else(|| LineError::BadDlcSuffix(clip(suffix)))?),
            )
        }
        None => (rest, None),
    };
    let (data, n) = parse_data(data_text, CAN_MAX_LEN)?;
    let mut frame = if error {
        CanFrame::new_error(id, &data[..n])?
    } else {
        CanFrame::new(id, extended, &data[..n])?
    };
    if let Some(dlc) = dlc {
        frame = frame.with_len8_dlc(dlc)?;
    }
    Ok(frame)
}

/// Formats the `<id>#<data>` field exactly as candump does.
pub fn format_frame(frame: &CanFrame, out: &mut String) {
    use fmt::Write as _;
    // Writing into a String cannot fail.
    let _ = if frame.is_error() {
        write!(out, "{:08X}#", frame.id() | CAN_ERR_FLAG)
    } else if frame.is_extended() {
        write!(out, "{:08X}#", frame.id())
    } else {
        write!(out, "{:03X}#", frame.id())
    };
    if frame.is_remote() {
        out.push('R');
        if !frame.is_empty() {
            let _ = write!(out, "{}", frame.len());
        }
        return;
    }
    if frame.is_fd() {
        let flags = (u8::from(frame.brs()) * FD_BRS) | (u8::from(frame.esi()) * FD_ESI);
        let _ = write!(out, "#{flags:X}");
    }
    for b in frame.data() {
        let _ = write!(out, "{b:02X}");
    }
    if let Some(dlc) = frame.len8_dlc() {
        let _ = write!(out, "_{dlc:X}");
    }
}

/// Formats a whole log line (without newline).
pub fn format_line(entry: &LogEntry, out: &mut String) {
    use fmt::Write as _;
    let _ = write!(out, "({}) {} ", entry.timestamp, entry.iface);
    format_frame(&entry.frame, out);
    match entry.direction {
        Some(Direction::Rx) => out.push_str(" R"),
        Some(Direction::Tx) => out.push_str(" T"),
        None => {}
    }
}

/// Streaming reader over any `BufRead`. Blank lines are skipped; every other
/// line yields an entry or an error with its 1-based line number, and reading
/// goes on after a bad line. After an I/O error the iterator ends.
pub struct CandumpReader<R> {
    reader: R,
    line: u64,
    buf: Vec<u8>,
    iface: Option<Arc<str>>,
    done: bool,
}

impl<R: BufRead> CandumpReader<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            line: 0,
            buf: Vec::with_capacity(128),
            iface: None,
            done: false,
        }
    }

    /// Line number of the entry (or error) returned last.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Reads one line into `buf`, at most `MAX_LINE` bytes; returns whether
    /// anything was read and whether the line had to be cut.
    fn read_line(&mut self) -> io::Result<Option<bool>> {
        self.buf.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.len() > MAX_LINE && self.buf.last() != Some(&b'\n') {
            // Discard the rest of an overlong line without buffering it.
            loop {
                let chunk = self.reader.fill_buf()?;
                if chunk.is_empty() {
                    break;
                }
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        self.reader.consume(p + 1);
                        break;
                    }
                    None => {
                        let len = chunk.len();
                        self.reader.consume(len);
                    }
                }
            }
            return Ok(Some(true));
        }
        Ok(Some(false))
    }
}

impl<R: BufRead> Iterator for CandumpReader<R> {
    type Item = Result<LogEntry, CandumpError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let cut = match self.read_line() {
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Ok(Some(cut)) => cut,
                Err(source) => {
                    self.done = true;
                    return Some(Err(CandumpError::Io {
                        line: self.line + 1,
                        source,
                    }));
                }
            };
            self.line += 1;
            let err = |kind| {
                Some(Err(CandumpError::Parse {
                    line: self.line,
                    kind,
                }))
            };
            if cut {
                return err(LineError::TooLong);
            }
            let Ok(text) = std::str::from_utf8(&self.buf) else {
                return err(LineError::NotUtf8);
            };
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            return Some(match parse_parts(text) {
                Ok((timestamp, iface, frame, direction)) => {
                    // Logs name one or two interfaces: share the Arc.
                    let iface = match &self.iface {
                        Some(a) if &**a == iface => a.clone(),
                        _ => {
                            let a: Arc<str> = Arc::from(iface);
                            self.iface = Some(a.clone());
                            a
                        }
                    };
                    Ok(LogEntry {
                        timestamp,
                        iface,
                        frame,
                        direction,
                    })
                }
                Err(kind) => Err(CandumpError::Parse {
                    line: self.line,
                    kind,
                }),
            });
        }
        None
    }
}

/// Writes log lines in `candump -L` format.
pub struct CandumpWriter<W> {
    out: W,
    line: String,
}

impl<W: Write> CandumpWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            line: String::with_capacity(160),
        }
    }

    pub fn write_entry(&mut self, entry: &LogEntry) -> io::Result<()> {
        self.line.clear();
        format_line(entry, &mut self.line);
        self.line.push('\n');
        self.out.write_all(self.line.as_bytes())
    }

    pub fn write_frame(
        &mut self,
        timestamp: Timestamp,
        iface: &str,
        frame: &CanFrame,
    ) -> io::Result<()> {
        use fmt::Write as _;
        self.line.clear();
        let _ = write!(self.line, "({timestamp}) {iface} ");
        format_frame(frame, &mut self.line);
        self.line.push('\n');
        self.out.write_all(self.line.as_bytes())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_frame_kind() {
        let e = parse_line("(1700000000.123456) can0 123#DEADBEEF").unwrap();
        assert_eq!(e.timestamp.secs(), 1_700_000_000);
        assert_eq!(e.timestamp.subsec_nanos(), 123_456_000);
        assert_eq!(&*e.iface, "can0");
        assert_eq!(e.frame.id(), 0x123);
        assert!(!e.frame.is_extended());
        assert_eq!(e.frame.data(), &[0xDE, 0xAD, 0xBE, 0xEF]);

        let e = parse_line("(1.5) vcan1 1ABCDEF0#01.02").unwrap();
        assert!(e.frame.is_extended());
        assert_eq!(e.frame.id(), 0x1ABC_DEF0);
        assert_eq!(e.frame.data(), &[1, 2]);

        let e = parse_line("(1.000001) can0 123#R").unwrap();
        assert!(e.frame.is_remote());
        assert_eq!(e.frame.len(), 0);
        let e = parse_line("(1.000001) can0 123#R5").unwrap();
        assert_eq!(e.frame.len(), 5);

        let e = parse_line("(1.000001) can0 123##311223344").unwrap();
        assert!(e.frame.is_fd() && e.frame.brs() && e.frame.esi());
        assert_eq!(e.frame.data(), &[0x11, 0x22, 0x33, 0x44]);

        let e = parse_line("(1.000001) can0 20000080#0000000000000000").unwrap();
        assert!(e.frame.is_error());
        assert_eq!(e.frame.id(), 0x80);

        let e = parse_line("(1.000001) can0 123#1122334455667788_C T").unwrap();
        assert_eq!(e.frame.len8_dlc(), Some(0xC));
        assert_eq!(e.direction, Some(Direction::Tx));
    }

    #[test]
    fn rejects_malformed_fields() {
        for bad in [
            "1700000000.1 can0 123#00",
            "(1700000000) can0 123#00",
            "(17x.1) can0 123#00",
            "(1.1)",
            "(1.1) can0",
            "(1.1) can0 12#00",
            "(1.1) can0 800#00",
            "(1.1) can0 1234#00",
            "(1.1) can0 40000000#00",
            "(1.1) can0 123#0",
            "(1.1) can0 123#001122334455667788",
            "(1.1) can0 123#GG",
            "(1.1) can0 123##",
            "(1.1) can0 123##G00",
            "(1.1) can0 123###000",
            "(1.1) can0 123#R9",
            "(1.1) can0 123#00_9",
            "(1.1) can0 123#0011223344556677_8",
            "(1.1) can0 123#00 X",
            "(1.1) can0 123#00..11",
            "(1.1) can0 123#.00",
            "(1.1) can0 123",
        ] {
            assert!(parse_line(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn timestamp_keeps_its_digits() {
        let e = parse_line("(0000000001.500) can0 123#").unwrap();
        assert_eq!(e.timestamp.to_string(), "0000000001.500");
        let mut s = String::new();
        format_line(&e, &mut s);
        assert_eq!(s, "(0000000001.500) can0 123#");
    }

    #[test]
    fn reader_counts_lines_and_continues_after_errors() {
        let log = "(1.000000) can0 123#00\n\n(2.0) can0 zzz\n(3.000000) can0 124#01\n\u{0}\u{ff}\n";
        let items: Vec<_> = CandumpReader::new(log.as_bytes()).collect();
        assert_eq!(items.len(), 4);
        assert!(items[0].is_ok());
        assert_eq!(items[1].as_ref().unwrap_err().line(), 3);
        assert!(items[2].is_ok());
        assert_eq!(items[3].as_ref().unwrap_err().line(), 5);
    }

    #[test]
    fn overlong_line_is_skipped_not_buffered() {
        let mut log = "x".repeat(MAX_LINE * 3);
        log.push_str("\n(1.000000) can0 123#00\n");
        let items: Vec<_> = CandumpReader::new(log.as_bytes()).collect();
        assert_eq!(items.len(), 2);
        assert!(matches!(
            items[0],
            Err(CandumpError::Parse {
                line: 1,
                kind: LineError::TooLong
            })
        ));
        assert!(items[1].is_ok());
    }
}
