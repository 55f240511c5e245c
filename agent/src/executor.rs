//! Executes journaled jobs on one register, one at a time, with the exactly-once rules of
//! `journal` (invariant 2): record the FN's last number, send, report; after any interruption,
//! settle the outcome from the FN archive before doing anything else.

use crate::agent::{Agent, CallError};
use crate::journal::{JobPhase, JournalJob};
use protocol::kkt::{Call, ErrorCode, KktError, Reply};
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Test fault knob: `AGENT_CRASH_AT=after-executing` aborts the process right after `Executing`
/// is durable and before the receipt is sent (the "not fiscalized" branch of recovery);
/// `AGENT_CRASH_AT=before-report` aborts after the register answered with a document and before
/// the result is journaled (the "fiscalized" branch). An abort is what `kill -9` does at that
/// instant: no destructor runs, nothing is flushed.
fn crash_point(name: &str) {
    if std::env::var("AGENT_CRASH_AT").is_ok_and(|v| v == name) {
        warn!(point = name, "AGENT_CRASH_AT: aborting the agent");
        std::process::abort();
    }
}

/// Pause before retrying after a register query failed.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs until the register detaches (or a newer attachment replaces this one).
pub async fn run(agent: Arc<Agent>, zn: String, generation: u64, wake: Arc<Notify>) {
    let mut state = Pipeline::default();
    loop {
        if !agent.is_attached(&zn, generation) {
            return;
        }
        let Some(job) = agent.next_job(&zn) else {
            wake.notified().await;
            continue;
        };
        let on = Link {
            agent: &agent,
            zn: &zn,
            generation,
            wake: &wake,
        };
        match step(&on, job, &mut state).await {
            Ok(()) => {}
            Err(CallError::LinkLost) | Err(CallError::NotAttached) => {
                debug!(kkt = %zn, "link lost during a job; recovery runs on reattach");
                return;
            }
            Err(CallError::Kkt(e)) => {
                // A query failed (not the job itself): the job stays where it is; try again
                // shortly, or sooner if woken.
                warn!(kkt = %zn, error = %e, "register query failed; retrying");
                state = Pipeline::default();
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = wake.notified() => {}
                }
            }
        }
    }
}

/// What the executor carries from one receipt to the next on the same register, so that the
/// register does not wait between receipts:
/// * `known` — the FN position the last receipt ended at, used instead of asking the FN;
/// * `prepared` — the next job, already made `Executing` (durably) while the previous receipt
///   was being printed, with the `fd_before` the previous one was sent with.
///
/// Both are safe because an `fd_before` may be stale-low but never high: FN numbers only grow,
/// and anything formed since (the previous receipt, a shift command) moves the real number past
/// it. Recovery reads every document after `fd_before` looking for the job's id, so a low value
/// only makes it read more. The one stale case that is not low, a replaced FN, makes recovery
/// stop and leave the job in doubt rather than guess; so `known` is used only for
/// [`KNOWN_FOR`] after the answer it came from — replacing an FN takes a closed shift, a closed
/// archive and a new registration, far more than that.
#[derive(Default)]
struct Pipeline {
    known: Option<(String, u32, tokio::time::Instant)>,
    prepared: Option<String>,
}

/// How long the FN position of a register's last answer stands in for asking the FN.
const KNOWN_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// One attachment of one register: every call the executor makes goes through it.
struct Link<'a> {
    agent: &'a Arc<Agent>,
    zn: &'a str,
    generation: u64,
    wake: &'a Notify,
}

impl Link<'_> {
    async fn call(&self, call: Call) -> Result<Reply, CallError> {
        self.agent.call_on(self.zn, self.generation, call).await
    }

    /// The FN's number and its last document number.
    async fn fn_position(&self) -> Result<(String, u32), CallError> {
        match self.call(Call::GetFnInfo).await? {
            Reply::FnInfo(i) => Ok((i.fn_number, i.last_fd_number)),
            other => Err(unexpected("getFnInfo", &other)),
        }
    }
}

/// The register answered a query with something else: a link fault, not the receipt's (the
/// controller blames `INVALID_PARAMETER` on the receipt itself).
fn unexpected(what: &str, reply: &Reply) -> CallError {
    CallError::Kkt(KktError::new(
        ErrorCode::NO_CONNECTION,
        format!("{what} answered {reply:?}"),
    ))
}

async fn step(link: &Link<'_>, job: JournalJob, state: &mut Pipeline) -> Result<(), CallError> {
    let prepared = state.prepared.take();
    match &job.phase {
        JobPhase::Reported { .. } => Ok(()),
        // Made `Executing` by this executor while the previous receipt ran: not an interrupted
        // job, send it.
        JobPhase::Executing {
            fn_number,
            fd_before,
        } if prepared.as_deref() == Some(job.job.as_str()) => {
            send(link, &job, fn_number.clone(), *fd_before, state).await
        }
        JobPhase::Executing {
            fn_number,
            fd_before,
        } => {
            state.known = None;
            recover(link, &job, fn_number, *fd_before).await
        }
        JobPhase::Accepted => execute(link, &job, state).await,
    }
}

