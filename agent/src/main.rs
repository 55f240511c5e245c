//! `agent enroll`, `agent run`, `agent status`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Edge agent: bridges registers on a shelf to the controller"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make this agent's key, get it certified with a one-time token, store the identity.
    Enroll {
        /// Controller's tunnel address, HOST:PORT.
        #[arg(long)]
        controller: String,
        /// The token printed by `controller agent-token create`.
        #[arg(long)]
        token: String,
        #[arg(long)]
        data: PathBuf,
        /// A name for people (defaults to the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Serve registers and keep the tunnel to the controller up.
    Run {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7800")]
        kkt_listen: SocketAddr,
        /// Health page and JSON; keep it on loopback.
        #[arg(long, default_value = "127.0.0.1:7801")]
        health: SocketAddr,
        /// A register on a serial line (one JSON message per line); repeatable.
        #[arg(long)]
        serial: Vec<PathBuf>,
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        /// Jobs plus unacknowledged reports held before new jobs are refused.
        #[arg(long, default_value_t = 100_000)]
        journal_limit: usize,
        #[arg(long, default_value_t = 5000)]
        max_backoff_ms: u64,
        /// Tunnel idle timeout in milliseconds: how fast a dead link is noticed.
        #[arg(long, default_value_t = 30_000)]
        idle_timeout_ms: u64,
    },
    /// Print the running agent's health.
    Status {
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            controller,
            token,
            data,
            name,
        } => {
            let name = name.unwrap_or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|_| "agent".into())
            });
            let info = agent::identity::enroll(&controller, &token, &data, &name).await?;
            println!(
                "enrolled as agent {} with {}; certificate valid until {} (Unix time)",
                info.agent_id, info.controller, info.not_after
            );
            Ok(())
        }
        Command::Run {
            data,
            kkt_listen,
            health,
            serial,
            baud,
            journal_limit,
            max_backoff_ms,
            idle_timeout_ms,
        } => {
            let started = agent::run::start(agent::run::Config {
                data,
                kkt_listen,
                health,
                serial,
                baud,
                journal_limit,
                max_backoff: Duration::from_millis(max_backoff_ms.max(100)),
                idle_timeout: Duration::from_millis(idle_timeout_ms.max(300)),
            })
            .await?;
            // Machine-readable lines for scripts and tests that asked for port 0.
            println!("kkt listening on {}", started.kkt_addr);
            println!("health listening on {}", started.health_addr);
            tokio::signal::ctrl_c().await?;
            // Everything reported was durable before it was sent; nothing to flush.
            Ok(())
        }
        Command::Status { data } => {
            let addr = std::fs::read_to_string(data.join("health.addr")).with_context(|| {
                format!(
                    "{}/health.addr: start the agent with `agent run --data {}` first",
                    data.display(),
                    data.display()
                )
            })?;
            let h = agent::health::fetch(addr.trim())
                .await
                .map_err(anyhow::Error::msg)?;
            print!("{}", agent::health::text(&h));
            Ok(())
        }
    }
}
