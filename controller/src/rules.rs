//! The dispatcher's pure core: what a job's record becomes when something happens to it.
//!
//! No I/O and no clock: every function takes the current time (`now`, Unix milliseconds) and the
//! current record and returns a [`Decision`]. The store runs these inside the one transaction that
//! reads the record and writes the outcome, so the rules below hold under any interleaving of
//! agents, reconnects and replays.
//!
//! # Rules (DESIGN.md §3)
//! * `Queued → Assigned{agent, kkt, attempt}` only through [`JobEvent::Assign`]; the attempt
//!   number grows by one each time, and results carry it back.
//! * A job that reached an agent belongs to it until the agent reports `Completed` or
//!   `NotFiscalized`, or refuses it before journaling (`Refused`, only while `Assigned`), or a
//!   reconnect proves the agent never received it (`Release`).
//! * `Completed` is final. A `Completed` is applied in every other state, `Queued` included: the
//!   register formed the document, whatever we thought. A second `Completed` with the same result
//!   is a replay (no-op); with a different result it is a duplicate fiscalization: recorded as an
//!   anomaly, never overwriting the first.
//! * `NotFiscalized` or `Refused` for an attempt older than the job's current one is stale and
//!   ignored: the job has moved on.

use protocol::kkt::{FiscalResult, KktError};
use protocol::tunnel::{JobId, Work};
use serde::{Deserialize, Serialize};

/// Most history entries kept per job; older ones (after the first) are dropped so that a job that
/// bounces between registers cannot grow without bound.
pub const MAX_HISTORY: usize = 64;

/// One fiscal job: a document that must be formed exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub work: Work,
    pub state: JobState,
    /// The attempt last given out (0 before the first dispatch).
    pub attempt: u32,
    /// Attempts a register proved not fiscalized (`NotFiscalized`). Unlike `attempt` it does not
    /// count dispatches that never reached a register (refused, released, undeliverable), so
    /// an agent that flaps does not use up a receipt's attempts.
    pub failures: u32,
    /// Why the last attempt did not complete; kept when the job is queued again so the balancer
    /// can avoid the register that failed.
    pub last_error: Option<Setback>,
    pub created_at: u64,
    pub updated_at: u64,
    pub history: Vec<HistoryEntry>,
    /// The job's place in its organisation's FIFO queue, for jobs that came through the API
    /// (jobs given straight to a register by an operator have none). The place is kept when the
    /// job comes back to the queue, so a job that failed over goes ahead of younger ones.
    pub queue: Option<QueuePlace>,
}

/// Where a job waits: the organisation (INN) whose registers may take it, and its order there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePlace {
    pub inn: String,
    pub order: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for a register; nobody holds it.
    Queued,
    /// Recorded before the dispatch was sent; the agent may or may not have it.
    Assigned {
        agent: String,
        kkt: String,
        attempt: u32,
    },
    /// The agent journaled it.
    Accepted {
        agent: String,
        kkt: String,
        attempt: u32,
    },
    /// Final: the register formed the document.
    Completed {
        agent: String,
        kkt: String,
        attempt: u32,
        result: FiscalResult,
    },
    /// Final: proven not fiscalized and not worth another register (the receipt itself was
    /// refused, or it failed too many times). The shop must send it again with a new InvoiceId.
    Failed { reason: String },
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned { .. } => "assigned",
            JobState::Accepted { .. } => "accepted",
            JobState::Completed { .. } => "completed",
            JobState::Failed { .. } => "failed",
        }
    }

    /// The agent, register and attempt that hold the job while it is in flight.
    pub fn holder(&self) -> Option<(&str, &str, u32)> {
        match self {
            JobState::Assigned {
                agent,
                kkt,
                attempt,
            }
            | JobState::Accepted {
                agent,
                kkt,
                attempt,
            } => Some((agent, kkt, *attempt)),
            _ => None,
        }
    }

    /// Assigned or accepted: the outcome is with an agent.
    pub fn in_flight(&self) -> bool {
        self.holder().is_some()
    }
}

