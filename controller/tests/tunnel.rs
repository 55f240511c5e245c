//! The exactly-once protocol over a real QUIC tunnel, with fake agents.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use controller::rules::{JobState, SetbackKind};
use controller::tunnel::{CommandError, DispatchError, TunnelEvent};
use protocol::kkt::{Call, ErrorCode, KktError, Reply};
use protocol::tunnel::{
    AgentMessage, ControllerMessage, Dispatch, Health, HeldJob, JournalSummary, OutboxBody,
    MAX_FRAME, TUNNEL_VERSION,
};
use std::time::Duration;

async fn expect_dispatch(agent: &mut FakeAgent) -> Dispatch {
    match agent.recv().await.unwrap() {
        ControllerMessage::Dispatch(d) => d,
        other => panic!("expected a dispatch, got {other:?}"),
    }
}

async fn expect_ack(agent: &mut FakeAgent) -> u64 {
    match agent.recv().await.unwrap() {
        ControllerMessage::Ack { upto } => upto,
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_goes_out_is_accepted_completed_and_acknowledged() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    let online = c.tunnel.online_kkts();
    assert_eq!(online.len(), 1);
    assert_eq!(online[0].agent, creds.agent_id);

    let sent = c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    assert_eq!(sent.attempt, 1);
    // Recorded before it was sent.
    assert!(matches!(
        c.tunnel.job("j1").unwrap().unwrap().state,
        JobState::Assigned { attempt: 1, .. }
    ));
    assert_eq!(c.tunnel.online_kkts()[0].in_flight, 1);
    let d = expect_dispatch(&mut agent).await;
    assert_eq!((d.job.as_str(), d.kkt.as_str(), d.attempt), ("j1", "K1", 1));
    assert_eq!(d.work, work(1));

    agent
        .send(&AgentMessage::Accepted {
            job: "j1".into(),
            attempt: 1,
        })
        .await
        .unwrap();
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::JobAccepted { job, .. } if job == "j1"),
    )
    .await;
    assert!(matches!(
        c.tunnel.job("j1").unwrap().unwrap().state,
        JobState::Accepted { .. }
    ));

    agent.outbox(1, completed("j1", "K1", 1, 10)).await;
    assert_eq!(expect_ack(&mut agent).await, 1);
    let job = c.tunnel.job("j1").unwrap().unwrap();
    match &job.state {
        JobState::Completed { result, agent, .. } => {
            assert_eq!(result.fd_number, 10);
            assert_eq!(*agent, creds.agent_id);
        }
        other => panic!("expected completed, got {other:?}"),
    }
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::JobCompleted { job, .. } if job == "j1"),
    )
    .await;
    assert_eq!(c.tunnel.online_kkts()[0].in_flight, 0);
    assert!(c.tunnel.anomalies().unwrap().is_empty());
    assert_eq!(
        c.tunnel
            .store()
            .agent(&creds.agent_id)
            .unwrap()
            .unwrap()
            .applied_upto,
        1
    );

    // A completed job cannot be given out again.
    assert!(matches!(
        c.tunnel.dispatch("j1", "K1", work(1)).await,
        Err(DispatchError::Assign(_))
    ));
    // A register nobody attached.
    assert!(matches!(
        c.tunnel.dispatch("j9", "K404", work(9)).await,
        Err(DispatchError::KktOffline(_))
    ));
}

