//! `controller demo`: the whole product on loopback in one process, for a first look and for the
//! README's first command. Nothing here is a mock: the controller, the agent, the simulated
//! registers and the simulated OFD are the same code `controller serve`, `agent run` and
//! `firmware-sim` run, and they talk over real QUIC (mutual TLS), WebSocket and TCP.
//!
//! State lives under `--data` (`controller/`, `agent/`, `registers/`, `ofd/`), so a second start
//! resumes the same system: the same account, agent identity, registers with their FN archives,
//! and receipts. Ports other than `--http` are chosen by the OS at each start; the agent's
//! identity is re-pointed at this run's QUIC port and the registers at this run's OFD port.

use anyhow::{bail, Context};
use controller::server::{Server, ServerConfig};
use controller::store::{Account, PasswordHash, PASSWORD_ROUNDS};
use controller::tunnel::create_enroll_token;
use firmware_sim::device::{Fleet, FleetOptions};
use firmware_sim::fixtures::{self, DEMO_INN};
use firmware_sim::ofd::Ofd;
use protocol::kkt::{Call, Operator, ShiftState};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

pub const LOGIN: &str = "demo";
pub const PASSWORD: &str = "demo";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the registers may take to connect and be prepared before the demo gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(
    data: PathBuf,
    http: SocketAddr,
    registers: usize,
    latency_ms: u64,
) -> anyhow::Result<()> {
    if registers == 0 {
        bail!("--registers must be at least 1");
    }
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create --data {}", data.display()))?;
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();

    // The OFD first: registers send to it from their first document on.
    let ofd = Ofd::open(&data.join("ofd")).context("opening the simulated OFD's store")?;
    let ofd_listener = tokio::net::TcpListener::bind(loopback).await?;
    let ofd_addr = ofd_listener.local_addr()?;
    tokio::spawn(ofd.clone().serve_tcp(ofd_listener));
    let ofd_endpoint = fixtures::ofd_endpoint(ofd_addr);

    let mut config = ServerConfig::new(data.join("controller"), http, loopback);
    // Everything runs on loopback, a shop developer's callback receiver too.
    config.api.allow_private_callbacks = true;
    let server = Server::start(config)
        .await
        .context("starting the controller")?;
    let store = server.store().clone();
    if store.account_by_login(LOGIN)?.is_none() {
        let account = Account {
            id: "acc-demo".into(),
            login: LOGIN.into(),
            password: PasswordHash::new(PASSWORD, PASSWORD_ROUNDS),
            inns: vec![DEMO_INN.into()],
            callback_secret: "demo-callback-secret".into(),
            created_at: controller::unix_ms(),
        };
        if let Err(refusal) = store.create_account(account).await? {
            bail!("cannot create the demo account: {refusal}");
        }
    }

    let agent_dir = data.join("agent");
    let controller_addr = server.quic_addr().to_string();
    point_agent(&server, &agent_dir, &controller_addr).await?;
    let agent = agent::run::start(agent::run::Config {
        data: agent_dir,
        kkt_listen: loopback,
        health: loopback,
        serial: Vec::new(),
        baud: 115_200,
        journal_limit: 100_000,
        max_backoff: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(10),
    })
    .await
    .context("starting the agent")?;

    let mut events = server.tunnel.subscribe();
    let fleet = Arc::new(
        Fleet::open(
            &data.join("registers"),
            registers,
            FleetOptions {
                connect: format!("ws://{}/kkt", agent.kkt_addr),
                latency_ms,
                default_ofd: Some(ofd_endpoint.clone()),
                capacity: None,
                ffd: protocol::kkt::FfdVersion::V1_2,
                max_backoff: Duration::from_secs(2),
            },
        )
        .context("opening the simulated registers")?,
    );
    fleet.start();
    let zns: Vec<String> = fleet.devices.keys().cloned().collect();
    tokio::time::timeout(READY_TIMEOUT, async {
        while zns
            .iter()
            .any(|zn| server.tunnel.online_kkt(zn).and_then(|k| k.state).is_none())
        {
            if let Err(tokio::sync::broadcast::error::RecvError::Closed) = events.recv().await {
                break;
            }
        }
    })
    .await
    .context("the simulated registers did not come online through the agent within a minute")?;
    // Three cloud registers in internet mode and one counter register that prints, so that
    // receipts without the buyer's e-mail or phone (which an internet-mode register refuses)
    // have somewhere to go too.
    let printing = zns.last().cloned();
    for zn in &zns {
        let internet = Some(zn) != printing.as_ref();
        prepare(&server, zn, &ofd_endpoint, internet).await?;
    }

    let base = format!("http://{}", server.http_addr);
    let mut out = std::io::stdout().lock();
    writeln!(out, "http listening on {}", server.http_addr)?;
    writeln!(out, "quic listening on {}", server.quic_addr())?;
    writeln!(out)?;
    writeln!(
        out,
        "KKT cloud balancer demo is running (state in {}).",
        data.display()
    )?;
    writeln!(out, "  API base URL  {base}/api   (Ferma-compatible)")?;
    writeln!(
        out,
        "  login         {LOGIN} / password {PASSWORD}, organisation INN {DEMO_INN}"
    )?;
    writeln!(
        out,
        "  registers     {} behind one agent: {} (internet mode); {} (prints)",
        zns.len(),
        zns[..zns.len().saturating_sub(1)].join(", "),
        printing.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "  OFD           tcp://{ofd_addr}   metrics {base}/metrics   OpenAPI {base}/openapi.json"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Get a token, create a receipt, and ask for its status:"
    )?;
    for line in curl_lines(&base) {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Ctrl-C stops; starting again with the same --data resumes."
    )?;
    out.flush()?;
    drop(out);

    crate::shutdown_signal().await;
    info!("demo stopping");
    server.shutdown().await;
    drop(fleet);
    Ok(())
}

