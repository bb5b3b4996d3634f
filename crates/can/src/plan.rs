//! Decode plans: each DBC message is compiled once into precomputed bit
//! positions, masks and scaling so that decoding a frame is a handful of
//! loads, shifts and multiplies per signal.
//!
//! Bit extraction works on a zero-padded copy of the payload (`PADDED_LEN`
//! bytes) so every signal is read with one unaligned 8- or 16-byte load and
//! no per-bit loop, whatever its position or byte order.

use std::sync::Arc;
use std::time::Duration;

/// Payload copy size: 64 data bytes plus room for a 16-byte load starting at
/// the last data byte.
pub(crate) const PADDED_LEN: usize = 64 + 16;

/// Most multiplexor signals one message may have (bits of a `u32` presence mask).
pub(crate) const MAX_MULTIPLEXORS: usize = 32;

/// How the DBC lays a signal's bits out in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ByteOrder {
    /// Intel: `start_bit` is the least significant bit, bits grow upwards.
    LittleEndian,
    /// Motorola: `start_bit` is the most significant bit in DBC "sawtooth"
    /// numbering (bit 7 of byte 0 is bit 7, after bit 0 of byte 0 comes bit 15).
    BigEndian,
}

/// The raw encoding of a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    Unsigned,
    /// Two's complement.
    Signed,
    /// IEEE 754 single (`SIG_VALTYPE_ ... : 1`), 32 bits.
    Float32,
    /// IEEE 754 double (`SIG_VALTYPE_ ... : 2`), 64 bits.
    Float64,
}

/// A decoded physical value.
///
/// Rule: a signal decodes to [`SignalValue::Int`] when its raw value is an
/// integer (not IEEE float), its factor and offset are both integral, and
/// every possible `raw * factor + offset` fits in an `i64`; otherwise to
/// [`SignalValue::Float`]. The choice is made per signal when the DBC is
/// loaded, so a given signal always yields the same variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SignalValue {
    Int(i64),
    Float(f64),
}

impl SignalValue {
    /// The value as `f64` (exact for integers up to 2^53).
    #[inline]
    pub fn as_f64(self) -> f64 {
        match self {
            SignalValue::Int(v) => v as f64,
            SignalValue::Float(v) => v,
        }
    }
}

/// Precomputed location of a signal's bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// First payload byte of the load window.
    byte: u8,
    /// Right shift applied to the loaded window.
    shift: u8,
    /// Whether the bits span more than 64 bits of window (needs a u128 load).
    wide: bool,
    big_endian: bool,
    bits: u8,
    mask: u64,
    /// Payload bytes the signal needs: its highest byte index + 1.
    end: u8,
}

impl Layout {
    /// `start_bit` and `bits` as written in the DBC. Errors when the signal
    /// is empty, wider than 64 bits or leaves a 64-byte payload.
    pub(crate) fn new(start_bit: u64, bits: u64, order: ByteOrder) -> Result<Self, String> {
        if bits == 0 || bits > 64 {
            return Err(format!("signal size {bits} is not in 1..=64 bits"));
        }
        let max_bit = 8 * super::frame::CANFD_MAX_LEN as u64;
        if start_bit >= max_bit {
            return Err(format!("start bit {start_bit} is beyond a 64-byte payload"));
        }
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        match order {
            ByteOrder::LittleEndian => {
                let last = start_bit + bits - 1;
                if last >= max_bit {
                    return Err(format!(
                        "bits {start_bit}..={last} run past the end of a 64-byte payload"
                    ));
                }
                let shift = start_bit % 8;
                Ok(Self {
                    byte: (start_bit / 8) as u8,
                    shift: shift as u8,
                    wide: shift + bits > 64,
                    big_endian: false,
                    bits: bits as u8,
                    mask,
                    end: (last / 8 + 1) as u8,
                })
            }
            ByteOrder::BigEndian => {
                // Number bits in transmission order: byte k bit j becomes
                // 8k + (7 - j). A Motorola signal is then a contiguous run
                // starting at its MSB, which is what a big-endian load gives.
                let first_byte = start_bit / 8;
                let msb = 8 * first_byte + 7 - start_bit % 8;
                let lsb = msb + bits - 1;
                if lsb >= max_bit {
                    return Err(format!(
                        "Motorola signal starting at bit {start_bit} with {bits} bits runs past the end of a 64-byte payload"
                    ));
                }
                let rel = lsb - 8 * first_byte; // 0..=70
                let wide = rel >= 64;
                let window = if wide { 128 } else { 64 };
                Ok(Self {
                    byte: first_byte as u8,
                    shift: (window - 1 - rel) as u8,
                    wide,
                    big_endian: true,
                    bits: bits as u8,
                    mask,
                    end: (lsb / 8 + 1) as u8,
                })
            }
        }
    }

