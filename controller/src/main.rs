//! `controller serve` runs the controller; `controller demo` runs a whole system in one process;
//! `controller agent-token create` and `controller account create` ask a running controller to
//! do an operator's job.

mod demo;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use controller::admin::{AccountResponse, TokenResponse, ADMIN_SECRET_FILE};
use controller::server::{Server, ServerConfig};
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
    /// Log as JSON lines (for log shippers) instead of text; RUST_LOG sets the level.
    #[arg(long, global = true)]
    log_json: bool,
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
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Run a whole system on loopback: controller, one agent, simulated registers and OFD.
    Demo {
        /// Where the demo keeps its state; a second start on it resumes the same system.
        #[arg(long, default_value = "demo-data")]
        data: PathBuf,
        /// HTTP API address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Simulated registers (all registered for the demo INN 3245001416).
        #[arg(long, default_value_t = 4)]
        registers: usize,
        /// Service time of each simulated register, milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Enrollment tokens for agents.
    AgentToken {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Customer accounts.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
}

/// Limits and automation settings of `serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct Tuning {
    /// Receipts waiting per INN before the API answers 503 with Retry-After.
    #[arg(long, default_value_t = 100_000)]
    max_queue: usize,
    /// Jobs in flight per register (1 or 2 keeps what a lost agent strands small).
    #[arg(long, default_value_t = 2)]
    max_in_flight: usize,
    /// Rotate every shift once a day at this Moscow time (HH:MM), besides the 24 h limit.
    #[arg(long)]
    daily_shift_close: Option<String>,
    /// Start draining a register this many minutes before its shift's 24 h limit.
    #[arg(long, default_value_t = 30)]
    rotate_before_minutes: i64,
    /// Lifetime of a Ferma AuthToken, hours.
    #[arg(long, default_value_t = 24)]
    token_hours: u64,
    /// Let a receipt's CallbackUrl reach loopback and private addresses (shop servers inside
    /// this network). Off by default: a shop's URL must not reach into the operator's network.
    #[arg(long)]
    allow_private_callbacks: bool,
}

impl Tuning {
    fn apply(&self, config: &mut ServerConfig) -> anyhow::Result<()> {
        if self.max_queue == 0 {
            bail!("--max-queue must be at least 1");
        }
        if !(1..=16).contains(&self.max_in_flight) {
            bail!("--max-in-flight must be 1..=16 (1 or 2 is what DESIGN.md recommends)");
        }
        config.api.max_queue = self.max_queue;
        config.api.session_ttl = Duration::from_secs(self.token_hours.max(1) * 3600);
        config.api.allow_private_callbacks = self.allow_private_callbacks;
        config.balancer.max_in_flight = self.max_in_flight;
        config.balancer.rotate_before_secs = self.rotate_before_minutes.max(1) * 60;
        if let Some(t) = &self.daily_shift_close {
            let parsed = t
                .split_once(':')
                .and_then(|(h, m)| Some((h.parse::<i64>().ok()?, m.parse::<i64>().ok()?)))
                .filter(|(h, m)| (0..24).contains(h) && (0..60).contains(m));
            let Some((h, m)) = parsed else {
                bail!("--daily-shift-close {t:?}: write the Moscow time as HH:MM, e.g. 03:00");
            };
            config.balancer.daily_close_at = Some(h * 3600 + m * 60);
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create an account owning one or more organisations (INNs); prints its callback secret.
    Create {
        #[arg(long)]
        login: String,
        #[arg(long)]
        password: String,
        /// An INN the account may fiscalize for; repeat for several.
        #[arg(long = "inn", required = true)]
        inns: Vec<String>,
        /// The running controller's data directory (its admin credential is read from there).
        #[arg(long)]
        data: PathBuf,
        /// The running controller's HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
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
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // One JSON object per line, fields (job, kkt, agent, ...) as keys: what log shippers read.
    if cli.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    controller::install_crypto_provider();
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
            tuning,
        } => {
            serve(
                data,
                http,
                quic,
                server_names,
                agent_cert_validity_seconds,
                tuning,
            )
            .await
        }
        Command::Demo {
            data,
            http,
            registers,
            latency_ms,
        } => demo::run(data, http, registers, latency_ms).await,
        Command::Account {
            command:
                AccountCommand::Create {
                    login,
                    password,
                    inns,
                    data,
                    http,
                },
        } => create_account(data, http, login, password, inns).await,
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
    tuning: Tuning,
) -> anyhow::Result<()> {
    let mut config = ServerConfig::new(&data, http, quic);
    config.tunnel.server_names = server_names;
    if let Some(s) = validity {
        if s == 0 {
            bail!("--agent-cert-validity-seconds must be at least 1");
        }
        config.tunnel.agent_cert_validity = Duration::from_secs(s);
    }
    tuning.apply(&mut config)?;
    let server = Server::start(config)
        .await
        .with_context(|| format!("starting the controller on --data {}", data.display()))?;
    // Machine-readable lines for scripts and tests that asked for port 0.
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "quic listening on {}", server.quic_addr())?;
        writeln!(out, "http listening on {}", server.http_addr)?;
        out.flush()?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests and commits, closing agent links");
    server.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what service managers and test harnesses send).
pub(crate) async fn shutdown_signal() {
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

/// POSTs `body` to the running controller's admin API with the credential from `data`, and
/// returns the answer's JSON; errors say what to check.
async fn admin_post(
    data: &std::path::Path,
    http: SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let secret_path = data.join(ADMIN_SECRET_FILE);
    let secret = std::fs::read_to_string(&secret_path).with_context(|| {
        format!(
            "cannot read the admin credential {}; run this on the controller's machine with the \
             --data directory the controller was started with",
            secret_path.display()
        )
    })?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let response = client
        .post(format!("http://{http}{path}"))
        .bearer_auth(secret.trim())
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
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
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
    serde_json::from_str(&text).with_context(|| {
        format!("the controller's answer is not JSON ({text:?}); are --http and the controller's version right?")
    })
}

async fn create_account(
    data: PathBuf,
    http: SocketAddr,
    login: String,
    password: String,
    inns: Vec<String>,
) -> anyhow::Result<()> {
    let body = serde_json::json!({ "login": login, "password": password, "inns": inns });
    let answer = admin_post(&data, http, "/admin/accounts", body).await?;
    let account: AccountResponse = serde_json::from_value(answer)
        .context("the controller's answer is not an account; is its version right?")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "account {} created: login {}, INN {}",
        account.id,
        account.login,
        account.inns.join(", ")
    )?;
    writeln!(
        out,
        "callback secret (signs X-Signature: sha256=HMAC(secret, body) on this account's callbacks; shown once):"
    )?;
    writeln!(out, "{}", account.callback_secret.unwrap_or_default())?;
    out.flush()?;
    Ok(())
}

async fn create_token(
    data: PathBuf,
    http: SocketAddr,
    ttl_seconds: Option<u64>,
) -> anyhow::Result<()> {
    let body = match ttl_seconds {
        Some(t) => serde_json::json!({ "ttlSeconds": t }),
        None => serde_json::json!({}),
    };
    let answer = admin_post(&data, http, "/admin/agent-tokens", body).await?;
    let token: TokenResponse = serde_json::from_value(answer).context(
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
