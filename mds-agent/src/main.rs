use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Per-workload service-account identities through the GCE metadata server.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel programs, attach them and serve the metadata API.
    Run(ConfigArg),
    /// Validate a configuration and print the rules as understood.
    Check(ConfigArg),
    /// Remove the pinned kernel links, ending interception (the agent must be stopped first).
    Detach(ConfigArg),
    /// Run the agent with its built-in emulator in a sandbox of its own (network namespace and
    /// cgroups), show two users in two cgroups getting different identities, and keep serving
    /// until Ctrl-C.
    Demo,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The configuration file (TOML).
    #[arg(
        long,
        short,
        env = "MDS_AGENT_CONFIG",
        default_value = "/etc/mds-agent/config.toml"
    )]
    config: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("MDS_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(ConfigArg { config }) => mds_agent::run::run(&config),
        Command::Check(ConfigArg { config }) => check(&config),
        Command::Detach(ConfigArg { config }) => detach(&config),
        Command::Demo => mds_agent::demo::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mds-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = mds_agent::config::Config::load(path)?;
    let policy = mds_agent::policy::Policy::new(&config.rules)?;
    // A closed pipe (`check | head`) is an error to report, not a panic.
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}: ok", path.display())?;
    write!(out, "{policy}")?;
    Ok(())
}

fn detach(path: &std::path::Path) -> anyhow::Result<()> {
    let config = mds_agent::config::Config::load(path)?;
    let removed = mds_agent::bpf::detach(&config.pin_dir)
        .with_context(|| format!("detaching the links pinned in {}", config.pin_dir.display()))?;
    println!(
        "removed {removed} pinned links from {}",
        config.pin_dir.display()
    );
    Ok(())
}