/// Why an attempt ended without a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setback {
    pub kkt: String,
    pub attempt: u32,
    pub at: u64,
    pub kind: SetbackKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetbackKind {
    /// The register refused; proven that no document was formed.
    NotFiscalized(KktError),
    /// The agent would not take the dispatch (nothing journaled).
    Refused(String),
    /// The agent reconnected without the job: it never received it.
    Released,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: u64,
    pub state: String,
    pub attempt: u32,
    pub kkt: Option<String>,
}

/// Something that happens to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// The dispatcher gives the job to `kkt` behind `agent`.
    Assign {
        agent: String,
        kkt: String,
    },
    Accepted {
        agent: String,
        attempt: u32,
    },
    Refused {
        agent: String,
        attempt: u32,
        reason: String,
    },
    Completed {
        agent: String,
        kkt: String,
        attempt: u32,
        result: FiscalResult,
    },
    NotFiscalized {
        agent: String,
        kkt: String,
        attempt: u32,
        error: KktError,
    },
    /// The agent's hello does not list the job: it never received it.
    Release {
        agent: String,
    },
    /// The dispatch could not even be handed to the connection (it was gone): it never left.
    Undeliverable {
        agent: String,
        attempt: u32,
    },
    /// The dispatcher gives up on a queued job (nobody holds it, so no document can appear).
    Fail {
        reason: String,
    },
}

/// What to do with the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write this record (boxed: a job carries its whole receipt).
    Apply(Box<Job>),
    /// Already applied (a replay); write nothing, acknowledge.
    Duplicate,
    /// Does not apply to the job as it is now; write nothing, log why.
    Ignore(&'static str),
    /// The job cannot be assigned; write nothing.
    Refuse(AssignRefusal),
    /// A second, different fiscal result for a completed job: record it, keep the first.
    Anomaly {
        existing: Box<FiscalResult>,
        incoming: Box<FiscalResult>,
    },
}

