//! The agent's executor against real simulated registers over WebSocket, in process: jobs are
//! fiscalized exactly once, refusals become proofs of non-fiscalization, and a register that
//! crashes after forming the document is settled from its FN archive.
#![allow(clippy::unwrap_used)]

use agent::agent::Agent;
use agent::identity::IdentityInfo;
use agent::journal::JobPhase;
use firmware_sim::device::{CrashMode, Fleet, FleetOptions};
use firmware_sim::fixtures;
use protocol::kkt::{Call, ErrorCode, Operator, Reply};
use protocol::tunnel::{Dispatch, OutboxBody, OutboxEntry, Work};
use std::sync::Arc;
use std::time::Duration;

struct Rig {
    agent: Arc<Agent>,
    fleet: Arc<Fleet>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn rig() -> Rig {
    rig_with_limit(1000).await
}

async fn rig_with_limit(limit: usize) -> Rig {
    let data = tempfile::tempdir().unwrap();
    let store = agent::store::Store::open(&data.path().join("journal.redb"), 1).unwrap();
    let (journal, epoch) = agent::journal::load(store.db(), limit).unwrap();
    let agent = Agent::new(
        journal,
        store,
        epoch,
        IdentityInfo {
            agent_id: "test".into(),
            controller: "127.0.0.1:1".into(),
            name: "test".into(),
            not_after: 0,
        },
        data.path().to_path_buf(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/kkt", listener.local_addr().unwrap());
    tokio::spawn(agent::kkt_link::serve_ws(agent.clone(), listener));
    let state = tempfile::tempdir().unwrap();
    let fleet = Arc::new(
        Fleet::open(
            state.path(),
            1,
            FleetOptions {
                connect: url,
                latency_ms: 0,
                default_ofd: None,
                capacity: None,
                ffd: protocol::kkt::FfdVersion::V1_2,
                max_backoff: Duration::from_millis(100),
            },
        )
        .unwrap(),
    );
    fleet.start();
    Rig {
        agent,
        fleet,
        _dirs: (data, state),
    }
}

/// Waits (on the agent's notification) until `n` registers are attached; returns their ZNs.
async fn attached(agent: &Agent, n: usize) -> Vec<String> {
    loop {
        let notified = agent.kkts_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now: Vec<String> = agent.attached().into_iter().map(|a| a.0.zn).collect();
        if now.len() == n {
            return now;
        }
        notified.await;
    }
}

async fn next_entry(agent: &Agent, after: u64) -> OutboxEntry {
    loop {
        let notified = agent.outbox_ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(e) = agent.journal().sendable(after).into_iter().next() {
            return e;
        }
        notified.await;
    }
}

async fn ready_register(rig: &Rig) -> String {
    let zn = attached(&rig.agent, 1).await.remove(0);
    let ofd = fixtures::ofd_endpoint("127.0.0.1:1".parse().unwrap());
    let reg = fixtures::registration(&zn, fixtures::DEMO_INN, ofd).unwrap();
    assert!(matches!(
        rig.agent.call(&zn, Call::Register(reg)).await,
        Ok(Reply::Fiscal(_))
    ));
    assert!(matches!(
        rig.agent
            .call(&zn, Call::OpenShift(Operator::default()))
            .await,
        Ok(Reply::Fiscal(_))
    ));
    zn
}

fn dispatch(id: &str, kkt: &str, n: u64) -> Dispatch {
    Dispatch {
        job: id.into(),
        attempt: 1,
        kkt: kkt.into(),
        work: Work::Receipt(fixtures::receipt(n, None)),
    }
}

/// Documents in the register's archive that carry `job` in tag 1192.
async fn documents_for(agent: &Agent, zn: &str, job: &str) -> usize {
    let Ok(Reply::FnInfo(info)) = agent.call(zn, Call::GetFnInfo).await else {
        panic!("fn info")
    };
    let mut n = 0;
    for fd in 1..=info.last_fd_number {
        if let Ok(Reply::FnDocument(d)) = agent.call(zn, Agent::fd_request(fd)).await {
            if d.result.additional_attribute.as_deref() == Some(job) {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_fiscalized_once_and_reported_in_the_outbox() {
    let rig = rig().await;
    let zn = ready_register(&rig).await;
    rig.agent.on_dispatch(dispatch("job-1", &zn, 1)).await;
    let entry = next_entry(&rig.agent, 0).await;
    let OutboxBody::Completed { job, result, .. } = entry.body else {
        panic!("completed, got {:?}", entry.body)
    };
    assert_eq!(job, "job-1");
    assert_eq!(result.additional_attribute.as_deref(), Some("job-1"));
    assert_eq!(result.fd_number, 3);
    assert_eq!(
        rig.agent.job_phase("job-1"),
        Some(JobPhase::Reported { seq: entry.seq })
    );
    // A resent dispatch of the same job is not executed again.
    rig.agent.on_dispatch(dispatch("job-1", &zn, 1)).await;
    assert_eq!(documents_for(&rig.agent, &zn, "job-1").await, 1);
    rig.agent.on_ack(entry.seq);
    assert_eq!(rig.agent.job_phase("job-1"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_reported_as_not_fiscalized() {
    let rig = rig().await;
    let zn = ready_register(&rig).await;
    rig.fleet.device(&zn).unwrap().register().paper_present = false;
    rig.agent.on_dispatch(dispatch("job-2", &zn, 2)).await;
    let entry = next_entry(&rig.agent, 0).await;
    let OutboxBody::NotFiscalized { job, error, .. } = entry.body else {
        panic!("not fiscalized, got {:?}", entry.body)
    };
    assert_eq!(job, "job-2");
    assert_eq!(error.code, ErrorCode::NO_PAPER);
    assert_eq!(documents_for(&rig.agent, &zn, "job-2").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_crash_after_the_document_is_settled_from_the_archive() {
    let rig = rig().await;
    let zn = ready_register(&rig).await;
    rig.fleet.device(&zn).unwrap().faults().crash_next_receipt = Some(CrashMode::Reboot);
    rig.agent.on_dispatch(dispatch("job-3", &zn, 3)).await;
    // The register forms the document and drops the link without answering; when it is back,
    // the executor reads the archive instead of sending the receipt again.
    let entry = next_entry(&rig.agent, 0).await;
    let OutboxBody::Completed { job, result, .. } = entry.body else {
        panic!("completed, got {:?}", entry.body)
    };
    assert_eq!(job, "job-3");
    assert_eq!(result.fd_number, 3);
    attached(&rig.agent, 1).await;
    assert_eq!(documents_for(&rig.agent, &zn, "job-3").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_for_a_register_that_is_not_here_are_refused_without_journaling() {
    let rig = rig().await;
    let _ = ready_register(&rig).await;
    rig.agent
        .on_dispatch(dispatch("job-4", "0000000000000000", 4))
        .await;
    assert_eq!(rig.agent.job_phase("job-4"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_refuses_new_jobs_raises_an_alarm_and_keeps_what_it_holds() {
    // Room for one job and its report.
    let rig = rig_with_limit(2).await;
    let zn = ready_register(&rig).await;
    rig.agent.on_dispatch(dispatch("held", &zn, 1)).await;
    let entry = next_entry(&rig.agent, 0).await;
    assert!(matches!(entry.body, OutboxBody::Completed { .. }));
    // Job + unacknowledged report fill the journal: the next job is refused, nothing journaled.
    rig.agent.on_dispatch(dispatch("refused", &zn, 2)).await;
    assert_eq!(rig.agent.job_phase("refused"), None);
    assert_eq!(documents_for(&rig.agent, &zn, "refused").await, 0);
    let health = rig.agent.health();
    assert!(health.alarm.is_some(), "the technician sees why");
    assert_eq!(health.outbox_depth, 1, "the report it holds is kept");
    // Once the controller acknowledges, there is room again.
    rig.agent.on_ack(entry.seq);
    assert!(rig.agent.health().alarm.is_none());
    rig.agent.on_dispatch(dispatch("after", &zn, 3)).await;
    let next = next_entry(&rig.agent, entry.seq).await;
    assert!(matches!(next.body, OutboxBody::Completed { ref job, .. } if job == "after"));
}

/// Receipts queued on one register run back to back: the next one is made `Executing` (with the
/// previous `fd_before`, stale-low and safe) while the register prints the current one. Each is
/// fiscalized once, in dispatch order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_queued_on_one_register_run_back_to_back_each_once() {
    let rig = rig().await;
    let zn = ready_register(&rig).await;
    rig.fleet.device(&zn).unwrap().faults().latency_ms = 30;
    for n in 0..6 {
        rig.agent
            .on_dispatch(dispatch(&format!("job-b{n}"), &zn, 10 + n))
            .await;
    }
    let mut after = 0;
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let entry = next_entry(&rig.agent, after).await;
        after = entry.seq;
        if let OutboxBody::Completed { job, result, .. } = entry.body {
            seen.push((job, result.fd_number));
        }
    }
    let expected: Vec<(String, u32)> = (0..6).map(|n| (format!("job-b{n}"), 3 + n)).collect();
    assert_eq!(seen, expected);
    for n in 0..6 {
        assert_eq!(
            documents_for(&rig.agent, &zn, &format!("job-b{n}")).await,
            1
        );
    }
}

/// The register reboots after forming a document while the next job was already prepared
/// (`Executing` on disk, never sent): recovery finds the first in the archive and proves the
/// second was not fiscalized, which then runs. Each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_the_next_receipt_prepared_settles_both_exactly_once() {
    let rig = rig().await;
    let zn = ready_register(&rig).await;
    {
        let device = rig.fleet.device(&zn).unwrap();
        let mut faults = device.faults();
        faults.latency_ms = 50;
        faults.crash_next_receipt = Some(CrashMode::Reboot);
    }
    for n in 0..3 {
        rig.agent
            .on_dispatch(dispatch(&format!("job-c{n}"), &zn, 20 + n))
            .await;
    }
    let mut after = 0;
    let mut done = std::collections::BTreeMap::new();
    while done.len() < 3 {
        let entry = next_entry(&rig.agent, after).await;
        after = entry.seq;
        match entry.body {
            OutboxBody::Completed { job, .. } => {
                assert!(
                    done.insert(job.clone(), ()).is_none(),
                    "{job} reported twice"
                );
            }
            other => panic!("every job must complete, got {other:?}"),
        }
    }
    attached(&rig.agent, 1).await;
    for n in 0..3 {
        assert_eq!(
            documents_for(&rig.agent, &zn, &format!("job-c{n}")).await,
            1
        );
    }
}
