//! `controller serve` runs the controller; `controller agent-token create` asks a running one for
//! an enrollment token.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use controller::admin::{self, AdminState, TokenResponse, ADMIN_SECRET_FILE};
use controller::tunnel::{Tunnel, TunnelConfig};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Cloud balancer controller for fiscal registers (54-FZ)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: the agent tunnel (QUIC) and the HTTP API.
    Serve {
        /// Data directory: store, CA and admin credential. Created at first start.
        #[arg(long)]
        data: PathBuf,
        /// HTTP API address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// QUIC address agents dial.
        #[arg(long, default_value = "127.0.0.1:7443")]
        quic: SocketAddr,
        /// A name agents use to reach this controller (DNS name or IP); repeat for several.
        /// localhost and the loopback addresses are always included.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Validity of agent certificates, in seconds (default 30 days).
        #[arg(long)]
        agent_cert_validity_seconds: Option<u64>,
    },
    /// Enrollment tokens for agents.
    AgentToken {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Ask the running controller for a one-time token; prints it alone on the last line.
    Create {
        /// The running controller's data directory (its admin credential is read from there).
        #[arg(long)]
        data: PathBuf,
        /// The running controller's HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// How long the token stays valid (default 24 h).
        #[arg(long)]
        ttl_seconds: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    controller::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(run(cli));
    // Drop every task (and with them the store handles) before exiting.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            data,
            http,
            quic,
            server_names,
            agent_cert_validity_seconds,
        } => serve(data, http, quic, server_names, agent_cert_validity_seconds).await,
        Command::AgentToken {
            command:
                TokenCommand::Create {
                    data,
                    http,
                    ttl_seconds,
                },
        } => create_token(data, http, ttl_seconds).await,
    }
}

async fn serve(
    data: PathBuf,
    http: SocketAddr,
    quic: SocketAddr,
    server_names: Vec<String>,
    validity: Option<u64>,
) -> anyhow::Result<()> {
    let mut config = TunnelConfig::new(&data, quic);
    config.server_names = server_names;
    if let Some(s) = validity {
        if s == 0 {
            bail!("--agent-cert-validity-seconds must be at least 1");
        }
        config.agent_cert_validity = Duration::from_secs(s);
    }
    let tunnel = Tunnel::start(config)
        .await
        .with_context(|| format!("starting the controller on --data {}", data.display()))?;
    let admin_hash = admin::ensure_admin_secret(&data, tunnel.store())
        .await
        .context("setting up the admin credential")?;
    let listener = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("--http {http}: cannot listen (is the port in use?)"))?;
    let http_addr = listener.local_addr()?;
    let app = admin::app(AdminState::new(
        tunnel.store().clone(),
        tunnel.ca().fingerprint(),
        admin_hash,
        data.clone(),
    ));
    // Machine-readable lines for scripts and tests that asked for port 0.
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "quic listening on {}", tunnel.local_addr())?;
        writeln!(out, "http listening on {http_addr}")?;
        out.flush()?;
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("HTTP server")?;
    tracing::info!("shutting down: closing agent links and finishing commits");
    tunnel.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what service managers and test harnesses send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn create_token(
    data: PathBuf,
    http: SocketAddr,
    ttl_seconds: Option<u64>,
) -> anyhow::Result<()> {
    let secret_path = data.join(ADMIN_SECRET_FILE);
    let secret = std::fs::read_to_string(&secret_path).with_context(|| {
        format!(
            "cannot read the admin credential {}; run this on the controller's machine with the \
             --data directory the controller was started with",
            secret_path.display()
        )
    })?;
    let secret = secret.trim();
    let url = format!("http://{http}/admin/agent-tokens");
    let body = match ttl_seconds {
        Some(t) => serde_json::json!({ "ttlSeconds": t }),
        None => serde_json::json!({}),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let response = client
        .post(&url)
        .bearer_auth(secret)
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the controller is not reachable at http://{http} ({e}); start it with \
                 `controller serve --data {} --http {http}`, or pass --http with the address it \
                 listens on",
                data.display()
            )
        })?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(text);
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!(
                "the controller at http://{http} refused the admin credential from {}: is it \
                 running with --data {}? ({message})",
                secret_path.display(),
                data.display()
            );
        }
        bail!("the controller answered {status}: {message}");
    }
    let token: TokenResponse = response.json().await.context(
        "the controller's answer is not a token; are --http and the controller's version right?",
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "enrollment token (one use, expires at Unix time {}); on the agent run: agent enroll --controller HOST:PORT --token <token> --data DIR",
        token.expires_at
    )?;
    writeln!(out, "{}", token.token)?;
    out.flush()?;
    Ok(())
}
