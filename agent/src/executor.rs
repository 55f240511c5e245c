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
        };
        match step(&on, job).await {
            Ok(()) => {}
            Err(CallError::LinkLost) | Err(CallError::NotAttached) => {
                debug!(kkt = %zn, "link lost during a job; recovery runs on reattach");
                return;
            }
            Err(CallError::Kkt(e)) => {
                // A query failed (not the job itself): the job stays where it is; try again
                // shortly, or sooner if woken.
                warn!(kkt = %zn, error = %e, "register query failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = wake.notified() => {}
                }
            }
        }
    }
}

/// One attachment of one register: every call the executor makes goes through it.
struct Link<'a> {
    agent: &'a Agent,
    zn: &'a str,
    generation: u64,
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

fn unexpected(what: &str, reply: &Reply) -> CallError {
    CallError::Kkt(KktError::new(
        ErrorCode::INVALID_PARAMETER,
        format!("{what} answered {reply:?}"),
    ))
}

async fn step(link: &Link<'_>, job: JournalJob) -> Result<(), CallError> {
    match &job.phase {
        JobPhase::Reported { .. } => Ok(()),
        JobPhase::Executing {
            fn_number,
            fd_before,
        } => recover(link, &job, fn_number, *fd_before).await,
        JobPhase::Accepted => execute(link, &job).await,
    }
}

async fn execute(link: &Link<'_>, job: &JournalJob) -> Result<(), CallError> {
    let (agent, zn) = (link.agent, link.zn);
    let (fn_number, fd_before) = match link.fn_position().await {
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
    debug!(job = %job.job, kkt = %zn, fd_before, "executing");
    crash_point("after-executing");
    match link.call(job.work.call(&job.job)).await {
        Ok(Reply::Fiscal(result)) => {
            crash_point("before-report");
            agent.report(&job.job, Ok(result)).await;
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
