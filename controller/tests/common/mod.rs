//! Test helpers: a controller tunnel on 127.0.0.1:0 in a temp dir, a hand-made enrollment client,
//! and a fake agent speaking the tunnel protocol over real QUIC. Nothing here sleeps: waits are on
//! events or frames, with a generous timeout only as a safety net.
#![allow(clippy::unwrap_used, dead_code)]

use controller::ca::Ca;
use controller::store::{FleetStore, Store};
use controller::tunnel::tls::client_config;
use controller::tunnel::{create_enroll_token, Tunnel, TunnelConfig, TunnelEvent, STORE_FILE};
use protocol::document::DocumentType;
use protocol::kkt::{FfdVersion, FiscalResult, Hello, LINK_VERSION, MODEL};
use protocol::tunnel::{
    decode_frame, encode_frame, frame_len, AgentHello, AgentMessage, Attached, ControllerHello,
    ControllerMessage, EnrollRequest, EnrollResponse, JournalSummary, OutboxBody, OutboxEntry,
    Work, ALPN_ENROLL, ALPN_TUNNEL, TUNNEL_VERSION,
};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Safety net for every wait; tests finish far sooner.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn init() {
    controller::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub struct Controller<S: FleetStore = Store> {
    pub dir: tempfile::TempDir,
    pub tunnel: Tunnel<S>,
    /// The redb store underneath, for what only an operator does (enrollment tokens).
    pub store: Store,
}

pub async fn start() -> Controller {
    start_over(|store| store).await
}

/// A tunnel whose store is `wrap` of the redb store (see `fleet_store.rs`).
pub async fn start_over<S: FleetStore>(wrap: impl FnOnce(Store) -> S) -> Controller<S> {
    init();
    let dir = tempfile::tempdir().unwrap();
    let config = TunnelConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    let ca = Arc::new(Ca::open_or_create(dir.path()).unwrap());
    let store = Store::open(&dir.path().join(STORE_FILE)).unwrap();
    let tunnel = Tunnel::start_with(config, ca, wrap(store.clone()))
        .await
        .unwrap();
    Controller { dir, tunnel, store }
}

impl<S: FleetStore> Controller<S> {
    pub fn addr(&self) -> SocketAddr {
        self.tunnel.local_addr()
    }

    /// The CA certificate as an agent would keep it, read from the data directory.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.dir.path().join("ca.cert.pem")).unwrap()
    }

    pub async fn token(&self) -> String {
        create_enroll_token(
            &self.store,
            self.tunnel.ca().fingerprint(),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .0
    }

    /// Enrolls a new agent and returns its credentials.
    pub async fn enroll_agent(&self, name: &str) -> Credentials {
        let token = self.token().await;
        let (key, csr) = key_and_csr();
        match enroll(self.addr(), self.ca_der(), &token, &csr, name).await {
            EnrollResponse::Enrolled {
                agent_id,
                certificate,
            } => Credentials {
                agent_id,
                cert: CertificateDer::from_pem_slice(certificate.cert_pem.as_bytes()).unwrap(),
                key_der: key.serialize_der(),
            },
            EnrollResponse::Refused { reason } => panic!("enrollment refused: {reason}"),
        }
    }
}

pub fn key_and_csr() -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, csr)
}

#[derive(Clone)]
pub struct Credentials {
    pub agent_id: String,
    pub cert: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Credentials {
    pub fn client_auth(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
        )
    }
}

/// Credentials from a CA the controller never saw.
pub fn foreign_credentials() -> Credentials {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(dir.path()).unwrap();
    let (key, csr) = key_and_csr();
    let issued = ca
        .issue_agent("agt-impostor", &csr, Duration::from_secs(3600))
        .unwrap();
    Credentials {
        agent_id: "agt-impostor".into(),
        cert: issued.cert_der,
        key_der: key.serialize_der(),
    }
}

fn client_endpoint(config: quinn::ClientConfig) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(config);
    ep
}