#[tokio::test]
async fn replays_after_a_reconnect_are_deduplicated() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    expect_dispatch(&mut agent).await;
    agent.outbox(1, completed("j1", "K1", 1, 10)).await;
    assert_eq!(expect_ack(&mut agent).await, 1);

    // The link drops; the agent comes back with the same store epoch.
    agent.conn.close(0u32.into(), b"cut");
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::AgentDisconnected { .. })
    })
    .await;
    let mut again = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    let h = again
        .hello(
            1,
            JournalSummary {
                jobs: vec![],
                last_seq: 1,
                outbox_depth: 1,
            },
        )
        .await;
    assert_eq!(h.applied_upto, 1, "the agent may drop entry 1");
    assert_eq!(h.version, TUNNEL_VERSION);

    // It replays entry 1 anyway (it lost the ack): skipped by sequence, acknowledged again.
    again.outbox(1, completed("j1", "K1", 1, 10)).await;
    assert_eq!(expect_ack(&mut again).await, 1);
    // The same result under a new number (e.g. reported twice): deduplicated by job id.
    again.outbox(2, completed("j1", "K1", 1, 10)).await;
    assert_eq!(expect_ack(&mut again).await, 2);
    assert!(c.tunnel.anomalies().unwrap().is_empty());
    let job = c.tunnel.job("j1").unwrap().unwrap();
    let completions = job
        .history
        .iter()
        .filter(|h| h.state == "completed")
        .count();
    assert_eq!(completions, 1, "completed exactly once: {:?}", job.history);

    // A different document for the same job is a duplicate fiscalization: recorded, not applied.
    again.outbox(3, completed("j1", "K1", 1, 11)).await;
    assert_eq!(expect_ack(&mut again).await, 3);
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::AnomalyRecorded { job, .. } if job == "j1"),
    )
    .await;
    let anomalies = c.tunnel.anomalies().unwrap();
    assert_eq!(anomalies.len(), 1);
    match &c.tunnel.job("j1").unwrap().unwrap().state {
        JobState::Completed { result, .. } => assert_eq!(result.fd_number, 10, "first one kept"),
        other => panic!("{other:?}"),
    }

    // A new store epoch: numbering starts over at 0.
    again.conn.close(0u32.into(), b"cut");
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::AgentDisconnected { .. })
    })
    .await;
    let mut fresh = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    assert_eq!(
        fresh.hello(2, JournalSummary::default()).await.applied_upto,
        0
    );
}

#[tokio::test]
async fn a_reconnect_without_an_assigned_job_releases_it_and_keeps_held_ones() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    // j1 reaches the agent and is journaled; j2 is assigned but "lost" on the way.
    c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    expect_dispatch(&mut agent).await;
    agent
        .send(&AgentMessage::Accepted {
            job: "j1".into(),
            attempt: 1,
        })
        .await
        .unwrap();
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::JobAccepted { .. })
    })
    .await;
    c.tunnel.dispatch("j2", "K1", work(2)).await.unwrap();
    expect_dispatch(&mut agent).await;
    agent.conn.close(0u32.into(), b"cut");
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::AgentDisconnected { .. })
    })
    .await;

    // While the agent is away both are "in doubt".
    assert_eq!(c.tunnel.jobs_in_doubt(Duration::ZERO).unwrap().len(), 2);

    let mut again = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    again
        .hello(
            1,
            JournalSummary {
                jobs: vec![HeldJob {
                    job: "j1".into(),
                    attempt: 1,
                    kkt: "K1".into(),
                }],
                last_seq: 0,
                outbox_depth: 0,
            },
        )
        .await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::JobReleased { job, .. } if job == "j2"),
    )
    .await;
    let j2 = c.tunnel.job("j2").unwrap().unwrap();
    assert_eq!(j2.state, JobState::Queued);
    assert!(matches!(
        j2.last_error.as_ref().map(|e| &e.kind),
        Some(SetbackKind::Released)
    ));
    assert!(matches!(
        c.tunnel.job("j1").unwrap().unwrap().state,
        JobState::Accepted { .. }
    ));

    // The released job goes out again with the next attempt.
    again.attach("K1").await;
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::KktAttached { .. })
    })
    .await;
    let d = c.tunnel.dispatch("j2", "K1", work(2)).await.unwrap();
    assert_eq!(d.attempt, 2);
    assert_eq!(expect_dispatch(&mut again).await.attempt, 2);
}

