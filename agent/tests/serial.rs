//! A register on a serial line (a pseudo-terminal pair here) speaks the same JSON protocol, one
//! message per line, and is driven like a network register.
#![allow(clippy::unwrap_used)]

use agent::agent::Agent;
use agent::identity::IdentityInfo;
use firmware_sim::drive::DriveConfig;
use firmware_sim::register::Register;
use protocol::kkt::{Call, KktMessage, Reply, Response};
use serialport::{SerialPort, TTYPort};
use std::io::{BufRead, BufReader, Write};

/// The register end: answers requests with the simulator's pure register core.
fn register_on(mut port: TTYPort, zn: &str) {
    let mut reg = Register::new(
        zn.into(),
        DriveConfig::new("9999078900000042".into(), [3; 32]),
    );
    port.set_timeout(std::time::Duration::from_secs(60))
        .unwrap();
    let hello = KktMessage::Hello(reg.hello()).to_json();
    port.write_all(format!("{hello}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(port.try_clone_native().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if let Ok(KktMessage::Request(r)) = KktMessage::from_json(line.trim()) {
            let outcome = reg.handle(&r.call, 1_800_000_000).reply;
            let answer = KktMessage::Response(Response { id: r.id, outcome }).to_json();
            port.write_all(format!("{answer}\n").as_bytes()).unwrap();
        }
        line.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_register_attaches_and_answers() {
    let data = tempfile::tempdir().unwrap();
    let store = agent::store::Store::open(&data.path().join("journal.redb"), 1).unwrap();
    let (journal, epoch) = agent::journal::load(store.db(), 100).unwrap();
    let agent = Agent::new(
        journal,
        store,
        epoch,
        IdentityInfo {
            agent_id: "t".into(),
            controller: "127.0.0.1:1".into(),
            name: "t".into(),
            not_after: 0,
        },
        data.path().to_path_buf(),
    );
    let (master, slave) = TTYPort::pair().expect("a pseudo-terminal pair");
    std::thread::spawn(move || register_on(master, "0000000000000077"));
    let (rx, tx) = agent::kkt_link::serial_pump(Box::new(slave));
    let driver = tokio::spawn(agent::kkt_link::drive(
        agent.clone(),
        "serial test".into(),
        rx,
        tx,
    ));

    loop {
        let notified = agent.kkts_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !agent.attached().is_empty() {
            break;
        }
        notified.await;
    }
    let (hello, transport, _, _) = agent.attached().remove(0);
    assert_eq!(hello.zn, "0000000000000077");
    assert_eq!(transport, "serial test");
    let Ok(Reply::FnInfo(info)) = agent.call("0000000000000077", Call::GetFnInfo).await else {
        panic!("FN info over the serial line")
    };
    assert_eq!(info.fn_number, "9999078900000042");
    assert_eq!(info.phase, 1);
    driver.abort();
}