/// The enrollment exchange, as the agent does it: verify the controller by the CA, send one
/// request, read one answer.
pub async fn enroll(
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    token: &str,
    csr_pem: &str,
    name: &str,
) -> EnrollResponse {
    let ep = client_endpoint(client_config(ca, None, ALPN_ENROLL).unwrap());
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = EnrollRequest {
        version: TUNNEL_VERSION,
        token: token.into(),
        csr_pem: csr_pem.into(),
        name: name.into(),
    };
    send.write_all(&encode_frame(&req).unwrap()).await.unwrap();
    send.finish().unwrap();
    let answer = read_raw(&mut recv).await.unwrap();
    let resp = decode_frame(&answer).unwrap();
    conn.close(0u32.into(), b"bye");
    resp
}

async fn read_raw(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, String> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = frame_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

/// A fake agent: one QUIC connection, one bidirectional stream.
pub struct FakeAgent {
    pub id: String,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    _ep: quinn::Endpoint,
}

/// Connects with `client` credentials (or none) using the tunnel ALPN and opens the stream.
/// With TLS 1.3 a refused certificate shows up only later, on the first stream operation.
pub async fn connect(
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    client: Option<&Credentials>,
) -> Result<FakeAgent, String> {
    let ep =
        client_endpoint(client_config(ca, client.map(|c| c.client_auth()), ALPN_TUNNEL).unwrap());
    let conn = ep
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    Ok(FakeAgent {
        id: client.map(|c| c.agent_id.clone()).unwrap_or_default(),
        conn,
        send,
        recv,
        _ep: ep,
    })
}

pub fn hello(agent_id: &str, epoch: u64, journal: JournalSummary) -> AgentMessage {
    AgentMessage::Hello(AgentHello {
        version: TUNNEL_VERSION,
        agent_id: agent_id.into(),
        store_epoch: epoch,
        software: "fake-agent/0".into(),
        journal,
    })
}

impl FakeAgent {
    pub async fn send(&mut self, msg: &AgentMessage) -> Result<(), String> {
        self.send
            .write_all(&encode_frame(msg).unwrap())
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.send.write_all(bytes).await.map_err(|e| e.to_string())
    }

    /// The next controller message other than a ping.
    pub async fn recv(&mut self) -> Result<ControllerMessage, String> {
        loop {
            let body = tokio::time::timeout(WAIT, read_raw(&mut self.recv))
                .await
                .map_err(|_| "timed out waiting for a frame".to_string())??;
            let msg: ControllerMessage = decode_frame(&body).map_err(|e| e.to_string())?;
            if !matches!(msg, ControllerMessage::Ping { .. }) {
                return Ok(msg);
            }
        }
    }

    /// Says hello and returns the controller's hello.
    pub async fn hello(&mut self, epoch: u64, journal: JournalSummary) -> ControllerHello {
        let id = self.id.clone();
        self.send(&hello(&id, epoch, journal)).await.unwrap();
        match self.recv().await.unwrap() {
            ControllerMessage::Hello(h) => h,
            other => panic!("expected the controller's hello, got {other:?}"),
        }
    }

    pub async fn attach(&mut self, zn: &str) {
        self.send(&AgentMessage::Attached(attached(zn)))
            .await
            .unwrap();
    }

    pub async fn outbox(&mut self, seq: u64, body: OutboxBody) {
        self.send(&AgentMessage::Outbox(OutboxEntry { seq, body }))
            .await
            .unwrap();
    }

    /// Waits until the controller closes the connection; returns the reason it gave.
    pub async fn closed_reason(&mut self) -> String {
        // Reading drives the connection until it fails.
        let r = tokio::time::timeout(WAIT, async {
            loop {
                if read_raw(&mut self.recv).await.is_err() {
                    break;
                }
            }
            self.conn.closed().await
        })
        .await
        .expect("the controller did not close the connection");
        r.to_string()
    }
}

pub fn attached(zn: &str) -> Attached {
    Attached {
        hello: Hello {
            version: LINK_VERSION,
            model: MODEL.into(),
            zn: zn.into(),
            fn_number: format!("73804408{zn:0>8}"),
            firmware: "1.0".into(),
            ffd_version: FfdVersion::V1_2,
        },
        transport: "network".into(),
    }
}

pub fn work(n: u64) -> Work {
    Work::Receipt(firmware_sim::fixtures::receipt(n, None))
}

pub fn result(job: &str, kkt: &str, fd: u32) -> FiscalResult {
    FiscalResult {
        document_type: DocumentType::Receipt,
        fd_number: fd,
        fpd: 1_000_000 + fd,
        shift_number: 1,
        receipt_number: Some(fd),
        fn_number: format!("73804408{kkt:0>8}"),
        rnm: "0000000001012345".into(),
        zn: kkt.into(),
        date_time: 1_767_000_000,
        total: None,
        additional_attribute: Some(job.into()),
    }
}

pub fn completed(job: &str, kkt: &str, attempt: u32, fd: u32) -> OutboxBody {
    OutboxBody::Completed {
        job: job.into(),
        attempt,
        kkt: kkt.into(),
        result: result(job, kkt, fd),
    }
}

/// Waits for the first event matching `pred`.
pub async fn wait_for(
    rx: &mut broadcast::Receiver<TunnelEvent>,
    mut pred: impl FnMut(&TunnelEvent) -> bool,
) -> TunnelEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event channel: {e}"),
            }
        }
    })
    .await
    .expect("the expected event did not come")
}

