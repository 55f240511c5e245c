//! The tunnel over a store that is not the redb `Store` itself: the [`FleetStore`] trait is all
//! it needs. The wrapper fails report commits on demand, which is what a second backend's outage
//! looks like to the exactly-once protocol: nothing of the failed batch is acknowledged, the link
//! is dropped, and the agent's resend applies exactly once when the store is back.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use controller::rules::{Job, JobState, QueuePlace, TokenRefusal};
use controller::store::{
    AgentLookup, AgentRecord, Anomaly, Applied, AssignError, FleetStore, HelloOutcome, KktRecord,
    Report, Store, StoreError, TokenLookup,
};
use controller::tunnel::TunnelEvent;
use protocol::tunnel::{AgentMessage, ControllerMessage, HeldJob, JobId, JournalSummary, Work};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The redb store, with report commits that fail while `down` is set.
#[derive(Clone)]
struct Flaky {
    store: Store,
    down: Arc<AtomicBool>,
}

impl FleetStore for Flaky {
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.store.flush()
    }
    fn controller_id(&self) -> Result<String, StoreError> {
        self.store.controller_id()
    }
    fn check_token(&self, hash: &[u8; 32], now_ms: u64) -> Result<(), TokenLookup> {
        self.store.check_token(hash, now_ms)
    }
    fn enroll(
        &self,
        token_hash: [u8; 32],
        agent: AgentRecord,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<(), TokenRefusal>, StoreError>> + Send {
        self.store.enroll(token_hash, agent, now_ms)
    }
    fn add_certificate(
        &self,
        agent: &str,
        fingerprint: [u8; 32],
        not_after: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.store.add_certificate(agent, fingerprint, not_after)
    }
    fn revoke_agent(&self, agent: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.store.revoke_agent(agent)
    }
    fn agent_by_certificate(
        &self,
        fingerprint: &[u8; 32],
    ) -> Result<Result<AgentRecord, AgentLookup>, StoreError> {
        self.store.agent_by_certificate(fingerprint)
    }
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.store.agent(id)
    }
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.store.agents()
    }
    fn agent_hello(
        &self,
        agent: &str,
        store_epoch: u64,
        last_seq: u64,
        held_jobs: HashSet<JobId>,
        now_ms: u64,
    ) -> impl Future<Output = Result<HelloOutcome, StoreError>> + Send {
        self.store
            .agent_hello(agent, store_epoch, last_seq, held_jobs, now_ms)
    }
    fn assign(
        &self,
        job_id: &str,
        work: Work,
        agent: &str,
        kkt: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<Job, AssignError>, StoreError>> + Send {
        self.store.assign(job_id, work, agent, kkt, now_ms)
    }
    fn undeliverable(
        &self,
        job_id: &str,
        agent: &str,
        attempt: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.store.undeliverable(job_id, agent, attempt, now_ms)
    }
    fn apply_reports(
        &self,
        agent: &str,
        reports: Vec<Report>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send {
        let down = self.down.load(Ordering::SeqCst);
        let commit = self.store.apply_reports(agent, reports, now_ms);
        async move {
            if down {
                Err(StoreError::Commit(
                    "injected: the database is unreachable".into(),
                ))
            } else {
                commit.await
            }
        }
    }
    fn fail_job(
        &self,
        job_id: &str,
        reason: String,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.store.fail_job(job_id, reason, now_ms)
    }
    fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.store.job(id)
    }
    fn jobs_in_doubt(&self, older_than_ms: u64, now_ms: u64) -> Result<Vec<Job>, StoreError> {
        self.store.jobs_in_doubt(older_than_ms, now_ms)
    }
    fn in_flight(&self) -> Result<Vec<(String, JobId, String)>, StoreError> {
        self.store.in_flight()
    }
    fn queued(&self) -> Result<Vec<(QueuePlace, JobId)>, StoreError> {
        self.store.queued()
    }
    fn kkt(&self, zn: &str) -> Result<Option<KktRecord>, StoreError> {
        self.store.kkt(zn)
    }
    fn kkts(&self) -> Result<Vec<KktRecord>, StoreError> {
        self.store.kkts()
    }
    fn anomalies(&self) -> Result<Vec<Anomaly>, StoreError> {
        self.store.anomalies()
    }
}

#[tokio::test]
async fn a_failed_report_commit_acknowledges_nothing_and_the_resend_applies_once() {
    let down = Arc::new(AtomicBool::new(false));
    let c = start_over(|store| Flaky {
        store,
        down: down.clone(),
    })
    .await;
    let mut events = c.tunnel.subscribe();
    let (creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    assert!(matches!(
        agent.recv().await.unwrap(),
        ControllerMessage::Dispatch(_)
    ));

    // The store goes down with the result on its way: no ack, and the link is dropped so that
    // the agent resends rather than waiting for an ack that will never come.
    down.store(true, Ordering::SeqCst);
    agent.outbox(1, completed("j1", "K1", 1, 10)).await;
    let reason = agent.closed_reason().await;
    assert!(reason.contains("store failed"), "{reason}");
    assert!(matches!(
        c.tunnel.job("j1").unwrap().unwrap().state,
        JobState::Assigned { .. }
    ));
    assert_eq!(
        c.store
            .agent(&creds.agent_id)
            .unwrap()
            .unwrap()
            .applied_upto,
        0
    );

    // Back up: the agent reconnects holding the job and replays entry 1.
    down.store(false, Ordering::SeqCst);
    let mut again = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    let h = again
        .hello(
            1,
            JournalSummary {
                jobs: vec![HeldJob {
                    job: "j1".into(),
                    attempt: 1,
                    kkt: "K1".into(),
                }],
                last_seq: 1,
                outbox_depth: 1,
            },
        )
        .await;
    assert_eq!(h.applied_upto, 0, "entry 1 was never applied");
    again
        .send(&AgentMessage::Attached(attached("K1")))
        .await
        .unwrap();
    again.outbox(1, completed("j1", "K1", 1, 10)).await;
    loop {
        match again.recv().await.unwrap() {
            ControllerMessage::Ack { upto } => {
                assert_eq!(upto, 1);
                break;
            }
            ControllerMessage::Settings { .. } => {}
            other => panic!("expected the ack, got {other:?}"),
        }
    }
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::JobCompleted { job, .. } if job == "j1"),
    )
    .await;
    let job = c.tunnel.job("j1").unwrap().unwrap();
    assert!(matches!(job.state, JobState::Completed { .. }), "{job:?}");
    let completions = job
        .history
        .iter()
        .filter(|h| h.state == "completed")
        .count();
    assert_eq!(completions, 1, "{:?}", job.history);
    assert!(c.tunnel.anomalies().unwrap().is_empty());
}
