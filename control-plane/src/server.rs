//! `phoenix-control-plane`: `serve` (gRPC and REST on one listener) and `token create`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use phoenix_proto::v1::agent_service_server::AgentServiceServer;
use phoenix_proto::v1::fleet_service_server::FleetServiceServer;
use phoenix_proto::v1::rollout_service_server::RolloutServiceServer;

use crate::auth::Role;
use crate::grpc::Grpc;
use crate::service::{ControlPlane, Settings};

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(super::redact("cp.db"), "cp.db");
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "phoenix-control-plane",
    version,
    about = "Phoenix control plane: fleet, config rollouts in waves with automatic rollback"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves gRPC (agents, FleetService, RolloutService) and REST (/api/v1/) on one address.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4320")]
        listen: SocketAddr,
        /// The store: a SQLite file (created if missing), or a `postgres://user@host/db` URL.
        /// The schema is created and migrated at start.
        #[arg(long, default_value = "phoenix-control-plane.db")]
        db: String,
        /// How long an offered agent may take to ack APPLIED or FAILED.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        ack_timeout: Duration,
        /// How long an agent of the current wave may stay away before the rollout counts it
        /// lost (also the time agents get to reconnect after a restart).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        agent_lost_after: Duration,
        /// PEM certificate chain: with --tls-key, the listener speaks TLS only.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Token management (works on the database directly, so the first admin token can be
    /// made before the server runs).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a token and prints it once; only its SHA-256 is stored.
    Create {
        /// The store, as for `serve --db`.
        #[arg(long, default_value = "phoenix-control-plane.db")]
        db: String,
        #[arg(long)]
        name: String,
        /// agent, viewer, operator or admin.
        #[arg(long)]
        role: String,
    },
}

/// Serves `cp` on `listener` (a TCP or [`crate::tls::TlsListener`]) until `shutdown`
/// completes.
pub async fn serve<L>(
    listener: L,
    cp: Arc<ControlPlane>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let grpc = Grpc { cp: cp.clone() };
    let routes = tonic::service::Routes::new(AgentServiceServer::new(grpc.clone()))
        .add_service(FleetServiceServer::new(grpc.clone()))
        .add_service(RolloutServiceServer::new(grpc));
    let app = crate::api::router(cp).merge(routes.into_axum_router());
    // Agent streams never end by themselves, so shutdown does not wait for connections: all
    // state is in SQLite, committed per change.
    tokio::select! {
        result = axum::serve(listener, app) => result,
        _ = shutdown => Ok(()),
    }
}

async fn run_serve(
    listen: SocketAddr,
    db: String,
    settings: Settings,
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    let tls_config = match &tls {
        Some((cert, key)) => Some(crate::tls::server_config(cert, key)?),
        None => None,
    };
    let store =
        crate::store::open(&db).with_context(|| format!("opening the store {}", redact(&db)))?;
    let cp = ControlPlane::new(store, settings);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let engine = tokio::spawn(cp.clone().run_engine(stop_rx));
    tracing::info!(%listen, db = %redact(&db), tls = tls_config.is_some(), "phoenix-control-plane serving");
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
        tracing::info!("shutting down");
    };
    match tls_config {
        Some(config) => {
            let listener =
                crate::tls::TlsListener::new(listener, config).context("TLS listener")?;
            serve(listener, cp, shutdown).await.context("serving")?;
        }
        None => serve(listener, cp, shutdown).await.context("serving")?,
    }
    let _ = stop_tx.send(true);
    let _ = engine.await;
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            command: TokenCommand::Create { db, name, role },
        } => {
            let Some(role) = Role::parse(&role) else {
                eprintln!("error: unknown role {role:?}: agent, viewer, operator or admin");
                return ExitCode::from(2);
            };
            let result = crate::store::open(&db)
                .map_err(anyhow::Error::from)
                .and_then(|store| {
                    let cp = ControlPlane::new(store, Settings::default());
                    // Made on the database file directly: audited as the local user.
                    let local = crate::auth::Principal {
                        name: format!(
                            "local:{}",
                            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
                        ),
                        role: Role::Admin,
                    };
                    cp.create_token(Some(&local), &name, role)
                        .map_err(anyhow::Error::from)
                });
            match result {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve {
            listen,
            db,
            ack_timeout,
            agent_lost_after,
            tls_cert,
            tls_key,
        } => {
            init_logging();
            let settings = Settings {
                ack_timeout,
                agent_lost_after,
                ..Settings::default()
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("error: cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run_serve(listen, db, settings, tls_cert.zip(tls_key))) {
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

/// A store spec for logs: a URL's password is left out.
fn redact(spec: &str) -> String {
    match (spec.split_once("://"), spec.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => match rest.split_once('@') {
            Some((user, host)) => {
                let user = user.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}@{host}")
            }
            None => spec.to_string(),
        },
        _ => spec.to_string(),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}
