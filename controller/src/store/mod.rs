//! The controller's durable state in redb (`<data>/controller.redb`).
//!
//! # What is durable when
//! * Every operation below is **one transaction**: it reads what it needs, decides with the pure
//!   rules of [`crate::rules`], and writes the outcome. Its future resolves only after the commit
//!   holding it is durable (fsync). The tunnel relies on this ordering:
//!   - an assignment is durable before its `Dispatch` frame is sent;
//!   - an agent's reports (outbox entries, accepted, refused, register state) and the advance of
//!     its `applied_upto` are durable together before the `Ack` is sent, so an acknowledged entry
//!     is never lost and a replayed one is recognised by its sequence number or its job id;
//!   - a token is marked used in the same transaction that registers the agent it enrolled.
//! * Nothing is cached across operations except in the caller's memory; a restart reads the same
//!   records back.
//!
//! # Group commit
//! redb admits one writer and a durable commit costs an fsync (≈ 4 ms here). All writes go
//! through one writer thread that takes every operation waiting in its queue and commits them
//! together (at most [`MAX_BATCH`]); each caller learns its own result once that commit is
//! durable. An operation that fails with a storage error fails its whole batch (its neighbours'
//! callers retry or disconnect; agents resend): a partial batch would make "acknowledged after
//! commit" depend on what else was queued. Domain refusals (job not queued, token used) are not
//! errors: an operation decides before it writes and returns the refusal as its value.
//!
//! # Layout
//! Values are postcard with a leading format byte ([`FORMAT`]) so that a later layout can be told
//! apart. Tables: `meta`, `enroll_tokens` (SHA-256 of the secret → [`TokenRecord`]), `agents`
//! (id → [`AgentRecord`]), `agent_certs` (certificate SHA-256 → agent id), `kkts` (ZN →
//! [`KktRecord`]), `jobs` (id → [`Job`]), `in_flight` ((agent, job) → ZN; exactly the jobs
//! assigned or accepted, kept in the transaction that changes the job) and `anomalies`.
//!
//! # Scale-out
//! Each public operation maps onto one SQL transaction over the same tables, so a PostgreSQL
//! backend can offer the same methods (DESIGN.md §8); nothing here depends on being the only
//! controller except the group-commit thread itself. The rest of the controller sees the store
//! only through [`Ledger`] (shop-facing) and [`FleetStore`] (tunnel and dispatcher).

mod fleet;
mod ledger;
pub use fleet::FleetStore;
pub use ledger::*;

use crate::rules::{
    self as rules, check_seq, check_token, AssignRefusal, Decision, Job, JobEvent, SeqCheck,
    TokenRecord, TokenRefusal, TokenUse,
};
use protocol::kkt::{Event, FiscalResult, KktError, OfdAckEvent};
use protocol::tunnel::{Attached, JobId, KktState, OutboxBody, OutboxEntry, Work};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("enroll_tokens");
pub const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
pub const AGENT_CERTS: TableDefinition<&[u8], &str> = TableDefinition::new("agent_certs");
pub const KKTS: TableDefinition<&str, &[u8]> = TableDefinition::new("kkts");
pub const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
pub const IN_FLIGHT: TableDefinition<(&str, &str), &str> = TableDefinition::new("in_flight");
pub const ANOMALIES: TableDefinition<u64, &[u8]> = TableDefinition::new("anomalies");
/// (INN, order) → job id: exactly the queued jobs that have a queue place (see [`JobTables`]).
pub const QUEUE: TableDefinition<(&str, u64), &str> = TableDefinition::new("queue");

/// Leading byte of every stored value.
pub const FORMAT: u8 = 1;

const ADMIN_HASH_KEY: &str = "admin_secret_sha256";
const CONTROLLER_ID_KEY: &str = "controller_id";

/// At most this many operations share one transaction, so one commit never holds a caller much
/// longer than its own write needs.
pub const MAX_BATCH: usize = 4096;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}; is another controller running on this --data directory?")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("storage error: {0}")]
    Redb(#[from] redb::Error),
    #[error("stored record is unreadable ({0}); the data directory may be damaged")]
    Corrupt(String),
    #[error("the commit failed: {0}")]
    Commit(String),
    #[error("the store's writer has stopped (the controller is shutting down)")]
    Closed,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT];
    postcard::to_io(v, &mut out).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            postcard::from_bytes(rest).map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "record format {v}, this controller reads {FORMAT}; run the controller version that wrote it"
        ))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub enrolled_at: u64,
    /// Fingerprint and expiry (Unix seconds) of the newest certificate issued to it.
    pub cert_fingerprint: [u8; 32],
    pub cert_not_after: u64,
    pub revoked: bool,
    /// The agent's store epoch as of its last hello (None before the first).
    pub store_epoch: Option<u64>,
    /// Highest outbox sequence of `store_epoch` applied here.
    pub applied_upto: u64,
    pub last_seen: u64,
}

/// A register as last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KktRecord {
    pub zn: String,
    pub agent: String,
    pub attached: Attached,
    pub state: Option<KktState>,
    pub last_ofd_ack: Option<OfdAckEvent>,
    pub attached_at: u64,
    pub detached_at: Option<u64>,
    pub updated_at: u64,
}

/// Something an operator must look at: the system's promises did not hold somewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    pub id: u64,
    pub at: u64,
    pub agent: String,
    pub job: JobId,
    pub kind: AnomalyKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnomalyKind {
    /// A second, different document for a job already completed: a duplicate fiscalization.
    DuplicateFiscalization {
        existing: FiscalResult,
        incoming: FiscalResult,
        kkt: String,
        attempt: u32,
    },
    /// A result for a job this controller does not know (store restored from a backup?).
    UnknownJobCompleted {
        kkt: String,
        attempt: u32,
        result: FiscalResult,
    },
}

