//! The encoder: physical values back into frame bytes, using the same plans
//! as the decoder so the two are exact inverses (up to the factor's
//! resolution: a physical value is rounded to the nearest raw step).

use std::sync::Arc;

use crate::frame::{CanFrame, CAN_MAX_LEN};
use crate::plan::{
    Conversion, MessagePlan, SignalPlan, SignalValue, ValueKind, MAX_MULTIPLEXORS, PADDED_LEN,
};

impl From<f64> for SignalValue {
    fn from(v: f64) -> Self {
        SignalValue::Float(v)
    }
}

impl From<i64> for SignalValue {
    fn from(v: i64) -> Self {
        SignalValue::Int(v)
    }
}

/// Why values could not be encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("no message named {0}")]
    UnknownMessage(String),
    #[error("message {message} has no signal {signal}")]
    UnknownSignal { message: Arc<str>, signal: String },
    #[error("no value given for {message}.{signal}")]
    MissingSignal { message: Arc<str>, signal: Arc<str> },
    #[error("value given for {message}.{signal}, which the multiplexor value does not select")]
    InactiveSignal { message: Arc<str>, signal: Arc<str> },
    #[error("{message}.{signal}: {value} is outside the encodable range {min}..={max}")]
    OutOfRange {
        message: Arc<str>,
        signal: Arc<str>,
        value: f64,
        min: f64,
        max: f64,
    },
}

impl SignalPlan {
    /// Physical value to raw bits (already masked to the signal width).
    /// `None` when the value cannot be represented.
    pub fn to_raw(&self, value: SignalValue) -> Option<u64> {
        let bits = self.layout.bits();
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        match self.kind {
            ValueKind::Float32 => {
                let x = (value.as_f64() - self.offset) / self.factor;
                let f = x as f32;
                if x.is_finite() && !f.is_finite() {
                    return None;
                }
                Some(u64::from(f.to_bits()))
            }
            ValueKind::Float64 => Some(((value.as_f64() - self.offset) / self.factor).to_bits()),
            ValueKind::Signed | ValueKind::Unsigned => {
                let raw = self.raw_integer(value)?;
                let (lo, hi): (i128, i128) = if self.kind == ValueKind::Signed {
                    (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
                } else {
                    (0, (1i128 << bits) - 1)
                };
                // f64 cannot hold 2^63 - 1 or 2^64 - 1: a value at the edge of
                // a 54+-bit signal's range rounds one step past it. Clamp
                // such float noise, reject anything further out.
                let slack = |bound: i128| (bound.unsigned_abs() >> 50) as i128;
                let raw = if raw < lo && lo - raw <= slack(lo) {
                    lo
                } else if raw > hi && raw - hi <= slack(hi) {
                    hi
                } else {
                    raw
                };
                if raw < lo || raw > hi {
                    return None;
                }
                Some((raw as u64) & mask)
            }
        }
    }

    /// The raw integer nearest to `value`; exact in integer arithmetic when
    /// the signal's scaling is integral and the value an integer.
    fn raw_integer(&self, value: SignalValue) -> Option<i128> {
        if let (SignalValue::Int(p), Conversion::Int { factor, offset, .. }) =
            (value, self.conversion)
        {
            let num = i128::from(p) - i128::from(offset);
            let f = i128::from(factor);
            if num % f == 0 {
                return Some(num / f);
            }
        }
        let x = ((value.as_f64() - self.offset) / self.factor).round();
        // Saturating cast; the caller's range check rejects saturated values.
        x.is_finite().then_some(x as i128)
    }
}

impl MessagePlan {
    /// Encodes a frame asking `value(index, signal)` for each signal present
    /// (multiplexors first, so their values decide which signals are asked
    /// for). Bytes not covered by a present signal are zero. Messages longer
    /// than 8 bytes become CAN FD frames, padded to a valid FD length.
    pub fn encode_with<F>(&self, mut value: F) -> Result<CanFrame, EncodeError>
    where
        F: FnMut(usize, &SignalPlan) -> Option<SignalValue>,
    {
        let mut buf = [0u8; PADDED_LEN];
        let mut mux_values = [0u64; MAX_MULTIPLEXORS];
        let mut mux_present: u32 = 0;
        for (i, s) in self.signals.iter().enumerate() {
            if !is_selected(s, mux_present, &mux_values) {
                continue;
            }
            let v = value(i, s).ok_or_else(|| EncodeError::MissingSignal {
                message: self.name.clone(),
                signal: s.name.clone(),
            })?;
            let raw = s.to_raw(v).ok_or_else(|| {
                let (min, max) = s.representable_range();
                EncodeError::OutOfRange {
                    message: self.name.clone(),
                    signal: s.name.clone(),
                    value: v.as_f64(),
                    min,
                    max,
                }
            })?;
            s.layout.insert(&mut buf, raw);
            if let Some(slot) = s.mux_slot {
                mux_values[slot as usize] = raw;
                mux_present |= 1 << slot;
            }
        }
        let size = self.size as usize;
        let frame = if size > CAN_MAX_LEN {
            // CAN FD carries 12, 16, 20, 24, 32, 48 or 64 bytes beyond 8: a
            // DBC size in between is padded (with zeros) as on the wire.
            let len = fd_len(size);
            CanFrame::new_fd(self.id, self.extended, &buf[..len], false, false)
        } else {
            CanFrame::new(self.id, self.extended, &buf[..size])
        };
        // The plan was validated at load time (id width, size <= 64), so
        // building the frame cannot fail; map defensively instead of panicking.
        frame.map_err(|_| EncodeError::UnknownMessage(self.name.to_string()))
    }

