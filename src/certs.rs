use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use edgefleet_pki::dev::{self, DevPki, Validity};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a development CA, an ingest server certificate and N agent certificates.
    Init {
        /// Directory to write into (created if missing).
        dir: PathBuf,
        /// How many agent certificates (agent-001, agent-002, ...).
        #[arg(long, default_value_t = 1)]
        agents: u32,
        /// Name prefix of the agents.
        #[arg(long, default_value = "agent")]
        agent_prefix: String,
        /// DNS names or IP addresses the ingest's certificate is valid for.
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
    /// Issue one more agent certificate from an existing development CA.
    AddAgent {
        dir: PathBuf,
        id: String,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Issue a site certificate from an existing development CA: one
    /// certificate for every gateway of the site (a DaemonSet's Secret),
    /// each streaming as `<node>@<site>`.
    AddSite {
        dir: PathBuf,
        site: String,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

pub fn run(command: CertsCommand) -> anyhow::Result<ExitCode> {
    match command {
        CertsCommand::Init {
            dir,
            agents,
            agent_prefix,
            server_names,
        } => {
            let ids: Vec<String> = (1..=agents)
                .map(|i| format!("{agent_prefix}-{i:03}"))
                .collect();
            let pki = dev::init(&dir, &ids, &server_names)?;
            println!("CA:              {}", pki.ca_cert().display());
            println!(
                "ingest server:   {} ({})",
                pki.server_cert().display(),
                server_names.join(", ")
            );
            for id in &ids {
                println!("agent {id}: {}", pki.agent_cert(id).display());
            }
            println!(
                "Development only: the CA key is in {}.",
                pki.ca_key().display()
            );
        }
        CertsCommand::AddAgent { dir, id, days } => {
            let pki = DevPki { dir };
            dev::issue_agent(&pki, &id, Validity::days(days))?;
            println!("agent {id}: {}", pki.agent_cert(&id).display());
        }
        CertsCommand::AddSite { dir, site, days } => {
            let pki = DevPki { dir };
            dev::issue_site(&pki, &site, Validity::days(days))?;
            println!("site {site}: {}", pki.site_cert(&site).display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
