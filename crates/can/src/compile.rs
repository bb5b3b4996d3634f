//! Turns one parsed DBC (`can_dbc::Dbc`) into decode plans, checking
//! everything the fast path later takes for granted: signals inside their
//! message, sensible widths and scaling, resolvable multiplexing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use can_dbc::{
    AttributeValue, Dbc, Message, MessageId, MultiplexIndicator, NumericValue,
    SignalExtendedValueType, ValueDescription,
};

use crate::dbc::{DbcLoadError, Interner, LocatedMessage, MessageLocation};
use crate::frame::{CANFD_MAX_LEN, SFF_MAX_ID};
use crate::plan::{
    ByteOrder, Conversion, Layout, MessagePlan, MuxCondition, SignalPlan, ValueKind,
    MAX_MULTIPLEXORS,
};

/// Vector's pseudo-message holding signals not yet assigned to a frame.
const INDEPENDENT_SIGNALS: &str = "VECTOR__INDEPENDENT_SIG_MSG";
const CYCLE_TIME_ATTR: &str = "GenMsgCycleTime";

type Key<'a> = (MessageId, &'a str);

/// Per-file lookups built once, instead of can-dbc's linear scans per signal.
struct Index<'a> {
    labels: HashMap<Key<'a>, &'a [can_dbc::ValDescription]>,
    value_types: HashMap<Key<'a>, SignalExtendedValueType>,
    mux_values: HashMap<Key<'a>, &'a can_dbc::ExtendedMultiplex>,
}

impl<'a> Index<'a> {
    fn new(dbc: &'a Dbc) -> Self {
        let mut labels = HashMap::new();
        for vd in &dbc.value_descriptions {
            if let ValueDescription::Signal {
                message_id,
                name,
                value_descriptions,
            } = vd
            {
                labels.insert((*message_id, name.as_str()), value_descriptions.as_slice());
            }
        }
        let value_types = dbc
            .signal_extended_value_type_list
            .iter()
            .map(|v| {
                (
                    (v.message_id, v.signal_name.as_str()),
                    v.signal_extended_value_type,
                )
            })
            .collect();
        let mux_values = dbc
            .extended_multiplex
            .iter()
            .map(|m| ((m.message_id, m.signal_name.as_str()), m))
            .collect();
        Self {
            labels,
            value_types,
            mux_values,
        }
    }
}

/// A semantic problem at a position, turned into `DbcLoadError::Invalid`.
struct Problem {
    line: usize,
    column: usize,
    message: String,
}

pub(crate) fn compile_file(
    name: &str,
    dbc: &Dbc,
    locations: &[MessageLocation],
) -> Result<Vec<LocatedMessage>, DbcLoadError> {
    let source: Arc<str> = Arc::from(name);
    let index = Index::new(dbc);
    let mut interner = Interner::default();
    let mut out: Vec<LocatedMessage> = Vec::with_capacity(dbc.messages.len());
    let mut seen: HashMap<(u32, bool), usize> = HashMap::new();
    for (i, msg) in dbc.messages.iter().enumerate() {
        let fallback = MessageLocation {
            line: 1,
            column: 1,
            signals: Vec::new(),
        };
        let loc = locations.get(i).unwrap_or(&fallback);
        let plan = compile_message(dbc, &index, msg, loc, &source, &mut interner).map_err(|p| {
            DbcLoadError::Invalid {
                path: name.to_string(),
                line: p.line,
                column: p.column,
                message: p.message,
            }
        })?;
        let Some(plan) = plan else { continue };
        let key = (plan.id, plan.extended);
        if let Some(&prev) = seen.get(&key) {
            let first: &LocatedMessage = &out[prev];
            return Err(DbcLoadError::DuplicateMessageId {
                id: plan.id,
                extended: plan.extended,
                first_path: name.to_string(),
                first_line: first.line,
                first_name: first.plan.name.to_string(),
                second_path: name.to_string(),
                second_line: loc.line,
                second_name: plan.name.to_string(),
            });
        }
        seen.insert(key, out.len());
        out.push(LocatedMessage {
            plan,
            line: loc.line,
        });
    }
    Ok(out)
}

fn numeric(v: &NumericValue) -> f64 {
    match *v {
        NumericValue::Uint(u) => u as f64,
        NumericValue::Int(i) => i as f64,
        NumericValue::Double(d) => d,
    }
}

fn cycle_time(dbc: &Dbc, id: MessageId) -> Option<Duration> {
    let ms = match dbc.resolved_message_attribute(id, CYCLE_TIME_ATTR)? {
        AttributeValue::Uint(v) => *v as f64,
        AttributeValue::Int(v) => *v as f64,
        AttributeValue::Double(v) => *v,
        AttributeValue::String(s) => s.trim().parse().ok()?,
    };
    // Zero means "event driven" in practice; absurd values are ignored too.
    (ms.is_finite() && ms > 0.0 && ms < 1.0e9).then(|| Duration::from_secs_f64(ms / 1000.0))
}

