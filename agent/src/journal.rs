//! The agent's journal of jobs and its outbox, as a pure core plus its redb layout.
//!
//! # Invariants (what is durable when)
//! 1. A dispatch is answered `Accepted` only after its journal entry is durable. From then on the
//!    job is the agent's; the controller will not give it to anyone else.
//! 2. `Executing{fd_before}` — a lower bound of the FN's last document number before the receipt
//!    (never above it; the executor may take it from the previous answer) — is durable before the
//!    receipt is sent to the register. After any crash, the agent compares the FN's last number
//!    with `fd_before`: if it moved, the archive is searched for the document carrying the job id
//!    (tag 1192) and that is the result; if the job's document is not there, it was not fiscalized
//!    and the job runs again. A job is never sent to a register twice without that proof.
//! 3. Everything the agent must report (a result, a proof of non-fiscalization, a register event)
//!    becomes an outbox entry with the next sequence number, durable before it is sent.
//! 4. An outbox entry — and the job it reports — is deleted only after the controller acknowledges
//!    its sequence number (cumulatively). Deleting is not urgent: a lost delete means a replay the
//!    controller deduplicates.
//! 5. Bounded: when jobs + outbox reach the limit the agent refuses new dispatches (nothing is
//!    journaled for them, so the controller may route them elsewhere) and raises an alarm. It never
//!    drops what it holds.
//!
//! The core ([`Journal`]) decides and returns the writes; the shell commits them through the
//! group-commit store, queuing them under the same lock as the decision so that the disk sees them
//! in decision order.

use protocol::kkt::{FiscalResult, KktError};
use protocol::tunnel::{Dispatch, HeldJob, JobId, JournalSummary, OutboxBody, OutboxEntry, Work};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Where a journaled job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    /// Journaled, not yet sent to the register.
    Accepted,
    /// Sent (or about to be) with FN `fn_number` at `fd_before`; the outcome is unknown until the
    /// register answers or that FN's archive is read.
    Executing { fn_number: String, fd_before: u32 },
    /// Its outcome is outbox entry `seq`, awaiting the controller's ack.
    Reported { seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalJob {
    pub job: JobId,
    pub attempt: u32,
    pub kkt: String,
    pub work: Work,
    pub phase: JobPhase,
    /// When the agent accepted it, Unix seconds.
    pub accepted_at: u64,
}

/// One durable change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    PutJob(Box<JournalJob>),
    DeleteJob(JobId),
    PutOutbox(u64, OutboxBody, u64),
    DeleteOutbox(u64),
    SetLastSeq(u64),
}

/// What to do with a dispatch.
#[derive(Debug, PartialEq, Eq)]
pub enum DispatchDecision {
    /// Journal these writes, then answer `Accepted`.
    Accept(Vec<Write>),
    /// Already journaled (the controller resent it): answer `Accepted` again, write nothing.
    AlreadyHeld,
    /// Answer `Refused` with this reason; nothing is journaled.
    Refuse(String),
}

/// The journal's state, mirrored in redb.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Journal {
    jobs: BTreeMap<JobId, JournalJob>,
    /// seq → (body, created at).
    outbox: BTreeMap<u64, (OutboxBody, u64)>,
    last_seq: u64,
    /// Highest sequence number known durable. Writes commit in queue order and are queued in
    /// sequence order, so everything at or below it is on disk; only those entries may be sent.
    durable_upto: u64,
    limit: usize,
}

impl Journal {
    pub fn new(limit: usize) -> Self {
        Journal {
            limit,
            ..Journal::default()
        }
    }

    pub fn job(&self, id: &str) -> Option<&JournalJob> {
        self.jobs.get(id)
    }

    pub fn depth(&self) -> usize {
        self.jobs.len()
    }

