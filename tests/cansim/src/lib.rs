//! Shared by `cansim` (which writes a [`SimReport`] of what it sent) and
//! `cansim-check` (which compares reports with the records the ingest stored).
//!
//! The proof of "every frame exactly once, in order" rests on a counter
//! signal: `cansim --counter Seq` makes each message's `Seq` signal count
//! 0, 1, 2, ... per frame (wrapping at `counter_cycle`), so the records of a
//! message, in the order the ingest stored them, must carry exactly the
//! counters of the frames sent, in the same order: a lost frame is a missing
//! value, a duplicate a repeated one, a reordering an out-of-place one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one `cansim` run sent (printed as one JSON line at the end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// The interface written to, or the interface name in the log.
    pub interface: String,
    pub seed: u64,
    pub total_sent: u64,
    /// Frames the interface refused (e.g. it was down); not on the bus.
    pub total_failed: u64,
    pub messages: BTreeMap<String, MessageReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageReport {
    pub id: u32,
    pub sent: u64,
    pub failed: u64,
    /// The counter signal and its cycle length, when the message has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter_cycle: Option<u64>,
}

/// One stored record, as `cloud-ingest query` prints it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StoredRecord {
    pub agent: String,
    pub seq: u64,
    pub source: String,
    pub device: String,
    #[serde(default)]
    pub signals: BTreeMap<String, serde_json::Value>,
}

/// The verdict, with one line per checked message.
#[derive(Debug, Default)]
pub struct Verdict {
    pub ok: bool,
    pub lines: Vec<String>,
}

/// Counters the records of (interface, message) must carry, in order. A run
/// that had failed sends cannot say which counters are missing, so it makes
/// the message's check a subsequence check (`exact` false).
fn expected(reports: &[SimReport]) -> BTreeMap<(String, String), (Vec<u64>, bool, String)> {
    let mut out: BTreeMap<(String, String), (Vec<u64>, bool, String)> = BTreeMap::new();
    for r in reports {
        for (name, m) in &r.messages {
            let Some(counter) = &m.counter else { continue };
            let cycle = m.counter_cycle.unwrap_or(u64::MAX).max(1);
            let entry = out
                .entry((r.interface.clone(), name.clone()))
                .or_insert_with(|| (Vec::new(), true, counter.clone()));
            if m.failed > 0 {
                entry.1 = false;
            }
            entry.0.extend((0..m.sent + m.failed).map(|k| k % cycle));
        }
    }
    out
}

fn counter_of(record: &StoredRecord, counter: &str) -> Option<u64> {
    record.signals.get(counter).and_then(|v| {
        v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                .map(|f| f as u64)
        })
    })
}

/// Compares what was sent with what was stored. Records of interfaces the
/// reports do not mention are ignored; on a mentioned interface every
/// record must belong to a reported message with a counter. `absent` lists
/// (interface, message) pairs that were sent but must not be stored (a
/// kernel filter excludes them).
pub fn check(
    reports: &[SimReport],
    records: &[StoredRecord],
    absent: &[(String, String)],
) -> Verdict {
    let mut verdict = Verdict {
        ok: true,
        lines: Vec::new(),
    };
    let fail = |v: &mut Verdict, line: String| {
        v.ok = false;
        v.lines.push(format!("FAIL {line}"));
    };
    // The ingest stores each agent's records in seq order; the query prints
    // them that way. Check it, since the order proof relies on it.
    let mut last_seq: BTreeMap<&str, u64> = BTreeMap::new();
    for r in records {
        if let Some(prev) = last_seq.insert(&r.agent, r.seq) {
            if r.seq <= prev {
                fail(
                    &mut verdict,
                    format!(
                        "agent {} seq {} after {prev}: not in seq order",
                        r.agent, r.seq
                    ),
                );
            }
        }
    }
    let mut expected = expected(reports);
    for key in absent {
        if expected.remove(key).is_none() {
            fail(
                &mut verdict,
                format!(
                    "{}/{}: listed as absent but cansim did not send it",
                    key.0, key.1
                ),
            );
        }
    }
    let interfaces: std::collections::BTreeSet<&str> =
        reports.iter().map(|r| r.interface.as_str()).collect();
    let mut got: BTreeMap<(String, String), Vec<Option<u64>>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| interfaces.contains(r.source.as_str()))
    {
        let key = (r.source.clone(), r.device.clone());
        match expected.get(&key) {
            Some((_, _, counter)) => got.entry(key).or_default().push(counter_of(r, counter)),
            None if absent.contains(&key) => fail(
                &mut verdict,
                format!(
                    "{}/{}: record seq {} of a message that should have been filtered out",
                    r.source, r.device, r.seq
                ),
            ),
            None => fail(
                &mut verdict,
                format!(
                    "{}/{}: record seq {} of a message cansim did not send",
                    r.source, r.device, r.seq
                ),
            ),
        }
    }
    for (key, (want, exact, counter)) in &expected {
        let (iface, message) = key;
        let have = got.remove(key).unwrap_or_default();
        if have.iter().any(Option::is_none) {
            fail(
                &mut verdict,
                format!("{iface}/{message}: records without an integer {counter} signal"),
            );
            continue;
        }
        let have: Vec<u64> = have.into_iter().flatten().collect();
        if *exact {
            if have == *want {
                verdict.lines.push(format!(
                    "ok   {iface}/{message}: {} frames sent, {} records, counters in order",
                    want.len(),
                    have.len()
                ));
            } else {
                let at = want
                    .iter()
                    .zip(&have)
                    .position(|(a, b)| a != b)
                    .unwrap_or(want.len().min(have.len()));
                fail(
                    &mut verdict,
                    format!(
                        "{iface}/{message}: {} frames sent, {} records; first difference at #{at}: sent {:?}, stored {:?}",
                        want.len(),
                        have.len(),
                        want.get(at),
                        have.get(at)
                    ),
                );
            }
        } else {
            // Some sends failed: every stored counter must be a sent one, in order, once.
            let mut it = want.iter();
            let ordered = have.iter().all(|h| it.any(|w| w == h));
            if ordered {
                verdict.lines.push(format!(
                    "ok   {iface}/{message}: {} records, a subsequence of the {} counters attempted (some sends failed)",
                    have.len(),
                    want.len()
                ));
            } else {
                fail(
                    &mut verdict,
                    format!("{iface}/{message}: stored counters are not an in-order subsequence of those attempted"),
                );
            }
        }
    }
    verdict
}

