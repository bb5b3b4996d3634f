//! A batch's records compressed inside the message (`RecordBatch.records_zstd`).
//!
//! gRPC's own compression (tonic's `send_compressed`) builds a new zstd
//! context for every message and drops it after: a fresh allocation of more
//! than a MiB, page-faulted in, for every batch and every ack. Here each side
//! keeps one context: the agent one compressor per stream, the ingest one
//! decompressor per worker thread (a context per stream would cost ~100 KiB
//! for each of thousands of streams).
//!
//! The compressed content is the batch's own encoding with only `records`
//! set, so the ingest decodes what it decompressed exactly as it decodes an
//! uncompressed batch.

use prost::bytes::Bytes;
use prost::Message;

use crate::encoded::EncodedBatch;

/// The name of this encoding in `HelloAck.batch_encodings`.
pub const ENCODING: &str = "zstd";

/// zstd's default level: the best ratio per CPU second for telemetry
/// batches of a few hundred KiB that we know of.
const LEVEL: i32 = 3;

/// A batch is compressed as concatenated frames (which any zstd decoder
/// reads as one), each of whole records and at most this much encoding
/// (unless one record is larger). Telemetry shrinks six- to tenfold, so a
/// frame comes to a few KiB: a size the ingest's store keeps as one value
/// in sled's log, without compressing the records again. The price is on
/// the wire: the `spine` benchmark's records compress 6.6-fold in such
/// frames, 7.7-fold in one frame per 2,000-record batch.
pub const FRAME_PLAIN_BYTES: usize = 32 * 1024;

/// What is wrong with a batch's `records_zstd`.
#[derive(Debug, thiserror::Error)]
pub enum BatchZstdError {
    #[error("RecordBatch has both records and records_zstd")]
    Both,
    #[error("RecordBatch.records_zstd decompresses to {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: usize },
    #[error("RecordBatch.records_zstd is not a valid zstd frame: {0}")]
    Zstd(std::io::Error),
    #[error("RecordBatch.records_zstd decompresses to something that is not a RecordBatch: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("RecordBatch.records_zstd contains a batch that is itself compressed")]
    Nested,
    #[error("compressing a batch: {0}")]
    Compress(std::io::Error),
}

/// Batches whose records are smaller than this go uncompressed: an agent
/// that sends a few records now and then would otherwise keep a context of
/// over a MiB for what saves it a few hundred bytes.
pub const COMPRESS_FROM_BYTES: usize = 16 * 1024;

/// The agent's side: one per stream. The context is made when the first
/// large batch needs it, reused for every batch after, and given back with
/// [`release`](Self::release) when the stream goes idle.
#[derive(Default)]
pub struct BatchCompressor {
    context: Option<zstd::bulk::Compressor<'static>>,
    plain: Vec<u8>,
}

impl BatchCompressor {
    /// `batch` with its records moved into `records_zstd`, or as it is when
    /// its records are under [`COMPRESS_FROM_BYTES`].
    pub fn compress(&mut self, batch: EncodedBatch) -> Result<EncodedBatch, BatchZstdError> {
        let bytes: usize = batch.records.iter().map(Bytes::len).sum();
        if bytes < COMPRESS_FROM_BYTES {
            return Ok(batch);
        }
        let context = context(&mut self.context)?;
        self.plain.clear();
        // Encoding into a Vec grows it as needed and cannot fail.
        let _ = batch.encode(&mut self.plain);
        // One frame per run of whole records, so the ingest can store each
        // frame as it came ([`KeptFrames`]).
        let mut out = Vec::new();
        let mut run_start = 0;
        let mut run_end = 0;
        for record in &batch.records {
            let len = entry_len(record);
            if run_end > run_start && run_end + len - run_start > FRAME_PLAIN_BYTES {
                compress_frame(context, &self.plain[run_start..run_end], &mut out)?;
                run_start = run_end;
            }
            run_end += len;
        }
        compress_frame(context, &self.plain[run_start..run_end], &mut out)?;
        Ok(EncodedBatch {
            records: Vec::new(),
            records_zstd: Bytes::from(out),
        })
    }

    /// Drops the context and the scratch buffer; the next large batch makes
    /// new ones.
    pub fn release(&mut self) {
        self.context = None;
        self.plain = Vec::new();
    }
}