    pub fn outbox_depth(&self) -> usize {
        self.outbox.len()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Records that the commit holding entry `seq` is durable.
    pub fn mark_durable(&mut self, seq: u64) {
        self.durable_upto = self.durable_upto.max(seq);
    }

    /// Durable, unacknowledged entries after `after`, in order: what may be sent next.
    pub fn sendable(&self, after: u64) -> Vec<OutboxEntry> {
        if after >= self.durable_upto {
            return Vec::new();
        }
        self.outbox
            .range(after.saturating_add(1)..=self.durable_upto)
            .map(|(seq, (body, _))| OutboxEntry {
                seq: *seq,
                body: body.clone(),
            })
            .collect()
    }

    /// Jobs plus outbox entries reached the limit: new jobs are refused.
    pub fn is_full(&self) -> bool {
        self.jobs.len() + self.outbox.len() >= self.limit
    }

    pub fn alarm(&self) -> Option<String> {
        self.is_full().then(|| {
            format!(
                "journal full ({} jobs, {} outbox entries, limit {}): new jobs are refused until the controller acknowledges",
                self.jobs.len(),
                self.outbox.len(),
                self.limit
            )
        })
    }

    pub fn oldest_unacked(&self, now: u64) -> Option<u64> {
        self.outbox
            .values()
            .map(|(_, at)| *at)
            .min()
            .map(|t| now.saturating_sub(t))
    }

    pub fn dispatch(&mut self, d: Dispatch, now: u64) -> DispatchDecision {
        if let Some(held) = self.jobs.get(&d.job) {
            if held.attempt == d.attempt {
                return DispatchDecision::AlreadyHeld;
            }
            return DispatchDecision::Refuse(format!(
                "job {} is held here as attempt {}; attempt {} cannot replace it",
                d.job, held.attempt, d.attempt
            ));
        }
        if self.is_full() {
            return DispatchDecision::Refuse(self.alarm().unwrap_or_default());
        }
        let job = JournalJob {
            job: d.job.clone(),
            attempt: d.attempt,
            kkt: d.kkt,
            work: d.work,
            phase: JobPhase::Accepted,
            accepted_at: now,
        };
        self.jobs.insert(d.job, job.clone());
        DispatchDecision::Accept(vec![Write::PutJob(Box::new(job))])
    }

    /// Records the FN's last number before the receipt goes out (invariant 2).
    pub fn start(&mut self, id: &str, fn_number: &str, fd_before: u32) -> Vec<Write> {
        match self.jobs.get_mut(id) {
            Some(j) if j.phase == JobPhase::Accepted => {
                j.phase = JobPhase::Executing {
                    fn_number: fn_number.to_owned(),
                    fd_before,
                };
                vec![Write::PutJob(Box::new(j.clone()))]
            }
            _ => Vec::new(),
        }
    }

    /// Executing → Accepted, once it is proven the register did not form the document.
    pub fn retry(&mut self, id: &str) -> Vec<Write> {
        match self.jobs.get_mut(id) {
            Some(j) if matches!(j.phase, JobPhase::Executing { .. }) => {
                j.phase = JobPhase::Accepted;
                vec![Write::PutJob(Box::new(j.clone()))]
            }
            _ => Vec::new(),
        }
    }

    fn append(&mut self, body: OutboxBody, now: u64, writes: &mut Vec<Write>) -> OutboxEntry {
        self.last_seq += 1;
        let seq = self.last_seq;
        self.outbox.insert(seq, (body.clone(), now));
        writes.push(Write::PutOutbox(seq, body.clone(), now));
        writes.push(Write::SetLastSeq(seq));
        OutboxEntry { seq, body }
    }

    fn report(
        &mut self,
        id: &str,
        body: OutboxBody,
        now: u64,
    ) -> Option<(OutboxEntry, Vec<Write>)> {
        let j = self.jobs.get(id)?;
        if matches!(j.phase, JobPhase::Reported { .. }) {
            return None;
        }
        let mut writes = Vec::new();
        let entry = self.append(body, now, &mut writes);
        if let Some(j) = self.jobs.get_mut(id) {
            j.phase = JobPhase::Reported { seq: entry.seq };
            writes.push(Write::PutJob(Box::new(j.clone())));
        }
        Some((entry, writes))
    }

    /// The register formed the job's document. `None` if the job is unknown or already reported.
    pub fn complete(
        &mut self,
        id: &str,
        result: FiscalResult,
        now: u64,
    ) -> Option<(OutboxEntry, Vec<Write>)> {
        let j = self.jobs.get(id)?;
        let body = OutboxBody::Completed {
            job: j.job.clone(),
            attempt: j.attempt,
            kkt: j.kkt.clone(),
            result,
        };
        self.report(id, body, now)
    }

    /// The register proved it formed nothing for the job.
    pub fn not_fiscalized(
        &mut self,
        id: &str,
        error: KktError,
        now: u64,
    ) -> Option<(OutboxEntry, Vec<Write>)> {
        let j = self.jobs.get(id)?;
        let body = OutboxBody::NotFiscalized {
            job: j.job.clone(),
            attempt: j.attempt,
            kkt: j.kkt.clone(),
            error,
        };
        self.report(id, body, now)
    }

    /// A register event to report.
    pub fn event(&mut self, body: OutboxBody, now: u64) -> (OutboxEntry, Vec<Write>) {
        let mut writes = Vec::new();
        let entry = self.append(body, now, &mut writes);
        (entry, writes)
    }

    /// The controller applied everything up to `upto`: forget it (invariant 4).
    pub fn ack(&mut self, upto: u64) -> Vec<Write> {
        let acked: Vec<u64> = self.outbox.range(..=upto).map(|(s, _)| *s).collect();
        let mut writes = Vec::new();
        for seq in acked {
            self.outbox.remove(&seq);
            writes.push(Write::DeleteOutbox(seq));
        }
        let done: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| matches!(j.phase, JobPhase::Reported { seq } if seq <= upto))
            .map(|j| j.job.clone())
            .collect();
        for id in done {
            self.jobs.remove(&id);
            writes.push(Write::DeleteJob(id));
        }
        writes
    }

