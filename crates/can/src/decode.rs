//! The decoder: frame in, named physical values out.

use std::path::Path;
use std::sync::Arc;

use crate::dbc::{self, DbcLoadError, LocatedMessage};
use crate::frame::{CanFrame, SFF_MAX_ID};
use crate::plan::{MessagePlan, SignalValue, MAX_MULTIPLEXORS, PADDED_LEN};

/// One decoded signal.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSignal {
    pub name: Arc<str>,
    /// Physical value; see [`SignalValue`] for when it is an integer.
    pub value: SignalValue,
    pub unit: Arc<str>,
    /// `VAL_` label of the raw value, if the DBC has one.
    pub label: Option<Arc<str>>,
    /// Raw bits as read from the payload (zero-extended).
    pub raw: u64,
    /// Position of the signal in [`MessagePlan::signals`]: stable for a given
    /// message, so it can key per-signal state (see [`crate::Reducer`]).
    pub index: u16,
}

/// One decoded frame. Reuse it with [`Decoder::decode_into`] to avoid
/// allocating on the hot path.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedFrame {
    /// Identifier without flag bits.
    pub id: u32,
    pub extended: bool,
    pub message: Arc<str>,
    /// Signals present in this frame (multiplexed ones only when selected),
    /// multiplexors first, otherwise in DBC order.
    pub signals: Vec<DecodedSignal>,
}

impl Default for DecodedFrame {
    fn default() -> Self {
        Self {
            id: 0,
            extended: false,
            message: Arc::from(""),
            signals: Vec::new(),
        }
    }
}

impl DecodedFrame {
    pub fn signal(&self, name: &str) -> Option<&DecodedSignal> {
        self.signals.iter().find(|s| &*s.name == name)
    }
}

/// Why a frame was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The id is in no loaded DBC: the caller decides whether to forward raw
    /// bytes or drop (and count) the frame.
    #[error("no DBC entry for {} id {id:#X}", if *extended { "extended" } else { "standard" })]
    NoDbcEntry { id: u32, extended: bool },
    #[error("{message} (id {id:#X}) needs {needed} data bytes{}, frame has {got}",
        signal.as_ref().map(|s| format!(" for signal {s}")).unwrap_or_default())]
    ShortFrame {
        id: u32,
        message: Arc<str>,
        signal: Option<Arc<str>>,
        needed: usize,
        got: usize,
    },
    #[error("remote frame (id {id:#X}) carries no data")]
    RemoteFrame { id: u32 },
    #[error("error frame (class {class:#X})")]
    ErrorFrame { class: u32 },
}

impl DecodeError {
    /// True for the "no DBC entry" outcome, as opposed to a malformed frame.
    pub fn is_no_dbc_entry(&self) -> bool {
        matches!(self, DecodeError::NoDbcEntry { .. })
    }
}

const NONE: u32 = u32::MAX;

/// Compiled decode plans of one or more DBC files, indexed by frame id.
/// Cheap to share across threads (`Arc<Decoder>`); decoding takes `&self`.
#[derive(Debug, Clone)]
pub struct Decoder {
    messages: Vec<MessagePlan>,
    /// Standard ids index directly into `messages` (2048 entries).
    standard: Box<[u32]>,
    /// Extended ids, sorted, for binary search.
    extended: Vec<(u32, u32)>,
}

/// Collects DBC files into a [`Decoder`], rejecting ids defined twice.
#[derive(Default)]
pub struct DecoderBuilder {
    messages: Vec<LocatedMessage>,
}

impl DecoderBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a DBC file (UTF-8, or Windows-1252 as a fallback).
    pub fn add_file(&mut self, path: impl AsRef<Path>) -> Result<&mut Self, DbcLoadError> {
        let found = dbc::load_file(path.as_ref())?;
        self.merge(found)
    }

    /// Loads DBC text; `name` stands in for the file name in errors.
    pub fn add_str(&mut self, name: &str, text: &str) -> Result<&mut Self, DbcLoadError> {
        let found = dbc::load_str(name, text)?;
        self.merge(found)
    }

    /// Loads DBC bytes (UTF-8 or Windows-1252); never panics.
    pub fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<&mut Self, DbcLoadError> {
        let found = dbc::load_bytes(name, bytes)?;
        self.merge(found)
    }

    fn merge(&mut self, found: Vec<LocatedMessage>) -> Result<&mut Self, DbcLoadError> {
        for new in &found {
            let clash = self
                .messages
                .iter()
                .find(|m| m.plan.id == new.plan.id && m.plan.extended == new.plan.extended);
            if let Some(old) = clash {
                return Err(DbcLoadError::DuplicateMessageId {
                    id: new.plan.id,
                    extended: new.plan.extended,
                    first_path: old.plan.source.to_string(),
                    first_line: old.line,
                    first_name: old.plan.name.to_string(),
                    second_path: new.plan.source.to_string(),
                    second_line: new.line,
                    second_name: new.plan.name.to_string(),
                });
            }
        }
        self.messages.extend(found);
        Ok(self)
    }

    pub fn build(self) -> Decoder {
        Decoder::from_plans(self.messages.into_iter().map(|m| m.plan).collect())
    }
}

impl Decoder {
    /// Loads and compiles several DBC files into one decoder.
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, DbcLoadError> {
        let mut b = DecoderBuilder::new();
        for p in paths {
            b.add_file(p)?;
        }
        Ok(b.build())
    }

    /// Compiles DBC text; `name` stands in for the file name in errors.
    pub fn from_dbc_str(name: &str, text: &str) -> Result<Self, DbcLoadError> {
        let mut b = DecoderBuilder::new();
        b.add_str(name, text)?;
        Ok(b.build())
    }