fn compile_message(
    dbc: &Dbc,
    index: &Index<'_>,
    msg: &Message,
    loc: &MessageLocation,
    source: &Arc<str>,
    interner: &mut Interner,
) -> Result<Option<MessagePlan>, Problem> {
    if msg.name == INDEPENDENT_SIGNALS {
        return Ok(None);
    }
    let at_msg = |message: String| Problem {
        line: loc.line,
        column: loc.column,
        message,
    };
    let (id, extended) = match msg.id {
        MessageId::Standard(id) => (u32::from(id), false),
        MessageId::Extended(id) => (id, true),
    };
    if !extended && id > SFF_MAX_ID {
        return Err(at_msg(format!(
            "message {}: id {id:#X} does not fit 11 bits; extended ids need bit 31 set (id + 2147483648)",
            msg.name
        )));
    }
    if msg.size > CANFD_MAX_LEN as u64 {
        return Err(at_msg(format!(
            "message {}: size {} bytes exceeds the 64-byte CAN FD maximum",
            msg.name, msg.size
        )));
    }

    if msg.signals.len() > usize::from(u16::MAX) {
        return Err(at_msg(format!(
            "message {}: more than {} signals",
            msg.name,
            u16::MAX
        )));
    }
    let mut signals: Vec<SignalPlan> = Vec::with_capacity(msg.signals.len());
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, sig) in msg.signals.iter().enumerate() {
        let (line, column) = loc.signals.get(i).copied().unwrap_or((loc.line, 1));
        let at = |message: String| Problem {
            line,
            column,
            message: format!("signal {}.{}: {message}", msg.name, sig.name),
        };
        if names.insert(sig.name.as_str(), i).is_some() {
            return Err(at("defined twice in the same message".into()));
        }
        let signed = sig.value_type == can_dbc::ValueType::Signed;
        let kind = match index.value_types.get(&(msg.id, sig.name.as_str())) {
            Some(SignalExtendedValueType::IEEEfloat32Bit) => ValueKind::Float32,
            Some(SignalExtendedValueType::IEEEdouble64bit) => ValueKind::Float64,
            _ if signed => ValueKind::Signed,
            _ => ValueKind::Unsigned,
        };
        let needed = match kind {
            ValueKind::Float32 => Some(32),
            ValueKind::Float64 => Some(64),
            _ => None,
        };
        if let Some(n) = needed {
            if sig.size != n {
                return Err(at(format!(
                    "declared as a {n}-bit IEEE float by SIG_VALTYPE_ but is {} bits wide",
                    sig.size
                )));
            }
        }
        if !sig.factor.is_finite() || sig.factor == 0.0 {
            return Err(at(format!(
                "factor {} must be finite and non-zero",
                sig.factor
            )));
        }
        if !sig.offset.is_finite() {
            return Err(at(format!("offset {} must be finite", sig.offset)));
        }
        let order = match sig.byte_order {
            can_dbc::ByteOrder::LittleEndian => ByteOrder::LittleEndian,
            can_dbc::ByteOrder::BigEndian => ByteOrder::BigEndian,
        };
        let layout = Layout::new(sig.start_bit, sig.size, order).map_err(at)?;
        if layout.end() as u64 > msg.size {
            return Err(at(format!(
                "needs {} bytes but the message declares {}",
                layout.end(),
                msg.size
            )));
        }
        let mut labels: Vec<(i64, Arc<str>)> = index
            .labels
            .get(&(msg.id, sig.name.as_str()))
            .map(|v| {
                v.iter()
                    .map(|d| (d.id, interner.get(&d.description)))
                    .collect()
            })
            .unwrap_or_default();
        labels.sort_by_key(|(k, _)| *k);
        labels.dedup_by_key(|(k, _)| *k);
        signals.push(SignalPlan {
            name: Arc::from(sig.name.as_str()),
            unit: interner.get(&sig.unit),
            start_bit: sig.start_bit as u16,
            byte_order: order,
            kind,
            factor: sig.factor,
            offset: sig.offset,
            min: numeric(&sig.min),
            max: numeric(&sig.max),
            layout,
            conversion: Conversion::new(kind, layout.bits(), sig.factor, sig.offset),
            labels: labels.into_boxed_slice(),
            mux: None,
            mux_slot: None,
        });
    }

    resolve_multiplexing(index, msg, loc, &mut signals)?;
    let signals = order_signals(signals).map_err(|name| {
        at_msg(format!(
            "message {}: multiplexor cycle involving signal {name}",
            msg.name
        ))
    })?;
    let base_len = signals
        .iter()
        .filter(|s| s.mux.is_none())
        .map(|s| s.layout.end())
        .max()
        .unwrap_or(0);
    let full_len = signals.iter().map(|s| s.layout.end()).max().unwrap_or(0);

    Ok(Some(MessagePlan {
        id,
        extended,
        name: Arc::from(msg.name.as_str()),
        size: msg.size as u8,
        transmitter: msg.transmitter.as_deref().map(|t| interner.get(t)),
        cycle_time: cycle_time(dbc, msg.id),
        signals: signals.into_boxed_slice(),
        base_len: base_len as u8,
        full_len: full_len as u8,
        source: source.clone(),
    }))
}

