//! The writer and the judge of the power-cut test
//! (`tests/vm/run-power-cut-tests.sh`), run inside a VM whose power the
//! host cuts by killing qemu.
//!
//! `powercut write DIR` appends to an agent buffer, acks its oldest records
//! as an uplink would, and commits to an ingest store under DIR until it is
//! killed, printing on the console what each acknowledged the moment it
//! did: the buffer's append resolving (what the MQTT source sends its
//! PUBACK on) and the store's commit returning (what the ingest acks on),
//! and each ack before it is given. `powercut check DIR --buffer-acked N
//! --buffer-acking A --store-acked M`, after the cut, passes only if both
//! open without quarantine and hold an unbroken run of numbered records,
//! each once, reaching at least what was acknowledged, the buffer's
//! starting no later than just after the last ack given. A later `write`
//! carries on from where the check found the data, so every cut after the
//! first also tests writing after a recovery.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use cloud_ingest::query::{Query, RecordSource};
use cloud_ingest::sink::{AgentRecords, EmbeddedStore, EncodedRecord, Sink};
use edgefleet_buffer::{Buffer, BufferOptions, Incoming, Outcome};
use edgefleet_proto::{record, signal, Record, Signal, Signals};
use prost::Message;
use rand::{Rng, SeedableRng};

/// The agent id the store's records are committed under.
const AGENT: &str = "powercut";
/// The signal carrying each record's number, from 0 (buffer) or 1 (store).
const NUMBER: &str = "n";

#[derive(Parser)]
#[command(about = "Writer and judge of the power-cut test (tests/vm/run-power-cut-tests.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Append to a buffer and commit to a store under DIR until killed,
    /// printing `BUFFER-ACKED n` and `STORE-ACKED n` as they are acknowledged.
    Write { dir: PathBuf },
    /// Check that everything acknowledged before the cut is there, once.
    Check {
        dir: PathBuf,
        /// The highest `BUFFER-ACKED` the console showed before the cut.
        #[arg(long)]
        buffer_acked: Option<u64>,
        /// The highest `BUFFER-ACKING` the console showed: no ack went further.
        #[arg(long)]
        buffer_acking: Option<u64>,
        /// The highest `STORE-ACKED` the console showed before the cut.
        #[arg(long)]
        store_acked: Option<u64>,
    },
}

fn main() {
    let cli = Cli::parse();
    let (what, result) = match cli.command {
        Command::Write { dir } => ("WRITE", write(&dir)),
        Command::Check {
            dir,
            buffer_acked,
            buffer_acking,
            store_acked,
        } => (
            "CHECK",
            check(&dir, buffer_acked, buffer_acking, store_acked),
        ),
    };
    if let Err(e) = result {
        println!("POWERCUT-{what}: FAIL {e:#}");
        std::process::exit(1);
    }
}

fn buffer_options(dir: &Path) -> BufferOptions {
    BufferOptions::new(dir.join("agent"))
}

fn store_dir(dir: &Path) -> PathBuf {
    dir.join("store")
}

/// A record numbered `n`, with a padding signal of varying length so that
/// segments and blocks come in different sizes.
fn numbered(n: u64, seq: u64, device: &str) -> Record {
    let pad = "x".repeat((n as usize * 37) % 700);
    Record {
        seq,
        source: "powercut".into(),
        device_id: device.into(),
        timestamp_ns: 1_700_000_000_000_000_000 + n as i64,
        value: Some(record::Value::Signals(Signals {
            signals: vec![Signal::i64(NUMBER, n as i64), Signal::str("pad", pad)],
        })),
    }
}

fn number_of(record: &Record) -> Option<u64> {
    let Some(record::Value::Signals(signals)) = &record.value else {
        return None;
    };
    signals
        .signals
        .iter()
        .find_map(|s| match (&s.name, &s.value) {
            (name, Some(signal::Value::I64(n))) if name == NUMBER => u64::try_from(*n).ok(),
            _ => None,
        })
}