impl Decision {
    fn write(job: Job) -> Decision {
        Decision::Apply(Box::new(job))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignRefusal {
    #[error("job {job} is already completed on register {kkt}")]
    Completed { job: JobId, kkt: String },
    #[error("job {job} has failed for good: {reason}")]
    Failed { job: JobId, reason: String },
    #[error("job {job} is {state} on register {kkt} (attempt {attempt}); it can be given out again only after its agent reports it or reconnects without it")]
    InFlight {
        job: JobId,
        state: &'static str,
        kkt: String,
        attempt: u32,
    },
}

impl Job {
    /// A new job, not yet given to anyone.
    pub fn new(id: JobId, work: Work, now: u64) -> Job {
        Job {
            id,
            work,
            state: JobState::Queued,
            attempt: 0,
            failures: 0,
            last_error: None,
            created_at: now,
            updated_at: now,
            history: vec![HistoryEntry {
                at: now,
                state: "queued".into(),
                attempt: 0,
                kkt: None,
            }],
            queue: None,
        }
    }

    /// A new job waiting in `inn`'s queue at `order`.
    pub fn queued(id: JobId, work: Work, place: QueuePlace, now: u64) -> Job {
        let mut job = Job::new(id, work, now);
        job.queue = Some(place);
        job
    }

    /// The queue place while the job waits in a queue, else None.
    pub fn waiting_in(&self) -> Option<&QueuePlace> {
        match self.state {
            JobState::Queued => self.queue.as_ref(),
            _ => None,
        }
    }

    fn moved(&self, state: JobState, now: u64) -> Job {
        let mut next = self.clone();
        let kkt = match &state {
            JobState::Queued | JobState::Failed { .. } => None,
            JobState::Assigned { kkt, .. }
            | JobState::Accepted { kkt, .. }
            | JobState::Completed { kkt, .. } => Some(kkt.clone()),
        };
        next.history.push(HistoryEntry {
            at: now,
            state: state.name().into(),
            attempt: next.attempt,
            kkt,
        });
        if next.history.len() > MAX_HISTORY {
            next.history.remove(1);
        }
        next.state = state;
        next.updated_at = now;
        next
    }

    fn requeued(&self, kkt: &str, attempt: u32, kind: SetbackKind, now: u64) -> Job {
        let mut next = self.moved(JobState::Queued, now);
        next.last_error = Some(Setback {
            kkt: kkt.to_owned(),
            attempt,
            at: now,
            kind,
        });
        next
    }
}

/// The job state machine. `job` is the record as stored now.
pub fn apply(job: &Job, event: JobEvent, now: u64) -> Decision {
    use JobState as S;
    match (event, &job.state) {
        (JobEvent::Assign { agent, kkt }, S::Queued) => {
            let attempt = job.attempt.saturating_add(1);
            let mut next = job.clone();
            next.attempt = attempt;
            Decision::write(next.moved(
                S::Assigned {
                    agent,
                    kkt,
                    attempt,
                },
                now,
            ))
        }
        (JobEvent::Assign { .. }, S::Completed { kkt, .. }) => {
            Decision::Refuse(AssignRefusal::Completed {
                job: job.id.clone(),
                kkt: kkt.clone(),
            })
        }
        (JobEvent::Assign { .. }, S::Failed { reason }) => {
            Decision::Refuse(AssignRefusal::Failed {
                job: job.id.clone(),
                reason: reason.clone(),
            })
        }
        (
            JobEvent::Assign { .. },
            s @ (S::Assigned { kkt, attempt, .. } | S::Accepted { kkt, attempt, .. }),
        ) => Decision::Refuse(AssignRefusal::InFlight {
            job: job.id.clone(),
            state: s.name(),
            kkt: kkt.clone(),
            attempt: *attempt,
        }),

        (
            JobEvent::Accepted { agent, attempt },
            S::Assigned {
                agent: a,
                kkt,
                attempt: n,
            },
        ) if *a == agent && *n == attempt => Decision::write(job.moved(
            S::Accepted {
                agent,
                kkt: kkt.clone(),
                attempt,
            },
            now,
        )),
        (
            JobEvent::Accepted { agent, attempt },
            S::Accepted {
                agent: a,
                attempt: n,
                ..
            },
        ) if *a == agent && *n == attempt => Decision::Duplicate,
        (JobEvent::Accepted { .. }, _) => {
            Decision::Ignore("accepted for an attempt that is no longer out")
        }

        (
            JobEvent::Refused {
                agent,
                attempt,
                reason,
            },
            S::Assigned {
                agent: a,
                kkt,
                attempt: n,
            },
        ) if *a == agent && *n == attempt => {
            Decision::write(job.requeued(kkt, attempt, SetbackKind::Refused(reason), now))
        }
        (JobEvent::Refused { .. }, S::Accepted { .. }) => {
            Decision::Ignore("refused after the agent accepted (journaled) the job")
        }
        (JobEvent::Refused { .. }, _) => {
            Decision::Ignore("refused for an attempt that is no longer out")
        }

        (
            JobEvent::Completed { result, .. },
            S::Completed {
                result: existing, ..
            },
        ) => {
            if *existing == result {
                Decision::Duplicate
            } else {
                Decision::Anomaly {
                    existing: Box::new(existing.clone()),
                    incoming: Box::new(result),
                }
            }
        }
        (
            JobEvent::Completed {
                agent,
                kkt,
                attempt,
                result,
            },
            _,
        ) => {
            // Whatever we believed, the register formed the document: this is the job's result.
            let mut next = job.moved(
                S::Completed {
                    agent,
                    kkt,
                    attempt,
                    result,
                },
                now,
            );
            next.attempt = next.attempt.max(attempt);
            Decision::write(next)
        }

        (JobEvent::NotFiscalized { attempt, .. }, _) if attempt < job.attempt => {
            Decision::Ignore("not-fiscalized for an older attempt")
        }
        (
            JobEvent::NotFiscalized {
                agent,
                kkt,
                attempt,
                error,
            },
            S::Assigned {
                agent: a,
                attempt: n,
                ..
            }
            | S::Accepted {
                agent: a,
                attempt: n,
                ..
            },
        ) if *a == agent && *n == attempt => {
            let mut next = job.requeued(&kkt, attempt, SetbackKind::NotFiscalized(error), now);
            next.failures = next.failures.saturating_add(1);
            Decision::write(next)
        }
        (JobEvent::NotFiscalized { attempt, .. }, S::Queued)
            if attempt == job.attempt
                && job
                    .last_error
                    .as_ref()
                    .is_some_and(|e| e.attempt == attempt) =>
        {
            Decision::Duplicate
        }
        (JobEvent::NotFiscalized { .. }, S::Completed { .. }) => {
            Decision::Ignore("not-fiscalized for a job already completed")
        }
        (JobEvent::NotFiscalized { .. }, _) => {
            Decision::Ignore("not-fiscalized from an agent that does not hold the attempt")
        }

        (JobEvent::Release { agent }, s) => match s.holder() {
            Some((a, kkt, attempt)) if a == agent => {
                Decision::write(job.requeued(kkt, attempt, SetbackKind::Released, now))
            }
            _ => Decision::Ignore("release of a job this agent does not hold"),
        },

        (
            JobEvent::Undeliverable { agent, attempt },
            S::Assigned {
                agent: a,
                kkt,
                attempt: n,
            },
        ) if *a == agent && *n == attempt => {
            Decision::write(job.requeued(kkt, attempt, SetbackKind::Released, now))
        }
        (JobEvent::Undeliverable { .. }, _) => {
            Decision::Ignore("undeliverable dispatch for a job that moved on")
        }

        (JobEvent::Fail { reason }, S::Queued) => {
            Decision::write(job.moved(S::Failed { reason }, now))
        }
        (JobEvent::Fail { .. }, _) => {
            Decision::Ignore("only a queued job (held by nobody) can be given up")
        }
    }
}

/// What to make of an agent's hello against what we recorded for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochDecision {
    /// The outbox position to tell the agent (and to store).
    pub applied_upto: u64,
    /// Something an operator should know.
    pub warning: Option<String>,
}

/// A new store epoch means the agent's outbox starts over at 1. The same epoch with a
/// `last_seq` below what we applied means the agent's store went back in time (restored from a
/// backup): its next entries would reuse numbers we already applied, so we start over from its
/// `last_seq` and rely on the job-id dedup for fiscal results.
pub fn reconcile_epoch(
    recorded_epoch: Option<u64>,
    applied_upto: u64,
    hello_epoch: u64,
    hello_last_seq: u64,
) -> EpochDecision {
    match recorded_epoch {
        Some(e) if e == hello_epoch => {
            if hello_last_seq < applied_upto {
                EpochDecision {
                    applied_upto: hello_last_seq,
                    warning: Some(format!(
                        "agent store went back: its last outbox entry is {hello_last_seq}, \
                         {applied_upto} were applied; restarting from {hello_last_seq}"
                    )),
                }
            } else {
                EpochDecision {
                    applied_upto,
                    warning: None,
                }
            }
        }
        Some(e) => EpochDecision {
            applied_upto: 0,
            warning: Some(format!(
                "agent store epoch changed from {e} to {hello_epoch}: its journal was lost or \
                 recreated; outbox numbering starts over"
            )),
        },
        None => EpochDecision {
            applied_upto: 0,
            warning: None,
        },
    }
}

/// An outbox entry's sequence number against the agent's applied position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// Already applied: skip it (and acknowledge again).
    Replay,
    /// The next one.
    Next,
    /// Later than the next one: entries in between never arrived. Applied anyway (the agent
    /// sends in order on one stream, so the missing ones are not coming); logged.
    Gap { missing_from: u64, missing_to: u64 },
}

