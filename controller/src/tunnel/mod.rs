//! The controller's side of the agent tunnel: a QUIC endpoint (mutual TLS) that agents dial, and
//! the API the dispatcher drives ([`Tunnel`]).
//!
//! # Invariants (DESIGN.md §3)
//! * An assignment is durable in the store before its `Dispatch` frame is handed to the
//!   connection ([`Tunnel::dispatch`]). If the connection is already gone when we try, the frame
//!   never left and the job goes straight back to the queue; otherwise the job belongs to the agent
//!   until it reports, or until its next hello shows it never received it.
//! * An agent's reports are applied and its `applied_upto` advanced in one durable transaction
//!   before the cumulative `Ack` for them is sent; acks are batched per commit, not per entry.
//! * One live connection per agent: a new one supersedes (closes) the old one *before* the hello
//!   reconciliation runs, so a dispatch racing the reconnect either is seen by the reconciliation
//!   or finds the old connection closed and re-queues the job.
//! * A connection that breaks the rules (garbage, oversized frame, wrong version, no or unknown
//!   certificate) is closed with a logged reason; no other connection is affected.
//!
//! What lives only in memory (rebuilt from the agents on reconnect): which agents and registers
//! are online, their health and RTT, and waiters for register commands.

mod conn;
mod enroll;
pub mod frame;
pub mod tls;

pub use enroll::{create_enroll_token, DEFAULT_TOKEN_TTL};

use crate::ca::{Ca, CaError, DEFAULT_AGENT_VALIDITY};
use crate::rules::Job;
use crate::store::{Anomaly, FleetStore, Store, StoreError};
use crate::unix_ms;
use protocol::kkt::{Call, Event, FiscalResult, KktError, Reply};
use protocol::tunnel::{
    encode_frame, Attached, ControllerMessage, Dispatch, Health, JobId, KktState, Work,
};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, warn};

/// The store file inside the data directory.
pub const STORE_FILE: &str = "controller.redb";

/// How the tunnel runs.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Extra names (DNS or IP) for the server certificate, besides localhost and loopback.
    pub server_names: Vec<String>,
    /// Validity of agent certificates (enrollment and renewal).
    pub agent_cert_validity: Duration,
    /// How often the controller pings each agent to measure the round trip.
    pub ping_interval: Duration,
    /// A new connection must say hello (or send its enrollment request) within this time.
    pub hello_timeout: Duration,
}

impl TunnelConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        TunnelConfig {
            data_dir: data_dir.into(),
            listen,
            server_names: Vec::new(),
            agent_cert_validity: DEFAULT_AGENT_VALIDITY,
            ping_interval: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// What happened on the tunnel; tests and the dispatcher wait on these instead of sleeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEvent {
    Enrolled {
        agent: String,
        name: String,
    },
    AgentConnected {
        agent: String,
    },
    AgentDisconnected {
        agent: String,
        reason: String,
    },
    /// A connection was closed for breaking the rules (or never identified itself).
    ConnectionRejected {
        agent: Option<String>,
        remote: SocketAddr,
        reason: String,
    },
    KktAttached {
        agent: String,
        kkt: String,
    },
    /// `agent` claimed register `kkt` while `holder` holds it; the claim waits (see
    /// `Live::pending_claims`).
    KktClaimWaiting {
        agent: String,
        kkt: String,
        holder: String,
    },
    KktDetached {
        agent: String,
        kkt: String,
    },
    KktStatus {
        agent: String,
        kkt: String,
    },
    KktEvent {
        agent: String,
        kkt: String,
        event: Box<Event>,
    },
    JobDispatched {
        job: JobId,
        agent: String,
        kkt: String,
        attempt: u32,
    },
    JobAccepted {
        job: JobId,
        agent: String,
        kkt: String,
        attempt: u32,
    },
    JobRefused {
        job: JobId,
        agent: String,
        kkt: String,
        attempt: u32,
        reason: String,
    },
    JobCompleted {
        job: JobId,
        agent: String,
        kkt: String,
        result: Box<FiscalResult>,
    },
    JobNotFiscalized {
        job: JobId,
        agent: String,
        kkt: String,
        error: KktError,
    },
    /// Back in the queue: the agent reconnected without it.
    JobReleased {
        job: JobId,
        agent: String,
        kkt: String,
    },
    /// Outbox entries up to `upto` are durable and acknowledged.
    OutboxApplied {
        agent: String,
        upto: u64,
    },
    AnomalyRecorded {
        id: u64,
        job: JobId,
    },
    /// The OFD acknowledged these receipts (durable: they are CONFIRMED).
    ReceiptsConfirmed {
        jobs: Vec<JobId>,
    },
}