    fn from_plans(messages: Vec<MessagePlan>) -> Self {
        let mut standard = vec![NONE; SFF_MAX_ID as usize + 1].into_boxed_slice();
        let mut extended = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.extended {
                extended.push((m.id, i as u32));
            } else {
                standard[m.id as usize] = i as u32;
            }
        }
        extended.sort_unstable();
        Self {
            messages,
            standard,
            extended,
        }
    }

    /// The plan for an id, if any DBC defines it.
    #[inline]
    pub fn message(&self, id: u32, extended: bool) -> Option<&MessagePlan> {
        let idx = if extended {
            let pos = self.extended.binary_search_by_key(&id, |e| e.0).ok()?;
            self.extended[pos].1
        } else {
            *self.standard.get(id as usize)?
        };
        self.messages.get(idx as usize)
    }

    /// First message with this name.
    pub fn message_by_name(&self, name: &str) -> Option<&MessagePlan> {
        self.messages.iter().find(|m| &*m.name == name)
    }

    /// All messages, in load order.
    pub fn messages(&self) -> &[MessagePlan] {
        &self.messages
    }

    /// Decodes into a new [`DecodedFrame`]. Allocates; see [`Self::decode_into`].
    pub fn decode(&self, frame: &CanFrame) -> Result<DecodedFrame, DecodeError> {
        let mut out = DecodedFrame::default();
        self.decode_into(frame, &mut out)?;
        Ok(out)
    }

    /// Decodes into a caller-owned frame, reusing its signal vector: after the
    /// first few frames this does not allocate. On error `out` holds no signals.
    pub fn decode_into(&self, frame: &CanFrame, out: &mut DecodedFrame) -> Result<(), DecodeError> {
        out.signals.clear();
        let plan = self.lookup(frame)?;
        out.id = plan.id;
        out.extended = plan.extended;
        if !Arc::ptr_eq(&out.message, &plan.name) {
            out.message = plan.name.clone();
        }
        let result = decode_signals(plan, frame, |s, value, raw, label, index| {
            out.signals.push(DecodedSignal {
                name: s.name.clone(),
                value,
                unit: s.unit.clone(),
                label: label.cloned(),
                raw,
                index,
            });
        });
        if result.is_err() {
            out.signals.clear();
        }
        result.map(|_| ())
    }

    /// Lowest-overhead form: calls `sink(signal, value, label)` for each
    /// present signal without touching any reference count, and returns the
    /// message plan. Nothing is produced for a frame that fails.
    #[inline]
    pub fn decode_with<'a, F>(
        &'a self,
        frame: &CanFrame,
        mut sink: F,
    ) -> Result<&'a MessagePlan, DecodeError>
    where
        F: FnMut(&'a crate::plan::SignalPlan, SignalValue, Option<&'a Arc<str>>),
    {
        let plan = self.lookup(frame)?;
        // A frame shorter than the longest signal may fail part-way; check
        // first so that a failing frame emits nothing.
        if frame.len() < plan.full_len as usize {
            precheck(plan, frame)?;
        }
        decode_signals(plan, frame, |s, v, _, l, _| sink(s, v, l))?;
        Ok(plan)
    }

    #[inline]
    fn lookup(&self, frame: &CanFrame) -> Result<&MessagePlan, DecodeError> {
        if frame.is_error() {
            return Err(DecodeError::ErrorFrame { class: frame.id() });
        }
        let plan =
            self.message(frame.id(), frame.is_extended())
                .ok_or(DecodeError::NoDbcEntry {
                    id: frame.id(),
                    extended: frame.is_extended(),
                })?;
        if frame.is_remote() {
            return Err(DecodeError::RemoteFrame { id: frame.id() });
        }
        Ok(plan)
    }
}

fn short(plan: &MessagePlan, signal: Option<&Arc<str>>, needed: usize, got: usize) -> DecodeError {
    DecodeError::ShortFrame {
        id: plan.id,
        message: plan.name.clone(),
        signal: signal.cloned(),
        needed,
        got,
    }
}

/// Runs the same presence logic as `decode_signals` but only checks lengths.
fn precheck(plan: &MessagePlan, frame: &CanFrame) -> Result<(), DecodeError> {
    decode_signals(plan, frame, |_, _, _, _, _| {}).map(|_| ())
}

/// The hot loop shared by every decode entry point.
#[inline]
fn decode_signals<'a, F>(
    plan: &'a MessagePlan,
    frame: &CanFrame,
    mut emit: F,
) -> Result<usize, DecodeError>
where
    F: FnMut(&'a crate::plan::SignalPlan, SignalValue, u64, Option<&'a Arc<str>>, u16),
{
    let len = frame.len();
    if len < plan.base_len as usize {
        return Err(short(plan, None, plan.base_len as usize, len));
    }
    let mut buf = [0u8; PADDED_LEN];
    buf[..64].copy_from_slice(frame.padded());
    let mut mux_values = [0u64; MAX_MULTIPLEXORS];
    let mut mux_present: u32 = 0;
    let mut count = 0;
    for (i, s) in plan.signals.iter().enumerate() {
        if let Some(cond) = &s.mux {
            let slot = cond.slot as usize;
            if mux_present & (1 << slot) == 0 || !cond.matches(mux_values[slot]) {
                continue;
            }
            if s.layout.end() > len {
                return Err(short(plan, Some(&s.name), s.layout.end(), len));
            }
        }
        let raw = s.layout.extract(&buf);
        if let Some(slot) = s.mux_slot {
            mux_values[slot as usize] = raw;
            mux_present |= 1 << slot;
        }
        let (value, key) = s.physical(raw);
        emit(s, value, raw, s.label(key), i as u16);
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Decoder>();
        assert_send_sync::<DecodedFrame>();
    }
}
