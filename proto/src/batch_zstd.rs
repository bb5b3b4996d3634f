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
        let context = match &mut self.context {
            Some(context) => context,
            None => self
                .context
                .insert(zstd::bulk::Compressor::new(LEVEL).map_err(BatchZstdError::Compress)?),
        };
        self.plain.clear();
        // Encoding into a Vec grows it as needed and cannot fail.
        let _ = batch.encode(&mut self.plain);
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(self.plain.len()));
        context
            .compress_to_buffer(&self.plain, &mut out)
            .map_err(BatchZstdError::Compress)?;
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
        if batch.records_zstd.is_empty() {
            return Ok(batch);
        }
        if !batch.records.is_empty() {
            return Err(BatchZstdError::Both);
        }
        // Refuse by the size the frame declares before allocating for it.
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(&batch.records_zstd) {
            if size > limit as u64 {
                return Err(BatchZstdError::TooLarge { size, limit });
            }
        }
        let plain = self
            .context
            .decompress(&batch.records_zstd, limit)
            .map_err(BatchZstdError::Zstd)?;
        let inner = EncodedBatch::decode(Bytes::from(plain))?;
        if !inner.records_zstd.is_empty() {
            return Err(BatchZstdError::Nested);
        }
        Ok(inner)
    }
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

    #[test]
    fn bad_compressed_batches_are_refused_with_the_reason() {
        let mut compressor = BatchCompressor::default();
        let mut decompressor = BatchDecompressor::new().unwrap();
        let plain = batch(500);
        let sent = compressor.compress(plain.clone()).unwrap();

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