/// Gives every multiplexor a slot and every multiplexed signal its condition,
/// from `SG_MUL_VAL_` when present (extended multiplexing), else from the
/// `mN` indicator and the message's single multiplexor.
fn resolve_multiplexing(
    index: &Index<'_>,
    msg: &Message,
    loc: &MessageLocation,
    signals: &mut [SignalPlan],
) -> Result<(), Problem> {
    let mut slots = 0usize;
    let mut plain_switch = Vec::new();
    for (i, sig) in msg.signals.iter().enumerate() {
        let is_switch = matches!(
            sig.multiplexer_indicator,
            MultiplexIndicator::Multiplexor
                | MultiplexIndicator::MultiplexorAndMultiplexedSignal(_)
        );
        if is_switch {
            if slots == MAX_MULTIPLEXORS {
                let (line, column) = loc.signals.get(i).copied().unwrap_or((loc.line, 1));
                return Err(Problem {
                    line,
                    column,
                    message: format!(
                        "message {}: more than {MAX_MULTIPLEXORS} multiplexor signals are not supported",
                        msg.name
                    ),
                });
            }
            signals[i].mux_slot = Some(slots as u8);
            slots += 1;
        }
        if sig.multiplexer_indicator == MultiplexIndicator::Multiplexor {
            plain_switch.push(i);
        }
    }
    for (i, sig) in msg.signals.iter().enumerate() {
        let selector = match sig.multiplexer_indicator {
            MultiplexIndicator::MultiplexedSignal(v)
            | MultiplexIndicator::MultiplexorAndMultiplexedSignal(v) => v,
            _ => continue,
        };
        let (line, column) = loc.signals.get(i).copied().unwrap_or((loc.line, 1));
        let at = |message: String| Problem {
            line,
            column,
            message: format!("signal {}.{}: {message}", msg.name, sig.name),
        };
        let (switch, ranges): (usize, Vec<(u64, u64)>) = if let Some(ext) =
            index.mux_values.get(&(msg.id, sig.name.as_str()))
        {
            let j = msg
                .signals
                .iter()
                .position(|s| s.name == ext.multiplexor_signal_name)
                .ok_or_else(|| {
                    at(format!(
                        "SG_MUL_VAL_ names multiplexor {} which is not in the message",
                        ext.multiplexor_signal_name
                    ))
                })?;
            let ranges = ext
                .mappings
                .iter()
                .map(|m| (m.min_value.min(m.max_value), m.min_value.max(m.max_value)))
                .collect();
            (j, ranges)
        } else {
            let candidates: Vec<usize> = if plain_switch.len() == 1 {
                plain_switch.clone()
            } else {
                (0..signals.len())
                    .filter(|&j| signals[j].mux_slot.is_some() && j != i)
                    .collect()
            };
            match candidates.as_slice() {
                    [j] => (*j, vec![(selector, selector)]),
                    [] => {
                        return Err(at(format!(
                            "multiplexed (m{selector}) but the message has no multiplexor signal (M)"
                        )))
                    }
                    _ => {
                        return Err(at(
                            "several multiplexors in the message and no SG_MUL_VAL_ says which one selects this signal".into(),
                        ))
                    }
                }
        };
        let Some(slot) = signals[switch].mux_slot else {
            return Err(at(format!(
                "selected by {} which is not marked as a multiplexor (M)",
                signals[switch].name
            )));
        };
        if switch == i {
            return Err(at("multiplexed by itself".into()));
        }
        signals[i].mux = Some(MuxCondition {
            slot,
            multiplexor: switch,
            ranges: ranges.into_boxed_slice(),
        });
    }
    Ok(())
}

/// Orders signals so each multiplexor precedes the signals it selects,
/// otherwise keeping DBC order, and rewrites multiplexor indices to match.
/// Errors with a signal name when the multiplexors form a cycle.
fn order_signals(signals: Vec<SignalPlan>) -> Result<Vec<SignalPlan>, String> {
    let n = signals.len();
    let mut placed = vec![usize::MAX; n]; // old index -> new index
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let before = order.len();
        for i in 0..n {
            if placed[i] != usize::MAX {
                continue;
            }
            let ready = signals[i]
                .mux
                .as_ref()
                .is_none_or(|m| placed[m.multiplexor] != usize::MAX);
            if ready {
                placed[i] = order.len();
                order.push(i);
            }
        }
        if order.len() == before {
            let stuck = (0..n).find(|&i| placed[i] == usize::MAX).unwrap_or(0);
            return Err(signals[stuck].name.to_string());
        }
    }
    let mut slots: Vec<Option<SignalPlan>> = signals.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(n);
    for old in order {
        if let Some(mut s) = slots[old].take() {
            if let Some(m) = s.mux.as_mut() {
                m.multiplexor = placed[m.multiplexor];
            }
            out.push(s);
        }
    }
    Ok(out)
}