    #[inline]
    pub(crate) fn end(&self) -> usize {
        self.end as usize
    }

    #[inline]
    pub(crate) fn bits(&self) -> u32 {
        u32::from(self.bits)
    }

    #[inline]
    pub(crate) fn extract(&self, buf: &[u8; PADDED_LEN]) -> u64 {
        let b = self.byte as usize;
        let word = if self.wide {
            let w: [u8; 16] = buf[b..b + 16].try_into().unwrap_or([0; 16]);
            let v = if self.big_endian {
                u128::from_be_bytes(w)
            } else {
                u128::from_le_bytes(w)
            };
            (v >> self.shift) as u64
        } else {
            let w: [u8; 8] = buf[b..b + 8].try_into().unwrap_or([0; 8]);
            let v = if self.big_endian {
                u64::from_be_bytes(w)
            } else {
                u64::from_le_bytes(w)
            };
            v >> self.shift
        };
        word & self.mask
    }

    /// Writes `raw` (masked to the signal width) into the padded buffer,
    /// leaving every other bit untouched.
    #[inline]
    pub(crate) fn insert(&self, buf: &mut [u8; PADDED_LEN], raw: u64) {
        let b = self.byte as usize;
        let raw = raw & self.mask;
        if self.wide {
            let slot = &mut buf[b..b + 16];
            let w: [u8; 16] = slot.try_into().unwrap_or([0; 16]);
            let mut v = if self.big_endian {
                u128::from_be_bytes(w)
            } else {
                u128::from_le_bytes(w)
            };
            let m = u128::from(self.mask) << self.shift;
            v = (v & !m) | (u128::from(raw) << self.shift);
            let out = if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            slot.copy_from_slice(&out);
        } else {
            let slot = &mut buf[b..b + 8];
            let w: [u8; 8] = slot.try_into().unwrap_or([0; 8]);
            let mut v = if self.big_endian {
                u64::from_be_bytes(w)
            } else {
                u64::from_le_bytes(w)
            };
            let m = self.mask << self.shift;
            v = (v & !m) | (raw << self.shift);
            let out = if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            slot.copy_from_slice(&out);
        }
    }
}

/// Sign-extends the low `bits` bits of `raw`.
#[inline]
pub(crate) fn sign_extend(raw: u64, bits: u32) -> i64 {
    let unused = 64 - bits;
    ((raw << unused) as i64) >> unused
}

/// Raw-to-physical conversion, chosen once per signal (see [`SignalValue`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Conversion {
    Int {
        signed: bool,
        factor: i64,
        offset: i64,
    },
    Float {
        signed: bool,
        factor: f64,
        offset: f64,
    },
    F32 {
        factor: f64,
        offset: f64,
    },
    F64 {
        factor: f64,
        offset: f64,
    },
}

impl Conversion {
    pub(crate) fn new(kind: ValueKind, bits: u32, factor: f64, offset: f64) -> Self {
        let signed = kind == ValueKind::Signed;
        match kind {
            ValueKind::Float32 => return Conversion::F32 { factor, offset },
            ValueKind::Float64 => return Conversion::F64 { factor, offset },
            _ => {}
        }
        if let Some((f, o)) = integral_scaling(signed, bits, factor, offset) {
            Conversion::Int {
                signed,
                factor: f,
                offset: o,
            }
        } else {
            Conversion::Float {
                signed,
                factor,
                offset,
            }
        }
    }
}