    /// What the agent holds, for its hello after a reconnect.
    pub fn summary(&self) -> JournalSummary {
        JournalSummary {
            jobs: self
                .jobs
                .values()
                .map(|j| HeldJob {
                    job: j.job.clone(),
                    attempt: j.attempt,
                    kkt: j.kkt.clone(),
                })
                .collect(),
            last_seq: self.last_seq,
            outbox_depth: self.outbox.len() as u64,
        }
    }

    /// Unacknowledged outbox entries in sequence order: what a reconnect replays.
    pub fn pending(&self) -> Vec<OutboxEntry> {
        self.outbox
            .iter()
            .map(|(seq, (body, _))| OutboxEntry {
                seq: *seq,
                body: body.clone(),
            })
            .collect()
    }

    /// The next job for a register: oldest accepted first, and a job left executing by a crash
    /// before anything else (its outcome must be settled first).
    pub fn next_for(&self, kkt: &str) -> Option<&JournalJob> {
        let mine = || self.jobs.values().filter(move |j| j.kkt == kkt);
        mine()
            .find(|j| matches!(j.phase, JobPhase::Executing { .. }))
            .or_else(|| {
                mine()
                    .filter(|j| j.phase == JobPhase::Accepted)
                    .min_by_key(|j| (j.accepted_at, j.job.clone()))
            })
    }

    /// The accepted job that [`Journal::next_for`] will give after `current` is done: the one the
    /// executor may prepare while `current` runs.
    pub fn next_accepted_for(&self, kkt: &str, current: &str) -> Option<&JournalJob> {
        self.jobs
            .values()
            .filter(|j| j.kkt == kkt && j.job != current && j.phase == JobPhase::Accepted)
            .min_by_key(|j| (j.accepted_at, j.job.clone()))
    }

    /// Applies a write to the in-memory state only (used when loading from disk).
    fn load(&mut self, w: Write) {
        match w {
            Write::PutJob(j) => {
                self.jobs.insert(j.job.clone(), *j);
            }
            Write::PutOutbox(seq, body, at) => {
                self.durable_upto = self.durable_upto.max(seq);
                self.outbox.insert(seq, (body, at));
            }
            Write::SetLastSeq(s) => {
                self.last_seq = self.last_seq.max(s);
                // What is loaded from disk is durable.
                self.durable_upto = self.last_seq;
            }
            Write::DeleteJob(_) | Write::DeleteOutbox(_) => {}
        }
    }
}

/// Outbox record on disk.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    body: OutboxBody,
    created_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("journal record {0} is unreadable: {1}; the agent's data directory may be damaged")]
    Corrupt(String, postcard::Error),
}

macro_rules! redb_into_journal {
    ($($t:ty),*) => {$(
        impl From<$t> for JournalError {
            fn from(e: $t) -> Self {
                JournalError::Storage(e.into())
            }
        }
    )*};
}
redb_into_journal!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Applies writes inside a transaction.
pub fn apply(txn: &WriteTransaction, writes: &[Write]) -> Result<(), JournalError> {
    let mut jobs = txn.open_table(JOBS)?;
    let mut outbox = txn.open_table(OUTBOX)?;
    let mut meta = txn.open_table(META)?;
    for w in writes {
        match w {
            Write::PutJob(j) => {
                let bytes = postcard::to_allocvec(j)
                    .map_err(|e| JournalError::Corrupt(j.job.clone(), e))?;
                jobs.insert(j.job.as_str(), bytes.as_slice())?;
            }
            Write::DeleteJob(id) => {
                jobs.remove(id.as_str())?;
            }
            Write::PutOutbox(seq, body, at) => {
                let rec = StoredEntry {
                    body: body.clone(),
                    created_at: *at,
                };
                let bytes = postcard::to_allocvec(&rec)
                    .map_err(|e| JournalError::Corrupt(format!("outbox {seq}"), e))?;
                outbox.insert(*seq, bytes.as_slice())?;
            }
            Write::DeleteOutbox(seq) => {
                outbox.remove(*seq)?;
            }
            Write::SetLastSeq(s) => {
                let cur = meta.get("last_seq")?.map(|v| v.value()).unwrap_or(0);
                if *s > cur {
                    meta.insert("last_seq", *s)?;
                }
            }
        }
    }
    Ok(())
}