#[tokio::test]
async fn not_fiscalized_puts_the_job_back_and_stale_reports_are_ignored() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (_creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    expect_dispatch(&mut agent).await;
    let nf = |attempt| OutboxBody::NotFiscalized {
        job: "j1".into(),
        attempt,
        kkt: "K1".into(),
        error: KktError::new(ErrorCode::NO_PAPER, "no paper"),
    };
    agent.outbox(1, nf(1)).await;
    assert_eq!(expect_ack(&mut agent).await, 1);
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::JobNotFiscalized { .. })
    })
    .await;
    let job = c.tunnel.job("j1").unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.attempt, 1);
    assert!(matches!(
        job.last_error.map(|e| e.kind),
        Some(SetbackKind::NotFiscalized(_))
    ));

    // Second attempt; a late report about attempt 1 changes nothing.
    c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    assert_eq!(expect_dispatch(&mut agent).await.attempt, 2);
    agent.outbox(2, nf(1)).await;
    assert_eq!(expect_ack(&mut agent).await, 2);
    assert!(matches!(
        c.tunnel.job("j1").unwrap().unwrap().state,
        JobState::Assigned { attempt: 2, .. }
    ));

    // A refusal before journaling also re-queues.
    agent
        .send(&AgentMessage::Refused {
            job: "j1".into(),
            attempt: 2,
            reason: "journal full".into(),
        })
        .await
        .unwrap();
    wait_for(&mut events, |e| matches!(e, TunnelEvent::JobRefused { .. })).await;
    assert_eq!(c.tunnel.job("j1").unwrap().unwrap().state, JobState::Queued);
}

#[tokio::test]
async fn commands_heartbeats_and_pings() {
    let c = start().await;
    let (creds, mut agent) = online_agent(&c, "shelf", "K1").await;

    let tunnel = c.tunnel.clone();
    let call = tokio::spawn(async move {
        tunnel
            .command("K1", Call::GetDeviceStatus, Duration::from_secs(20))
            .await
    });
    let (id, kkt) = match agent.recv().await.unwrap() {
        ControllerMessage::Command { id, kkt, call } => {
            assert_eq!(call, Call::GetDeviceStatus);
            (id, kkt)
        }
        other => panic!("expected a command, got {other:?}"),
    };
    agent
        .send(&AgentMessage::CommandResult {
            id,
            kkt,
            outcome: Ok(Reply::Done),
        })
        .await
        .unwrap();
    assert_eq!(call.await.unwrap().unwrap(), Reply::Done);

    // Register errors come back as errors.
    let tunnel = c.tunnel.clone();
    let call = tokio::spawn(async move {
        tunnel
            .command("K1", Call::ReportX, Duration::from_secs(20))
            .await
    });
    let ControllerMessage::Command { id, kkt, .. } = agent.recv().await.unwrap() else {
        panic!("expected a command")
    };
    agent
        .send(&AgentMessage::CommandResult {
            id,
            kkt,
            outcome: Err(KktError::new(ErrorCode::COVER_OPEN, "cover open")),
        })
        .await
        .unwrap();
    assert!(matches!(call.await.unwrap(), Err(CommandError::Kkt(_))));

    // Receipts never travel as commands.
    assert!(matches!(
        c.tunnel
            .command(
                "K1",
                Call::Receipt(firmware_sim::fixtures::receipt(1, None)),
                Duration::from_secs(1)
            )
            .await,
        Err(CommandError::UseJob(_))
    ));
    assert!(matches!(
        c.tunnel
            .command("K404", Call::GetFnInfo, Duration::from_secs(1))
            .await,
        Err(CommandError::KktOffline(_))
    ));

    // Heartbeat: answered with a pong, health visible.
    agent
        .send(&AgentMessage::Heartbeat(Health {
            sent_at_micros: 77,
            journal_depth: 3,
            version: "fake".into(),
            ..Health::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        agent.recv().await.unwrap(),
        ControllerMessage::Pong { sent_at_micros: 77 }
    );
    let info = c.tunnel.agents();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].id, creds.agent_id);
    assert_eq!(info[0].health.as_ref().unwrap().journal_depth, 3);
    assert_eq!(info[0].kkts, vec!["K1".to_string()]);
}

