//! The CAN frame as it travels between the candump reader, the decoder, the
//! encoder and the simulator.
//!
//! The payload lives inline in a fixed 64-byte array so a frame is `Copy` and
//! never allocates: frames are created at bus rate on the hot path.

use std::fmt;

/// Largest payload of a classical CAN frame.
pub const CAN_MAX_LEN: usize = 8;
/// Largest payload of a CAN FD frame.
pub const CANFD_MAX_LEN: usize = 64;
/// Largest standard (11-bit) identifier.
pub const SFF_MAX_ID: u32 = 0x7FF;
/// Largest extended (29-bit) identifier.
pub const EFF_MAX_ID: u32 = 0x1FFF_FFFF;

const F_EXTENDED: u8 = 1 << 0;
const F_REMOTE: u8 = 1 << 1;
const F_ERROR: u8 = 1 << 2;
const F_FD: u8 = 1 << 3;
const F_BRS: u8 = 1 << 4;
const F_ESI: u8 = 1 << 5;

/// Why a frame could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("identifier {id:#X} does not fit in {bits} bits")]
    IdOutOfRange { id: u32, bits: u8 },
    #[error("payload of {len} bytes exceeds the {max}-byte maximum")]
    TooLong { len: usize, max: usize },
    #[error("length code {0} is not in 9..=15 (classical CAN DLC beyond 8 bytes)")]
    BadLen8Dlc(u8),
}

/// One CAN or CAN FD frame. The identifier never carries flag bits: extended,
/// remote and error are separate properties.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CanFrame {
    id: u32,
    flags: u8,
    len: u8,
    /// Classical CAN only: a DLC of 9..=15 on the wire (payload still 8 bytes),
    /// kept so logs round-trip; 0 when absent.
    len8_dlc: u8,
    /// Bytes past `len` are always zero: the decoder relies on that padding.
    data: [u8; CANFD_MAX_LEN],
}

fn check_id(id: u32, extended: bool) -> Result<(), FrameError> {
    let (max, bits) = if extended {
        (EFF_MAX_ID, 29)
    } else {
        (SFF_MAX_ID, 11)
    };
    if id > max {
        return Err(FrameError::IdOutOfRange { id, bits });
    }
    Ok(())
}

impl CanFrame {
    fn build(id: u32, flags: u8, payload: &[u8], max: usize) -> Result<Self, FrameError> {
        check_id(id, flags & F_EXTENDED != 0)?;
        if payload.len() > max {
            return Err(FrameError::TooLong {
                len: payload.len(),
                max,
            });
        }
        let mut data = [0u8; CANFD_MAX_LEN];
        data[..payload.len()].copy_from_slice(payload);
        Ok(Self {
            id,
            flags,
            len: payload.len() as u8,
            len8_dlc: 0,
            data,
        })
    }

    /// A classical data frame (payload at most 8 bytes).
    pub fn new(id: u32, extended: bool, payload: &[u8]) -> Result<Self, FrameError> {
        let flags = if extended { F_EXTENDED } else { 0 };
        Self::build(id, flags, payload, CAN_MAX_LEN)
    }

    /// A CAN FD data frame (payload at most 64 bytes). `brs` is bit-rate switch,
    /// `esi` the error state indicator.
    pub fn new_fd(
        id: u32,
        extended: bool,
        payload: &[u8],
        brs: bool,
        esi: bool,
    ) -> Result<Self, FrameError> {
        let mut flags = F_FD;
        if extended {
            flags |= F_EXTENDED;
        }
        if brs {
            flags |= F_BRS;
        }
        if esi {
            flags |= F_ESI;
        }
        Self::build(id, flags, payload, CANFD_MAX_LEN)
    }

    /// A remote transmission request asking for `dlc` bytes (0..=8).
    pub fn new_remote(id: u32, extended: bool, dlc: u8) -> Result<Self, FrameError> {
        check_id(id, extended)?;
        if usize::from(dlc) > CAN_MAX_LEN {
            return Err(FrameError::TooLong {
                len: dlc.into(),
                max: CAN_MAX_LEN,
            });
        }
        let mut flags = F_REMOTE;
        if extended {
            flags |= F_EXTENDED;
        }
        Ok(Self {
            id,
            flags,
            len: dlc,
            len8_dlc: 0,
            data: [0; CANFD_MAX_LEN],
        })
    }