pub fn check_seq(applied_upto: u64, seq: u64) -> SeqCheck {
    if seq <= applied_upto {
        SeqCheck::Replay
    } else if seq == applied_upto + 1 {
        SeqCheck::Next
    } else {
        SeqCheck::Gap {
            missing_from: applied_upto + 1,
            missing_to: seq - 1,
        }
    }
}

/// A stored enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub created_at: u64,
    pub expires_at: u64,
    pub used: Option<TokenUse>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub at: u64,
    pub agent: String,
}

/// Why a token does not admit an agent. The texts go back to the technician.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown enrollment token; ask the operator for a new one (`controller agent-token create`)")]
    Unknown,
    #[error("the enrollment token has expired; ask the operator for a new one (`controller agent-token create`)")]
    Expired,
    #[error("the enrollment token was already used; each token enrolls one agent, ask the operator for a new one")]
    Used,
}

/// Whether a token admits an agent now.
pub fn check_token(token: Option<&TokenRecord>, now: u64) -> Result<(), TokenRefusal> {
    match token {
        None => Err(TokenRefusal::Unknown),
        Some(t) if t.used.is_some() => Err(TokenRefusal::Used),
        Some(t) if now >= t.expires_at => Err(TokenRefusal::Expired),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::document::DocumentType;
    use protocol::kkt::ErrorCode;

    fn work() -> Work {
        Work::Receipt(firmware_sim::fixtures::receipt(1, None))
    }

    fn result(fd: u32) -> FiscalResult {
        FiscalResult {
            document_type: DocumentType::Receipt,
            fd_number: fd,
            fpd: 12345,
            shift_number: 1,
            receipt_number: Some(fd),
            fn_number: "7380440800000001".into(),
            rnm: "0000000001012345".into(),
            zn: "K1".into(),
            date_time: 1_700_000_000,
            total: None,
            additional_attribute: Some("j1".into()),
        }
    }

    fn err() -> KktError {
        KktError::new(ErrorCode::NO_PAPER, "no paper")
    }

    fn queued() -> Job {
        Job::new("j1".into(), work(), 1)
    }

    fn applied(d: Decision) -> Job {
        match d {
            Decision::Apply(j) => *j,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    fn assign(job: &Job, agent: &str, kkt: &str, now: u64) -> Job {
        applied(apply(
            job,
            JobEvent::Assign {
                agent: agent.into(),
                kkt: kkt.into(),
            },
            now,
        ))
    }

    fn accepted(job: &Job, agent: &str, attempt: u32) -> Job {
        applied(apply(
            job,
            JobEvent::Accepted {
                agent: agent.into(),
                attempt,
            },
            3,
        ))
    }

    fn completed(agent: &str, attempt: u32, fd: u32) -> JobEvent {
        JobEvent::Completed {
            agent: agent.into(),
            kkt: "K1".into(),
            attempt,
            result: result(fd),
        }
    }

    fn not_fiscalized(agent: &str, attempt: u32) -> JobEvent {
        JobEvent::NotFiscalized {
            agent: agent.into(),
            kkt: "K1".into(),
            attempt,
            error: err(),
        }
    }

    #[test]
    fn assign_numbers_attempts_and_records_history() {
        let j = assign(&queued(), "a", "K1", 2);
        assert_eq!(
            j.state,
            JobState::Assigned {
                agent: "a".into(),
                kkt: "K1".into(),
                attempt: 1
            }
        );
        assert_eq!(j.attempt, 1);
        assert_eq!(j.updated_at, 2);
        assert_eq!(j.history.len(), 2);
        assert_eq!(j.history[1].state, "assigned");
    }

    #[test]
    fn assign_is_refused_unless_queued() {
        let a = assign(&queued(), "a", "K1", 2);
        assert!(matches!(
            apply(
                &a,
                JobEvent::Assign {
                    agent: "b".into(),
                    kkt: "K2".into()
                },
                3
            ),
            Decision::Refuse(AssignRefusal::InFlight { attempt: 1, .. })
        ));
        let acc = accepted(&a, "a", 1);
        assert!(matches!(
            apply(
                &acc,
                JobEvent::Assign {
                    agent: "b".into(),
                    kkt: "K2".into()
                },
                3
            ),
            Decision::Refuse(AssignRefusal::InFlight {
                state: "accepted",
                ..
            })
        ));
        let done = applied(apply(&acc, completed("a", 1, 7), 4));
        assert!(matches!(
            apply(
                &done,
                JobEvent::Assign {
                    agent: "b".into(),
                    kkt: "K2".into()
                },
                5
            ),
            Decision::Refuse(AssignRefusal::Completed { .. })
        ));
    }

    #[test]
    fn accepted_only_for_the_current_attempt_of_the_same_agent() {
        let a = assign(&queued(), "a", "K1", 2);
        assert!(matches!(
            apply(
                &a,
                JobEvent::Accepted {
                    agent: "b".into(),
                    attempt: 1
                },
                3
            ),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            apply(
                &a,
                JobEvent::Accepted {
                    agent: "a".into(),
                    attempt: 2
                },
                3
            ),
            Decision::Ignore(_)
        ));
        let acc = accepted(&a, "a", 1);
        assert_eq!(
            apply(
                &acc,
                JobEvent::Accepted {
                    agent: "a".into(),
                    attempt: 1
                },
                4
            ),
            Decision::Duplicate
        );
        // An Accepted that arrives after the Completed (reordering) does not move it back.
        let done = applied(apply(&acc, completed("a", 1, 7), 4));
        assert!(matches!(
            apply(
                &done,
                JobEvent::Accepted {
                    agent: "a".into(),
                    attempt: 1
                },
                5
            ),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            apply(
                &queued(),
                JobEvent::Accepted {
                    agent: "a".into(),
                    attempt: 0
                },
                5
            ),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn refused_requeues_only_before_acceptance() {
        let a = assign(&queued(), "a", "K1", 2);
        let r = applied(apply(
            &a,
            JobEvent::Refused {
                agent: "a".into(),
                attempt: 1,
                reason: "journal full".into(),
            },
            3,
        ));
        assert_eq!(r.state, JobState::Queued);
        assert_eq!(r.attempt, 1);
        assert!(matches!(
            r.last_error,
            Some(Setback {
                kind: SetbackKind::Refused(_),
                attempt: 1,
                ..
            })
        ));
        let acc = accepted(&a, "a", 1);
        assert!(matches!(
            apply(
                &acc,
                JobEvent::Refused {
                    agent: "a".into(),
                    attempt: 1,
                    reason: "x".into()
                },
                3
            ),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            apply(
                &a,
                JobEvent::Refused {
                    agent: "b".into(),
                    attempt: 1,
                    reason: "x".into()
                },
                3
            ),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn completed_applies_in_every_state_and_is_final() {
        let q = queued();
        let a = assign(&q, "a", "K1", 2);
        let acc = accepted(&a, "a", 1);
        for (state, job) in [("queued", &q), ("assigned", &a), ("accepted", &acc)] {
            let done = applied(apply(job, completed("a", 1, 7), 9));
            assert!(
                matches!(&done.state, JobState::Completed { result, .. } if result.fd_number == 7),
                "from {state}"
            );
            assert_eq!(done.updated_at, 9);
            assert!(done.attempt >= 1);
        }
        // Completed from another agent than the holder (the job was released, but the first
        // agent had executed it after all): still the truth.
        let other = applied(apply(&a, completed("z", 1, 8), 9));
        assert!(matches!(other.state, JobState::Completed { ref agent, .. } if agent == "z"));
    }

    #[test]
    fn replayed_completed_is_a_duplicate_and_a_different_one_an_anomaly() {
        let a = assign(&queued(), "a", "K1", 2);
        let done = applied(apply(&a, completed("a", 1, 7), 4));
        assert_eq!(apply(&done, completed("a", 1, 7), 5), Decision::Duplicate);
        match apply(&done, completed("b", 2, 8), 5) {
            Decision::Anomaly { existing, incoming } => {
                assert_eq!(existing.fd_number, 7);
                assert_eq!(incoming.fd_number, 8);
            }
            other => panic!("expected an anomaly, got {other:?}"),
        }
    }

    #[test]
    fn not_fiscalized_requeues_the_current_attempt_and_ignores_stale_ones() {
        let a = assign(&queued(), "a", "K1", 2);
        let acc = accepted(&a, "a", 1);
        for job in [&a, &acc] {
            let q = applied(apply(job, not_fiscalized("a", 1), 5));
            assert_eq!(q.state, JobState::Queued);
            assert_eq!(q.attempt, 1, "attempt is kept");
            assert!(matches!(
                q.last_error,
                Some(Setback {
                    kind: SetbackKind::NotFiscalized(_),
                    ..
                })
            ));
            // A replay of the same report is a duplicate.
            assert_eq!(apply(&q, not_fiscalized("a", 1), 6), Decision::Duplicate);
        }
        // Second attempt on another register: a late report about attempt 1 is stale.
        let q = applied(apply(&acc, not_fiscalized("a", 1), 5));
        let b = assign(&q, "b", "K2", 6);
        assert_eq!(b.attempt, 2);
        assert!(matches!(
            apply(&b, not_fiscalized("a", 1), 7),
            Decision::Ignore("not-fiscalized for an older attempt")
        ));
        // ... from the wrong agent for the current attempt: ignored.
        assert!(matches!(
            apply(&b, not_fiscalized("a", 2), 7),
            Decision::Ignore(_)
        ));
        // After completion: ignored.
        let done = applied(apply(&b, completed("b", 2, 9), 8));
        assert!(matches!(
            apply(&done, not_fiscalized("b", 2), 9),
            Decision::Ignore(_)
        ));
        // Queued job that never had this attempt out.
        assert!(matches!(
            apply(&queued(), not_fiscalized("a", 0), 9),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn release_only_from_the_holding_agent() {
        let a = assign(&queued(), "a", "K1", 2);
        let acc = accepted(&a, "a", 1);
        for job in [&a, &acc] {
            let r = applied(apply(job, JobEvent::Release { agent: "a".into() }, 3));
            assert_eq!(r.state, JobState::Queued);
            assert!(matches!(
                r.last_error,
                Some(Setback {
                    kind: SetbackKind::Released,
                    ..
                })
            ));
            assert!(matches!(
                apply(job, JobEvent::Release { agent: "b".into() }, 3),
                Decision::Ignore(_)
            ));
        }
        let done = applied(apply(&acc, completed("a", 1, 7), 4));
        assert!(matches!(
            apply(&done, JobEvent::Release { agent: "a".into() }, 5),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            apply(&queued(), JobEvent::Release { agent: "a".into() }, 5),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn undeliverable_requeues_only_an_unaccepted_assignment() {
        let a = assign(&queued(), "a", "K1", 2);
        let ev = || JobEvent::Undeliverable {
            agent: "a".into(),
            attempt: 1,
        };
        assert_eq!(applied(apply(&a, ev(), 3)).state, JobState::Queued);
        let acc = accepted(&a, "a", 1);
        assert!(matches!(apply(&acc, ev(), 3), Decision::Ignore(_)));
    }

    #[test]
    fn history_is_bounded() {
        let mut j = queued();
        for i in 0..200u32 {
            j = assign(&j, "a", "K1", u64::from(i));
            j = applied(apply(
                &j,
                JobEvent::Release { agent: "a".into() },
                u64::from(i),
            ));
        }
        assert_eq!(j.history.len(), MAX_HISTORY);
        assert_eq!(j.history[0].state, "queued", "the creation entry is kept");
        assert_eq!(j.attempt, 200);
    }

    #[test]
    fn epochs() {
        assert_eq!(reconcile_epoch(None, 0, 5, 10).applied_upto, 0);
        let same = reconcile_epoch(Some(5), 7, 5, 10);
        assert_eq!(same.applied_upto, 7);
        assert!(same.warning.is_none());
        let new = reconcile_epoch(Some(5), 7, 6, 3);
        assert_eq!(new.applied_upto, 0);
        assert!(new.warning.is_some());
        let back = reconcile_epoch(Some(5), 7, 5, 4);
        assert_eq!(back.applied_upto, 4);
        assert!(back.warning.is_some());
    }

    #[test]
    fn sequence_checks() {
        assert_eq!(check_seq(5, 3), SeqCheck::Replay);
        assert_eq!(check_seq(5, 5), SeqCheck::Replay);
        assert_eq!(check_seq(5, 6), SeqCheck::Next);
        assert_eq!(
            check_seq(5, 9),
            SeqCheck::Gap {
                missing_from: 6,
                missing_to: 8
            }
        );
    }

    #[test]
    fn tokens() {
        let t = TokenRecord {
            created_at: 0,
            expires_at: 100,
            used: None,
        };
        assert_eq!(check_token(Some(&t), 99), Ok(()));
        assert_eq!(check_token(Some(&t), 100), Err(TokenRefusal::Expired));
        assert_eq!(check_token(None, 1), Err(TokenRefusal::Unknown));
        let used = TokenRecord {
            used: Some(TokenUse {
                at: 5,
                agent: "a".into(),
            }),
            ..t
        };
        assert_eq!(check_token(Some(&used), 6), Err(TokenRefusal::Used));
    }

    fn event_strategy() -> impl proptest::strategy::Strategy<Value = JobEvent> {
        use proptest::prelude::*;
        let agent = prop_oneof![Just("a".to_string()), Just("b".to_string())];
        let kkt = prop_oneof![Just("K1".to_string()), Just("K2".to_string())];
        prop_oneof![
            (agent.clone(), kkt.clone()).prop_map(|(agent, kkt)| JobEvent::Assign { agent, kkt }),
            (agent.clone(), 0..4u32)
                .prop_map(|(agent, attempt)| JobEvent::Accepted { agent, attempt }),
            (agent.clone(), 0..4u32).prop_map(|(agent, attempt)| JobEvent::Refused {
                agent,
                attempt,
                reason: "r".into()
            }),
            (agent.clone(), kkt.clone(), 0..4u32, 1..3u32).prop_map(|(agent, kkt, attempt, fd)| {
                JobEvent::Completed {
                    agent,
                    kkt,
                    attempt,
                    result: result(fd),
                }
            }),
            (agent.clone(), kkt, 0..4u32).prop_map(|(agent, kkt, attempt)| {
                JobEvent::NotFiscalized {
                    agent,
                    kkt,
                    attempt,
                    error: err(),
                }
            }),
            agent.clone().prop_map(|agent| JobEvent::Release { agent }),
            (agent, 0..4u32)
                .prop_map(|(agent, attempt)| JobEvent::Undeliverable { agent, attempt }),
        ]
    }

    proptest::proptest! {
        /// Whatever arrives in whatever order: the first fiscal result is never replaced, a
        /// completed job never moves, attempts never go back, and a job in flight is held for
        /// its current attempt.
        #[test]
        fn invariants_hold_under_any_sequence_of_events(
            events in proptest::collection::vec(event_strategy(), 0..64)
        ) {
            let mut job = queued();
            let mut first: Option<FiscalResult> = None;
            for (i, event) in events.into_iter().enumerate() {
                let was_completed = matches!(job.state, JobState::Completed { .. });
                let decision = apply(&job, event, i as u64);
                if let Decision::Apply(next) = decision {
                    proptest::prop_assert!(!was_completed, "a completed job moved");
                    proptest::prop_assert!(next.attempt >= job.attempt);
                    proptest::prop_assert!(next.history.len() <= MAX_HISTORY);
                    job = *next;
                }
                if let JobState::Completed { result, .. } = &job.state {
                    match &first {
                        None => first = Some(result.clone()),
                        Some(r) => proptest::prop_assert_eq!(r, result),
                    }
                }
                if let Some((_, _, attempt)) = job.state.holder() {
                    proptest::prop_assert_eq!(attempt, job.attempt);
                }
            }
        }
    }
}
