//! `cansim`: simulated CAN devices. Every message of the DBC files at its own
//! rate (the DBC's `GenMsgCycleTime`, `--default-period`, or `--period`),
//! signals following the simulator's patterns, written to a SocketCAN
//! interface in real time or to a `candump -L` log as fast as possible.
//! Prints one JSON line at the end saying how many frames it wrote per
//! message (see `edgefleet_cansim::SimReport`), so a test can compare.
//!
//! ```text
//! cansim --dbc test.dbc --interface vcan0 --duration 3s --counter Seq
//! cansim --dbc test.dbc --output bus.log --log-interface can0 --count 1000
//! ```

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use edgefleet_can::candump::{CandumpWriter, Timestamp};
use edgefleet_can::simulate::{FrameSink, Paced, Pattern, SimConfig, Simulator};
use edgefleet_can::{CanFrame, Decoder};
use edgefleet_cansim::{MessageReport, SimReport};
use socketcan::{CanAnyFrame, CanDataFrame, CanFdFrame, EmbeddedFrame, Id, Socket};

#[derive(Parser, Debug)]
#[command(
    about = "Write simulated CAN traffic from DBC files to a SocketCAN interface or a candump log"
)]
struct Args {
    /// DBC file; repeat for several.
    #[arg(long = "dbc", value_name = "FILE", required = true)]
    dbc: Vec<PathBuf>,
    /// SocketCAN interface to write to, paced in real time (e.g. vcan0).
    #[arg(long, conflicts_with = "output", required_unless_present = "output")]
    interface: Option<String>,
    /// candump log to write instead (no pacing).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Interface name written into the log.
    #[arg(long, default_value = "can0")]
    log_interface: String,
    /// Simulated time to run for (e.g. 5s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many frames in total.
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Period of messages without `GenMsgCycleTime` (e.g. 100ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    default_period: Duration,
    /// Per-message period, `Message=10ms`; repeatable.
    #[arg(long, value_parser = parse_period)]
    period: Vec<(String, Duration)>,
    /// Only these messages; repeatable. Default: every message.
    #[arg(long)]
    only: Vec<String>,
    /// Signal that counts 0, 1, 2, ... per frame of its message (wrapping at
    /// its range, at most 2^20 values); repeatable. This is what lets a
    /// consumer prove every frame arrived once and in order.
    #[arg(long)]
    counter: Vec<String>,
}

fn parse_period(text: &str) -> Result<(String, Duration), String> {
    let (name, d) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected Message=DURATION"))?;
    let d = humantime::parse_duration(d).map_err(|e| format!("`{text}`: {e}"))?;
    Ok((name.to_string(), d))
}

/// Longest counter cycle: a `Pattern::Cycle` holds its values.
const MAX_COUNTER_CYCLE: u64 = 1 << 20;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.duration.is_none() && args.count.is_none() {
        bail!("give --duration or --count (or both)");
    }
    let decoder = Decoder::from_files(&args.dbc).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = SimConfig {
        seed: args.seed,
        default_period: args.default_period,
        periods: args.period.iter().cloned().collect(),
        only: args.only.clone(),
        ..Default::default()
    };
    if args.interface.is_some() {
        // Live traffic: timestamps in the log sense start now.
        config.start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
    }
    let mut report = SimReport {
        interface: args
            .interface
            .clone()
            .unwrap_or_else(|| args.log_interface.clone()),
        seed: args.seed,
        total_sent: 0,
        total_failed: 0,
        messages: BTreeMap::new(),
    };
    for m in decoder.messages() {
        if !args.only.is_empty() && !args.only.iter().any(|o| **o == **m.name()) {
            continue;
        }
        let mut entry = MessageReport {
            id: m.id(),
            sent: 0,
            failed: 0,
            counter: None,
            counter_cycle: None,
        };
        for c in &args.counter {
            let Some((_, s)) = m.signal(c) else { continue };
            let (lo, hi) = s.representable_range();
            let raw_values = ((hi - lo) / s.factor()).round() as u64 + 1;
            let cycle = raw_values.min(MAX_COUNTER_CYCLE);
            let values = (0..cycle).map(|k| lo + k as f64 * s.factor()).collect();
            config.patterns.insert(
                format!("{}.{}", m.name(), c),
                Pattern::Cycle {
                    values,
                    dwell: Duration::ZERO,
                },
            );
            entry.counter = Some(c.clone());
            entry.counter_cycle = Some(cycle);
        }
        report.messages.insert(m.name().to_string(), entry);
    }
    if report.messages.is_empty() {
        bail!("no message to simulate (check --only)");
    }