#[tokio::test]
async fn bad_frames_close_only_the_offending_connection() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (_good_creds, mut good) = online_agent(&c, "good", "K1").await;

    // 1. An oversized length prefix before the hello.
    let b = c.enroll_agent("big").await;
    let mut big = connect(c.addr(), c.ca_der(), Some(&b)).await.unwrap();
    big.send_raw(&((MAX_FRAME as u32) + 1).to_le_bytes())
        .await
        .unwrap();
    let reason = big.closed_reason().await;
    assert!(reason.contains("exceeds"), "{reason}");

    // 2. Garbage that does not decode, after a good hello.
    let g = c.enroll_agent("garbage").await;
    let mut garbage = connect(c.addr(), c.ca_der(), Some(&g)).await.unwrap();
    garbage.hello(1, JournalSummary::default()).await;
    let mut frame = 8u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0xff; 8]);
    garbage.send_raw(&frame).await.unwrap();
    let reason = garbage.closed_reason().await;
    assert!(reason.contains("does not decode"), "{reason}");

    // 3. Another tunnel version.
    let v = c.enroll_agent("future").await;
    let mut future = connect(c.addr(), c.ca_der(), Some(&v)).await.unwrap();
    let AgentMessage::Hello(mut h) = hello(&v.agent_id, 1, JournalSummary::default()) else {
        unreachable!()
    };
    h.version = 99;
    future.send(&AgentMessage::Hello(h)).await.unwrap();
    let reason = future.closed_reason().await;
    assert!(reason.contains("version 99"), "{reason}");

    // 3b. A hello from a later protocol whose layout we cannot decode: still named by version.
    let w = c.enroll_agent("later").await;
    let mut later = connect(c.addr(), c.ca_der(), Some(&w)).await.unwrap();
    let mut frame = 4u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0, 2, 0xff, 0xff]);
    later.send_raw(&frame).await.unwrap();
    let reason = later.closed_reason().await;
    assert!(reason.contains("version 2"), "{reason}");

    // 4. A hello that claims another agent's id.
    let s = c.enroll_agent("spoof").await;
    let mut spoof = connect(c.addr(), c.ca_der(), Some(&s)).await.unwrap();
    spoof
        .send(&hello(&_good_creds.agent_id, 1, JournalSummary::default()))
        .await
        .unwrap();
    let reason = spoof.closed_reason().await;
    assert!(reason.contains("certificate"), "{reason}");

    // Each was logged and announced with the offending agent's id.
    let mut rejected = Vec::new();
    while rejected.len() < 5 {
        if let TunnelEvent::ConnectionRejected { agent, .. } = wait_for(&mut events, |e| {
            matches!(e, TunnelEvent::ConnectionRejected { .. })
        })
        .await
        {
            rejected.push(agent.unwrap());
        }
    }
    for id in [
        &b.agent_id,
        &g.agent_id,
        &v.agent_id,
        &w.agent_id,
        &s.agent_id,
    ] {
        assert!(rejected.contains(id));
    }

    // The good agent kept its link and still works end to end.
    c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    expect_dispatch(&mut good).await;
    good.outbox(1, completed("j1", "K1", 1, 5)).await;
    assert_eq!(expect_ack(&mut good).await, 1);
    assert_eq!(c.tunnel.agents().len(), 1);
}

