//! `firmware-sim kkt ...` runs simulated registers; `firmware-sim ofd ...` runs the simulated OFD.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use firmware_sim::device::{Fleet, FleetOptions};
use firmware_sim::ofd::{self, Ofd, OFD_INN};
use protocol::kkt::{FfdVersion, OfdEndpoint};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Simulated \"Эфир Pro ФС\" registers with fiscal drives, and a simulated OFD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N registers that connect to an agent's WebSocket.
    Kkt {
        /// Agent endpoint, e.g. ws://127.0.0.1:7800/kkt.
        #[arg(long)]
        connect: String,
        /// Number of registers in this process.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// State directory: a restart on the same directory brings back the same registers.
        #[arg(long)]
        state: PathBuf,
        /// Service time of every operation that forms a document (receipt, shift report), in
        /// milliseconds; status queries answer at once.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// OFD for registers that have none configured yet (registration sets its own).
        #[arg(long)]
        ofd: Option<SocketAddr>,
        /// Control API (faults, clock) on this loopback address.
        #[arg(long)]
        control: Option<SocketAddr>,
        /// Documents an FN holds (default 250000).
        #[arg(long)]
        capacity: Option<u32>,
        /// FFD version of the registers' FNs: 1.05, 1.1 or 1.2.
        #[arg(long, default_value = "1.2")]
        ffd: FfdVersion,
        /// Longest wait between reconnect attempts, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        max_backoff_ms: u64,
    },
    /// Run the OFD: containers over TCP, a JSON API over HTTP.
    Ofd {
        #[arg(long, default_value = "127.0.0.1:7777")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7780")]
        http: SocketAddr,
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Kkt {
            connect,
            count,
            state,
            latency_ms,
            ofd,
            control,
            capacity,
            ffd,
            max_backoff_ms,
        } => {
            if count == 0 {
                bail!("--count: run at least one register");
            }
            if !connect.starts_with("ws://") {
                bail!("--connect: expected ws://HOST:PORT/kkt, got {connect:?}");
            }
            let options = FleetOptions {
                connect,
                latency_ms,
                default_ofd: ofd.map(|a| OfdEndpoint {
                    name: "ОФД-симулятор".into(),
                    inn: OFD_INN.into(),
                    host: a.ip().to_string(),
                    port: a.port(),
                }),
                capacity,
                ffd,
                max_backoff: Duration::from_millis(max_backoff_ms.max(100)),
            };
            let fleet = Arc::new(
                Fleet::open(&state, count, options)
                    .with_context(|| format!("--state {}", state.display()))?,
            );
            fleet.start();
            if let Some(addr) = control {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--control {addr}"))?;
                // Machine-readable line for scripts and tests that asked for port 0.
                println!("control listening on {}", listener.local_addr()?);
                let app = firmware_sim::control::app(fleet.clone());
                tokio::spawn(async move { axum::serve(listener, app).await });
            }
            tokio::signal::ctrl_c().await?;
            // Every document is durable before it is answered; nothing to flush.
            Ok(())
        }
        Command::Ofd { listen, http, data } => {
            let ofd = Ofd::open(&data).with_context(|| format!("--data {}", data.display()))?;
            let tcp = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("--listen {listen}"))?;
            let web = tokio::net::TcpListener::bind(http)
                .await
                .with_context(|| format!("--http {http}"))?;
            println!(
                "ofd listening on {} http {}",
                tcp.local_addr()?,
                web.local_addr()?
            );
            tokio::spawn(ofd.clone().serve_tcp(tcp));
            let app = ofd::app(ofd);
            tokio::select! {
                r = axum::serve(web, app) => r.context("HTTP server")?,
                r = tokio::signal::ctrl_c() => r?,
            }
            Ok(())
        }
    }
}