    /// An error frame as SocketCAN reports it: `class` holds the error class
    /// bits (the identifier without `CAN_ERR_FLAG`), the payload the details.
    pub fn new_error(class: u32, payload: &[u8]) -> Result<Self, FrameError> {
        let mut f = Self::build(0, F_ERROR, payload, CAN_MAX_LEN)?;
        if class > EFF_MAX_ID {
            return Err(FrameError::IdOutOfRange {
                id: class,
                bits: 29,
            });
        }
        f.id = class;
        Ok(f)
    }

    /// Records a classical-CAN DLC of 9..=15 (payload must be 8 bytes).
    pub fn with_len8_dlc(mut self, dlc: u8) -> Result<Self, FrameError> {
        if !(9..=15).contains(&dlc) || self.len as usize != CAN_MAX_LEN || self.is_fd() {
            return Err(FrameError::BadLen8Dlc(dlc));
        }
        self.len8_dlc = dlc;
        Ok(self)
    }

    /// Identifier without any flag bits (11 or 29 bits; error class for error frames).
    #[inline]
    pub fn id(&self) -> u32 {
        self.id
    }
    #[inline]
    pub fn is_extended(&self) -> bool {
        self.flags & F_EXTENDED != 0
    }
    #[inline]
    pub fn is_remote(&self) -> bool {
        self.flags & F_REMOTE != 0
    }
    #[inline]
    pub fn is_error(&self) -> bool {
        self.flags & F_ERROR != 0
    }
    #[inline]
    pub fn is_fd(&self) -> bool {
        self.flags & F_FD != 0
    }
    /// CAN FD bit-rate switch flag.
    #[inline]
    pub fn brs(&self) -> bool {
        self.flags & F_BRS != 0
    }
    /// CAN FD error state indicator flag.
    #[inline]
    pub fn esi(&self) -> bool {
        self.flags & F_ESI != 0
    }
    /// Payload length in bytes (for remote frames: the requested length).
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The classical-CAN DLC 9..=15 if one was recorded.
    pub fn len8_dlc(&self) -> Option<u8> {
        (self.len8_dlc != 0).then_some(self.len8_dlc)
    }
    /// The payload (empty for remote frames).
    #[inline]
    pub fn data(&self) -> &[u8] {
        if self.is_remote() {
            &[]
        } else {
            &self.data[..self.len as usize]
        }
    }
    /// The whole 64-byte buffer, zero past `len()`.
    #[inline]
    pub(crate) fn padded(&self) -> &[u8; CANFD_MAX_LEN] {
        &self.data
    }
}

impl fmt::Debug for CanFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CanFrame");
        d.field("id", &format_args!("{:#X}", self.id))
            .field("extended", &self.is_extended());
        if self.is_remote() {
            d.field("remote", &true);
        }
        if self.is_error() {
            d.field("error", &true);
        }
        if self.is_fd() {
            d.field("fd", &true)
                .field("brs", &self.brs())
                .field("esi", &self.esi());
        }
        d.field("len", &self.len)
            .field("data", &format_args!("{:02X?}", self.data()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_ids_and_lengths_out_of_range() {
        assert!(CanFrame::new(0x800, false, &[]).is_err());
        assert!(CanFrame::new(0x7FF, false, &[]).is_ok());
        assert!(CanFrame::new(0x2000_0000, true, &[]).is_err());
        assert!(CanFrame::new(1, false, &[0; 9]).is_err());
        assert!(CanFrame::new_fd(1, false, &[0; 65], false, false).is_err());
        assert!(CanFrame::new_remote(1, false, 9).is_err());
    }

    #[test]
    fn remote_frame_has_no_payload() {
        let f = CanFrame::new_remote(0x123, false, 4).unwrap();
        assert_eq!(f.len(), 4);
        assert!(f.data().is_empty());
    }

    #[test]
    fn len8_dlc_only_on_full_classic_frames() {
        let f = CanFrame::new(1, false, &[0; 8]).unwrap();
        assert_eq!(f.with_len8_dlc(0xF).unwrap().len8_dlc(), Some(0xF));
        assert!(f.with_len8_dlc(8).is_err());
        assert!(CanFrame::new(1, false, &[0; 7])
            .unwrap()
            .with_len8_dlc(9)
            .is_err());
    }
}