fn write(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = EmbeddedStore::open(&store_dir(dir)).context("opening the store")?;
    // Either writer failing ends the process: the host sees the VM stop
    // before its cut and fails with the console.
    std::thread::spawn(move || {
        let Err(e) = write_store(store);
        println!("POWERCUT-WRITE: FAIL the store: {e:#}");
        std::process::exit(1);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let Err(e) = runtime.block_on(write_buffer(dir));
    Err(e.context("the buffer"))
}

/// Prints one acknowledgement line and pushes it to the console at once.
fn announce(what: &str, n: u64) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{what} {n}");
    let _ = out.flush();
}

/// Records the writer keeps unacknowledged at least, as an uplink that is
/// behind would: acks delete from the oldest end while appends add at the
/// other, as on a gateway.
const UNACKED_AT_LEAST: u64 = 2_000;

async fn write_buffer(dir: &Path) -> anyhow::Result<std::convert::Infallible> {
    let (buffer, _) = Buffer::open(buffer_options(dir)).context("opening the buffer")?;
    let held = buffer_records(&buffer)?;
    let (mut next, mut last_seq) = held.map_or((0, 0), |h| (h.last + 1, h.last_seq));
    // The oldest number still held: everything below it was acknowledged.
    let mut oldest = held.map_or(0, |h| h.first);
    let mut rng = rand::rngs::StdRng::seed_from_u64(next);
    loop {
        let count = rng.random_range(1..=300u64);
        let records: Vec<Incoming> = (next..next + count)
            .map(|n| Incoming::from(numbered(n, 0, "buffer")))
            .collect();
        let outcomes = buffer.append(records).await.context("appending")?;
        for outcome in outcomes {
            match outcome {
                Outcome::Stored(seq) => last_seq = seq,
                other => bail!("the buffer answered {other:?} to an append"),
            }
        }
        next += count;
        announce("BUFFER-ACKED", next - 1);
        // Numbers and seqs advance together: every record is stored.
        let newest = next - 1;
        if newest - oldest > 2 * UNACKED_AT_LEAST {
            let through = newest - UNACKED_AT_LEAST - rng.random_range(0..UNACKED_AT_LEAST);
            // On the console before the ack is given: the check may then
            // take the console's last ack as the most that can be gone.
            announce("BUFFER-ACKING", through);
            drain_console();
            buffer
                .ack(last_seq - (newest - through))
                .await
                .context("acknowledging")?;
            oldest = through + 1;
        }
    }
}

/// Waits until the console has sent everything written to it: a line still
/// in the guest's tty buffer at the cut never reaches the host.
fn drain_console() {
    let _ = nix::sys::termios::tcdrain(std::io::stdout());
}

fn write_store(store: EmbeddedStore) -> anyhow::Result<std::convert::Infallible> {
    let mut last = store.stored_through(AGENT)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(last);
    loop {
        let count = rng.random_range(1..=2_000u64);
        let records = (last + 1..=last + count)
            .map(|seq| EncodedRecord {
                seq,
                encoded: numbered(seq, seq, "store").encode_to_vec().into(),
            })
            .collect();
        store.commit(&[AgentRecords {
            agent: AGENT.into(),
            records,
            kept: None,
        }])?;
        last += count;
        announce("STORE-ACKED", last);
    }
}

/// The records a buffer holds, by number.
#[derive(Clone, Copy)]
struct Held {
    first: u64,
    last: u64,
    last_seq: u64,
}

/// What the buffer holds, after checking that it is one unbroken run of
/// numbers, each once; `None` when it is empty.
fn buffer_records(buffer: &Buffer) -> anyhow::Result<Option<Held>> {
    let mut held: Option<Held> = None;
    let mut from = 0u64;
    loop {
        let batch = buffer.read_from(from, 10_000, 16 << 20)?;
        let Some(tail) = batch.last() else {
            return Ok(held);
        };
        from = tail.seq + 1;
        for record in &batch {
            let n = number_of(record)
                .with_context(|| format!("buffer record seq {} has no number", record.seq))?;
            held = match held {
                None => Some(Held {
                    first: n,
                    last: n,
                    last_seq: record.seq,
                }),
                Some(h) if n == h.last + 1 => Some(Held {
                    last: n,
                    last_seq: record.seq,
                    ..h
                }),
                Some(h) => bail!(
                    "buffer: record seq {} is number {n} after number {} (a gap or a duplicate)",
                    record.seq,
                    h.last
                ),
            };
        }
    }
}

fn shown_run(held: Option<Held>) -> String {
    held.map_or_else(|| "nothing".into(), |h| format!("{}..={}", h.first, h.last))
}

fn shown(n: Option<u64>) -> String {
    n.map_or_else(|| "none".into(), |n| n.to_string())
}

fn check(
    dir: &Path,
    buffer_acked: Option<u64>,
    buffer_acking: Option<u64>,
    store_acked: Option<u64>,
) -> anyhow::Result<()> {
    let (buffer, report) = Buffer::open(buffer_options(dir)).context("opening the buffer")?;
    if let Some(q) = &report.quarantined {
        bail!("the buffer was quarantined after the cut: {}", q.reason);
    }
    let held = buffer_records(&buffer)?;
    drop(buffer);
    if let Some(acked) = buffer_acked {
        match held {
            Some(h) if h.last >= acked => {}
            _ => bail!(
                "buffer: appends acknowledged through {acked}, after the cut it holds {}",
                shown_run(held)
            ),
        }
    }
    // An ack deletes records up to a number; none above the last ack given
    // may be missing (records at or below it may come back: the ack itself
    // may not have been durable, and the ingest drops a resent seq).
    let may_be_gone = buffer_acking.map_or(0, |a| a + 1);
    if let Some(h) = held {
        if h.first > may_be_gone {
            bail!(
                "buffer: acks given through {} at most, after the cut it holds {}",
                shown(buffer_acking),
                shown_run(held)
            );
        }
    }

    let store = EmbeddedStore::open_existing(&store_dir(dir)).context("opening the store")?;
    let mut expected = 1u64;
    let mut broken = None;
    store.query(
        &Query {
            agent: Some(AGENT.into()),
            ..Query::default()
        },
        &mut |_, record| {
            if record.seq != expected || number_of(&record) != Some(record.seq) {
                broken = Some(format!(
                    "store: found seq {} (number {:?}), expected {expected}",
                    record.seq,
                    number_of(&record)
                ));
                return false;
            }
            expected += 1;
            true
        },
    )?;
    if let Some(broken) = broken {
        bail!(broken);
    }
    let store_last = expected - 1;
    let high_water = store.stored_through(AGENT)?;
    if high_water != store_last {
        bail!("store: high-water mark {high_water}, records through {store_last}");
    }
    if let Some(acked) = store_acked {
        if store_last < acked {
            bail!("store: acknowledged through {acked}, after the cut only through {store_last}");
        }
    }
    println!(
        "POWERCUT-CHECK: PASS buffer holds {} (appends acknowledged through {}, acks given through {}), \
         store through {store_last} (acknowledged {})",
        shown_run(held),
        shown(buffer_acked),
        shown(buffer_acking),
        shown(store_acked),
    );
    Ok(())
}
