//! The edge link end to end: the controller's tunnel, the real `agent` binary (or the agent in
//! process where the test must observe it), simulated registers, on 127.0.0.1 with OS-chosen ports.
//! Every wait is on an event; nothing sleeps.
#![allow(clippy::unwrap_used)]

use controller::rules::JobState;
use controller::tunnel::TunnelEvent;
use firmware_sim::fixtures;
use protocol::tunnel::Work;
use system_tests::relay::Relay;
use system_tests::system::{documents_for_job, registers, AgentProcess, System};

fn work(n: u64) -> Work {
    Work::Receipt(fixtures::receipt(n, None))
}

async fn attached(sys: &mut System, n: usize) -> Vec<String> {
    let mut kkts = Vec::new();
    while kkts.len() < n {
        if let TunnelEvent::KktAttached { kkt, .. } = sys
            .wait(|e| matches!(e, TunnelEvent::KktAttached { .. }))
            .await
        {
            if !kkts.contains(&kkt) {
                kkts.push(kkt);
            }
        }
    }
    kkts
}

async fn completed(sys: &mut System, job: &str) -> protocol::kkt::FiscalResult {
    match sys
        .wait(|e| matches!(e, TunnelEvent::JobCompleted { job: j, .. } if j == job))
        .await
    {
        TunnelEvent::JobCompleted { result, .. } => *result,
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_works_once_per_token_and_a_job_is_applied_exactly_once() {
    let mut sys = System::start().await.unwrap();
    let data = sys.dir.path().join("agent");
    sys.enroll(&data).await.unwrap();

    // The same token a second time is refused, and says so.
    let token = sys.token().await.unwrap();
    let other = sys.dir.path().join("agent2");
    let run = |dir: &std::path::Path| {
        system_tests::system::agent_command()
            .unwrap()
            .args([
                "enroll",
                "--controller",
                &sys.quic_addr(),
                "--token",
                &token,
            ])
            .arg("--data")
            .arg(dir)
            .output()
            .unwrap()
    };
    assert!(run(&other).status.success());
    let again = run(&sys.dir.path().join("agent3"));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refused"));

    let agent = AgentProcess::spawn(&data, None, &[]).unwrap();
    let fleet = registers(agent.kkt_addr, 1, &sys.dir.path().join("sim"), 0).unwrap();
    let kkt = attached(&mut sys, 1).await.remove(0);
    sys.prepare(&kkt).await.unwrap();

    sys.tunnel.dispatch("job-1", &kkt, work(1)).await.unwrap();
    let result = completed(&mut sys, "job-1").await;
    assert_eq!(result.additional_attribute.as_deref(), Some("job-1"));
    let job = sys.tunnel.job("job-1").unwrap().unwrap();
    assert!(matches!(job.state, JobState::Completed { .. }));
    // Dispatching it again is refused: a completed job never goes out twice.
    assert!(sys.tunnel.dispatch("job-1", &kkt, work(1)).await.is_err());
    assert_eq!(documents_for_job(&fleet, &kkt, "job-1"), 1);
    assert!(sys.tunnel.anomalies().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_controller_is_refused() {
    let sys_a = System::start().await.unwrap();
    let mut sys_b = System::start().await.unwrap();
    let data = sys_a.dir.path().join("agent");
    sys_a.enroll(&data).await.unwrap();
    // Point the agent enrolled with A at controller B: B's CA never signed its certificate.
    let id_path = data.join("identity.json");
    let mut id: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&id_path).unwrap()).unwrap();
    id["controller"] = sys_b.quic_addr().into();
    std::fs::write(&id_path, id.to_string()).unwrap();
    let _agent = AgentProcess::spawn(&data, None, &[]).unwrap();
    let e = sys_b
        .wait(|e| {
            matches!(
                e,
                TunnelEvent::ConnectionRejected { .. } | TunnelEvent::AgentConnected { .. }
            )
        })
        .await;
    assert!(
        matches!(e, TunnelEvent::ConnectionRejected { .. }),
        "got {e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_made_while_the_link_is_cut_are_replayed_without_loss_or_duplicate() {
    let mut sys = System::start().await.unwrap();
    let data = sys.dir.path().join("agent");
    sys.enroll(&data).await.unwrap();
    // The agent reaches the controller through a relay the test can cut.
    let relay = Relay::start(sys.tunnel.local_addr()).await.unwrap();
    let id_path = data.join("identity.json");
    let mut id: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&id_path).unwrap()).unwrap();
    id["controller"] = relay.addr.to_string().into();
    std::fs::write(&id_path, id.to_string()).unwrap();

    let agent = AgentProcess::spawn(&data, None, &[]).unwrap();
    // Registers slow enough that the cut lands while they work.
    let fleet = registers(agent.kkt_addr, 2, &sys.dir.path().join("sim"), 150).unwrap();
    let kkts = attached(&mut sys, 2).await;
    for k in &kkts {
        sys.prepare(k).await.unwrap();
    }
    let jobs: Vec<(String, String)> = (0..10)
        .map(|n| (format!("cut-{n}"), kkts[n % 2].clone()))
        .collect();
    for (n, (job, kkt)) in jobs.iter().enumerate() {
        sys.tunnel.dispatch(job, kkt, work(n as u64)).await.unwrap();
    }
    let mut accepted = 0;
    while accepted < jobs.len() {
        sys.wait(|e| matches!(e, TunnelEvent::JobAccepted { .. }))
            .await;
        accepted += 1;
    }
    relay.cut();
    let down = sys
        .wait(|e| matches!(e, TunnelEvent::AgentDisconnected { .. }))
        .await;
    assert!(matches!(down, TunnelEvent::AgentDisconnected { .. }));
    // Let the registers finish everything while the link is down: wait on the simulators.
    for kkt in &kkts {
        let mut formed = fleet.device(kkt).unwrap().formed();
        // Registration, shift opening, and five receipts each.
        formed.wait_for(|fd| *fd >= 2 + 5).await.unwrap();
    }
    relay.restore();
    let mut done = std::collections::HashSet::new();
    while done.len() < jobs.len() {
        if let TunnelEvent::JobCompleted { job, .. } = sys
            .wait(|e| matches!(e, TunnelEvent::JobCompleted { .. }))
            .await
        {
            done.insert(job);
        }
    }
    for (job, kkt) in &jobs {
        assert_eq!(documents_for_job(&fleet, kkt, job), 1, "{job}");
        assert!(matches!(
            sys.tunnel.job(job).unwrap().unwrap().state,
            JobState::Completed { .. }
        ));
    }
    assert!(sys.tunnel.anomalies().unwrap().is_empty());
    drop(agent);
}

/// Kills the agent (abort at a precise point = kill -9 there) and restarts it on the same data.
async fn crash_and_recover(crash_at: &str) {
    let mut sys = System::start().await.unwrap();
    let data = sys.dir.path().join("agent");
    sys.enroll(&data).await.unwrap();
    let mut agent = AgentProcess::spawn(&data, None, &[("AGENT_CRASH_AT", crash_at)]).unwrap();
    let kkt_addr = agent.kkt_addr;
    let fleet = registers(kkt_addr, 1, &sys.dir.path().join("sim"), 0).unwrap();
    let kkt = attached(&mut sys, 1).await.remove(0);
    sys.prepare(&kkt).await.unwrap();
    let fd_before = fleet.device(&kkt).unwrap().register().drive.last_fd;

    sys.tunnel.dispatch("job-x", &kkt, work(7)).await.unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = agent.child.wait();
        (agent, s)
    })
    .await
    .unwrap();
    agent = status.0;
    assert!(!status.1.unwrap().success(), "the agent died at {crash_at}");
    let moved = fleet.device(&kkt).unwrap().register().drive.last_fd;
    match crash_at {
        "before-report" => assert_eq!(moved, fd_before + 1, "the register formed the document"),
        _ => assert_eq!(moved, fd_before, "the receipt never reached the register"),
    }
    assert!(!matches!(
        sys.tunnel.job("job-x").unwrap().unwrap().state,
        JobState::Completed { .. }
    ));

    // Restarted on the same journal and port, without the fault.
    let _agent = AgentProcess::spawn(&data, Some(kkt_addr), &[]).unwrap();
    let result = completed(&mut sys, "job-x").await;
    assert_eq!(result.fd_number, fd_before + 1);
    assert_eq!(
        documents_for_job(&fleet, &kkt, "job-x"),
        1,
        "fiscalized exactly once"
    );
    assert!(sys.tunnel.anomalies().unwrap().is_empty());
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_the_register_formed_the_document_reports_it_from_the_archive() {
    crash_and_recover("before-report").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_before_the_receipt_left_executes_it_exactly_once() {
    crash_and_recover("after-executing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_the_tunnel_port_does_not_disturb_a_working_agent() {
    let mut sys = System::start().await.unwrap();
    let data = sys.dir.path().join("agent");
    sys.enroll(&data).await.unwrap();
    let agent = AgentProcess::spawn(&data, None, &[]).unwrap();
    let fleet = registers(agent.kkt_addr, 1, &sys.dir.path().join("sim"), 0).unwrap();
    let kkt = attached(&mut sys, 1).await.remove(0);
    sys.prepare(&kkt).await.unwrap();

    // Random datagrams at the QUIC port, and a TLS client without a certificate.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for n in 0..50u8 {
        let junk: Vec<u8> = (0..1200).map(|i| (i as u8).wrapping_mul(n)).collect();
        sock.send_to(&junk, sys.tunnel.local_addr()).await.unwrap();
    }
    let ca = sys.tunnel.ca().cert_der().clone();
    let cfg =
        controller::tunnel::tls::client_config(ca, None, protocol::tunnel::ALPN_TUNNEL).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    if let Ok(conn) = ep
        .connect_with(cfg, sys.tunnel.local_addr(), "localhost")
        .unwrap()
        .await
    {
        if let Ok((mut s, _)) = conn.open_bi().await {
            let _ = s.write_all(&[0xFF; 64]).await;
        }
    }
    sys.wait(|e| matches!(e, TunnelEvent::ConnectionRejected { .. }))
        .await;

    sys.tunnel
        .dispatch("after-junk", &kkt, work(1))
        .await
        .unwrap();
    completed(&mut sys, "after-junk").await;
    assert_eq!(documents_for_job(&fleet, &kkt, "after-junk"), 1);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_before_it_expires() {
    // Certificates live 12 s here, so the renewal point (a third of the life left) comes at the
    // second heartbeat.
    let sys = System::start_with(|c| c.agent_cert_validity = std::time::Duration::from_secs(12))
        .await
        .unwrap();
    let data = sys.dir.path().join("agent");
    sys.enroll(&data).await.unwrap();
    let before = std::fs::read_to_string(data.join("agent.cert.pem")).unwrap();
    let started = agent::run::start(agent::run::Config {
        data: data.clone(),
        kkt_listen: "127.0.0.1:0".parse().unwrap(),
        health: "127.0.0.1:0".parse().unwrap(),
        serial: Vec::new(),
        baud: 115_200,
        journal_limit: 1000,
        max_backoff: std::time::Duration::from_millis(300),
        idle_timeout: std::time::Duration::from_secs(30),
    })
    .await
    .unwrap();
    let renewed = started.agent.renewed.notified();
    tokio::pin!(renewed);
    renewed.as_mut().enable();
    renewed.await;
    let after = std::fs::read_to_string(data.join("agent.cert.pem")).unwrap();
    assert_ne!(before, after, "a new certificate was stored");
    let not_after = started.agent.identity.lock().unwrap().not_after;
    let id: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("identity.json")).unwrap())
            .unwrap();
    assert_eq!(id["not_after"].as_u64(), Some(not_after));
    assert!(
        !data.join("renewal.key.pem").exists(),
        "the renewal key became the agent key"
    );
}
