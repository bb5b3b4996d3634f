//! `edgefleet`: the project's front door. `edgefleet demo` runs the whole
//! telemetry path on embedded defaults; `edgefleet certs` makes a
//! development PKI; `edgefleet gitops` scaffolds and checks fleet sites.

mod certs;
mod demo;
mod gitops;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "edgefleet: device telemetry from edge gateways to the cloud"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run simulated devices, an embedded MQTT broker, an edge agent and a
    /// cloud ingest, all over mTLS, and prove nothing was lost or duplicated.
    Demo(demo::DemoArgs),
    /// Development certificates (CA, ingest server, agents).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// The GitOps repository: scaffold sites, check rendered ones.
    #[command(subcommand)]
    Gitops(gitops::GitopsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Certs(command) => certs::run(command),
        Command::Gitops(command) => gitops::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
