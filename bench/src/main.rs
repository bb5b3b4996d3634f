//! edgefleet's load harness. Each scenario runs the real binaries (or, where
//! a scenario says so, the real library parts in this process) on this
//! machine, prints a table, writes `<scenario>.json` and `<scenario>.svg`,
//! and regenerates the tables in BENCHMARKS.md.
//!
//!     cargo run --release -p edgefleet-bench -- all
//!     cargo run --release -p edgefleet-bench -- spine
//!     cargo run -p edgefleet-bench -- all --quick      # proves the harness works

mod grpc;
mod mqtt;
mod plot;
mod report;
mod scenarios;
mod sys;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use crate::report::ScenarioResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    All,
    MqttE2e,
    Spine,
    Footprint,
    Drain,
    FanIn,
    CanDecode,
}

const ORDER: [&str; 6] = [
    "mqtt-e2e",
    "spine",
    "footprint",
    "drain",
    "fan-in",
    "can-decode",
];

#[derive(Parser, Debug)]
#[command(about = "Run edgefleet's benchmark scenarios on this machine")]
struct Args {
    /// Which scenario to run (`all` runs every one in turn).
    #[arg(value_enum)]
    scenario: Which,
    /// Run each scenario for a couple of seconds, only to prove the harness
    /// works: results go to a temporary directory and BENCHMARKS.md is left alone.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON and SVG results (default: bench/results, or a
    /// temporary directory with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not rewrite the tables in BENCHMARKS.md.
    #[arg(long)]
    no_markdown: bool,
    /// Seconds of load per measured phase (default: 20, or 2 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Simulated agents in fan-in (default: 10,000, or 20 with --quick).
    #[arg(long)]
    agents: Option<usize>,
    /// Records in the drain backlog (default: 2,000,000, or 20,000 with --quick).
    #[arg(long)]
    backlog: Option<u64>,
}

/// What every scenario gets.
pub struct Ctx {
    pub quick: bool,
    pub seconds: f64,
    pub agents: usize,
    pub backlog: u64,
    pub machine: sys::Machine,
    pub workspace: PathBuf,
}

impl Ctx {
    pub fn result(&self, scenario: &str) -> ScenarioResult {
        let mut machine = self.machine.clone();
        machine.load_average_at_start = sys::load_average();
        ScenarioResult::new(scenario, self.quick, &machine)
    }
    pub fn phase(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.seconds)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let quick_dir;
    let out = match (&args.out, args.quick) {
        (Some(dir), _) => dir.clone(),
        (None, true) => {
            quick_dir = tempfile::tempdir()?;
            quick_dir.path().to_path_buf()
        }
        (None, false) => workspace.join("bench/results"),
    };
    let ctx = Ctx {
        quick: args.quick,
        seconds: args.seconds.unwrap_or(if args.quick { 2.0 } else { 20.0 }),
        agents: args.agents.unwrap_or(if args.quick { 20 } else { 10_000 }),
        backlog: args
            .backlog
            .unwrap_or(if args.quick { 20_000 } else { 2_000_000 }),
        machine: sys::Machine::probe(),
        workspace: workspace.clone(),
    };
    println!("machine: {}", ctx.machine.describe());
    // fan-in holds the client side of every agent's connection in this process.
    match cloud_ingest::limits::raise_nofile_limit() {
        Ok(l) => println!(
            "open-file limit: {} (was {}, hard {})",
            l.soft, l.soft_before, l.hard
        ),
        Err(e) => eprintln!("cannot raise the open-file limit: {e}"),
    }
    println!(
        "binaries: {} (build them first: cargo build --release -p edge-agent -p cloud-ingest)",
        edgefleet_tests::bin_dir().display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let selected: Vec<&str> = match args.scenario {
        Which::All => ORDER.to_vec(),
        Which::MqttE2e => vec!["mqtt-e2e"],
        Which::Spine => vec!["spine"],
        Which::Footprint => vec!["footprint"],
        Which::Drain => vec!["drain"],
        Which::FanIn => vec!["fan-in"],
        Which::CanDecode => vec!["can-decode"],
    };
    let mut failed = Vec::new();
    for name in selected {
        println!("\n== {name}");
        let outcome = runtime.block_on(async {
            match name {
                "mqtt-e2e" => scenarios::mqtt_e2e::run(&ctx).await,
                "spine" => scenarios::spine::run(&ctx).await,
                "footprint" => scenarios::footprint::run(&ctx).await,
                "drain" => scenarios::drain::run(&ctx).await,
                "fan-in" => scenarios::fan_in::run(&ctx).await,
                _ => scenarios::can_decode::run(&ctx).await,
            }
        });
        match outcome {
            Ok(mut result) => {
                result.finish();
                result.print();
                let (json, svg) = result.write(&out)?;
                println!("  wrote {} and {}", json.display(), svg.display());
            }
            Err(e) => {
                eprintln!("{name} failed: {e:#}");
                failed.push(name);
            }
        }
    }
    if !args.quick && !args.no_markdown {
        let md = workspace.join("BENCHMARKS.md");
        report::update_benchmarks_md(&md, &out, &ORDER)?;
        println!("\nupdated {}", md.display());
    }
    if !failed.is_empty() {
        anyhow::bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}