async fn execute(link: &Link<'_>, job: &JournalJob, state: &mut Pipeline) -> Result<(), CallError> {
    let agent = link.agent;
    let position = match state.known.take() {
        Some((fn_number, fd, at)) if at.elapsed() < KNOWN_FOR => Ok((fn_number, fd)),
        _ => link.fn_position().await,
    };
    let (fn_number, fd_before) = match position {
        Ok(p) => p,
        Err(CallError::Kkt(e)) => {
            // Nothing was sent: the register refused even to report; the job was not fiscalized.
            agent.report(&job.job, Err(e)).await;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let id = job.job.clone();
    if !agent
        .transition(|j| j.start(&id, &fn_number, fd_before))
        .await
    {
        // Someone else moved the job on (a newer executor after a reattach): not ours to send.
        return Ok(());
    }
    send(link, job, fn_number, fd_before, state).await
}

/// Makes the register's next accepted job `Executing` with `fd_before`; its id when done.
async fn prepare_next(
    link: &Link<'_>,
    current: &str,
    fn_number: &str,
    fd_before: u32,
) -> Option<String> {
    let next = link.agent.next_accepted(link.zn, current)?;
    let id = next.job.clone();
    link.agent
        .transition(|j| j.start(&id, fn_number, fd_before))
        .await
        .then_some(next.job)
}

/// Sends a job whose `Executing` is durable, and reports the answer. While the register works,
/// the next job is prepared (see [`Pipeline`]).
async fn send(
    link: &Link<'_>,
    job: &JournalJob,
    fn_number: String,
    fd_before: u32,
    state: &mut Pipeline,
) -> Result<(), CallError> {
    let (agent, zn) = (link.agent, link.zn);
    debug!(job = %job.job, kkt = %zn, fd_before, "executing");
    crash_point("after-executing");
    let call = link.call(job.work.call(&job.job));
    tokio::pin!(call);
    let mut prepared = None;
    let mut preparing = Some(Box::pin(prepare_next(
        link, &job.job, &fn_number, fd_before,
    )));
    let answer = loop {
        match preparing.as_mut() {
            Some(p) => tokio::select! {
                a = &mut call => break a,
                next = p => {
                    preparing = None;
                    prepared = next;
                }
            },
            None if prepared.is_some() => break (&mut call).await,
            // Nothing to prepare yet: wait for the receipt or for a new job.
            None => tokio::select! {
                a = &mut call => break a,
                _ = link.wake.notified() => {
                    preparing = Some(Box::pin(prepare_next(link, &job.job, &fn_number, fd_before)));
                }
            },
        }
    };
    // A preparation once begun is finished: its write may already be queued, and an abandoned
    // one would send the job through recovery instead.
    if let Some(p) = preparing {
        prepared = p.await;
    }
    state.prepared = prepared;
    match answer {
        Ok(Reply::Fiscal(result)) => {
            crash_point("before-report");
            if result.fn_number == fn_number {
                state.known = Some((
                    result.fn_number.clone(),
                    result.fd_number,
                    tokio::time::Instant::now(),
                ));
            }
            agent.report_queued(&job.job, Ok(result));
            Ok(())
        }
        Ok(other) => {
            // Not a fiscal answer: treat the outcome as unknown and settle it from the archive.
            warn!(job = %job.job, kkt = %zn, ?other, "unexpected answer to a receipt");
            recover(link, job, &fn_number, fd_before).await
        }
        Err(CallError::Kkt(e)) => {
            // An error answer is the register's proof that no document was formed.
            info!(job = %job.job, kkt = %zn, error = %e, "not fiscalized");
            agent.report(&job.job, Err(e)).await;
            agent.refresh_status(zn).await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The outcome of a job left `Executing` is unknown: ask the FN it was sent to.
async fn recover(
    link: &Link<'_>,
    job: &JournalJob,
    fn_number: &str,
    fd_before: u32,
) -> Result<(), CallError> {
    let (agent, zn) = (link.agent, link.zn);
    let (current_fn, last) = link.fn_position().await?;
    if current_fn != fn_number {
        // The FN was replaced since: its archive cannot prove anything about this job. Leave it
        // executing (the controller shows it in doubt) for an operator to settle.
        tracing::error!(job = %job.job, kkt = %zn, was = %fn_number, now = %current_fn,
            "FN changed with a job in flight; settle it by hand from the old FN");
        return Err(CallError::Kkt(KktError::new(
            ErrorCode::WRONG_FN_STATE,
            "FN changed with a job in flight",
        )));
    }
    for fd in fd_before.saturating_add(1)..=last {
        match link.call(Agent::fd_request(fd)).await? {
            Reply::FnDocument(doc) => {
                if doc.result.additional_attribute.as_deref() == Some(job.job.as_str()) {
                    info!(job = %job.job, kkt = %zn, fd, "recovered: the receipt was fiscalized");
                    agent.report(&job.job, Ok(doc.result)).await;
                    return Ok(());
                }
            }
            // Without every document read, "not fiscalized" would be a guess: give up for now.
            other => return Err(unexpected("getFnDocument", &other)),
        }
    }
    // The FN holds no document for this job: it was not fiscalized and may run again.
    info!(job = %job.job, kkt = %zn, fd_before, last, "recovered: not fiscalized; running again");
    let id = job.job.clone();
    agent.transition(|j| j.retry(&id)).await;
    Ok(())
}
