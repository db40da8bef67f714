//! `phoenix-agent` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::AgentConfig;

#[derive(Debug, Parser)]
#[command(
    name = "phoenix-agent",
    version,
    about = "Phoenix node agent: OTLP in, baseline and candidate pipelines in parallel, OTLP out"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the agent until SIGTERM or SIGINT; SIGHUP or a change of the file reloads it.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Checks a config and exits 0 if it is valid, 1 with every problem listed if not.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match AgentConfig::load(&config) {
            Ok(config) => {
                println!(
                    "{}: valid; pipelines: {}; hash {}",
                    config.source.display(),
                    config
                        .pipelines
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                    config.hash
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            init_logging();
            raise_open_files_limit();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("phoenix-agent")
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("error: cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::service::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The hostmetrics process scraper keeps a few `/proc` files open per process; a soft limit
/// of 1024 would leave most processes to the slower open/read/close path.
fn raise_open_files_limit() {
    use crate::receiver::hostmetrics::procfs;
    match procfs::raise_open_files_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(
                ?before,
                ?after,
                "raised the soft open-files limit (RLIMIT_NOFILE) to the hard limit"
            )
        }
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(error = %err, limit = ?procfs::open_files_limit(), "cannot raise the soft open-files limit (RLIMIT_NOFILE)")
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