/// A batch's `records_zstd` put together, in order, from frames that were
/// compressed earlier and from records compressed here.
///
/// The agent buffer stores its records as runs of whole `RecordBatch`
/// entries, numbered, each run one zstd frame that declares its size (the
/// buffer's segments). The uplink passes such a frame on as it is:
/// compressing the records again was the largest cost of sending them, and
/// the ingest checks every frame's records whoever compressed it. Records
/// that cannot go that way (a segment read from its middle, renumbered, or
/// written by an older agent) are compressed here, a frame per run of at
/// most [`FRAME_PLAIN_BYTES`].
pub struct FramedBatchBuilder<'c> {
    compressor: &'c mut BatchCompressor,
    frames: Vec<u8>,
    /// Entries not yet compressed (see [`crate::encoded::write_entry`]).
    loose: Vec<u8>,
    records: usize,
    plain_bytes: usize,
}

impl<'c> FramedBatchBuilder<'c> {
    pub fn new(compressor: &'c mut BatchCompressor) -> Self {
        FramedBatchBuilder {
            compressor,
            frames: Vec::new(),
            loose: Vec::new(),
            records: 0,
            plain_bytes: 0,
        }
    }

    /// Appends a frame compressed earlier: `records` whole entries, in the
    /// batch's order, `plain_bytes` long when decompressed.
    pub fn push_frame(
        &mut self,
        frame: &[u8],
        records: usize,
        plain_bytes: usize,
    ) -> Result<(), BatchZstdError> {
        self.compress_loose()?;
        self.frames.extend_from_slice(frame);
        self.records += records;
        self.plain_bytes += plain_bytes;
        Ok(())
    }

    /// Appends a record encoded without its `seq`, numbered `seq`.
    pub fn push_record(
        &mut self,
        encoded_without_seq: &[u8],
        seq: u64,
    ) -> Result<(), BatchZstdError> {
        let entry = crate::encoded::entry_len(encoded_without_seq.len(), seq);
        if !self.loose.is_empty() && self.loose.len() + entry > FRAME_PLAIN_BYTES {
            self.compress_loose()?;
        }
        crate::encoded::write_entry(&mut self.loose, encoded_without_seq, seq);
        self.records += 1;
        self.plain_bytes += entry;
        Ok(())
    }

    /// Records so far.
    pub fn records(&self) -> usize {
        self.records
    }

    /// What the records so far take uncompressed: what the ingest counts
    /// against its `max_message_bytes`.
    pub fn plain_bytes(&self) -> usize {
        self.plain_bytes
    }

    /// The batch. Records alone, fewer than [`COMPRESS_FROM_BYTES`] of them,
    /// go uncompressed, as [`BatchCompressor::compress`] sends them.
    pub fn finish(mut self) -> Result<EncodedBatch, BatchZstdError> {
        if self.frames.is_empty() && self.loose.len() < COMPRESS_FROM_BYTES {
            return Ok(EncodedBatch::decode(Bytes::from(self.loose))?);
        }
        self.compress_loose()?;
        Ok(EncodedBatch {
            records: Vec::new(),
            records_zstd: Bytes::from(self.frames),
        })
    }

    fn compress_loose(&mut self) -> Result<(), BatchZstdError> {
        if self.loose.is_empty() {
            return Ok(());
        }
        let context = context(&mut self.compressor.context)?;
        compress_frame(context, &self.loose, &mut self.frames)?;
        self.loose.clear();
        Ok(())
    }
}

/// Bytes a record takes in a batch's encoding: `RecordBatch.records`'s key,
/// its length and itself.
fn entry_len(record: &Bytes) -> usize {
    prost::encoding::bytes::encoded_len(1, record)
}

/// The stream's context in `slot`, made on first use.
fn context<'s>(
    slot: &'s mut Option<zstd::bulk::Compressor<'static>>,
) -> Result<&'s mut zstd::bulk::Compressor<'static>, BatchZstdError> {
    match slot {
        Some(context) => Ok(context),
        None => {
            Ok(slot.insert(zstd::bulk::Compressor::new(LEVEL).map_err(BatchZstdError::Compress)?))
        }
    }
}

/// Appends one zstd frame of `plain` to `out`.
fn compress_frame(
    context: &mut zstd::bulk::Compressor<'static>,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), BatchZstdError> {
    let start = out.len();
    out.resize(start + zstd::zstd_safe::compress_bound(plain.len()), 0);
    let len = context
        .compress_to_buffer(plain, &mut out[start..])
        .map_err(BatchZstdError::Compress)?;
    out.truncate(start + len);
    Ok(())
}

/// The ingest's side: opens a batch sent either way.
pub struct BatchDecompressor {
    context: zstd::bulk::Decompressor<'static>,
}