    let frames = Simulator::new(&decoder, &config);
    let frames: Box<dyn Iterator<Item = _>> = match args.duration {
        Some(d) => Box::new(frames.until(d)),
        None => Box::new(frames),
    };
    let frames = frames.take(args.count.unwrap_or(u64::MAX) as usize);
    let name_of = |f: &CanFrame| -> String {
        decoder
            .message(f.id(), f.is_extended())
            .map(|m| m.name().to_string())
            .unwrap_or_default()
    };

    match (&args.interface, &args.output) {
        (Some(iface), _) => {
            let socket = socketcan::CanFdSocket::open(iface)
                .with_context(|| format!("cannot open CAN interface {iface}"))?;
            let mut sink =
                Paced::new(|_at: Duration, frame: &CanFrame| write_frame(&socket, frame));
            for f in frames {
                let m = report.messages.entry(name_of(&f.frame));
                let entry = m.or_insert_with(|| MessageReport {
                    id: f.frame.id(),
                    sent: 0,
                    failed: 0,
                    counter: None,
                    counter_cycle: None,
                });
                match sink.send(f.at, &f.frame) {
                    Ok(()) => {
                        entry.sent += 1;
                        report.total_sent += 1;
                    }
                    Err(e) => {
                        if report.total_failed == 0 {
                            eprintln!("cansim: {iface}: write failed (counted, continuing): {e}");
                        }
                        entry.failed += 1;
                        report.total_failed += 1;
                    }
                }
            }
        }
        (None, Some(path)) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut writer = CandumpWriter::new(BufWriter::new(file));
            for f in frames {
                writer
                    .write_frame(
                        Timestamp::from_duration(f.at),
                        &args.log_interface,
                        &f.frame,
                    )
                    .with_context(|| format!("writing {}", path.display()))?;
                if let Some(entry) = report.messages.get_mut(&name_of(&f.frame)) {
                    entry.sent += 1;
                }
                report.total_sent += 1;
            }
            writer
                .flush()
                .with_context(|| format!("writing {}", path.display()))?;
            writer
                .into_inner()
                .into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()?;
        }
        (None, None) => unreachable!("clap requires --interface or --output"),
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    Ok(())
}

/// Writes one frame, retrying briefly while the interface's transmit queue is
/// full (`ENOBUFS`), which a paced writer meets only in bursts.
fn write_frame(socket: &socketcan::CanFdSocket, frame: &CanFrame) -> std::io::Result<()> {
    let id: Id = if frame.is_extended() {
        socketcan::ExtendedId::new(frame.id()).map(Id::Extended)
    } else {
        socketcan::StandardId::new(frame.id() as u16).map(Id::Standard)
    }
    .ok_or_else(|| std::io::Error::other("identifier out of range"))?;
    let any: CanAnyFrame = if frame.is_fd() {
        let mut flags = socketcan::id::FdFlags::empty();
        if frame.brs() {
            flags |= socketcan::id::FdFlags::BRS;
        }
        CanFdFrame::with_flags(id, frame.data(), flags)
            .ok_or_else(|| std::io::Error::other("bad CAN FD frame"))?
            .into()
    } else {
        CanDataFrame::new(id, frame.data())
            .ok_or_else(|| std::io::Error::other("bad CAN frame"))?
            .into()
    };
    let mut tries = 0;
    loop {
        match socket.write_frame(&any) {
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && tries < 200 => {
                tries += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            other => return other,
        }
    }
}
