//! edgefleet-can: CAN frames in, named physical signal values out.
//!
//! * [`Decoder`] compiles one or more DBC files (via `can-dbc`) into decode
//!   plans and decodes [`CanFrame`]s into [`DecodedFrame`]s; load errors are
//!   [`DbcLoadError`]s naming file, line and column.
//! * [`MessagePlan::encode`] is the exact inverse, used by the simulator and tests.
//! * [`candump`] reads and writes `candump -L` logs; [`replay`] replays them
//!   with their recorded timing (async with the `tokio` feature).
//! * [`simulate`] produces deterministic traffic from a DBC.
//! * [`Reducer`] decides which decoded signals are worth sending upstream.
//! * [`decode_log()`] is the `edge-agent decode` command as a function.
//!
//! Supported DBC features: Intel and Motorola layouts, signed and unsigned
//! integers up to 64 bits, IEEE float/double (`SIG_VALTYPE_`), factor and
//! offset, simple and extended multiplexing (`M`, `mN`, `mNM`,
//! `SG_MUL_VAL_` ranges), value tables (`VAL_`), units, 29-bit ids (bit 31
//! set in the DBC), CAN FD payloads up to 64 bytes and `GenMsgCycleTime`.
//!
//! ```
//! use edgefleet_can::{CanFrame, DecodedFrame, Decoder, SignalValue};
//!
//! let dbc = "VERSION \"\"\n\nNS_ :\n\nBS_:\n\nBU_: ECU\n\n\
//!     BO_ 256 Engine: 8 ECU\n SG_ Rpm : 0|16@1+ (0.25,0) [0|16383.75] \"rpm\" ECU\n";
//! let decoder = Decoder::from_dbc_str("engine.dbc", dbc)?;
//! let frame = CanFrame::new(0x100, false, &[0x40, 0x1F, 0, 0, 0, 0, 0, 0])?;
//! let mut out = DecodedFrame::default(); // reuse across frames
//! decoder.decode_into(&frame, &mut out)?;
//! assert_eq!(&*out.message, "Engine");
//! assert_eq!(out.signals[0].value, SignalValue::Float(2000.0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod candump;
mod compile;
mod dbc;
mod decode;
pub mod decode_log;
mod encode;
mod frame;
mod plan;
mod reduce;
pub mod replay;
pub mod simulate;

pub use dbc::DbcLoadError;
pub use decode::{DecodeError, DecodedFrame, DecodedSignal, Decoder, DecoderBuilder};
pub use decode_log::{decode_log, decode_log_with, DecodeLogError, DecodeStats};
pub use encode::EncodeError;
pub use frame::{CanFrame, FrameError, CANFD_MAX_LEN, CAN_MAX_LEN, EFF_MAX_ID, SFF_MAX_ID};
pub use plan::{ByteOrder, MessagePlan, SignalPlan, SignalValue, ValueKind};
pub use reduce::{ReduceConfig, ReduceRule, Reducer};