#[tokio::test]
async fn many_outbox_entries_are_applied_in_batches_with_cumulative_acks() {
    let c = start().await;
    let (_creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    const N: u32 = 200;
    for i in 1..=N {
        c.tunnel
            .dispatch(&format!("j{i}"), "K1", work(u64::from(i)))
            .await
            .unwrap();
        expect_dispatch(&mut agent).await;
    }
    // Everything at once, as after a reconnect.
    for i in 1..=N {
        agent
            .outbox(u64::from(i), completed(&format!("j{i}"), "K1", 1, i))
            .await;
    }
    let mut acks = 0;
    loop {
        let upto = expect_ack(&mut agent).await;
        acks += 1;
        if upto == u64::from(N) {
            break;
        }
    }
    assert!(acks <= N as usize);
    for i in 1..=N {
        assert!(matches!(
            c.tunnel.job(&format!("j{i}")).unwrap().unwrap().state,
            JobState::Completed { .. }
        ));
    }
    assert_eq!(c.tunnel.online_kkts()[0].in_flight, 0);
}

#[tokio::test]
async fn register_status_detach_settings_and_revocation() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    agent
        .send(&AgentMessage::Status(Box::new(kkt_state("K1"))))
        .await
        .unwrap();
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktStatus { kkt, .. } if kkt == "K1"),
    )
    .await;
    assert_eq!(c.tunnel.online_kkts()[0].state, Some(kkt_state("K1")));
    let stored = c.tunnel.store().kkt("K1").unwrap().unwrap();
    assert_eq!(stored.agent, creds.agent_id);
    assert_eq!(stored.state, Some(kkt_state("K1")));

    // A status about a register of another agent is ignored (tenant isolation).
    agent
        .send(&AgentMessage::Status(Box::new(kkt_state("K2"))))
        .await
        .unwrap();

    c.tunnel
        .push_settings("K1", protocol::tunnel::KktSettings::default())
        .await
        .unwrap();
    assert!(matches!(
        agent.recv().await.unwrap(),
        ControllerMessage::Settings { ref kkt, .. } if kkt == "K1"
    ));

    agent
        .send(&AgentMessage::Detached { kkt: "K1".into() })
        .await
        .unwrap();
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktDetached { kkt, .. } if kkt == "K1"),
    )
    .await;
    assert!(c.tunnel.online_kkts().is_empty());
    assert!(c
        .tunnel
        .store()
        .kkt("K1")
        .unwrap()
        .unwrap()
        .detached_at
        .is_some());
    assert!(c.tunnel.store().kkt("K2").unwrap().is_none());

    // Revocation closes the link and refuses the next connection.
    assert!(c.tunnel.revoke_agent(&creds.agent_id).await.unwrap());
    let reason = agent.closed_reason().await;
    assert!(reason.contains("revoked"), "{reason}");
    let mut again = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    let _ = again
        .send(&hello(&creds.agent_id, 1, JournalSummary::default()))
        .await;
    let reason = again.closed_reason().await;
    assert!(reason.contains("revoked"), "{reason}");
}

/// A journal summary too big for one frame arrives in `HeldJobs` frames before the hello; the
/// controller reconciles against the whole list (a job named only in those frames is not
/// released), and only after the hello.
#[tokio::test]
async fn held_jobs_sent_before_the_hello_count_as_held() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (creds, mut agent) = online_agent(&c, "shelf", "K1").await;
    c.tunnel.dispatch("j1", "K1", work(1)).await.unwrap();
    expect_dispatch(&mut agent).await;
    c.tunnel.dispatch("j2", "K1", work(2)).await.unwrap();
    expect_dispatch(&mut agent).await;
    agent.conn.close(0u32.into(), b"cut");
    wait_for(&mut events, |e| {
        matches!(e, TunnelEvent::AgentDisconnected { .. })
    })
    .await;

    let mut again = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    again
        .send(&AgentMessage::HeldJobs(vec![HeldJob {
            job: "j1".into(),
            attempt: 1,
            kkt: "K1".into(),
        }]))
        .await
        .unwrap();
    again.hello(1, JournalSummary::default()).await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::JobReleased { job, .. } if job == "j2"),
    )
    .await;
    assert!(
        c.tunnel.job("j1").unwrap().unwrap().state.in_flight(),
        "j1 was listed before the hello: still the agent's"
    );
    assert_eq!(c.tunnel.job("j2").unwrap().unwrap().state, JobState::Queued);
}

