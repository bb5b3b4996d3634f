//! Helper for scripts/check-k8s.sh.
//!
//!   fleet_check scaffold REPO_ROOT COUNT
//!       scaffolds COUNT sites (load-0001...) with the library, varying the
//!       options so every branch of the generated files is exercised;
//!   fleet_check validate CRD_YAML FILE...
//!       checks every EdgePipeline in the YAML streams (rendered sites)
//!       against the CRD and the agent's rules, and that the ConfigMaps the
//!       workloads mount resolve; fails if a file has no EdgePipeline.
//!   fleet_check print-crd
//!       prints the CRD the code generates.
//!   fleet_check add-site REPO_ROOT NAME [--wave W] [--label K=V]... [--can IF]...
//!                        [--dbc FILE]... [--broker HOST[:PORT]] [--topic T]...
//!                        [--no-mosquitto] [--ingest URL] [--server URL]
//!       one site, as `edgefleet gitops add-site` will (made the example sites).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use edgefleet_fleet::{add_site, PipelineValidator, SiteOptions, Wave};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("scaffold") if args.len() == 3 => match args[2].parse() {
            Ok(count) => scaffold(Path::new(&args[1]), count),
            Err(_) => Err(format!("COUNT `{}` is not a number", args[2])),
        },
        Some("validate") if args.len() >= 3 => validate(Path::new(&args[1]), &args[2..]),
        Some("add-site") if args.len() >= 3 => add_one(Path::new(&args[1]), &args[2], &args[3..]),
        Some("print-crd") => edgefleet_fleet::crd_yaml()
            .map(|text| print!("{text}"))
            .map_err(|e| e.to_string()),
        _ => Err(
            "usage: fleet_check scaffold REPO_ROOT COUNT | validate CRD_YAML FILE... | print-crd"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fleet_check: {message}");
            ExitCode::FAILURE
        }
    }
}

fn add_one(repo: &Path, name: &str, flags: &[String]) -> Result<(), String> {
    let mut options = SiteOptions::default();
    let mut labels = Vec::new();
    let mut topics = Vec::new();
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        if flag == "--no-mosquitto" {
            options.mosquitto = false;
            continue;
        }
        let value = flags.next().ok_or(format!("{flag} needs a value"))?.clone();
        match flag.as_str() {
            "--wave" => {
                options.wave = value
                    .parse()
                    .map_err(|e: edgefleet_fleet::FleetError| e.to_string())?
            }
            "--label" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or(format!("label `{value}` is not K=V"))?;
                labels.push((k.to_string(), v.to_string()));
            }
            "--can" => options.can_interfaces.push(value),
            "--dbc" => options.dbc_files.push(PathBuf::from(value)),
            "--broker" => {
                options.mosquitto = false;
                options.mqtt_broker = Some(value);
            }
            "--topic" => topics.push(value),
            "--ingest" => options.ingest_endpoint = value,
            "--server" => options.cluster_server = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if !topics.is_empty() {
        options.mqtt_topics = topics;
    }
    let files = add_site(repo, name, &labels, &options).map_err(|e| e.to_string())?;
    for file in files.all() {
        println!("wrote {}", file.display());
    }
    Ok(())
}

fn scaffold(repo: &Path, count: usize) -> Result<(), String> {
    let dbc = std::env::temp_dir().join(format!("fleet-check-{}.dbc", std::process::id()));
    std::fs::write(&dbc, "VERSION \"\"\n").map_err(|e| e.to_string())?;
    let waves = [
        Wave::Canary,
        Wave::Early,
        Wave::Main,
        Wave::Main,
        Wave::Hold,
    ];
    for i in 1..=count {
        let name = format!("load-{i:04}");
        let mut options = SiteOptions {
            wave: waves[i % waves.len()],
            ..SiteOptions::default()
        };
        match i % 4 {
            // On-site broker only (the default).
            0 => {}
            // CAN with a DBC file, and the on-site broker.
            1 => {
                options.can_interfaces = vec!["can0".into()];
                options.dbc_files = vec![dbc.clone()];
            }
            // An existing broker.
            2 => {
                options.mosquitto = false;
                options.mqtt_broker = Some(format!("broker-{i}.plant.local:1883"));
            }
            // CAN only, two interfaces, no DBC.
            _ => {
                options.mosquitto = false;
                options.can_interfaces = vec!["can0".into(), "can1".into()];
            }
        }
        let labels = vec![("region".to_string(), format!("r{}", i % 7))];
        add_site(repo, &name, &labels, &options).map_err(|e| format!("{name}: {e}"))?;
    }
    let _ = std::fs::remove_file(&dbc);
    println!(
        "scaffolded {count} site(s) under {}",
        repo.join("gitops/sites").display()
    );
    Ok(())
}

fn validate(crd: &Path, files: &[String]) -> Result<(), String> {
    let text = std::fs::read_to_string(crd).map_err(|e| format!("{}: {e}", crd.display()))?;
    let validator = PipelineValidator::from_crd_yaml(&text).map_err(|e| e.to_string())?;
    let mut failures = 0;
    for file in files.iter().map(PathBuf::from) {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        if !text.lines().any(|l| l.trim_end() == "kind: EdgePipeline") {
            eprintln!(
                "INVALID {}: no EdgePipeline in the rendered site",
                file.display()
            );
            failures += 1;
        }
        for problem in edgefleet_fleet::check_site_render(&text) {
            eprintln!("INVALID {}: {problem}", file.display());
            failures += 1;
        }
        for problem in validator.check_yaml(&text) {
            eprintln!("INVALID {}: {problem}", file.display());
            failures += 1;
        }
    }
    println!(
        "fleet_check: {} file(s) checked, {failures} problem(s)",
        files.len()
    );
    if failures == 0 {
        Ok(())
    } else {
        Err(format!("{failures} problem(s)"))
    }
}