/// `Some((factor, offset))` when both are integral and the scaled range of
/// every raw value of this width fits in `i64`.
fn integral_scaling(signed: bool, bits: u32, factor: f64, offset: f64) -> Option<(i64, i64)> {
    const LIMIT: f64 = 9.0e18; // comfortably inside i64
    let integral = |v: f64| v.is_finite() && v.fract() == 0.0 && v.abs() < LIMIT;
    if !integral(factor) || !integral(offset) {
        return None;
    }
    let (f, o) = (factor as i64, offset as i64);
    let (lo, hi): (i128, i128) = if signed {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    };
    let ends = [
        lo * i128::from(f) + i128::from(o),
        hi * i128::from(f) + i128::from(o),
    ];
    let fits = ends
        .iter()
        .all(|v| (i128::from(i64::MIN)..=i128::from(i64::MAX)).contains(v));
    fits.then_some((f, o))
}

/// When a multiplexed signal is present: its multiplexor (by slot) holds a
/// raw value inside one of `ranges` (inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MuxCondition {
    pub(crate) slot: u8,
    pub(crate) multiplexor: usize,
    pub(crate) ranges: Box<[(u64, u64)]>,
}

impl MuxCondition {
    #[inline]
    pub(crate) fn matches(&self, value: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| lo <= value && value <= hi)
    }
}

/// One signal of a compiled message.
#[derive(Debug, Clone)]
pub struct SignalPlan {
    pub(crate) name: Arc<str>,
    pub(crate) unit: Arc<str>,
    pub(crate) start_bit: u16,
    pub(crate) byte_order: ByteOrder,
    pub(crate) kind: ValueKind,
    pub(crate) factor: f64,
    pub(crate) offset: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) layout: Layout,
    pub(crate) conversion: Conversion,
    /// Value table sorted by raw value.
    pub(crate) labels: Box<[(i64, Arc<str>)]>,
    /// Set when this signal is present only for some multiplexor values.
    pub(crate) mux: Option<MuxCondition>,
    /// Set when this signal is a multiplexor: where its raw value is kept.
    pub(crate) mux_slot: Option<u8>,
}