/// Creates the tables, and the store epoch on first use.
pub fn init(txn: &WriteTransaction, new_epoch: u64) -> Result<(), JournalError> {
    txn.open_table(JOBS)?;
    txn.open_table(OUTBOX)?;
    let mut meta = txn.open_table(META)?;
    if meta.get("epoch")?.is_none() {
        meta.insert("epoch", new_epoch)?;
    }
    Ok(())
}

/// Loads the journal and the store epoch.
pub fn load(db: &redb::Database, limit: usize) -> Result<(Journal, u64), JournalError> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let mut journal = Journal::new(limit);
    let meta = txn.open_table(META)?;
    let epoch = meta.get("epoch")?.map(|v| v.value()).unwrap_or(0);
    journal.load(Write::SetLastSeq(
        meta.get("last_seq")?.map(|v| v.value()).unwrap_or(0),
    ));
    for row in txn.open_table(JOBS)?.iter()? {
        let (k, v) = row?;
        let j: JournalJob = postcard::from_bytes(v.value())
            .map_err(|e| JournalError::Corrupt(k.value().to_owned(), e))?;
        journal.load(Write::PutJob(Box::new(j)));
    }
    for row in txn.open_table(OUTBOX)?.iter()? {
        let (k, v) = row?;
        let rec: StoredEntry = postcard::from_bytes(v.value())
            .map_err(|e| JournalError::Corrupt(format!("outbox {}", k.value()), e))?;
        journal.load(Write::PutOutbox(k.value(), rec.body, rec.created_at));
    }
    Ok((journal, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::document::DocumentType;
    use protocol::kkt::ErrorCode;

    fn dispatch(job: &str, attempt: u32) -> Dispatch {
        Dispatch {
            job: job.into(),
            attempt,
            kkt: "K1".into(),
            work: Work::Receipt(firmware_sim::fixtures::receipt(1, None)),
        }
    }

    fn result(fd: u32) -> FiscalResult {
        FiscalResult {
            document_type: DocumentType::Receipt,
            fd_number: fd,
            fpd: 1,
            shift_number: 1,
            receipt_number: Some(1),
            fn_number: "F".into(),
            rnm: "R".into(),
            zn: "K1".into(),
            date_time: 0,
            total: None,
            additional_attribute: None,
        }
    }

    #[test]
    fn a_job_goes_accepted_executing_reported_and_is_forgotten_after_the_ack() {
        let mut j = Journal::new(10);
        assert!(matches!(
            j.dispatch(dispatch("a", 1), 0),
            DispatchDecision::Accept(_)
        ));
        assert_eq!(
            j.dispatch(dispatch("a", 1), 0),
            DispatchDecision::AlreadyHeld
        );
        assert!(matches!(
            j.dispatch(dispatch("a", 2), 0),
            DispatchDecision::Refuse(_)
        ));
        assert_eq!(j.next_for("K1").map(|x| x.job.as_str()), Some("a"));
        assert_eq!(j.start("a", "F", 41).len(), 1);
        assert!(
            j.start("a", "F", 41).is_empty(),
            "a second start is a no-op"
        );
        assert_eq!(
            j.job("a").map(|x| x.phase.clone()),
            Some(JobPhase::Executing {
                fn_number: "F".into(),
                fd_before: 41
            })
        );
        let (entry, writes) = j.complete("a", result(42), 5).expect("reported");
        assert_eq!(entry.seq, 1);
        assert!(writes.contains(&Write::SetLastSeq(1)));
        // A second outcome for the same job is impossible.
        assert!(j.complete("a", result(43), 5).is_none());
        assert!(j
            .not_fiscalized("a", KktError::new(ErrorCode::NO_PAPER, "x"), 5)
            .is_none());
        assert_eq!(j.summary().jobs.len(), 1, "held until acknowledged");
        assert_eq!(j.pending().len(), 1);
        assert_eq!(j.oldest_unacked(9), Some(4));
        let writes = j.ack(1);
        assert_eq!(
            writes,
            vec![Write::DeleteOutbox(1), Write::DeleteJob("a".into())]
        );
        assert_eq!(j.summary().jobs.len(), 0);
        assert!(j.pending().is_empty());
        assert_eq!(j.last_seq(), 1, "sequence numbers never go back");
    }

    #[test]
    fn executing_jobs_come_first_and_retry_only_from_executing() {
        let mut j = Journal::new(10);
        let _ = j.dispatch(dispatch("a", 1), 1);
        let _ = j.dispatch(dispatch("b", 1), 2);
        let _ = j.start("b", "F", 7);
        assert_eq!(j.next_for("K1").map(|x| x.job.as_str()), Some("b"));
        assert!(j.retry("a").is_empty(), "an accepted job is not retried");
        assert_eq!(j.retry("b").len(), 1);
        assert_eq!(
            j.next_for("K1").map(|x| x.job.as_str()),
            Some("a"),
            "oldest first"
        );
        assert!(j.next_for("K2").is_none());
    }

    #[test]
    fn a_full_journal_refuses_new_jobs_but_keeps_reporting() {
        let mut j = Journal::new(2);
        let _ = j.dispatch(dispatch("a", 1), 0);
        let _ = j.start("a", "F", 0);
        let _ = j.complete("a", result(1), 0);
        assert!(j.is_full(), "one job + one outbox entry");
        assert!(matches!(
            j.dispatch(dispatch("b", 1), 0),
            DispatchDecision::Refuse(_)
        ));
        assert!(j.alarm().is_some());
        // Events are still recorded: nothing the agent must report is dropped.
        let (e, _) = j.event(
            OutboxBody::Event {
                kkt: "K1".into(),
                event: protocol::kkt::Event::OfdAck(protocol::kkt::OfdAckEvent {
                    fn_number: "F".into(),
                    fd_number: 1,
                    acked_at: 0,
                    unsent_count: 0,
                }),
            },
            0,
        );
        assert_eq!(e.seq, 2);
        let _ = j.ack(2);
        assert!(!j.is_full());
    }

    #[test]
    fn only_durable_entries_are_sendable_in_order() {
        let mut j = Journal::new(100);
        for id in ["a", "b", "c"] {
            let _ = j.dispatch(dispatch(id, 1), 0);
            let _ = j.start(id, "F", 0);
            let _ = j.complete(id, result(1), 0);
        }
        assert!(j.sendable(0).is_empty(), "nothing is durable yet");
        j.mark_durable(2);
        j.mark_durable(1);
        assert_eq!(
            j.sendable(0).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            j.sendable(1).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2]
        );
        j.mark_durable(3);
        let _ = j.ack(2);
        assert_eq!(
            j.sendable(0).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn partial_acks_keep_what_is_not_acknowledged() {
        let mut j = Journal::new(100);
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            let _ = j.dispatch(dispatch(id, 1), n as u64);
            let _ = j.start(id, "F", 0);
            let _ = j.complete(id, result(n as u32), 0);
        }
        let _ = j.ack(2);
        assert_eq!(
            j.pending().iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(
            j.summary()
                .jobs
                .iter()
                .map(|h| h.job.as_str())
                .collect::<Vec<_>>(),
            vec!["c"]
        );
        // A stale, smaller ack changes nothing.
        assert!(j.ack(1).is_empty());
    }

    #[test]
    fn what_is_written_loads_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = redb::Database::create(dir.path().join("j.redb")).expect("db");
        let mut j = Journal::new(100);
        let mut all = Vec::new();
        {
            let txn = db.begin_write().expect("txn");
            init(&txn, 77).expect("init");
            txn.commit().expect("commit");
        }
        for id in ["a", "b", "c"] {
            if let DispatchDecision::Accept(w) = j.dispatch(dispatch(id, 1), 3) {
                all.extend(w);
            }
        }
        all.extend(j.start("a", "F", 5));
        all.extend(
            j.complete("a", result(6), 4)
                .map(|(_, w)| w)
                .unwrap_or_default(),
        );
        all.extend(j.start("b", "F", 6));
        all.extend(j.ack(1));
        let txn = db.begin_write().expect("txn");
        apply(&txn, &all).expect("apply");
        txn.commit().expect("commit");
        let (back, epoch) = load(&db, 100).expect("load");
        j.mark_durable(j.last_seq());
        assert_eq!(epoch, 77);
        assert_eq!(back, j);
    }
}
