//! The store as the tunnel and the dispatcher use it: agents, their certificates and enrollment,
//! registers, jobs and their exactly-once bookkeeping. With [`Ledger`](super::Ledger) (the
//! shop-facing half) this is the whole surface a second backend has to offer (a PostgreSQL one for
//! several controller nodes, DESIGN.md §8); the tunnel and the dispatcher are generic over it, and
//! [`Store`] (redb, group commit) is the default.
//!
//! Every method is one transaction. The `async` ones resolve only when their transaction is
//! durable; the exactly-once protocol depends on that (an assignment is durable before its
//! `Dispatch` frame leaves, a report batch before its acknowledgement). Domain refusals come back
//! as values, never as errors (see the `store` module docs).

use super::{
    AgentLookup, AgentRecord, Anomaly, Applied, AssignError, HelloOutcome, KktRecord, Report,
    Store, StoreError, TokenLookup,
};
use crate::rules::{Job, QueuePlace, TokenRefusal};
use protocol::tunnel::{JobId, Work};
use std::collections::HashSet;
use std::future::Future;

pub trait FleetStore: Clone + Send + Sync + 'static {
    /// Resolves once every write queued before it is durable (shutdown).
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// This controller's id, fixed at the first start (agents tell controllers apart by it).
    fn controller_id(&self) -> Result<String, StoreError>;

    // ---- enrollment and agents ---------------------------------------------------------------
    fn check_token(&self, hash: &[u8; 32], now_ms: u64) -> Result<(), TokenLookup>;
    fn enroll(
        &self,
        token_hash: [u8; 32],
        agent: AgentRecord,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<(), TokenRefusal>, StoreError>> + Send;
    fn add_certificate(
        &self,
        agent: &str,
        fingerprint: [u8; 32],
        not_after: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn revoke_agent(&self, agent: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn agent_by_certificate(
        &self,
        fingerprint: &[u8; 32],
    ) -> Result<Result<AgentRecord, AgentLookup>, StoreError>;
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Reconciles an agent's hello with what the store holds for it (see `rules`).
    fn agent_hello(
        &self,
        agent: &str,
        store_epoch: u64,
        last_seq: u64,
        held_jobs: HashSet<JobId>,
        now_ms: u64,
    ) -> impl Future<Output = Result<HelloOutcome, StoreError>> + Send;

    // ---- jobs --------------------------------------------------------------------------------
    /// Records a job as given to `agent` for register `kkt`; durable before the dispatch is sent.
    fn assign(
        &self,
        job_id: &str,
        work: Work,
        agent: &str,
        kkt: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<Job, AssignError>, StoreError>> + Send;
    /// The dispatch never reached the agent: the job goes back to the queue.
    fn undeliverable(
        &self,
        job_id: &str,
        agent: &str,
        attempt: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Applies a batch of an agent's reports in one transaction.
    fn apply_reports(
        &self,
        agent: &str,
        reports: Vec<Report>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send;
    /// Gives up on a queued job (KKT_ERROR); false when it is not queued.
    fn fail_job(
        &self,
        job_id: &str,
        reason: String,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn job(&self, id: &str) -> Result<Option<Job>, StoreError>;
    fn jobs_in_doubt(&self, older_than_ms: u64, now_ms: u64) -> Result<Vec<Job>, StoreError>;
    /// (agent, job, register) of every job assigned or accepted.
    fn in_flight(&self) -> Result<Vec<(String, JobId, String)>, StoreError>;
    /// Every job waiting in a queue, with its place.
    fn queued(&self) -> Result<Vec<(QueuePlace, JobId)>, StoreError>;

    // ---- registers and anomalies -------------------------------------------------------------
    fn kkt(&self, zn: &str) -> Result<Option<KktRecord>, StoreError>;
    fn kkts(&self) -> Result<Vec<KktRecord>, StoreError>;
    fn anomalies(&self) -> Result<Vec<Anomaly>, StoreError>;
}

impl FleetStore for Store {
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::flush(self)
    }
    fn controller_id(&self) -> Result<String, StoreError> {
        Store::controller_id(self)
    }
    fn check_token(&self, hash: &[u8; 32], now_ms: u64) -> Result<(), TokenLookup> {
        Store::check_token(self, hash, now_ms)
    }
    fn enroll(
        &self,
        token_hash: [u8; 32],
        agent: AgentRecord,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<(), TokenRefusal>, StoreError>> + Send {
        Store::enroll(self, token_hash, agent, now_ms)
    }
    fn add_certificate(
        &self,
        agent: &str,
        fingerprint: [u8; 32],
        not_after: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::add_certificate(self, agent, fingerprint, not_after)
    }
    fn revoke_agent(&self, agent: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Store::revoke_agent(self, agent)
    }
    fn agent_by_certificate(
        &self,
        fingerprint: &[u8; 32],
    ) -> Result<Result<AgentRecord, AgentLookup>, StoreError> {
        Store::agent_by_certificate(self, fingerprint)
    }
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        Store::agent(self, id)
    }
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        Store::agents(self)
    }
    fn agent_hello(
        &self,
        agent: &str,
        store_epoch: u64,
        last_seq: u64,
        held_jobs: HashSet<JobId>,
        now_ms: u64,
    ) -> impl Future<Output = Result<HelloOutcome, StoreError>> + Send {
        Store::agent_hello(self, agent, store_epoch, last_seq, held_jobs, now_ms)
    }
    fn assign(
        &self,
        job_id: &str,
        work: Work,
        agent: &str,
        kkt: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<Job, AssignError>, StoreError>> + Send {
        Store::assign(self, job_id, work, agent, kkt, now_ms)
    }
    fn undeliverable(
        &self,
        job_id: &str,
        agent: &str,
        attempt: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Store::undeliverable(self, job_id, agent, attempt, now_ms)
    }
    fn apply_reports(
        &self,
        agent: &str,
        reports: Vec<Report>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send {
        Store::apply_reports(self, agent, reports, now_ms)
    }
    fn fail_job(
        &self,
        job_id: &str,
        reason: String,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Store::fail_job(self, job_id, reason, now_ms)
    }
    fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Store::job(self, id)
    }
    fn jobs_in_doubt(&self, older_than_ms: u64, now_ms: u64) -> Result<Vec<Job>, StoreError> {
        Store::jobs_in_doubt(self, older_than_ms, now_ms)
    }
    fn in_flight(&self) -> Result<Vec<(String, JobId, String)>, StoreError> {
        Store::in_flight(self)
    }
    fn queued(&self) -> Result<Vec<(QueuePlace, JobId)>, StoreError> {
        Store::queued(self)
    }
    fn kkt(&self, zn: &str) -> Result<Option<KktRecord>, StoreError> {
        Store::kkt(self, zn)
    }
    fn kkts(&self) -> Result<Vec<KktRecord>, StoreError> {
        Store::kkts(self)
    }
    fn anomalies(&self) -> Result<Vec<Anomaly>, StoreError> {
        Store::anomalies(self)
    }
}