/// An agent's report, applied in arrival order in one transaction with its neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Accepted {
        job: JobId,
        attempt: u32,
    },
    Refused {
        job: JobId,
        attempt: u32,
        reason: String,
    },
    Outbox(OutboxEntry),
    Attached(Attached),
    Detached {
        kkt: String,
    },
    Status(Box<KktState>),
}

/// What applying reports changed; the tunnel turns these into events after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    JobAccepted {
        job: JobId,
        kkt: String,
        attempt: u32,
    },
    JobRefused {
        job: JobId,
        kkt: String,
        attempt: u32,
        reason: String,
    },
    JobCompleted {
        job: JobId,
        kkt: String,
        attempt: u32,
        result: Box<FiscalResult>,
        /// The job was held by this (agent, kkt) before; for the in-memory in-flight view.
        held_by: Option<(String, String)>,
    },
    JobNotFiscalized {
        job: JobId,
        kkt: String,
        attempt: u32,
        error: KktError,
    },
    AnomalyRecorded {
        id: u64,
        job: JobId,
    },
    KktAttached(Box<Attached>),
    KktDetached {
        kkt: String,
    },
    KktStatus(Box<KktState>),
    KktEvent {
        kkt: String,
        event: Box<Event>,
    },
    /// The OFD acknowledged these receipts' documents.
    ReceiptsConfirmed(Vec<JobId>),
}

/// Outcome of [`Store::apply_reports`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    pub effects: Vec<Effect>,
    /// The agent's applied position after the batch.
    pub applied_upto: u64,
    /// The batch held outbox entries, so an `Ack` is owed.
    pub ack_owed: bool,
}

