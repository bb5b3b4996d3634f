//! Fuzz target bodies, shared by the libFuzzer drivers (`fuzz_targets/`)
//! and the stable-toolchain fallback tests at the bottom of this file.

use edgefleet_can::candump::{format_line, parse_line, CandumpReader};
use edgefleet_can::{CanFrame, DecodedFrame, DecoderBuilder, SignalValue};

/// candump parsing: never panics; whatever parses re-formats to text that
/// parses to the same entry.
pub fn candump(data: &[u8]) {
    for entry in CandumpReader::new(data).flatten() {
        let mut line = String::new();
        format_line(&entry, &mut line);
        let again = parse_line(&line).expect("formatted line parses");
        assert_eq!(again, entry, "{line}");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_line(text);
    }
}

/// DBC loading and decoding: the input is DBC text, then a 0x00 byte, then
/// payload bytes. Never panics; for every loaded message the payload decodes
/// or fails cleanly, and integer signals survive decode -> encode -> decode.
pub fn dbc_decode(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (dbc, payload) = data.split_at(split);
    let mut builder = DecoderBuilder::new();
    if builder.add_bytes("fuzz.dbc", dbc).is_err() {
        return;
    }
    let decoder = builder.build();
    let payload = payload.get(1..).unwrap_or(&[]);
    let mut out = DecodedFrame::default();
    for plan in decoder.messages().iter().take(64) {
        let len = payload.len().min(64);
        let frame = if len > 8 {
            CanFrame::new_fd(plan.id(), plan.is_extended(), &payload[..len], false, false)
        } else {
            CanFrame::new(plan.id(), plan.is_extended(), &payload[..len])
        };
        let Ok(frame) = frame else { continue };
        if decoder.decode_into(&frame, &mut out).is_err() {
            continue;
        }
        let values: Vec<SignalValue> = out.signals.iter().map(|s| s.value).collect();
        let mut k = 0;
        let Ok(re) = plan.encode_with(|_, _| {
            let v = values.get(k).copied();
            k += 1;
            v
        }) else {
            continue;
        };
        let back = decoder.decode(&re).expect("encoded frame decodes");
        for (a, b) in out.signals.iter().zip(&back.signals) {
            if let (SignalValue::Int(x), SignalValue::Int(y)) = (a.value, b.value) {
                assert_eq!(x, y, "{}.{}", plan.name(), a.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Stable fallback: each target over the seed corpus and over a bounded
    //! number of pseudo-random mutations of it (no coverage guidance).

    use std::path::Path;

    fn seeds(dir: &str) -> Vec<Vec<u8>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out: Vec<Vec<u8>> = std::fs::read_dir(root.join("seeds").join(dir))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        if dir == "dbc_decode" {
            let mut dbc = std::fs::read(root.join("../testdata/vehicle.dbc")).unwrap();
            dbc.push(0);
            dbc.extend_from_slice(&[0x5A; 64]);
            out.push(dbc);
        }
        out
    }

    /// Bit flips, byte overwrites, truncation and duplication, seeded so a
    /// failure reproduces.
    fn mutate(input: &[u8], seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut v = input.to_vec();
        for _ in 0..1 + next() % 8 {
            if v.is_empty() {
                v.push(next() as u8);
                continue;
            }
            let i = (next() % v.len() as u64) as usize;
            match next() % 5 {
                0 => v[i] ^= 1 << (next() % 8),
                1 => v[i] = next() as u8,
                2 => v.truncate(i),
                3 => {
                    let j = (next() % v.len() as u64) as usize;
                    let chunk = v[i.min(j)..i.max(j)].to_vec();
                    v.splice(i..i, chunk.into_iter().take(256));
                }
                _ => {
                    let alphabet = b"#.()_R0F\n:|@-+";
                    v.insert(i, alphabet[(next() % alphabet.len() as u64) as usize]);
                }
            }
        }
        v
    }

    fn run(dir: &str, target: fn(&[u8]), rounds: u64) {
        let seeds = seeds(dir);
        assert!(!seeds.is_empty(), "no seeds for {dir}");
        for s in &seeds {
            target(s);
        }
        for r in 0..rounds {
            let s = &seeds[(r % seeds.len() as u64) as usize];
            target(&mutate(s, r));
        }
    }

    #[test]
    fn candump_seeds_and_mutations() {
        run("candump", super::candump, 20_000);
    }

    #[test]
    fn dbc_decode_seeds_and_mutations() {
        run("dbc_decode", super::dbc_decode, 3_000);
    }
}