impl BatchDecompressor {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            context: zstd::bulk::Decompressor::new()?,
        })
    }

    /// The batch with its records in `records`; a batch sent uncompressed
    /// is returned as it is. `limit` bounds the decompressed size.
    pub fn open(
        &mut self,
        batch: EncodedBatch,
        limit: usize,
    ) -> Result<EncodedBatch, BatchZstdError> {
        self.open_keeping_frames(batch, limit)
            .map(|opened| opened.0)
    }

    /// [`BatchDecompressor::open`], and the agent's frames too when a store
    /// may keep them as they are ([`KeptFrames`]): compressing the records
    /// again would cost the ingest as much CPU as the agent spent on them.
    pub fn open_keeping_frames(
        &mut self,
        batch: EncodedBatch,
        limit: usize,
    ) -> Result<(EncodedBatch, Option<KeptFrames>), BatchZstdError> {
        if batch.records_zstd.is_empty() {
            return Ok((batch, None));
        }
        if !batch.records.is_empty() {
            return Err(BatchZstdError::Both);
        }
        let sizes = frame_sizes(&batch.records_zstd);
        // Refuse by the sizes the frames declare before allocating for them.
        let declared = sizes
            .as_deref()
            .and_then(|sizes| sizes.iter().try_fold(0u64, |sum, f| sum.checked_add(f.1)));
        if let Some(size) = declared {
            if size > limit as u64 {
                return Err(BatchZstdError::TooLarge { size, limit });
            }
        }
        let plain = self
            .context
            .decompress(&batch.records_zstd, limit)
            .map_err(BatchZstdError::Zstd)?;
        let plain_len = plain.len();
        let inner = EncodedBatch::decode(Bytes::from(plain))?;
        if !inner.records_zstd.is_empty() {
            return Err(BatchZstdError::Nested);
        }
        let kept = sizes.and_then(|sizes| {
            KeptFrames::check(&batch.records_zstd, &sizes, plain_len, &inner.records)
        });
        Ok((inner, kept))
    }
}

/// Each frame of `all`: its length and the size it declares it
/// decompresses to. None when one declares nothing or the framing is
/// damaged (decompressing then finds out, within its limit).
fn frame_sizes(all: &[u8]) -> Option<Vec<(usize, u64)>> {
    let mut sizes = Vec::new();
    let mut rest = all;
    while !rest.is_empty() {
        let len = zstd::zstd_safe::find_frame_compressed_size(rest).ok()?;
        sizes.push((
            len,
            zstd::zstd_safe::get_frame_content_size(&rest[..len]).ok()??,
        ));
        rest = &rest[len..];
    }
    Some(sizes)
}

/// A batch's `records_zstd`, split into its frames, each of which reads
/// back, with [`crate::stored_zstd::decompress_into`] and
/// [`frame_records`], to exactly the run of records it holds. Kept only
/// when every frame declares its decompressed size, ends at a record's end,
/// and the whole holds nothing but `records` in their canonical encoding;
/// other frames (from another encoder: without their size, a record across
/// two frames, a skippable frame, unknown fields) are simply not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptFrames {
    /// Each frame and the number of records in it, in order.
    pub frames: Vec<(Bytes, usize)>,
}

impl KeptFrames {
    /// `sizes` are [`frame_sizes`] of `all`.
    fn check(
        all: &Bytes,
        sizes: &[(usize, u64)],
        plain_len: usize,
        records: &[Bytes],
    ) -> Option<Self> {
        // Each record took at least its key byte, its length's shortest
        // varint and itself; only when that adds up to every byte was there
        // nothing else and nothing encoded the long way.
        if records.iter().map(entry_len).sum::<usize>() != plain_len {
            return None;
        }
        let mut frames = Vec::with_capacity(sizes.len());
        let mut offset = 0;
        let mut records = records.iter();
        for &(len, declared) in sizes {
            let (mut content, mut count) = (0u64, 0);
            while content < declared {
                content += entry_len(records.next()?) as u64;
                count += 1;
            }
            if content != declared || count == 0 {
                return None; // A record runs across frames, or an empty frame.
            }
            frames.push((all.slice(offset..offset + len), count));
            offset += len;
        }
        Some(KeptFrames { frames })
    }
}

/// What is wrong with the decompressed content of a kept frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("byte {offset} of a stored batch: {reason}")]
pub struct FrameContentError {
    pub offset: usize,
    pub reason: &'static str,
}