/// Parses JSON lines, naming the line of a bad one.
pub fn parse_lines<T: for<'de> Deserialize<'de>>(text: &str, what: &str) -> anyhow::Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{what} line {}: {e}", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(iface: &str, sent: &[(&str, u64, u64)]) -> SimReport {
        SimReport {
            interface: iface.into(),
            seed: 1,
            total_sent: sent.iter().map(|s| s.1).sum(),
            total_failed: sent.iter().map(|s| s.2).sum(),
            messages: sent
                .iter()
                .map(|(name, n, failed)| {
                    (
                        name.to_string(),
                        MessageReport {
                            id: 1,
                            sent: *n,
                            failed: *failed,
                            counter: Some("Seq".into()),
                            counter_cycle: Some(4),
                        },
                    )
                })
                .collect(),
        }
    }

    fn records(rows: &[(&str, &str, u64)]) -> Vec<StoredRecord> {
        rows.iter()
            .enumerate()
            .map(|(i, (src, dev, seq))| StoredRecord {
                agent: "a".into(),
                seq: i as u64 + 1,
                source: src.to_string(),
                device: dev.to_string(),
                signals: [("Seq".to_string(), serde_json::json!(seq))]
                    .into_iter()
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn exact_sequences_across_runs_and_wraps_pass() {
        // Two runs: 0..5 (wrapping at 4) then 0..2.
        let reports = [
            report("vcan0", &[("M", 5, 0)]),
            report("vcan0", &[("M", 2, 0)]),
        ];
        let recs = records(&[
            ("vcan0", "M", 0),
            ("vcan0", "M", 1),
            ("vcan1", "X", 7), // other interface: ignored
            ("vcan0", "M", 2),
            ("vcan0", "M", 3),
            ("vcan0", "M", 0),
            ("vcan0", "M", 0),
            ("vcan0", "M", 1),
        ]);
        let v = check(&reports, &recs, &[]);
        assert!(v.ok, "{:?}", v.lines);
    }

    #[test]
    fn loss_duplicate_reorder_and_strangers_fail() {
        let reports = [report("vcan0", &[("M", 3, 0)])];
        for rows in [
            vec![("vcan0", "M", 0), ("vcan0", "M", 2)],
            vec![
                ("vcan0", "M", 0),
                ("vcan0", "M", 1),
                ("vcan0", "M", 1),
                ("vcan0", "M", 2),
            ],
            vec![("vcan0", "M", 0), ("vcan0", "M", 2), ("vcan0", "M", 1)],
            vec![
                ("vcan0", "M", 0),
                ("vcan0", "M", 1),
                ("vcan0", "M", 2),
                ("vcan0", "N", 0),
            ],
        ] {
            let v = check(&reports, &records(&rows), &[]);
            assert!(!v.ok, "accepted {rows:?}");
        }
    }

    #[test]
    fn failed_sends_make_a_subsequence_check() {
        let reports = [report("vcan0", &[("M", 2, 1)])];
        assert!(
            check(
                &reports,
                &records(&[("vcan0", "M", 0), ("vcan0", "M", 2)]),
                &[]
            )
            .ok
        );
        assert!(
            !check(
                &reports,
                &records(&[("vcan0", "M", 2), ("vcan0", "M", 0)]),
                &[]
            )
            .ok
        );
        assert!(
            !check(
                &reports,
                &records(&[("vcan0", "M", 0), ("vcan0", "M", 0)]),
                &[]
            )
            .ok
        );
    }

    #[test]
    fn seq_order_is_checked() {
        let reports = [report("vcan0", &[("M", 2, 0)])];
        let mut recs = records(&[("vcan0", "M", 0), ("vcan0", "M", 1)]);
        recs[1].seq = 1;
        assert!(!check(&reports, &recs, &[]).ok);
    }

    #[test]
    fn absent_messages_must_have_no_records() {
        let reports = [report("vcan1", &[("M", 2, 0), ("F", 3, 0)])];
        let absent = [("vcan1".to_string(), "F".to_string())];
        let ok = records(&[("vcan1", "M", 0), ("vcan1", "M", 1)]);
        assert!(check(&reports, &ok, &absent).ok);
        let leaked = records(&[("vcan1", "M", 0), ("vcan1", "F", 0), ("vcan1", "M", 1)]);
        assert!(!check(&reports, &leaked, &absent).ok);
        let bogus = [("vcan1".to_string(), "Nope".to_string())];
        assert!(!check(&reports, &ok, &bogus).ok);
    }
}