/// Enrolls, connects, says hello and attaches `zn`; waits until the register is online.
pub async fn online_agent<S: FleetStore>(
    c: &Controller<S>,
    name: &str,
    zn: &str,
) -> (Credentials, FakeAgent) {
    let mut events = c.tunnel.subscribe();
    let creds = c.enroll_agent(name).await;
    let mut agent = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    let h = agent.hello(1, JournalSummary::default()).await;
    assert_eq!(h.applied_upto, 0);
    agent.attach(zn).await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktAttached { kkt, .. } if kkt == zn),
    )
    .await;
    (creds, agent)
}

pub fn kkt_state(zn: &str) -> protocol::tunnel::KktState {
    use protocol::kkt::*;
    protocol::tunnel::KktState {
        kkt: zn.into(),
        device: DeviceStatus {
            date_time: 1_767_000_000,
            shift: ShiftState::Opened,
            blocked: false,
            cover_open: false,
            paper_present: true,
            fiscal: true,
            fn_present: true,
            model: MODEL.into(),
            zn: zn.into(),
            firmware: "1.0".into(),
        },
        fn_info: FnInfo {
            fn_number: format!("73804408{zn:0>8}"),
            phase: 3,
            last_fd_number: 10,
            registrations_done: 1,
            registrations_left: 29,
            valid_until: 1_800_000_000,
            ffd_version: FfdVersion::V1_2,
            warnings: FnWarnings::default(),
            block: None,
            documents_used: 10,
            documents_capacity: 250_000,
            registration: None,
        },
        shift: ShiftStatus {
            state: ShiftState::Opened,
            number: 1,
            opened_at: Some(1_767_000_000),
            expires_at: Some(1_767_086_400),
            receipts: 3,
            documents: 4,
        },
        ofd: OfdExchangeStatus {
            unsent_count: 0,
            first_unsent_fd: None,
            first_unsent_date_time: None,
            last_ack_at: None,
            ofd: None,
        },
    }
}

/// A Ferma create-receipt body: the minimal payload CMS modules send.
pub fn receipt(inn: &str, invoice: &str) -> Value {
    json!({"Request": {
        "Inn": inn,
        "Type": "Income",
        "InvoiceId": invoice,
        "LocalDate": "2026-12-04T10:15:00",
        "CustomerReceipt": {
            "TaxationSystem": "Common",
            "Email": "buyer@example.com",
            "Phone": "+79991234567",
            "Items": [{"Label": "Молоко 3,2%", "Price": 89.9, "Quantity": 2, "Amount": 179.8, "Vat": "Vat10"}]
        }
    }})
}