impl SignalPlan {
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }
    pub fn unit(&self) -> &Arc<str> {
        &self.unit
    }
    /// Start bit as written in the DBC (LSB for Intel, MSB for Motorola).
    pub fn start_bit(&self) -> u16 {
        self.start_bit
    }
    pub fn size(&self) -> u32 {
        self.layout.bits()
    }
    pub fn byte_order(&self) -> ByteOrder {
        self.byte_order
    }
    pub fn kind(&self) -> ValueKind {
        self.kind
    }
    pub fn factor(&self) -> f64 {
        self.factor
    }
    pub fn offset(&self) -> f64 {
        self.offset
    }
    /// Physical minimum from the DBC (`[min|max]`).
    pub fn min(&self) -> f64 {
        self.min
    }
    /// Physical maximum from the DBC (`[min|max]`).
    pub fn max(&self) -> f64 {
        self.max
    }
    /// `VAL_` entries as (raw value, label), sorted by raw value.
    pub fn labels(&self) -> &[(i64, Arc<str>)] {
        &self.labels
    }
    /// Whether this signal decodes to [`SignalValue::Int`].
    pub fn is_integer(&self) -> bool {
        matches!(self.conversion, Conversion::Int { .. })
    }
    /// Whether this signal selects which multiplexed signals are present.
    pub fn is_multiplexor(&self) -> bool {
        self.mux_slot.is_some()
    }
    /// For a multiplexed signal: the index (in [`MessagePlan::signals`]) of
    /// its multiplexor and the inclusive raw ranges that select it.
    pub fn multiplexed_by(&self) -> Option<(usize, &[(u64, u64)])> {
        self.mux.as_ref().map(|m| (m.multiplexor, &m.ranges[..]))
    }
    /// Payload bytes this signal needs.
    pub fn end_byte(&self) -> usize {
        self.layout.end()
    }

    /// Smallest and largest raw integer (for float signals: the bit patterns'
    /// full range is not meaningful, so this returns the float's own limits).
    pub(crate) fn raw_range(&self) -> (f64, f64) {
        let bits = self.layout.bits();
        match self.kind {
            ValueKind::Unsigned => (0.0, ((1u128 << bits) - 1) as f64),
            ValueKind::Signed => (
                -((1u128 << (bits - 1)) as f64),
                ((1u128 << (bits - 1)) - 1) as f64,
            ),
            ValueKind::Float32 => (f32::MIN as f64, f32::MAX as f64),
            ValueKind::Float64 => (f64::MIN, f64::MAX),
        }
    }

    /// The physical range the raw encoding can express.
    pub fn representable_range(&self) -> (f64, f64) {
        let (lo, hi) = self.raw_range();
        let a = lo * self.factor + self.offset;
        let b = hi * self.factor + self.offset;
        (a.min(b), a.max(b))
    }

    /// Raw bits to physical value; also returns the integer key used for the
    /// value table.
    #[inline]
    pub(crate) fn physical(&self, raw: u64) -> (SignalValue, i64) {
        let bits = self.layout.bits();
        match self.conversion {
            Conversion::Int {
                signed,
                factor,
                offset,
            } => {
                let r = if signed {
                    sign_extend(raw, bits)
                } else {
                    raw as i64
                };
                (
                    SignalValue::Int(r.wrapping_mul(factor).wrapping_add(offset)),
                    r,
                )
            }
            Conversion::Float {
                signed,
                factor,
                offset,
            } => {
                if signed {
                    let r = sign_extend(raw, bits);
                    (SignalValue::Float(r as f64 * factor + offset), r)
                } else {
                    (SignalValue::Float(raw as f64 * factor + offset), raw as i64)
                }
            }
            Conversion::F32 { factor, offset } => {
                let v = f64::from(f32::from_bits(raw as u32));
                (SignalValue::Float(v * factor + offset), raw as i64)
            }
            Conversion::F64 { factor, offset } => {
                let v = f64::from_bits(raw);
                (SignalValue::Float(v * factor + offset), raw as i64)
            }
        }
    }

    #[inline]
    pub(crate) fn label(&self, key: i64) -> Option<&Arc<str>> {
        if self.labels.is_empty() {
            return None;
        }
        self.labels
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
            .map(|i| &self.labels[i].1)
    }
}

/// One compiled DBC message.
#[derive(Debug, Clone)]
pub struct MessagePlan {
    pub(crate) id: u32,
    pub(crate) extended: bool,
    pub(crate) name: Arc<str>,
    pub(crate) size: u8,
    pub(crate) transmitter: Option<Arc<str>>,
    pub(crate) cycle_time: Option<Duration>,
    /// Multiplexors come before the signals they select; otherwise DBC order.
    pub(crate) signals: Box<[SignalPlan]>,
    /// Bytes needed by the signals that are always present.
    pub(crate) base_len: u8,
    /// Bytes needed by every signal, multiplexed or not: a frame this long
    /// can never be too short.
    pub(crate) full_len: u8,
    /// The DBC file this message came from.
    pub(crate) source: Arc<str>,
}

