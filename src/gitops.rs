//! `edgefleet gitops`: scaffolds sites into the GitOps repository and checks
//! what Argo CD will sync (the library is crates/fleet; this is its CLI).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use edgefleet_fleet::{add_site, PipelineValidator, SiteOptions, Wave};

#[derive(Subcommand)]
pub enum GitopsCommand {
    /// Scaffold a new site under gitops/sites/NAME: its kustomize overlay,
    /// its EdgePipeline, its DBC ConfigMap, the pull-mode Applications and
    /// the Argo CD cluster Secret template carrying the labels.
    AddSite(AddSiteArgs),
    /// Check rendered sites (`kubectl kustomize gitops/sites/NAME`): every
    /// EdgePipeline against the CRD schema and the agent's own rules, and
    /// that the ConfigMaps the workloads mount resolve.
    Validate {
        /// The CRD YAML (deploy/k3s/crd/edgepipelines.edgefleet.io.yaml).
        #[arg(long)]
        crd: PathBuf,
        /// Rendered YAML streams, one per site.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the EdgePipeline CRD the code generates.
    PrintCrd,
}

#[derive(clap::Args)]
pub struct AddSiteArgs {
    /// Site name: a DNS-1123 label (lowercase letters, digits, `-`).
    name: String,
    /// Root of the repository (holds deploy/k3s and gitops/).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Rollout wave: canary, early, main, or hold (left out of rollouts).
    #[arg(long, default_value = "main", value_parser = parse_wave)]
    wave: Wave,
    /// Argo CD cluster label, K=V (repeatable); ApplicationSets select on them.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// SocketCAN interface to read (repeatable), e.g. can0.
    #[arg(long = "can")]
    can_interfaces: Vec<String>,
    /// DBC file copied into the site and used for every CAN interface (repeatable).
    #[arg(long = "dbc")]
    dbc_files: Vec<PathBuf>,
    /// Read from this existing broker (HOST or HOST:PORT) instead of deploying
    /// the on-site Mosquitto.
    #[arg(long)]
    broker: Option<String>,
    /// MQTT topic filter to subscribe to (repeatable; default devices/+/telemetry).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Deploy no broker and read no MQTT (CAN-only sites).
    #[arg(long, conflicts_with = "broker")]
    no_mosquitto: bool,
    /// The ingest endpoint the agents stream to.
    #[arg(long)]
    ingest: Option<String>,
    /// API server URL of the site's cluster, for the cluster Secret template.
    #[arg(long)]
    server: Option<String>,
}

fn parse_wave(text: &str) -> Result<Wave, String> {
    text.parse()
        .map_err(|e: edgefleet_fleet::FleetError| e.to_string())
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label `{text}` is not K=V"))?;
    Ok((key.to_string(), value.to_string()))
}

pub fn run(command: GitopsCommand) -> anyhow::Result<ExitCode> {
    match command {
        GitopsCommand::AddSite(args) => add(args),
        GitopsCommand::Validate { crd, files } => validate(&crd, &files),
        GitopsCommand::PrintCrd => {
            print!("{}", edgefleet_fleet::crd_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn add(args: AddSiteArgs) -> anyhow::Result<ExitCode> {
    let mut options = SiteOptions {
        wave: args.wave,
        can_interfaces: args.can_interfaces,
        dbc_files: args.dbc_files,
        cluster_server: args.server,
        ..SiteOptions::default()
    };
    if let Some(broker) = args.broker {
        options.mosquitto = false;
        options.mqtt_broker = Some(broker);
    }
    if args.no_mosquitto {
        options.mosquitto = false;
    }
    if !args.topics.is_empty() {
        options.mqtt_topics = args.topics;
    }
    if let Some(ingest) = args.ingest {
        options.ingest_endpoint = ingest;
    }
    let files = add_site(&args.repo, &args.name, &args.labels, &options)
        .with_context(|| format!("cannot add site `{}`", args.name))?;
    for file in files.all() {
        println!("wrote {}", file.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(crd: &Path, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(crd).with_context(|| format!("{}", crd.display()))?;
    let validator = PipelineValidator::from_crd_yaml(&text)?;
    let mut failures = 0;
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
        let mut problems = Vec::new();
        if !text.lines().any(|l| l.trim_end() == "kind: EdgePipeline") {
            problems.push("no EdgePipeline in the rendered site".to_string());
        }
        problems.extend(edgefleet_fleet::check_site_render(&text));
        problems.extend(validator.check_yaml(&text));
        for problem in &problems {
            eprintln!("INVALID {}: {problem}", file.display());
        }
        failures += problems.len();
    }
    println!("{} file(s) checked, {failures} problem(s)", files.len());
    if failures > 0 {
        bail!("{failures} problem(s) in the rendered sites");
    }
    Ok(ExitCode::SUCCESS)
}
