//! zstd for record values kept on disk: the agent buffer's segments and the
//! embedded store's blocks, a few KiB of encoded records each.
//!
//! Both are written by one thread holding a [`StoredCompressor`] (one
//! context for every value) and read by [`decompress_into`] with one
//! decompressor per thread. A value is compressed only when that makes it
//! smaller, so the caller keeps its uncompressed form for the rest.

/// zstd's level 1: on values of telemetry records it has level 3's ratio
/// (5.8 against 5.8 on the `spine` records) at more speed.
const LEVEL: i32 = 1;
/// Bodies shorter than this stay as they are: a zstd frame has a dozen
/// bytes of overhead and a context to touch for little gain.
pub const COMPRESS_FROM: usize = 256;
/// What a stored frame may declare it holds. Values close at a few KiB
/// unless one record is larger, and no record either side accepts comes
/// near this, so a larger claim is damage.
const MAX_DECOMPRESSED: u64 = 1 << 30;

/// Why a stored frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoredFrameError {
    #[error("no readable zstd frame header")]
    Header,
    #[error("the frame declares {0} bytes, more than any value holds")]
    TooLarge(u64),
    #[error("the frame does not decompress: {0}")]
    Zstd(String),
    #[error("the frame decompressed to {got} bytes, its header says {declared}")]
    Size { got: usize, declared: usize },
}

/// Compresses values with one zstd context, made on first use.
#[derive(Default)]
pub struct StoredCompressor {
    context: Option<zstd::bulk::Compressor<'static>>,
}

impl StoredCompressor {
    /// Appends one zstd frame of `body` to `out` when `body` is at least
    /// [`COMPRESS_FROM`] long and the frame is shorter than it; returns
    /// whether it did. Otherwise (or if zstd fails) `out` is left as it was.
    pub fn compress_into(&mut self, body: &[u8], out: &mut Vec<u8>) -> bool {
        if body.len() < COMPRESS_FROM {
            return false;
        }
        if self.context.is_none() {
            match zstd::bulk::Compressor::new(LEVEL) {
                Ok(context) => self.context = Some(context),
                Err(e) => {
                    tracing::warn!(error = %e, "no zstd context: storing values uncompressed");
                    return false;
                }
            }
        }
        let Some(context) = self.context.as_mut() else {
            return false;
        };
        let start = out.len();
        out.resize(start + zstd::zstd_safe::compress_bound(body.len()), 0);
        match context.compress_to_buffer(body, &mut out[start..]) {
            Ok(len) if len < body.len() => {
                out.truncate(start + len);
                true
            }
            _ => {
                out.truncate(start);
                false
            }
        }
    }
}

thread_local! {
    /// Readers are the uplink's, the opener's and the query's threads: a
    /// context per thread rather than per value (zstd allocates its window
    /// on first use).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The size a frame declares it decompresses to; `None` when its header
/// is unreadable or declares none.
pub fn content_size(frame: &[u8]) -> Option<u64> {
    zstd::zstd_safe::get_frame_content_size(frame)
        .ok()
        .flatten()
}

/// Decompresses a frame made by [`StoredCompressor`] into `out`, which is
/// cleared first; refuses a frame that declares no size or an impossible one
/// before allocating for it.
pub fn decompress_into(frame: &[u8], out: &mut Vec<u8>) -> Result<(), StoredFrameError> {
    let declared = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size <= MAX_DECOMPRESSED => size as usize,
        Ok(Some(size)) => return Err(StoredFrameError::TooLarge(size)),
        _ => return Err(StoredFrameError::Header),
    };
    out.clear();
    out.reserve(declared);
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let context = match slot {
            Some(context) => context,
            None => slot.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| StoredFrameError::Zstd(e.to_string()))?,
            ),
        };
        let got = context
            .decompress_to_buffer(frame, out)
            .map_err(|e| StoredFrameError::Zstd(e.to_string()))?;
        if got == declared {
            Ok(())
        } else {
            Err(StoredFrameError::Size { got, declared })
        }
    })
}