/// A register online now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KktInfo {
    pub zn: String,
    pub agent: String,
    pub attached: Attached,
    pub state: Option<KktState>,
    /// Jobs assigned or accepted on it.
    pub in_flight: usize,
    pub online_since_ms: u64,
}

/// An agent connected now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: String,
    pub name: String,
    pub software: String,
    pub remote: SocketAddr,
    pub connected_at_ms: u64,
    /// The agent's last heartbeat.
    pub health: Option<Health>,
    /// Round trip of the controller's last ping.
    pub rtt: Option<Duration>,
    pub kkts: Vec<String>,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen for agents on {addr}: {source}; is the port in use?")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Error)]
pub enum DispatchError {
    #[error("register {0} is not online")]
    KktOffline(String),
    #[error(transparent)]
    Assign(#[from] crate::store::AssignError),
    #[error("the dispatch of job {0} does not fit in one tunnel frame")]
    TooLarge(JobId),
    #[error("the agent of register {kkt} disconnected before the dispatch left; job {job} is back in the queue")]
    AgentGone { job: JobId, kkt: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Error)]
pub enum CommandError {
    #[error("register {0} is not online")]
    KktOffline(String),
    #[error("{0} forms a receipt: submit it as a job (exactly-once), not as a command")]
    UseJob(&'static str),
    #[error(transparent)]
    Kkt(#[from] KktError),
    #[error("register {kkt} did not answer {method} within {timeout:?}")]
    Timeout {
        kkt: String,
        method: &'static str,
        timeout: Duration,
    },
    #[error("the agent of register {0} disconnected before answering")]
    Disconnected(String),
}

/// The tunnel. Cheap to clone; every clone drives the same endpoint.
/// Generic over its store ([`FleetStore`]); the redb [`Store`] is the default.
#[derive(Clone)]
pub struct Tunnel<S: FleetStore = Store> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    store: S,
    ca: Arc<Ca>,
    config: TunnelConfig,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    controller_id: String,
    events: broadcast::Sender<TunnelEvent>,
    live: Mutex<Live>,
    next_id: AtomicU64,
    /// Origin of the microsecond clock in pings.
    epoch: Instant,
}

#[derive(Default)]
struct Live {
    agents: HashMap<String, AgentLink>,
    kkts: HashMap<String, OnlineKkt>,
    /// Register → jobs assigned or accepted on it (mirrors the store's index).
    in_flight: HashMap<String, BTreeSet<JobId>>,
    /// Registers another agent claimed while an online agent held them. A register is wired to
    /// one agent at a time, so a second claim is either a re-cabling the first agent has not
    /// noticed yet or an agent lying to be given another shop's receipts; the claim waits, unstored,
    /// until the holder lets the register go (detaches it or disconnects), and is applied then.
    pending_claims: HashMap<String, PendingClaim>,
}

struct PendingClaim {
    agent: String,
    conn_id: u64,
    attached: Attached,
    /// The claiming connection's applier.
    reports: mpsc::Sender<crate::store::Report>,
}

struct AgentLink {
    conn_id: u64,
    name: String,
    software: String,
    remote: SocketAddr,
    connected_at_ms: u64,
    tx: mpsc::Sender<ControllerMessage>,
    conn: quinn::Connection,
    health: Option<Health>,
    rtt: Option<Duration>,
    waiters: HashMap<u64, oneshot::Sender<Result<Reply, KktError>>>,
}

struct OnlineKkt {
    agent: String,
    conn_id: u64,
    attached: Attached,
    state: Option<KktState>,
    since_ms: u64,
}

impl Live {
    /// Registers `zns` were let go by their agent: applies the claims that waited for them, if
    /// the claiming connection is still the agent's current one.
    fn release_claims(&mut self, zns: &[String]) {
        for zn in zns {
            let Some(claim) = self.pending_claims.remove(zn) else {
                continue;
            };
            if self
                .agents
                .get(&claim.agent)
                .is_none_or(|l| l.conn_id != claim.conn_id)
            {
                continue;
            }
            tracing::info!(
                agent = claim.agent,
                kkt = zn,
                "the register's previous agent let it go; applying the waiting claim"
            );
            let report = crate::store::Report::Attached(claim.attached);
            if let Err(mpsc::error::TrySendError::Full(report)) = claim.reports.try_send(report) {
                let reports = claim.reports;
                tokio::spawn(async move { reports.send(report).await });
            }
        }
    }