/// The encoded records in the decompressed content of one of [`KeptFrames`].
pub fn frame_records(
    content: &[u8],
) -> impl Iterator<Item = Result<&[u8], FrameContentError>> + '_ {
    let mut rest = content;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let offset = content.len() - rest.len();
        let mut fail = |reason| {
            failed = true;
            Some(Err(FrameContentError { offset, reason }))
        };
        // Field 1, length-delimited: `RecordBatch.records`.
        if rest[0] != 0x0A {
            return fail("not a RecordBatch.records entry");
        }
        rest = &rest[1..];
        let len = match prost::encoding::decode_varint(&mut rest) {
            Ok(len) if len <= rest.len() as u64 => len as usize,
            _ => return fail("record length runs past the end"),
        };
        let (record, tail) = rest.split_at(len);
        rest = tail;
        Some(Ok(record))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoded::BatchBuilder;
    use crate::RecordBatch;

    fn batch(records: u64) -> EncodedBatch {
        let mut builder = BatchBuilder::with_capacity(records as usize, 0);
        for seq in 1..=records {
            let record = crate::Record {
                seq: 0,
                source: "mqtt".into(),
                device_id: format!("dev-{}", seq % 7),
                timestamp_ns: seq as i64 * 1_000,
                value: Some(crate::record::Value::Signals(crate::Signals {
                    signals: vec![crate::Signal::f64("temp", seq as f64 / 3.0)],
                })),
            };
            builder.push(&record.encode_to_vec(), seq);
        }
        builder.finish()
    }

    #[test]
    fn a_compressed_batch_opens_to_the_same_records_and_is_smaller() {
        let mut compressor = BatchCompressor::default();
        let mut decompressor = BatchDecompressor::new().unwrap();
        // The same contexts for several batches (and after a release):
        // nothing carries over.
        for (round, records) in [500, 2000, 700].into_iter().enumerate() {
            if round == 2 {
                compressor.release();
            }
            let plain = batch(records);
            let sent = compressor.compress(plain.clone()).unwrap();
            assert!(sent.records.is_empty());
            assert!(sent.records_zstd.len() * 3 < plain.encoded_len());
            // What a peer using the generated types reads: nothing but field 2.
            let generated = RecordBatch::decode(sent.encode_to_vec().as_slice()).unwrap();
            assert_eq!(generated.records_zstd, sent.records_zstd.to_vec());
            let opened = decompressor.open(sent, 1 << 20).unwrap();
            assert_eq!(opened, plain);
        }
    }

    #[test]
    fn a_small_batch_is_sent_and_opened_as_it_is() {
        let plain = batch(3);
        assert_eq!(
            BatchCompressor::default().compress(plain.clone()).unwrap(),
            plain
        );
        let opened = BatchDecompressor::new()
            .unwrap()
            .open(plain.clone(), 10)
            .unwrap();
        assert_eq!(opened, plain);
    }

    /// The agent's frames, each a run of whole records, are kept with
    /// their counts, and each reads back to exactly its run.
    #[test]
    fn a_batch_is_sent_as_frames_of_whole_records_each_of_which_reads_back() {
        let plain = batch(4000);
        let sent = BatchCompressor::default().compress(plain.clone()).unwrap();
        let (opened, kept) = BatchDecompressor::new()
            .unwrap()
            .open_keeping_frames(sent.clone(), 16 << 20)
            .unwrap();
        assert_eq!(opened, plain);
        let kept = kept.expect("frames kept");
        assert!(kept.frames.len() > 1, "{} frames", kept.frames.len());
        let joined: Vec<u8> = kept.frames.iter().flat_map(|(f, _)| f.to_vec()).collect();
        assert_eq!(joined, sent.records_zstd.to_vec());
        let mut records = plain.records.iter();
        let mut content = Vec::new();
        for (frame, count) in &kept.frames {
            crate::stored_zstd::decompress_into(frame, &mut content).unwrap();
            assert!(content.len() <= FRAME_PLAIN_BYTES);
            let run: Vec<&[u8]> = frame_records(&content).map(Result::unwrap).collect();
            assert_eq!(run.len(), *count);
            for record in run {
                assert_eq!(record, &records.next().unwrap()[..]);
            }
        }
        assert!(records.next().is_none());
    }

    /// Frames a store could not read back record by record are not kept;
    /// the batch still opens.
    #[test]
    fn frames_that_do_not_read_back_record_by_record_are_not_kept() {
        let plain = batch(500);
        let encoded = plain.encode_to_vec();
        let mut with_unknown_field = encoded.clone();
        with_unknown_field.extend_from_slice(&[0x18, 0x01]); // field 3 = 1
        let cut = encoded.len() / 2; // inside a record
        let no_size = {
            use std::io::Write;
            let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
            encoder.include_contentsize(false).unwrap();
            encoder.write_all(&encoded).unwrap();
            encoder.finish().unwrap()
        };
        let mut skippable = vec![0x50, 0x2A, 0x4D, 0x18, 2, 0, 0, 0, 7, 7];
        skippable.extend(zstd::bulk::compress(&encoded, 3).unwrap());
        let cases = [
            ("no declared size", no_size),
            (
                "a record across two frames",
                [
                    zstd::bulk::compress(&encoded[..cut], 3).unwrap(),
                    zstd::bulk::compress(&encoded[cut..], 3).unwrap(),
                ]
                .concat(),
            ),
            (
                "an unknown field",
                zstd::bulk::compress(&with_unknown_field, 3).unwrap(),
            ),
            ("a skippable frame", skippable),
        ];
        let mut decompressor = BatchDecompressor::new().unwrap();
        for (case, frames) in cases {
            let (opened, kept) = decompressor
                .open_keeping_frames(
                    EncodedBatch {
                        records: Vec::new(),
                        records_zstd: frames.into(),
                    },
                    1 << 20,
                )
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(opened.records, plain.records, "{case}");
            assert!(kept.is_none(), "{case}: kept");
        }
        // One frame over the whole batch, as another encoder may send it,
        // is kept as one run.
        let (_, kept) = decompressor
            .open_keeping_frames(
                EncodedBatch {
                    records: Vec::new(),
                    records_zstd: zstd::bulk::compress(&encoded, 3).unwrap().into(),
                },
                1 << 20,
            )
            .unwrap();
        assert_eq!(kept.unwrap().frames[0].1, 500);
    }

    #[test]
    fn the_records_of_a_damaged_frame_content_end_in_an_error_naming_the_byte() {
        let plain = batch(3);
        let encoded = plain.encode_to_vec();
        let good: Vec<&[u8]> = frame_records(&encoded).map(Result::unwrap).collect();
        assert_eq!(good.len(), 3);
        let first = 2 + plain.records[0].len();
        let mut wrong_field = encoded.clone();
        wrong_field[first] = 0x12;
        let got: Vec<_> = frame_records(&wrong_field).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Err(FrameContentError {
                offset: first,
                reason: "not a RecordBatch.records entry"
            })
        );
        let cut = &encoded[..encoded.len() - 1];
        assert!(frame_records(cut).last().unwrap().is_err());
    }

    #[test]
    fn bad_compressed_batches_are_refused_with_the_reason() {
        let mut compressor = BatchCompressor::default();
        let mut decompressor = BatchDecompressor::new().unwrap();
        // Several frames: the limit applies to what they declare together.
        let plain = batch(2000);
        let sent = compressor.compress(plain.clone()).unwrap();
        assert!(frame_sizes(&sent.records_zstd[..sent.records_zstd.len() / 2]).is_none());

        let limit = plain.encoded_len() - 1;
        let err = decompressor.open(sent.clone(), limit).unwrap_err();
        assert!(
            matches!(err, BatchZstdError::TooLarge { size, limit: l } if size == plain.encoded_len() as u64 && l == limit),
            "{err}"
        );

        let mut both = sent.clone();
        both.records = plain.records.clone();
        assert!(matches!(
            decompressor.open(both, 1 << 20),
            Err(BatchZstdError::Both)
        ));

        let mut truncated = sent.clone();
        truncated.records_zstd = sent.records_zstd.slice(..sent.records_zstd.len() / 2);
        assert!(matches!(
            decompressor.open(truncated, 1 << 20),
            Err(BatchZstdError::Zstd(_))
        ));

        let not_a_batch = zstd::bulk::compress(&[0xFF, 0xFF, 0xFF], 3).unwrap();
        let err = decompressor
            .open(
                EncodedBatch {
                    records: Vec::new(),
                    records_zstd: not_a_batch.into(),
                },
                1 << 20,
            )
            .unwrap_err();
        assert!(matches!(err, BatchZstdError::Decode(_)), "{err}");

        // Built by hand: the compressor passes a batch this small through.
        let nested = EncodedBatch {
            records: Vec::new(),
            records_zstd: zstd::bulk::compress(&sent.encode_to_vec(), 3)
                .unwrap()
                .into(),
        };
        assert!(matches!(
            decompressor.open(nested, 1 << 20),
            Err(BatchZstdError::Nested)
        ));

        // The decompressor still works after every refusal.
        assert_eq!(decompressor.open(sent, 1 << 20).unwrap(), plain);
    }
}
