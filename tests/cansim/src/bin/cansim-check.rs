//! `cansim-check`: compares what `cansim` runs sent (their JSON report lines)
//! with the records the ingest stored (`cloud-ingest query` output), and
//! prints one line per message and `CANSIM-CHECK PASS` or `CANSIM-CHECK FAIL`.
//! Exit status 0 only on PASS.
//!
//! ```text
//! cansim-check --records records.jsonl --sent run1.json --sent run2.json --absent vcan1/Body
//! ```
//! Reports are taken in the order given; several runs on one interface are
//! expected back to back (each run's counters start at 0).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use edgefleet_cansim::{check, parse_lines, SimReport, StoredRecord};

#[derive(Parser, Debug)]
#[command(about = "Check that every frame cansim sent was stored exactly once and in order")]
struct Args {
    /// `cloud-ingest query` output (JSON lines).
    #[arg(long)]
    records: PathBuf,
    /// A file of cansim report lines; repeatable, in the order the runs happened.
    #[arg(long, required = true)]
    sent: Vec<PathBuf>,
    /// `INTERFACE/MESSAGE` that was sent but must not be stored (filtered out); repeatable.
    #[arg(long, value_parser = parse_absent)]
    absent: Vec<(String, String)>,
}

fn parse_absent(text: &str) -> Result<(String, String), String> {
    text.split_once('/')
        .map(|(i, m)| (i.to_string(), m.to_string()))
        .ok_or_else(|| format!("`{text}`: expected INTERFACE/MESSAGE"))
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(&args.records)
        .with_context(|| format!("reading {}", args.records.display()))?;
    let records: Vec<StoredRecord> = parse_lines(&text, &args.records.display().to_string())?;
    let mut reports: Vec<SimReport> = Vec::new();
    for path in &args.sent {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        reports.extend(parse_lines::<SimReport>(
            &text,
            &path.display().to_string(),
        )?);
    }
    let sent: u64 = reports.iter().map(|r| r.total_sent).sum();
    println!(
        "{} cansim runs, {sent} frames sent; {} records stored",
        reports.len(),
        records.len()
    );
    let verdict = check(&reports, &records, &args.absent);
    for line in &verdict.lines {
        println!("{line}");
    }
    Ok(verdict.ok)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => {
            println!("CANSIM-CHECK PASS");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("CANSIM-CHECK FAIL");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("CANSIM-CHECK FAIL: {e:#}");
            ExitCode::FAILURE
        }
    }
}
