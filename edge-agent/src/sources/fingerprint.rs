//! What the buffer's dedupe memory remembers of an MQTT message: 16 bytes
//! that stand for its topic and payload.
//!
//! The buffer compares a redelivered message's fingerprint with the last one
//! committed under the same key (source and packet id); only a match makes it
//! a duplicate. So the fingerprint needs no secrecy, only no accidental
//! collisions: a false duplicate takes the same broker-assigned packet id, the
//! DUP flag, and two different messages with equal 128-bit hashes.
//!
//! [`Fingerprinter`] uses XXH3-128, a fixed, specified function (the
//! fingerprints are written to disk and must not change with a crate
//! update). Agents built before it used the first 16 bytes of SHA-256:
//! 14 % of the runtime thread's time in `mqtt-e2e` on x86_64 with SHA
//! instructions, and done in software on ARM cores without them
//! (BENCHMARKS.md, "A fingerprint that costs less than its message"). A
//! buffer written by such an agent still holds those, so a redelivery
//! carries [`sha256_v1`] as well
//! ([`edgefleet_buffer::DedupeKey::earlier_fingerprint`]).

use sha2::{Digest, Sha256};

/// Fingerprints messages one after another: topic, a zero byte and payload
/// are joined in one buffer, kept across messages so that none allocates,
/// and hashed in one call.
#[derive(Default)]
pub struct Fingerprinter {
    joined: Vec<u8>,
}

impl Fingerprinter {
    pub fn of(&mut self, topic: &str, payload: &[u8]) -> [u8; 16] {
        self.joined.clear();
        self.joined.extend_from_slice(topic.as_bytes());
        self.joined.push(0);
        self.joined.extend_from_slice(payload);
        xxhash_rust::xxh3::xxh3_128(&self.joined).to_le_bytes()
    }
}

/// The fingerprint as agents before XXH3 computed it: SHA-256 of topic, a
/// zero byte and payload, first 16 bytes.
pub fn sha256_v1(topic: &str, payload: &[u8]) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(topic.as_bytes())
        .chain_update([0u8])
        .chain_update(payload)
        .finalize();
    digest[..16].try_into().expect("sha256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fingerprints are on disk: a change of either function, or of the
    // bytes it is given, would make every redelivery after an upgrade a
    // new record. The expected values come from the reference
    // implementations (Python's `xxhash`, which wraps the C library, and
    // `hashlib`), not from this code.
    #[test]
    fn fingerprints_are_the_same_bytes_in_every_build() {
        let mut fingerprinter = Fingerprinter::default();
        let topic = "devices/d-7/telemetry";
        let payload = br#"{"n":1,"temp":21.5}"#;
        assert_eq!(
            hex::encode(fingerprinter.of(topic, payload)),
            "0b65b3402a48a3519a165336a76d1515"
        );
        assert_eq!(
            hex::encode(sha256_v1(topic, payload)),
            "6ffd46d773221d8d0af71b70dee92f10"
        );
        // The separator keeps topic and payload apart.
        assert_ne!(fingerprinter.of("a/b", b"c"), fingerprinter.of("a/", b"bc"));
        // Reusing the fingerprinter changes nothing.
        assert_eq!(
            fingerprinter.of(topic, payload),
            Fingerprinter::default().of(topic, payload)
        );
    }
}