/// Outcome of [`Store::agent_hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOutcome {
    pub applied_upto: u64,
    /// Jobs released back to the queue: (job, kkt, attempt).
    pub released: Vec<(JobId, String, u32)>,
    /// Jobs this agent still holds by our records: (job, kkt).
    pub held: Vec<(JobId, String)>,
    pub warning: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AssignError {
    #[error(transparent)]
    Refused(#[from] AssignRefusal),
    #[error("job {0} exists with different work; a job id names one document")]
    WorkMismatch(JobId),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AgentLookup {
    #[error("the certificate was not issued to an enrolled agent; enroll again with a new token")]
    Unknown,
    #[error("agent {0} is revoked; enroll again with a new token if it should come back")]
    Revoked(String),
}

type WriteFn = Box<dyn FnOnce(&WriteTransaction) -> Result<(), StoreError> + Send>;

enum Msg {
    Write {
        write: WriteFn,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// The controller's store: a redb database with a group-commit writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    tx: mpsc::UnboundedSender<Msg>,
    /// Notified after a commit that owed callbacks the sender would otherwise find only on its
    /// next idle look (see `callbacks`).
    callbacks_owed: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) `path` and its tables, and starts the writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let db = Arc::new(db);
        {
            let txn = db.begin_write()?;
            txn.open_table(META)?;
            txn.open_table(TOKENS)?;
            txn.open_table(AGENTS)?;
            txn.open_table(AGENT_CERTS)?;
            txn.open_table(KKTS)?;
            txn.open_table(JOBS)?;
            txn.open_table(IN_FLIGHT)?;
            txn.open_table(ANOMALIES)?;
            txn.open_table(QUEUE)?;
            ledger::create_tables(&txn)?;
            {
                let mut meta = txn.open_table(META)?;
                if meta.get(CONTROLLER_ID_KEY)?.is_none() {
                    let mut id = [0u8; 8];
                    rand::fill(&mut id);
                    let id = format!("ctl-{}", protocol::tunnel::hex(&id));
                    meta.insert(CONTROLLER_ID_KEY, id.as_bytes())?;
                }
            }
            txn.commit()?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("controller-store".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(|e| StoreError::Commit(format!("cannot start the writer thread: {e}")))?;
        Ok(Store {
            db,
            tx,
            callbacks_owed: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Runs `op` in the next group commit; returns its value once that commit is durable.
    async fn transact<T: Send + 'static>(
        &self,
        op: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let (done, rx) = oneshot::channel();
        let write: WriteFn = Box::new(move |txn| {
            let v = op(txn)?;
            *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            Ok(())
        });
        self.tx
            .send(Msg::Write { write, done })
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(())) => slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or(StoreError::Closed),
            Ok(Err(e)) => Err(StoreError::Commit(e)),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Wakes the callback sender; notified when a receipt fails and owes a callback (the
    /// server also notifies it on confirmations).
    pub fn callbacks_owed(&self) -> Arc<tokio::sync::Notify> {
        self.callbacks_owed.clone()
    }

    /// Resolves once every write queued before it is durable (shutdown uses it).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.transact(|_| Ok(())).await
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }

    // ---- meta ------------------------------------------------------------------------------

    pub fn controller_id(&self) -> Result<String, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(META)?;
        let id = t
            .get(CONTROLLER_ID_KEY)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        id.ok_or_else(|| StoreError::Corrupt("controller id missing".into()))
    }

    pub fn admin_hash(&self) -> Result<Option<[u8; 32]>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(META)?;
        let v = t.get(ADMIN_HASH_KEY)?;
        Ok(v.and_then(|v| v.value().try_into().ok()))
    }

    pub async fn set_admin_hash(&self, hash: [u8; 32]) -> Result<(), StoreError> {
        self.transact(move |txn| {
            txn.open_table(META)?
                .insert(ADMIN_HASH_KEY, hash.as_slice())?;
            Ok(())
        })
        .await
    }

    // ---- enrollment --------------------------------------------------------------------------

    /// Stores a new one-time token by the SHA-256 of its secret.
    pub async fn create_token(
        &self,
        hash: [u8; 32],
        record: TokenRecord,
    ) -> Result<(), StoreError> {
        let value = encode(&record)?;
        self.transact(move |txn| {
            txn.open_table(TOKENS)?
                .insert(hash.as_slice(), value.as_slice())?;
            Ok(())
        })
        .await
    }

    /// A read-only look at a token (to refuse early, before signing anything).
    pub fn check_token(&self, hash: &[u8; 32], now_ms: u64) -> Result<(), TokenLookup> {
        let txn = self.read()?;
        let t = txn.open_table(TOKENS)?;
        let record = match t.get(hash.as_slice())? {
            Some(v) => Some(decode::<TokenRecord>(v.value())?),
            None => None,
        };
        check_token(record.as_ref(), now_ms).map_err(TokenLookup::Refused)
    }

    /// Enrolls `agent` with the token whose secret hashes to `token_hash`: checks the token, marks
    /// it used and registers the agent and its certificate, all in one transaction.
    pub async fn enroll(
        &self,
        token_hash: [u8; 32],
        agent: AgentRecord,
        now_ms: u64,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        self.transact(move |txn| {
            let mut tokens = txn.open_table(TOKENS)?;
            let record = match tokens.get(token_hash.as_slice())? {
                Some(v) => Some(decode::<TokenRecord>(v.value())?),
                None => None,
            };
            if let Err(refusal) = check_token(record.as_ref(), now_ms) {
                return Ok(Err(refusal));
            }
            let Some(mut record) = record else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            record.used = Some(TokenUse {
                at: now_ms,
                agent: agent.id.clone(),
            });
            tokens.insert(token_hash.as_slice(), encode(&record)?.as_slice())?;
            txn.open_table(AGENTS)?
                .insert(agent.id.as_str(), encode(&agent)?.as_slice())?;
            txn.open_table(AGENT_CERTS)?
                .insert(agent.cert_fingerprint.as_slice(), agent.id.as_str())?;
            Ok(Ok(()))
        })
        .await
    }

    /// Records a renewed certificate; the previous ones stay valid until they expire, so an agent
    /// that has not yet switched keeps its link.
    pub async fn add_certificate(
        &self,
        agent: &str,
        fingerprint: [u8; 32],
        not_after: u64,
    ) -> Result<(), StoreError> {
        let agent = agent.to_owned();
        self.transact(move |txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut record: AgentRecord = match agents.get(agent.as_str())? {
                Some(v) => decode(v.value())?,
                None => return Err(StoreError::Corrupt(format!("agent {agent} vanished"))),
            };
            record.cert_fingerprint = fingerprint;
            record.cert_not_after = not_after;
            agents.insert(agent.as_str(), encode(&record)?.as_slice())?;
            txn.open_table(AGENT_CERTS)?
                .insert(fingerprint.as_slice(), agent.as_str())?;
            Ok(())
        })
        .await
    }

    /// Marks an agent revoked: its certificates no longer open a tunnel.
    pub async fn revoke_agent(&self, agent: &str) -> Result<bool, StoreError> {
        let agent = agent.to_owned();
        self.transact(move |txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut record: AgentRecord = match agents.get(agent.as_str())? {
                Some(v) => decode(v.value())?,
                None => return Ok(false),
            };
            record.revoked = true;
            agents.insert(agent.as_str(), encode(&record)?.as_slice())?;
            Ok(true)
        })
        .await
    }

    /// The enrolled, not revoked agent a client certificate belongs to.
    pub fn agent_by_certificate(
        &self,
        fingerprint: &[u8; 32],
    ) -> Result<Result<AgentRecord, AgentLookup>, StoreError> {
        let txn = self.read()?;
        let certs = txn.open_table(AGENT_CERTS)?;
        let Some(id) = certs.get(fingerprint.as_slice())? else {
            return Ok(Err(AgentLookup::Unknown));
        };
        let agents = txn.open_table(AGENTS)?;
        let Some(v) = agents.get(id.value())? else {
            return Ok(Err(AgentLookup::Unknown));
        };
        let record: AgentRecord = decode(v.value())?;
        if record.revoked {
            return Ok(Err(AgentLookup::Revoked(record.id)));
        }
        Ok(Ok(record))
    }

    /// One record of a table keyed by name.
    fn record<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(table)?;
        let v = t.get(key)?;
        v.map(|v| decode(v.value())).transpose()
    }

    /// Every record of a table, in key order.
    fn records<K: redb::Key + 'static, T: DeserializeOwned>(
        &self,
        table: TableDefinition<K, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.record(AGENTS, id)
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.records(AGENTS)
    }

    // ---- the tunnel's operations -------------------------------------------------------------

    /// An agent said hello: record its store epoch and reconcile. Every job assigned or accepted
    /// to it that is not in `held_jobs` is released to the queue (it never got it); this and
    /// `NotFiscalized` are the only ways a job leaves an agent without a result.
    pub async fn agent_hello(
        &self,
        agent: &str,
        store_epoch: u64,
        last_seq: u64,
        held_jobs: HashSet<JobId>,
        now_ms: u64,
    ) -> Result<HelloOutcome, StoreError> {
        let agent = agent.to_owned();
        self.transact(move |txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut record: AgentRecord = match agents.get(agent.as_str())? {
                Some(v) => decode(v.value())?,
                None => return Err(StoreError::Corrupt(format!("agent {agent} vanished"))),
            };
            let epoch = rules::reconcile_epoch(
                record.store_epoch,
                record.applied_upto,
                store_epoch,
                last_seq,
            );
            record.store_epoch = Some(store_epoch);
            record.applied_upto = epoch.applied_upto;
            record.last_seen = now_ms;
            agents.insert(agent.as_str(), encode(&record)?.as_slice())?;
            drop(agents);

            let mut released = Vec::new();
            let mut held = Vec::new();
            let mine = in_flight_of(txn, &agent)?;
            let mut jt = JobTables::open(txn)?;
            for (job_id, kkt) in mine {
                if held_jobs.contains(&job_id) {
                    held.push((job_id, kkt));
                    continue;
                }
                let Some(job) = jt.get(&job_id)? else {
                    jt.in_flight.remove((agent.as_str(), job_id.as_str()))?;
                    continue;
                };
                if let Decision::Apply(next) = rules::apply(
                    &job,
                    JobEvent::Release {
                        agent: agent.clone(),
                    },
                    now_ms,
                ) {
                    released.push((job_id.clone(), kkt, job.attempt));
                    jt.put(&job, &next)?;
                }
            }
            Ok(HelloOutcome {
                applied_upto: epoch.applied_upto,
                released,
                held,
                warning: epoch.warning,
            })
        })
        .await
    }

    /// Gives job `job_id` to `kkt` behind `agent`: creates the job if it is new, or re-assigns a
    /// queued one. Durable before it returns, so the caller may send the dispatch.
    pub async fn assign(
        &self,
        job_id: &str,
        work: Work,
        agent: &str,
        kkt: &str,
        now_ms: u64,
    ) -> Result<Result<Job, AssignError>, StoreError> {
        let (job_id, agent, kkt) = (job_id.to_owned(), agent.to_owned(), kkt.to_owned());
        self.transact(move |txn| {
            let mut jt = JobTables::open(txn)?;
            let job = match jt.get(&job_id)? {
                Some(j) if j.work != work => return Ok(Err(AssignError::WorkMismatch(job_id))),
                Some(j) => j,
                None => Job::new(job_id.clone(), work, now_ms),
            };
            match rules::apply(&job, JobEvent::Assign { agent, kkt }, now_ms) {
                Decision::Apply(next) => {
                    jt.put(&job, &next)?;
                    Ok(Ok(*next))
                }
                Decision::Refuse(r) => Ok(Err(r.into())),
                other => Err(StoreError::Corrupt(format!(
                    "assignment of {job_id} decided {other:?}"
                ))),
            }
        })
        .await
    }

    /// The dispatch never left (the connection was already gone): put the job back in the queue.
    pub async fn undeliverable(
        &self,
        job_id: &str,
        agent: &str,
        attempt: u32,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let (job_id, agent) = (job_id.to_owned(), agent.to_owned());
        self.transact(move |txn| {
            let mut jt = JobTables::open(txn)?;
            let Some(job) = jt.get(&job_id)? else {
                return Ok(false);
            };
            match rules::apply(&job, JobEvent::Undeliverable { agent, attempt }, now_ms) {
                Decision::Apply(next) => {
                    jt.put(&job, &next)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
    }

    /// Applies an agent's reports in order, in one transaction that also advances its
    /// `applied_upto`. Entries at or below `applied_upto` are replays and skipped; results are
    /// further deduplicated by job id (see [`crate::rules`]).
    pub async fn apply_reports(
        &self,
        agent: &str,
        reports: Vec<Report>,
        now_ms: u64,
    ) -> Result<Applied, StoreError> {
        let agent = agent.to_owned();
        self.transact(move |txn| apply_reports(txn, &agent, reports, now_ms))
            .await
    }

    // ---- reads ---------------------------------------------------------------------------------

    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(JOBS)?;
        get_job(&t, id)
    }

    /// Jobs assigned or accepted whose last change is older than `older_than_ms`: the agent that
    /// holds them has not reported. An operator decides (they may have been fiscalized).
    pub fn jobs_in_doubt(&self, older_than_ms: u64, now_ms: u64) -> Result<Vec<Job>, StoreError> {
        let txn = self.read()?;
        let index = txn.open_table(IN_FLIGHT)?;
        let jobs = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in index.iter()? {
            let (k, _) = row?;
            let (_, job_id) = k.value();
            if let Some(job) = get_job(&jobs, job_id)? {
                if job.state.in_flight() && now_ms.saturating_sub(job.updated_at) >= older_than_ms {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    /// Every job in flight: (agent, job, kkt).
    pub fn in_flight(&self) -> Result<Vec<(String, JobId, String)>, StoreError> {
        let txn = self.read()?;
        let index = txn.open_table(IN_FLIGHT)?;
        let mut out = Vec::new();
        for row in index.iter()? {
            let (k, v) = row?;
            let (agent, job) = k.value();
            out.push((agent.to_owned(), job.to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }

    pub fn kkt(&self, zn: &str) -> Result<Option<KktRecord>, StoreError> {
        self.record(KKTS, zn)
    }

    pub fn kkts(&self) -> Result<Vec<KktRecord>, StoreError> {
        self.records(KKTS)
    }

    pub fn anomalies(&self) -> Result<Vec<Anomaly>, StoreError> {
        self.records(ANOMALIES)
    }
}

/// Why a token lookup did not admit.
#[derive(Debug, Error)]
pub enum TokenLookup {
    #[error(transparent)]
    Refused(TokenRefusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<redb::TransactionError> for TokenLookup {
    fn from(e: redb::TransactionError) -> Self {
        TokenLookup::Store(e.into())
    }
}
impl From<redb::TableError> for TokenLookup {
    fn from(e: redb::TableError) -> Self {
        TokenLookup::Store(e.into())
    }
}
impl From<redb::StorageError> for TokenLookup {
    fn from(e: redb::StorageError) -> Self {
        TokenLookup::Store(e.into())
    }
}

fn get_job(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<Job>, StoreError> {
    let v = t.get(id)?;
    v.map(|v| decode(v.value())).transpose()
}

/// The job table with its two indexes, open in one write transaction. Every change of a job goes
/// through [`JobTables::put`], which keeps the indexes equal to what they index:
/// `in_flight` = exactly the jobs assigned or accepted, `queue` = exactly the queued jobs that
/// have a queue place.
pub(crate) struct JobTables<'t> {
    pub(crate) jobs: redb::Table<'t, &'static str, &'static [u8]>,
    in_flight: redb::Table<'t, (&'static str, &'static str), &'static str>,
    queue: redb::Table<'t, (&'static str, u64), &'static str>,
}

impl<'t> JobTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(JobTables {
            jobs: txn.open_table(JOBS)?,
            in_flight: txn.open_table(IN_FLIGHT)?,
            queue: txn.open_table(QUEUE)?,
        })
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        get_job(&self.jobs, id)
    }

    /// Writes `next` over `prev` (`prev` is `next` itself for a new job with no indexes yet:
    /// pass the same record and nothing is removed twice).
    pub(crate) fn put(&mut self, prev: &Job, next: &Job) -> Result<(), StoreError> {
        if let Some((agent, _, _)) = prev.state.holder() {
            self.in_flight.remove((agent, prev.id.as_str()))?;
        }
        if let Some(place) = prev.waiting_in() {
            self.queue.remove((place.inn.as_str(), place.order))?;
        }
        if let Some((agent, kkt, _)) = next.state.holder() {
            self.in_flight.insert((agent, next.id.as_str()), kkt)?;
        }
        if let Some(place) = next.waiting_in() {
            self.queue
                .insert((place.inn.as_str(), place.order), next.id.as_str())?;
        }
        self.jobs
            .insert(next.id.as_str(), encode(next)?.as_slice())?;
        Ok(())
    }
}

fn in_flight_of(txn: &WriteTransaction, agent: &str) -> Result<Vec<(JobId, String)>, StoreError> {
    let index = txn.open_table(IN_FLIGHT)?;
    let mut out = Vec::new();
    for row in index.range((agent, "")..)? {
        let (k, v) = row?;
        let (a, job) = k.value();
        if a != agent {
            break;
        }
        out.push((job.to_owned(), v.value().to_owned()));
    }
    Ok(out)
}

fn next_anomaly_id(t: &redb::Table<u64, &'static [u8]>) -> Result<u64, StoreError> {
    Ok(t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1))
}

fn apply_reports(
    txn: &WriteTransaction,
    agent: &str,
    reports: Vec<Report>,
    now_ms: u64,
) -> Result<Applied, StoreError> {
    let mut agents = txn.open_table(AGENTS)?;
    let mut record: AgentRecord = match agents.get(agent)? {
        Some(v) => decode(v.value())?,
        None => return Err(StoreError::Corrupt(format!("agent {agent} vanished"))),
    };
    let mut jt = JobTables::open(txn)?;
    let mut kkts = txn.open_table(KKTS)?;
    let mut anomalies = txn.open_table(ANOMALIES)?;
    let mut out = Applied::default();

    for report in reports {
        match report {
            Report::Accepted { job, attempt } => {
                let Some(current) = jt.get(&job)? else {
                    warn!(agent, job, "accepted for an unknown job; ignored");
                    continue;
                };
                let event = JobEvent::Accepted {
                    agent: agent.to_owned(),
                    attempt,
                };
                match rules::apply(&current, event, now_ms) {
                    Decision::Apply(next) => {
                        jt.put(&current, &next)?;
                        let kkt = next
                            .state
                            .holder()
                            .map(|(_, k, _)| k.to_owned())
                            .unwrap_or_default();
                        out.effects.push(Effect::JobAccepted { job, kkt, attempt });
                    }
                    Decision::Ignore(why) => warn!(agent, job, attempt, why, "accepted ignored"),
                    _ => {}
                }
            }
            Report::Refused {
                job,
                attempt,
                reason,
            } => {
                let Some(current) = jt.get(&job)? else {
                    warn!(agent, job, "refused for an unknown job; ignored");
                    continue;
                };
                let event = JobEvent::Refused {
                    agent: agent.to_owned(),
                    attempt,
                    reason: reason.clone(),
                };
                match rules::apply(&current, event, now_ms) {
                    Decision::Apply(next) => {
                        let kkt = current
                            .state
                            .holder()
                            .map(|(_, k, _)| k.to_owned())
                            .unwrap_or_default();
                        jt.put(&current, &next)?;
                        out.effects.push(Effect::JobRefused {
                            job,
                            kkt,
                            attempt,
                            reason,
                        });
                    }
                    Decision::Ignore(why) => warn!(agent, job, attempt, why, "refusal ignored"),
                    _ => {}
                }
            }
            Report::Outbox(entry) => {
                out.ack_owed = true;
                match check_seq(record.applied_upto, entry.seq) {
                    SeqCheck::Replay => continue,
                    SeqCheck::Next => {}
                    SeqCheck::Gap {
                        missing_from,
                        missing_to,
                    } => warn!(
                        agent,
                        missing_from, missing_to, "outbox entries missing from the sequence"
                    ),
                }
                record.applied_upto = entry.seq;
                apply_outbox_body(
                    txn,
                    agent,
                    entry.body,
                    now_ms,
                    &mut jt,
                    &mut kkts,
                    &mut anomalies,
                    &mut out,
                )?;
            }
            Report::Attached(attached) => {
                let zn = attached.hello.zn.clone();
                let prev: Option<KktRecord> = kkts
                    .get(zn.as_str())?
                    .map(|v| decode(v.value()))
                    .transpose()?;
                if let Some(p) = &prev {
                    if p.agent != agent && p.detached_at.is_none() {
                        warn!(
                            agent,
                            kkt = zn,
                            previous_agent = p.agent,
                            "register moved to another agent"
                        );
                    }
                }
                let rec = KktRecord {
                    zn: zn.clone(),
                    agent: agent.to_owned(),
                    attached: attached.clone(),
                    state: prev.as_ref().and_then(|p| p.state.clone()),
                    last_ofd_ack: prev.and_then(|p| p.last_ofd_ack),
                    attached_at: now_ms,
                    detached_at: None,
                    updated_at: now_ms,
                };
                kkts.insert(zn.as_str(), encode(&rec)?.as_slice())?;
                out.effects.push(Effect::KktAttached(Box::new(attached)));
            }
            Report::Detached { kkt } => {
                if let Some(mut rec) = own_kkt(&kkts, agent, &kkt)? {
                    rec.detached_at = Some(now_ms);
                    rec.updated_at = now_ms;
                    kkts.insert(kkt.as_str(), encode(&rec)?.as_slice())?;
                    out.effects.push(Effect::KktDetached { kkt });
                }
            }
            Report::Status(state) => {
                if let Some(mut rec) = own_kkt(&kkts, agent, &state.kkt)? {
                    if let Some((fn_number, upto)) = ledger::delivered_upto(&state) {
                        let done = ledger::on_delivered(txn, &fn_number, upto, now_ms)?;
                        if !done.is_empty() {
                            out.effects.push(Effect::ReceiptsConfirmed(done));
                        }
                    }
                    rec.state = Some((*state).clone());
                    rec.updated_at = now_ms;
                    kkts.insert(state.kkt.as_str(), encode(&rec)?.as_slice())?;
                    out.effects.push(Effect::KktStatus(state));
                }
            }
        }
    }
    record.last_seen = now_ms;
    out.applied_upto = record.applied_upto;
    agents.insert(agent, encode(&record)?.as_slice())?;
    Ok(out)
}

/// The register record, if `agent` is the one it is attached to (tenant isolation: an agent
/// speaks only for its own registers).
fn own_kkt(
    kkts: &redb::Table<&'static str, &'static [u8]>,
    agent: &str,
    kkt: &str,
) -> Result<Option<KktRecord>, StoreError> {
    let rec: Option<KktRecord> = kkts.get(kkt)?.map(|v| decode(v.value())).transpose()?;
    match rec {
        Some(r) if r.agent == agent => Ok(Some(r)),
        Some(r) => {
            warn!(
                agent,
                kkt,
                owner = r.agent,
                "report about a register attached to another agent; ignored"
            );
            Ok(None)
        }
        None => {
            warn!(
                agent,
                kkt, "report about a register never attached; ignored"
            );
            Ok(None)
        }
    }
}

/// The last FD of `fn_number` that register record `rec` has proved delivered to the OFD: by its
/// last OFD acknowledgement or its last status (delivery is in FD order, so either covers every
/// earlier document).
fn delivered_on(rec: &KktRecord, fn_number: &str) -> Option<u32> {
    let by_ack = rec
        .last_ofd_ack
        .as_ref()
        .filter(|a| a.fn_number == fn_number)
        .map(|a| a.fd_number);
    let by_status = rec
        .state
        .as_ref()
        .and_then(ledger::delivered_upto)
        .filter(|(f, _)| f == fn_number)
        .map(|(_, upto)| upto);
    by_ack.max(by_status)
}

#[allow(clippy::too_many_arguments)]
fn apply_outbox_body(
    txn: &WriteTransaction,
    agent: &str,
    body: OutboxBody,
    now_ms: u64,
    jt: &mut JobTables<'_>,
    kkts: &mut redb::Table<&'static str, &'static [u8]>,
    anomalies: &mut redb::Table<u64, &'static [u8]>,
    out: &mut Applied,
) -> Result<(), StoreError> {
    match body {
        OutboxBody::Completed {
            job,
            attempt,
            kkt,
            result,
        } => {
            let Some(current) = jt.get(&job)? else {
                let id = next_anomaly_id(anomalies)?;
                error!(agent, job, kkt, "a result arrived for a job this controller does not know; recorded as an anomaly");
                let a = Anomaly {
                    id,
                    at: now_ms,
                    agent: agent.to_owned(),
                    job: job.clone(),
                    kind: AnomalyKind::UnknownJobCompleted {
                        kkt,
                        attempt,
                        result,
                    },
                };
                anomalies.insert(id, encode(&a)?.as_slice())?;
                out.effects.push(Effect::AnomalyRecorded { id, job });
                return Ok(());
            };
            // Tenant isolation (DESIGN.md §3.4): an agent speaks only for its own registers. A
            // result naming a register attached to another agent is applied only from the agent
            // holding the job (the register may have moved since it executed it); from anyone
            // else it would let one agent mark another's receipts fiscalized.
            // (Not the holder, or nobody holds it.)
            if current.state.holder().is_none_or(|(h, _, _)| h != agent) {
                let owner = kkts
                    .get(kkt.as_str())?
                    .map(|v| decode::<KktRecord>(v.value()))
                    .transpose()?
                    .map(|r| r.agent)
                    .filter(|owner| owner != agent);
                if let Some(owner) = owner {
                    error!(agent, job, kkt, owner, attempt, "a result for a register attached to another agent, for a job this agent does not hold; ignored");
                    return Ok(());
                }
            }
            if let Some((holder, _, n)) = current.state.holder() {
                if holder != agent || n != attempt {
                    warn!(agent, job, kkt, attempt, holder, held_attempt = n,
                        "completed by another agent or attempt than the one holding the job; the document exists, applying it");
                }
            }
            let event = JobEvent::Completed {
                agent: agent.to_owned(),
                kkt: kkt.clone(),
                attempt,
                result: result.clone(),
            };
            match rules::apply(&current, event, now_ms) {
                Decision::Apply(next) => {
                    jt.put(&current, &next)?;
                    ledger::on_completed(txn, &job, &result)?;
                    // The register may have proved this document delivered before its result
                    // got here: the OFD's acknowledgement overtakes the result on the way up
                    // (the agent journals the register's event and the executor's result
                    // concurrently), and after a recovery the result comes long after. An
                    // acknowledgement is cumulative and none may follow (the register's last
                    // document), so confirm it now, or it stays PROCESSED until a status probe.
                    let proven = kkts
                        .get(kkt.as_str())?
                        .map(|v| decode::<KktRecord>(v.value()))
                        .transpose()?
                        .and_then(|rec| delivered_on(&rec, &result.fn_number))
                        .filter(|upto| *upto >= result.fd_number);
                    let confirmed = match proven {
                        Some(upto) => ledger::on_delivered(txn, &result.fn_number, upto, now_ms)?,
                        None => Vec::new(),
                    };
                    info!(
                        agent,
                        job,
                        kkt,
                        attempt,
                        fd = result.fd_number,
                        "job completed"
                    );
                    out.effects.push(Effect::JobCompleted {
                        job,
                        kkt,
                        attempt,
                        result: Box::new(result),
                        held_by: current
                            .state
                            .holder()
                            .map(|(a, k, _)| (a.to_owned(), k.to_owned())),
                    });
                    if !confirmed.is_empty() {
                        out.effects.push(Effect::ReceiptsConfirmed(confirmed));
                    }
                }
                Decision::Duplicate => {}
                Decision::Anomaly { existing, incoming } => {
                    let id = next_anomaly_id(anomalies)?;
                    error!(
                        agent,
                        job,
                        kkt,
                        existing_fd = existing.fd_number,
                        existing_fn = existing.fn_number,
                        incoming_fd = incoming.fd_number,
                        incoming_fn = incoming.fn_number,
                        "DUPLICATE FISCALIZATION: a second document for a completed job; recorded, the first result is kept"
                    );
                    let a = Anomaly {
                        id,
                        at: now_ms,
                        agent: agent.to_owned(),
                        job: job.clone(),
                        kind: AnomalyKind::DuplicateFiscalization {
                            existing: *existing,
                            incoming: *incoming,
                            kkt,
                            attempt,
                        },
                    };
                    anomalies.insert(id, encode(&a)?.as_slice())?;
                    out.effects.push(Effect::AnomalyRecorded { id, job });
                }
                Decision::Ignore(why) => warn!(agent, job, why, "completed ignored"),
                Decision::Refuse(_) => {}
            }
        }
        OutboxBody::NotFiscalized {
            job,
            attempt,
            kkt,
            error,
        } => {
            let Some(current) = jt.get(&job)? else {
                warn!(agent, job, "not-fiscalized for an unknown job; ignored");
                return Ok(());
            };
            let event = JobEvent::NotFiscalized {
                agent: agent.to_owned(),
                kkt: kkt.clone(),
                attempt,
                error: error.clone(),
            };
            match rules::apply(&current, event, now_ms) {
                Decision::Apply(next) => {
                    jt.put(&current, &next)?;
                    info!(agent, job, kkt, attempt, error = %error, "job not fiscalized; back in the queue");
                    out.effects.push(Effect::JobNotFiscalized {
                        job,
                        kkt,
                        attempt,
                        error,
                    });
                }
                Decision::Ignore(why) => warn!(agent, job, attempt, why, "not-fiscalized ignored"),
                _ => {}
            }
        }
        OutboxBody::Event { kkt, event } => {
            if let Some(mut rec) = own_kkt(kkts, agent, &kkt)? {
                match &event {
                    Event::OfdAck(ack) => {
                        rec.last_ofd_ack = Some(ack.clone());
                        // An agent confirms only documents of the FN its register has: it must
                        // not be able to mark another register's (another tenant's) receipts.
                        let its_fn = rec
                            .state
                            .as_ref()
                            .is_some_and(|s| s.fn_info.fn_number == ack.fn_number);
                        if its_fn {
                            let done =
                                ledger::on_delivered(txn, &ack.fn_number, ack.fd_number, now_ms)?;
                            if !done.is_empty() {
                                out.effects.push(Effect::ReceiptsConfirmed(done));
                            }
                        } else {
                            warn!(agent, kkt, fn_number = ack.fn_number, "OFD acknowledgement for an FN this register does not have; not applied (its next status will confirm)");
                        }
                    }
                    Event::StatusChanged(device) => {
                        if let Some(state) = rec.state.as_mut() {
                            state.device = device.clone();
                        }
                    }
                }
                rec.updated_at = now_ms;
                kkts.insert(kkt.as_str(), encode(&rec)?.as_slice())?;
                // Published only for the agent's own register: subscribers (the dispatcher)
                // act on it.
                out.effects.push(Effect::KktEvent {
                    kkt,
                    event: Box::new(event),
                });
            }
        }
    }
    Ok(())
}

fn writer(db: Arc<Database>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut writes = Vec::with_capacity(batch.len());
        let mut dones = Vec::with_capacity(batch.len());
        for Msg::Write { write, done } in batch {
            writes.push(write);
            dones.push(done);
        }
        let outcome = run_batch(&db, writes);
        if let Err(e) = &outcome {
            error!(error = %e, writes = dones.len(), "group commit failed");
        }
        for done in dones {
            let _ = done.send(outcome.clone());
        }
    }
}

/// Applies every write of the batch in one transaction (see "Group commit").
fn run_batch(db: &Database, writes: Vec<WriteFn>) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(|e| e.to_string())?;
    for write in writes {
        write(&txn).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rules::JobState;

    fn now() -> u64 {
        1_000
    }

    #[tokio::test]
    async fn tokens_are_single_use_and_agents_found_by_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.redb")).unwrap();
        let hash = [7u8; 32];
        store
            .create_token(
                hash,
                TokenRecord {
                    created_at: 0,
                    expires_at: 10_000,
                    used: None,
                },
            )
            .await
            .unwrap();
        let agent = |id: &str, fp: u8| AgentRecord {
            id: id.into(),
            name: "shelf".into(),
            enrolled_at: now(),
            cert_fingerprint: [fp; 32],
            cert_not_after: 0,
            revoked: false,
            store_epoch: None,
            applied_upto: 0,
            last_seen: now(),
        };
        assert_eq!(
            store.enroll(hash, agent("a1", 1), now()).await.unwrap(),
            Ok(())
        );
        assert_eq!(
            store.enroll(hash, agent("a2", 2), now()).await.unwrap(),
            Err(TokenRefusal::Used)
        );
        assert_eq!(
            store.enroll([9; 32], agent("a3", 3), now()).await.unwrap(),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            store.agent_by_certificate(&[1; 32]).unwrap().unwrap().id,
            "a1"
        );
        assert_eq!(
            store.agent_by_certificate(&[2; 32]).unwrap(),
            Err(AgentLookup::Unknown)
        );
        assert!(store.revoke_agent("a1").await.unwrap());
        assert!(matches!(
            store.agent_by_certificate(&[1; 32]).unwrap(),
            Err(AgentLookup::Revoked(_))
        ));
    }

    #[test]
    fn records_carry_a_format_byte() {
        let bytes = encode(&7u32).unwrap();
        assert_eq!(bytes[0], FORMAT);
        assert_eq!(decode::<u32>(&bytes).unwrap(), 7);
        assert!(decode::<u32>(&[9, 7]).is_err());
        assert!(decode::<u32>(&[]).is_err());
    }

    /// The OFD's acknowledgement of a register's last document can reach the controller before
    /// the job's result (the agent journals the register's event and the executor's result
    /// concurrently). The receipt must still become CONFIRMED when its result is applied: no
    /// later acknowledgement may ever come.
    #[tokio::test]
    async fn an_acknowledgement_that_overtook_the_result_confirms_it() {
        use protocol::document::DocumentType;
        use protocol::kkt::{FfdVersion, Hello};
        use protocol::tunnel::{OutboxEntry, Work};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.redb")).unwrap();
        let agent = AgentRecord {
            id: "a".into(),
            name: "shelf".into(),
            enrolled_at: now(),
            cert_fingerprint: [1; 32],
            cert_not_after: 0,
            revoked: false,
            store_epoch: None,
            applied_upto: 0,
            last_seen: now(),
        };
        let hash = [7u8; 32];
        store
            .create_token(
                hash,
                TokenRecord {
                    created_at: 0,
                    expires_at: 10_000,
                    used: None,
                },
            )
            .await
            .unwrap();
        store.enroll(hash, agent, now()).await.unwrap().unwrap();
        let work = Work::Receipt(firmware_sim::fixtures::receipt(1, None));
        let record = ReceiptRecord {
            id: "r1".into(),
            account: "acc".into(),
            inn: "3245001416".into(),
            invoice_id: "inv-1".into(),
            callback_url: None,
            request_json: "{}".into(),
            created_at: now(),
        };
        store
            .create_receipt(
                NewReceipt {
                    record,
                    work: work.clone(),
                },
                now(),
            )
            .await
            .unwrap();
        store
            .assign("r1", work, "a", "K1", now())
            .await
            .unwrap()
            .unwrap();
        let attached = Report::Attached(Attached {
            hello: Hello {
                version: protocol::kkt::LINK_VERSION,
                model: "m".into(),
                zn: "K1".into(),
                fn_number: "F1".into(),
                firmware: "f".into(),
                ffd_version: FfdVersion::V1_2,
            },
            transport: "ws".into(),
        });
        let ack = Report::Outbox(OutboxEntry {
            seq: 1,
            body: OutboxBody::Event {
                kkt: "K1".into(),
                event: Event::OfdAck(OfdAckEvent {
                    fn_number: "F1".into(),
                    fd_number: 5,
                    acked_at: 1,
                    unsent_count: 0,
                }),
            },
        });
        let result = FiscalResult {
            document_type: DocumentType::Receipt,
            fd_number: 5,
            fpd: 42,
            shift_number: 1,
            receipt_number: Some(1),
            fn_number: "F1".into(),
            rnm: "R".into(),
            zn: "K1".into(),
            date_time: 1,
            total: None,
            additional_attribute: Some("r1".into()),
        };
        let completed = Report::Outbox(OutboxEntry {
            seq: 2,
            body: OutboxBody::Completed {
                job: "r1".into(),
                attempt: 1,
                kkt: "K1".into(),
                result,
            },
        });
        let applied = store
            .apply_reports("a", vec![attached, ack], now())
            .await
            .unwrap();
        assert!(!applied
            .effects
            .iter()
            .any(|e| matches!(e, Effect::ReceiptsConfirmed(_))));
        let applied = store
            .apply_reports("a", vec![completed], now())
            .await
            .unwrap();
        assert!(applied
            .effects
            .contains(&Effect::ReceiptsConfirmed(vec!["r1".into()])));
        let view = store.receipt("r1").unwrap().unwrap();
        assert_eq!(view.status(), ReceiptStatus::Confirmed);
    }

    #[tokio::test]
    async fn in_flight_index_follows_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.redb")).unwrap();
        let work = protocol::tunnel::Work::Receipt(firmware_sim::fixtures::receipt(1, None));
        let job = store
            .assign("j1", work.clone(), "a", "K1", now())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(job.state, JobState::Assigned { attempt: 1, .. }));
        assert_eq!(
            store.in_flight().unwrap(),
            vec![("a".into(), "j1".into(), "K1".into())]
        );
        // Not queued: refused.
        assert!(matches!(
            store
                .assign("j1", work.clone(), "b", "K2", now())
                .await
                .unwrap(),
            Err(AssignError::Refused(_))
        ));
        // Different work under the same id: refused.
        let other = protocol::tunnel::Work::Receipt(firmware_sim::fixtures::receipt(2, None));
        assert!(matches!(
            store.assign("j1", other, "b", "K2", now()).await.unwrap(),
            Err(AssignError::WorkMismatch(_))
        ));
        assert!(store.undeliverable("j1", "a", 1, now()).await.unwrap());
        assert!(store.in_flight().unwrap().is_empty());
        assert_eq!(store.job("j1").unwrap().unwrap().state, JobState::Queued);
        assert_eq!(store.jobs_in_doubt(0, now()).unwrap().len(), 0);
        store
            .assign("j1", work, "b", "K2", now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.jobs_in_doubt(0, now() + 5).unwrap().len(), 1);
        assert_eq!(store.jobs_in_doubt(10, now() + 5).unwrap().len(), 0);
    }
}