/// The shell lines the demo prints (a test runs exactly these).
pub fn curl_lines(base: &str) -> Vec<String> {
    let receipt = format!(
        r#"{{"Request":{{"Inn":"{DEMO_INN}","Type":"Income","InvoiceId":"demo-'"$(date +%s%N)"'","CustomerReceipt":{{"TaxationSystem":"Common","Email":"buyer@example.ru","Items":[{{"Label":"Чай зелёный","Price":150.50,"Quantity":2,"Amount":301.00,"Vat":"Vat20"}}]}}}}}}"#
    );
    vec![
        format!(
            r#"TOKEN=$(curl -s -X POST {base}/api/Authorization/CreateAuthToken -H 'Content-Type: application/json' -d '{{"Login":"{LOGIN}","Password":"{PASSWORD}"}}' | sed -E 's/.*"AuthToken":"([^"]+)".*/\1/')"#
        ),
        format!(
            r#"RECEIPT=$(curl -s -X POST "{base}/api/kkt/cloud/receipt?AuthToken=$TOKEN" -H 'Content-Type: application/json' -d '{receipt}' | sed -E 's/.*"ReceiptId":"([^"]+)".*/\1/'); echo "ReceiptId $RECEIPT""#
        ),
        format!(
            r#"curl -s -X POST "{base}/api/kkt/cloud/status?AuthToken=$TOKEN" -H 'Content-Type: application/json' -d '{{"Request":{{"ReceiptId":"'$RECEIPT'"}}}}'; echo"#
        ),
    ]
}

/// Enrolls the demo's agent at its first start; afterwards points its identity at this run's
/// controller address (the QUIC port is chosen anew at each start).
async fn point_agent(server: &Server, dir: &Path, controller_addr: &str) -> anyhow::Result<()> {
    let info_path = dir.join("identity.json");
    if !info_path.exists() {
        let (token, _) = create_enroll_token(
            server.store(),
            server.tunnel.ca().fingerprint(),
            Duration::from_secs(600),
        )
        .await?;
        agent::identity::enroll(controller_addr, &token, dir, "demo-agent")
            .await
            .context("enrolling the demo agent")?;
        return Ok(());
    }
    let text = std::fs::read_to_string(&info_path)
        .with_context(|| format!("reading {}", info_path.display()))?;
    let mut info: agent::identity::IdentityInfo =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; delete --data to start over",
                info_path.display()
            )
        })?;
    info.controller = controller_addr.to_owned();
    std::fs::write(&info_path, serde_json::to_string_pretty(&info)?)
        .with_context(|| format!("writing {}", info_path.display()))?;
    Ok(())
}

/// Registers a fresh register for the demo INN, points it at this run's OFD and opens its shift.
async fn prepare(
    server: &Server,
    zn: &str,
    ofd: &protocol::kkt::OfdEndpoint,
    internet: bool,
) -> anyhow::Result<()> {
    let tunnel = &server.tunnel;
    let state = tunnel
        .online_kkt(zn)
        .and_then(|k| k.state)
        .with_context(|| format!("register {zn} went offline"))?;
    if !state.device.fiscal {
        let params = protocol::kkt::RegistrationParams {
            internet,
            ..fixtures::registration(zn, DEMO_INN, ofd.clone())
                .map_err(|e| anyhow::anyhow!("registration card of {zn}: {e}"))?
        };
        tunnel
            .command(zn, Call::Register(params), COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("registering {zn}"))?;
        info!(kkt = zn, internet, "registered for the demo INN");
    } else {
        tunnel
            .command(zn, Call::SetOfd(ofd.clone()), COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("pointing {zn} at the OFD"))?;
    }
    let shift = match tunnel
        .command(zn, Call::GetShiftStatus, COMMAND_TIMEOUT)
        .await
    {
        Ok(protocol::kkt::Reply::ShiftStatus(s)) => s.state,
        Ok(other) => bail!("register {zn} answered the shift query with {other:?}"),
        Err(e) => return Err(e).with_context(|| format!("reading {zn}'s shift")),
    };
    if shift == ShiftState::Expired {
        tunnel
            .command(zn, Call::CloseShift(Operator::default()), COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("closing {zn}'s expired shift"))?;
    }
    if shift != ShiftState::Opened {
        tunnel
            .command(zn, Call::OpenShift(Operator::default()), COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("opening {zn}'s shift"))?;
    }
    // The balancer's fresh view: a status query makes the agent report the register's state.
    tunnel
        .command(zn, Call::GetDeviceStatus, COMMAND_TIMEOUT)
        .await
        .with_context(|| format!("reading {zn}'s status"))?;
    Ok(())
}