/// A register is wired to one agent at a time. A second agent's claim while the first holds it
/// is not taken (the first keeps the register, its statuses and its jobs; the second's reports
/// about it are ignored); it waits, and is applied when the holder detaches the register or
/// disconnects. A claim whose agent went away first is forgotten.
#[tokio::test]
async fn a_register_held_by_one_agent_is_not_taken_by_another_until_let_go() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (a_creds, mut a) = online_agent(&c, "shelf-a", "K1").await;
    let (b_creds, mut b) = online_agent(&c, "shelf-b", "K2").await;

    b.attach("K1").await;
    let waiting = wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktClaimWaiting { kkt, .. } if kkt == "K1"),
    )
    .await;
    let TunnelEvent::KktClaimWaiting { agent, holder, .. } = waiting else {
        unreachable!()
    };
    assert_eq!(
        (agent, holder),
        (b_creds.agent_id.clone(), a_creds.agent_id.clone())
    );
    // B's statuses about K1 are someone else's register: ignored, as before.
    b.send(&AgentMessage::Status(Box::new(kkt_state("K1"))))
        .await
        .unwrap();
    b.send(&AgentMessage::Status(Box::new(kkt_state("K2"))))
        .await
        .unwrap();
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktStatus { kkt, .. } if kkt == "K2"),
    )
    .await;
    assert_eq!(c.tunnel.online_kkt("K1").unwrap().agent, a_creds.agent_id);
    assert_eq!(c.tunnel.online_kkt("K1").unwrap().state, None);
    assert_eq!(
        c.tunnel.store().kkt("K1").unwrap().unwrap().agent,
        a_creds.agent_id
    );

    // A lets it go: B's claim is applied.
    a.send(&AgentMessage::Detached { kkt: "K1".into() })
        .await
        .unwrap();
    let taken = wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktAttached { kkt, .. } if kkt == "K1"),
    )
    .await;
    assert!(matches!(taken, TunnelEvent::KktAttached { agent, .. } if agent == b_creds.agent_id));
    assert_eq!(c.tunnel.online_kkt("K1").unwrap().agent, b_creds.agent_id);
    assert_eq!(
        c.tunnel.store().kkt("K1").unwrap().unwrap().agent,
        b_creds.agent_id
    );

    // The other way round, ended by a disconnect: A claims K2, B goes away, A gets K2.
    a.attach("K2").await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktClaimWaiting { kkt, .. } if kkt == "K2"),
    )
    .await;
    b.conn.close(0u32.into(), b"bye");
    let taken = wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktAttached { kkt, .. } if kkt == "K2"),
    )
    .await;
    assert!(matches!(taken, TunnelEvent::KktAttached { agent, .. } if agent == a_creds.agent_id));
    assert_eq!(c.tunnel.online_kkt("K2").unwrap().agent, a_creds.agent_id);
    // K1 went offline with B (it is not A's).
    assert!(c.tunnel.online_kkt("K1").is_none());
}

/// A new connection of the same agent supersedes the old one, and the registers the old one had
/// attached are reported detached at once: subscribers (the dispatcher) must not keep them in
/// the pool until the new connection attaches them again, or every dispatch to them fails and is
/// retried in a busy loop (the long fault run found this).
#[tokio::test]
async fn a_superseded_connection_detaches_its_registers() {
    let c = start().await;
    let mut events = c.tunnel.subscribe();
    let (creds, _old) = online_agent(&c, "shelf", "K1").await;
    let mut new = connect(c.addr(), c.ca_der(), Some(&creds)).await.unwrap();
    new.hello(1, JournalSummary::default()).await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktDetached { kkt, .. } if kkt == "K1"),
    )
    .await;
    assert!(c.tunnel.online_kkt("K1").is_none());
    new.attach("K1").await;
    wait_for(
        &mut events,
        |e| matches!(e, TunnelEvent::KktAttached { kkt, .. } if kkt == "K1"),
    )
    .await;
    assert_eq!(c.tunnel.online_kkt("K1").unwrap().agent, creds.agent_id);
}
