//! DBC loading: reading files, running the `can-dbc` parser, and turning every
//! failure into a [`DbcLoadError`] that names the file, line and column.
//!
//! `can-dbc` reports syntax errors with a position, but its conversion
//! errors (an integer that overflows, say) and our own semantic checks carry
//! none. For those we re-run the underlying pest grammar, which gives every
//! statement a span, and locate the offending statement ourselves.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use can_dbc_pest::{DbcParser, Parser as _, Rule};

use crate::compile::compile_file;
use crate::plan::MessagePlan;

/// Why a set of DBC files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DbcLoadError {
    #[error("{path}: cannot read DBC file: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: DBC syntax error: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed text that describes something impossible or unsupported
    /// (a signal beyond its message, a 33-bit float, an unknown multiplexor...).
    #[error("{path}:{line}:{column}: invalid DBC: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{} id {id:#X} is defined twice: {first_path}:{first_line} ({first_name}) and {second_path}:{second_line} ({second_name})",
        if *extended { "extended" } else { "standard" }
    )]
    DuplicateMessageId {
        id: u32,
        extended: bool,
        first_path: String,
        first_line: usize,
        first_name: String,
        second_path: String,
        second_line: usize,
        second_name: String,
    },
}

impl DbcLoadError {
    /// The file the error is about (the second file for duplicates).
    pub fn path(&self) -> &str {
        match self {
            DbcLoadError::Io { path, .. }
            | DbcLoadError::Syntax { path, .. }
            | DbcLoadError::Invalid { path, .. } => path,
            DbcLoadError::DuplicateMessageId { second_path, .. } => second_path,
        }
    }

    /// The 1-based line of the problem, when it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            DbcLoadError::Syntax { line, .. } | DbcLoadError::Invalid { line, .. } => Some(*line),
            DbcLoadError::DuplicateMessageId { second_line, .. } => Some(*second_line),
            DbcLoadError::Io { .. } => None,
        }
    }
}

/// A compiled message plus where it was defined, for duplicate reporting.
pub(crate) struct LocatedMessage {
    pub(crate) plan: MessagePlan,
    pub(crate) line: usize,
}

/// Line/column of a message and of each of its signals (1-based), in the
/// order `can-dbc` lists them.
pub(crate) struct MessageLocation {
    pub(crate) line: usize,
    pub(crate) column: usize,
    pub(crate) signals: Vec<(usize, usize)>,
}

/// Reads a file as UTF-8, falling back to Windows-1252 (what most DBC
/// editors write), and compiles it.
pub(crate) fn load_file(path: &Path) -> Result<Vec<LocatedMessage>, DbcLoadError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| DbcLoadError::Io {
        path: name.clone(),
        source,
    })?;
    load_bytes(&name, &bytes)
}

pub(crate) fn load_bytes(name: &str, bytes: &[u8]) -> Result<Vec<LocatedMessage>, DbcLoadError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => load_str(name, text),
        Err(_) => {
            let (text, _, _) = can_dbc::encodings::WINDOWS_1252.decode(bytes);
            load_str(name, &text)
        }
    }
}

/// Parses and compiles DBC text; `name` is used in error messages.
pub(crate) fn load_str(name: &str, text: &str) -> Result<Vec<LocatedMessage>, DbcLoadError> {
    // can-dbc has a few `expect`s that its grammar should make unreachable;
    // a DBC file is untrusted input, so a panic there becomes an error here.
    let parsed = catch_unwind(AssertUnwindSafe(|| can_dbc::Dbc::try_from(text)));
    let dbc = match parsed {
        Ok(Ok(dbc)) => dbc,
        Ok(Err(err)) => return Err(parse_error(name, text, err)),
        Err(_) => {
            return Err(DbcLoadError::Syntax {
                path: name.to_string(),
                line: 1,
                column: 1,
                message: "the DBC parser failed on this file".into(),
            })
        }
    };
    let locations = message_locations(text);
    compile_file(name, &dbc, &locations)
}

fn parse_error(name: &str, text: &str, err: can_dbc::DbcError) -> DbcLoadError {
    use can_dbc::DbcError as E;
    if let E::Pest(p) = &err {
        let (line, column) = match p.line_col {
            pest::error::LineColLocation::Pos(lc) => lc,
            pest::error::LineColLocation::Span(lc, _) => lc,
        };
        let mut message = p.variant.message().into_owned();
        let shown = p.line().trim_end();
        if !shown.is_empty() {
            message = format!("{message} in `{shown}`");
        }
        return DbcLoadError::Syntax {
            path: name.to_string(),
            line,
            column,
            message,
        };
    }
    // Conversion errors carry the offending text (or number) but no position:
    // find the first whole-token occurrence of it.
    let token = match &err {
        E::InvalidFloat(s)
        | E::InvalidInt(s)
        | E::InvalidUint(s)
        | E::InvalidNumericValue(s)
        | E::UnknownMultiplexIndicator(s) => Some(s.clone()),
        E::MessageIdOutOfRange(v) => Some(v.to_string()),
        E::NotImplemented(what) => what.split_whitespace().next().map(str::to_string),
        _ => None,
    };
    let (line, column) = token.and_then(|t| find_token(text, &t)).unwrap_or((1, 1));
    DbcLoadError::Syntax {
        path: name.to_string(),
        line,
        column,
        message: err.to_string(),
    }
}

/// 1-based line/column of the first occurrence of `token` not glued to other
/// identifier characters.
pub(crate) fn find_token(text: &str, token: &str) -> Option<(usize, usize)> {
    if token.is_empty() {
        return None;
    }
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    let mut from = 0;
    while let Some(pos) = text[from..].find(token) {
        let start = from + pos;
        let end = start + token.len();
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word(c));
        let after_ok = text[end..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            return Some(line_col(text, start));
        }
        from = end;
    }
    None
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

/// Positions of every `BO_` and its `SG_`s, from the pest grammar that
/// `can-dbc` itself uses (so both agree on what a statement is). Only called
/// after `can-dbc` accepted the text, so the grammar parse succeeds.
fn message_locations(text: &str) -> Vec<MessageLocation> {
    let mut out = Vec::new();
    let Ok(files) = DbcParser::parse(Rule::file, text) else {
        return out;
    };
    for file in files {
        for stmt in file.into_inner() {
            if stmt.as_rule() != Rule::message {
                continue;
            }
            let mut loc = MessageLocation {
                line: 0,
                column: 0,
                signals: Vec::new(),
            };
            (loc.line, loc.column) = stmt.as_span().start_pos().line_col();
            for part in stmt.into_inner() {
                if part.as_rule() != Rule::signal {
                    continue;
                }
                // The signal rule starts with the preceding newline, so
                // point at the signal's name instead.
                let pos = part
                    .into_inner()
                    .find(|p| p.as_rule() == Rule::signal_name)
                    .map_or((loc.line, 1), |p| p.as_span().start_pos().line_col());
                loc.signals.push(pos);
            }
            out.push(loc);
        }
    }
    out
}

/// Shared-string interner so identical units and labels share one allocation.
#[derive(Default)]
pub(crate) struct Interner(std::collections::HashMap<String, Arc<str>>);

impl Interner {
    pub(crate) fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(s.to_string(), a.clone());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_search_respects_word_boundaries() {
        let text = "BO_ 123 A: 8 X\nBO_ 1234 B: 8 X\n";
        assert_eq!(find_token(text, "1234"), Some((2, 5)));
        assert_eq!(find_token(text, "123"), Some((1, 5)));
        assert_eq!(find_token(text, "999"), None);
    }
}