impl MessagePlan {
    /// Identifier without flag bits.
    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn is_extended(&self) -> bool {
        self.extended
    }
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }
    /// Declared payload size in bytes (`BO_ ... : size`).
    pub fn size(&self) -> usize {
        self.size as usize
    }
    pub fn transmitter(&self) -> Option<&Arc<str>> {
        self.transmitter.as_ref()
    }
    /// `GenMsgCycleTime` (or its `BA_DEF_DEF_` default) when positive.
    pub fn cycle_time(&self) -> Option<Duration> {
        self.cycle_time
    }
    pub fn signals(&self) -> &[SignalPlan] {
        &self.signals
    }
    pub fn signal(&self, name: &str) -> Option<(usize, &SignalPlan)> {
        self.signals
            .iter()
            .enumerate()
            .find(|(_, s)| &*s.name == name)
    }
    /// Whether any signal is multiplexed.
    pub fn is_multiplexed(&self) -> bool {
        self.signals.iter().any(|s| s.mux.is_some())
    }
    /// Name of the DBC file (or source label) that defined this message.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// Payload bytes needed by the signals present in every frame.
    pub fn min_len(&self) -> usize {
        self.base_len as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(bytes: &[u8]) -> [u8; PADDED_LEN] {
        let mut b = [0u8; PADDED_LEN];
        b[..bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn intel_extract_by_hand() {
        // 12 bits starting at bit 4: byte0 high nibble is the low nibble of
        // the value, byte1 the high byte -> 0xAB_C.
        let l = Layout::new(4, 12, ByteOrder::LittleEndian).unwrap();
        assert_eq!(l.extract(&padded(&[0xC0, 0xAB])), 0xABC);
        assert_eq!(l.end(), 2);
    }

    #[test]
    fn motorola_extract_by_hand() {
        // Start bit 7 (MSB of byte 0), 16 bits: plain big-endian u16.
        let l = Layout::new(7, 16, ByteOrder::BigEndian).unwrap();
        assert_eq!(l.extract(&padded(&[0x12, 0x34])), 0x1234);
        // Start bit 3, 8 bits: low nibble of byte0 is the high nibble of the
        // value, high nibble of byte1 is its low nibble -> 0x5A.
        let l = Layout::new(3, 8, ByteOrder::BigEndian).unwrap();
        assert_eq!(l.extract(&padded(&[0xF5, 0xAF])), 0x5A);
        assert_eq!(l.end(), 2);
        // Start bit 0, 2 bits: bit 0 of byte 0 then bit 7 of byte 1.
        let l = Layout::new(0, 2, ByteOrder::BigEndian).unwrap();
        assert_eq!(l.extract(&padded(&[0x01, 0x00])), 0b10);
        assert_eq!(l.extract(&padded(&[0x00, 0x80])), 0b01);
    }

    #[test]
    fn wide_windows_round_trip() {
        for order in [ByteOrder::LittleEndian, ByteOrder::BigEndian] {
            let l = Layout::new(3 + 8 * 5, 64, order).unwrap();
            let mut buf = [0u8; PADDED_LEN];
            l.insert(&mut buf, 0xDEAD_BEEF_CAFE_F00D);
            assert_eq!(l.extract(&buf), 0xDEAD_BEEF_CAFE_F00D, "{order:?}");
        }
    }

    #[test]
    fn layout_rejects_out_of_payload() {
        assert!(Layout::new(0, 0, ByteOrder::LittleEndian).is_err());
        assert!(Layout::new(0, 65, ByteOrder::LittleEndian).is_err());
        assert!(Layout::new(505, 8, ByteOrder::LittleEndian).is_err());
        assert!(Layout::new(504, 8, ByteOrder::LittleEndian).is_ok());
        // Motorola at bit 504 (byte 63, bit 0) can hold a single bit only.
        assert!(Layout::new(504, 1, ByteOrder::BigEndian).is_ok());
        assert!(Layout::new(504, 2, ByteOrder::BigEndian).is_err());
    }

    #[test]
    fn integer_rule() {
        assert!(matches!(
            Conversion::new(ValueKind::Unsigned, 8, 2.0, -40.0),
            Conversion::Int { .. }
        ));
        assert!(matches!(
            Conversion::new(ValueKind::Unsigned, 8, 0.5, 0.0),
            Conversion::Float { .. }
        ));
        // 64-bit unsigned cannot be an i64 for all raw values.
        assert!(matches!(
            Conversion::new(ValueKind::Unsigned, 64, 1.0, 0.0),
            Conversion::Float { .. }
        ));
        assert!(matches!(
            Conversion::new(ValueKind::Signed, 64, 1.0, 0.0),
            Conversion::Int { .. }
        ));
    }
}