    fn add_in_flight(&mut self, kkt: &str, job: &str) {
        self.in_flight
            .entry(kkt.to_owned())
            .or_default()
            .insert(job.to_owned());
    }

    fn remove_in_flight(&mut self, kkt: &str, job: &str) {
        if let Some(set) = self.in_flight.get_mut(kkt) {
            set.remove(job);
            if set.is_empty() {
                self.in_flight.remove(kkt);
            }
        }
    }
}

/// Events are for observers; the channel keeps this many before a slow subscriber lags.
const EVENT_CAPACITY: usize = 4096;

impl Tunnel<Store> {
    /// Opens the CA and the store in `config.data_dir` (creating them at first start) and starts
    /// accepting agents on `config.listen`.
    pub async fn start(config: TunnelConfig) -> Result<Tunnel, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let ca = Arc::new(Ca::open_or_create(&config.data_dir)?);
        let store = Store::open(&config.data_dir.join(STORE_FILE))?;
        Self::start_with(config, ca, store).await
    }
}

impl<S: FleetStore> Tunnel<S> {
    /// Starts on an already opened CA and store.
    pub async fn start_with(
        config: TunnelConfig,
        ca: Arc<Ca>,
        store: S,
    ) -> Result<Tunnel<S>, StartError> {
        let server = tls::server_config(&ca, &config.server_names)?;
        let endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut live = Live::default();
        for (_, job, kkt) in store.in_flight()? {
            live.add_in_flight(&kkt, &job);
        }
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let inner = Arc::new(Inner {
            controller_id: store.controller_id()?,
            store,
            ca,
            config,
            endpoint,
            local_addr,
            events,
            live: Mutex::new(live),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
        });
        tokio::spawn(conn::accept_loop(inner.clone()));
        info!(addr = %local_addr, "tunnel listening for agents");
        Ok(Tunnel { inner })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    pub fn store(&self) -> &S {
        &self.inner.store
    }

    pub fn ca(&self) -> &Arc<Ca> {
        &self.inner.ca
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.inner.config
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TunnelEvent> {
        self.inner.events.subscribe()
    }

    /// Registers online now, with their last state and load.
    pub fn online_kkts(&self) -> Vec<KktInfo> {
        let live = self.inner.live();
        let mut out: Vec<KktInfo> = live
            .kkts
            .iter()
            .map(|(zn, k)| KktInfo {
                zn: zn.clone(),
                agent: k.agent.clone(),
                attached: k.attached.clone(),
                state: k.state.clone(),
                in_flight: live.in_flight.get(zn).map_or(0, |s| s.len()),
                online_since_ms: k.since_ms,
            })
            .collect();
        out.sort_by(|a, b| a.zn.cmp(&b.zn));
        out
    }

    /// One register, if it is online now.
    pub fn online_kkt(&self, zn: &str) -> Option<KktInfo> {
        let live = self.inner.live();
        live.kkts.get(zn).map(|k| KktInfo {
            zn: zn.to_owned(),
            agent: k.agent.clone(),
            attached: k.attached.clone(),
            state: k.state.clone(),
            in_flight: live.in_flight.get(zn).map_or(0, |s| s.len()),
            online_since_ms: k.since_ms,
        })
    }

    /// Agents connected now, with their health.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let live = self.inner.live();
        let mut out: Vec<AgentInfo> = live
            .agents
            .iter()
            .map(|(id, a)| {
                let mut kkts: Vec<String> = live
                    .kkts
                    .iter()
                    .filter(|(_, k)| k.conn_id == a.conn_id)
                    .map(|(zn, _)| zn.clone())
                    .collect();
                kkts.sort();
                AgentInfo {
                    id: id.clone(),
                    name: a.name.clone(),
                    software: a.software.clone(),
                    remote: a.remote,
                    connected_at_ms: a.connected_at_ms,
                    health: a.health.clone(),
                    rtt: a.rtt,
                    kkts,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.inner.store.job(id)
    }

    /// Jobs held by an agent that has not reported for `older_than`: possibly fiscalized, an
    /// operator must look (DESIGN.md §3).
    pub fn jobs_in_doubt(&self, older_than: Duration) -> Result<Vec<Job>, StoreError> {
        let ms = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
        self.inner.store.jobs_in_doubt(ms, unix_ms())
    }

    pub fn anomalies(&self) -> Result<Vec<Anomaly>, StoreError> {
        self.inner.store.anomalies()
    }

    /// Gives job `job` to register `kkt`: creates the job or re-assigns a queued one, records the
    /// assignment durably, then sends the dispatch to the register's agent.
    pub async fn dispatch(
        &self,
        job: &str,
        kkt: &str,
        work: Work,
    ) -> Result<Dispatch, DispatchError> {
        let inner = &self.inner;
        let (agent, tx, conn) = {
            let live = inner.live();
            let online = live
                .kkts
                .get(kkt)
                .ok_or_else(|| DispatchError::KktOffline(kkt.to_owned()))?;
            let link = live
                .agents
                .get(&online.agent)
                .filter(|l| l.conn_id == online.conn_id)
                .ok_or_else(|| DispatchError::KktOffline(kkt.to_owned()))?;
            (online.agent.clone(), link.tx.clone(), link.conn.clone())
        };
        // Refuse before recording anything if the frame could never be sent.
        let probe = ControllerMessage::Dispatch(Dispatch {
            job: job.to_owned(),
            attempt: u32::MAX,
            kkt: kkt.to_owned(),
            work: work.clone(),
        });
        if encode_frame(&probe).is_err() {
            return Err(DispatchError::TooLarge(job.to_owned()));
        }
        let assigned = inner
            .store
            .assign(job, work.clone(), &agent, kkt, unix_ms())
            .await??;
        let dispatch = Dispatch {
            job: job.to_owned(),
            attempt: assigned.attempt,
            kkt: kkt.to_owned(),
            work: assigned.work.clone(),
        };
        inner.live().add_in_flight(kkt, job);
        // The connection was closed (superseded, lost) after we looked it up: the frame cannot
        // leave, and a reconciliation that ran before our commit could not see this assignment.
        let sent = conn.close_reason().is_none()
            && tx
                .send(ControllerMessage::Dispatch(dispatch.clone()))
                .await
                .is_ok();
        if !sent {
            inner.live().remove_in_flight(kkt, job);
            inner
                .store
                .undeliverable(job, &agent, assigned.attempt, unix_ms())
                .await?;
            warn!(
                agent,
                kkt, job, "dispatch undeliverable, job back in the queue"
            );
            return Err(DispatchError::AgentGone {
                job: job.to_owned(),
                kkt: kkt.to_owned(),
            });
        }
        info!(
            agent,
            kkt,
            job,
            attempt = assigned.attempt,
            "job dispatched"
        );
        inner.emit(TunnelEvent::JobDispatched {
            job: job.to_owned(),
            agent,
            kkt: kkt.to_owned(),
            attempt: assigned.attempt,
        });
        Ok(dispatch)
    }

    /// Runs a register command (status queries, shift and registration operations) and waits
    /// for its answer. Receipts are refused here: they must go through [`Tunnel::dispatch`], which
    /// is the only path with exactly-once guarantees.
    pub async fn command(
        &self,
        kkt: &str,
        call: Call,
        timeout: Duration,
    ) -> Result<Reply, CommandError> {
        if matches!(call, Call::Receipt(_) | Call::Correction(_)) {
            return Err(CommandError::UseJob(call.method()));
        }
        let method = call.method();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        let tx = {
            let mut live = self.inner.live();
            let Some(agent) = live.kkts.get(kkt).map(|k| k.agent.clone()) else {
                return Err(CommandError::KktOffline(kkt.to_owned()));
            };
            let Some(link) = live.agents.get_mut(&agent) else {
                return Err(CommandError::KktOffline(kkt.to_owned()));
            };
            link.waiters.insert(id, done);
            link.tx.clone()
        };
        let msg = ControllerMessage::Command {
            id,
            kkt: kkt.to_owned(),
            call,
        };
        if tx.send(msg).await.is_err() {
            return Err(CommandError::Disconnected(kkt.to_owned()));
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(outcome)) => Ok(outcome?),
            Ok(Err(_)) => Err(CommandError::Disconnected(kkt.to_owned())),
            Err(_) => {
                let mut live = self.inner.live();
                for link in live.agents.values_mut() {
                    link.waiters.remove(&id);
                }
                Err(CommandError::Timeout {
                    kkt: kkt.to_owned(),
                    method,
                    timeout,
                })
            }
        }
    }

    /// Pushes settings (the OFD to use) to a register through its agent.
    pub async fn push_settings(
        &self,
        kkt: &str,
        settings: protocol::tunnel::KktSettings,
    ) -> Result<(), CommandError> {
        let tx = {
            let live = self.inner.live();
            live.kkts
                .get(kkt)
                .and_then(|k| live.agents.get(&k.agent).filter(|l| l.conn_id == k.conn_id))
                .map(|l| l.tx.clone())
                .ok_or_else(|| CommandError::KktOffline(kkt.to_owned()))?
        };
        tx.send(ControllerMessage::Settings {
            kkt: kkt.to_owned(),
            settings,
        })
        .await
        .map_err(|_| CommandError::Disconnected(kkt.to_owned()))
    }

    /// Revokes an agent: its certificates stop opening tunnels and its live connection is
    /// closed. Jobs it holds stay in doubt for an operator (they may have been fiscalized).
    pub async fn revoke_agent(&self, agent: &str) -> Result<bool, StoreError> {
        let known = self.inner.store.revoke_agent(agent).await?;
        let conn = self.inner.live().agents.get(agent).map(|l| l.conn.clone());
        if let Some(conn) = conn {
            conn::reject(
                &self.inner,
                &conn,
                Some(agent),
                conn::close_code::UNAUTHORIZED,
                "the agent was revoked by an operator",
            );
        }
        if known {
            warn!(agent, "agent revoked");
        }
        Ok(known)
    }

    /// Stops accepting agents, closes their connections and waits until every write already
    /// queued in the store is durable. Agents resend whatever was not acknowledged.
    pub async fn shutdown(&self) {
        self.inner
            .endpoint
            .close(conn::close_code::SHUTDOWN, b"controller shutting down");
        if let Err(e) = self.inner.store.flush().await {
            warn!(error = %e, "store flush at shutdown failed");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
        info!("tunnel stopped");
    }
}

impl<S> Inner<S> {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: TunnelEvent) {
        // No subscribers is fine.
        let _ = self.events.send(event);
    }

    fn micros(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}