    /// Encodes from `(signal name, value)` pairs. Every signal the
    /// multiplexor values select must be given; giving one they do not
    /// select, or an unknown name, is an error.
    pub fn encode(&self, values: &[(&str, SignalValue)]) -> Result<CanFrame, EncodeError> {
        let mut by_index: Vec<Option<SignalValue>> = vec![None; self.signals.len()];
        for (name, v) in values {
            let (i, _) = self
                .signal(name)
                .ok_or_else(|| EncodeError::UnknownSignal {
                    message: self.name.clone(),
                    signal: (*name).to_string(),
                })?;
            by_index[i] = Some(*v);
        }
        let mut used = vec![false; self.signals.len()];
        let frame = self.encode_with(|i, _| {
            used[i] = true;
            by_index[i]
        })?;
        if let Some(i) = (0..self.signals.len()).find(|&i| by_index[i].is_some() && !used[i]) {
            return Err(EncodeError::InactiveSignal {
                message: self.name.clone(),
                signal: self.signals[i].name.clone(),
            });
        }
        Ok(frame)
    }
}

/// The smallest CAN FD payload length that holds `n` bytes.
fn fd_len(n: usize) -> usize {
    [8, 12, 16, 20, 24, 32, 48, 64]
        .into_iter()
        .find(|&l| l >= n)
        .unwrap_or(64)
}

fn is_selected(s: &SignalPlan, present: u32, values: &[u64; MAX_MULTIPLEXORS]) -> bool {
    match &s.mux {
        None => true,
        Some(c) => present & (1 << c.slot) != 0 && c.matches(values[c.slot as usize]),
    }
}

impl crate::Decoder {
    /// Encodes the message called `message` from `(signal, value)` pairs.
    pub fn encode(
        &self,
        message: &str,
        values: &[(&str, SignalValue)],
    ) -> Result<CanFrame, EncodeError> {
        self.message_by_name(message)
            .ok_or_else(|| EncodeError::UnknownMessage(message.to_string()))?
            .encode(values)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Decoder, SignalValue};

    const DBC: &str = "VERSION \"\"\n\nNS_ :\n\nBS_:\n\nBU_: A\n\n\
        BO_ 1 Ten: 10 A\n SG_ Last : 72|8@1+ (1,0) [0|255] \"\" A\n\n\
        BO_ 2 Scaled: 2 A\n SG_ T : 0|16@1- (0.1,-40) [-100|100] \"degC\" A\n";

    #[test]
    fn fd_sizes_are_padded_to_a_valid_length() {
        let d = Decoder::from_dbc_str("t.dbc", DBC).unwrap();
        let f = d.encode("Ten", &[("Last", SignalValue::Int(7))]).unwrap();
        assert!(f.is_fd());
        assert_eq!(f.len(), 12);
        assert_eq!(f.data()[9], 7);
        assert_eq!(d.decode(&f).unwrap().signals[0].value, SignalValue::Int(7));
    }

    #[test]
    fn rounds_to_nearest_raw_step() {
        let d = Decoder::from_dbc_str("t.dbc", DBC).unwrap();
        let plan = d.message_by_name("Scaled").unwrap();
        let (_, s) = plan.signal("T").unwrap();
        // (21.34 + 40) / 0.1 = 613.4 -> 613 -> 21.3
        assert_eq!(s.to_raw(SignalValue::Float(21.34)), Some(613));
        // (-40.06 + 40) / 0.1 = -0.6 -> -1 -> 0xFFFF as 16-bit two's complement
        assert_eq!(s.to_raw(SignalValue::Float(-40.06)), Some(0xFFFF));
        assert_eq!(s.to_raw(SignalValue::Float(1.0e9)), None);
        assert_eq!(s.to_raw(SignalValue::Float(f64::NAN)), None);
    }
}
