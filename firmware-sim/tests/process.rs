//! The real `firmware-sim` binary as a child process: killed with SIGKILL and restarted on the same
//! state directory, it is the same register with the same FN, counters and archive.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use protocol::kkt::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use tokio::net::TcpListener;

fn spawn_sim(agent: &str, state: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args([
            "kkt",
            "--connect",
            agent,
            "--count",
            "1",
            "--max-backoff-ms",
            "200",
        ])
        .arg("--state")
        .arg(state)
        .args(["--control", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("firmware-sim starts")
}

/// Waits for the line that says the process is up (its control API is bound).
fn wait_ready(child: &mut Child) {
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    assert!(line.starts_with("control listening on"), "got {line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_keeps_the_same_register() {
    let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/kkt", agent.local_addr().unwrap());
    let state = tempfile::tempdir().unwrap();
    // No OFD listens here: documents stay unsent, so the unsent queue must survive too.
    let ofd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ofd_addr = ofd.local_addr().unwrap();
    drop(ofd);

    let mut child = spawn_sim(&url, state.path());
    wait_ready(&mut child);
    let mut link = Link::accept(&agent).await;
    let zn = link.hello.zn.clone();
    let fn_number = link.hello.fn_number.clone();
    link.fiscal(Call::Register(registration(&zn, ofd_addr)))
        .await;
    link.fiscal(Call::OpenShift(Operator::default())).await;
    let mut last = None;
    for n in 0..5 {
        last = Some(link.fiscal(Call::Receipt(receipt(n))).await);
    }
    let last = last.unwrap();
    let Ok(Reply::FnDocument(before)) = link
        .call(Call::GetFnDocument(GetFnDocument { fd_number: 4 }))
        .await
    else {
        panic!("read-back")
    };

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut child = spawn_sim(&url, state.path());
    wait_ready(&mut child);
    let mut link = Link::accept(&agent).await;
    assert_eq!(link.hello.zn, zn);
    assert_eq!(link.hello.fn_number, fn_number);
    let info = link.fn_info().await;
    assert_eq!(info.last_fd_number, last.fd_number);
    assert_eq!(info.phase, 3);
    let Ok(Reply::FnDocument(after)) = link
        .call(Call::GetFnDocument(GetFnDocument { fd_number: 4 }))
        .await
    else {
        panic!("read-back")
    };
    assert_eq!(after.tlv_hex, before.tlv_hex);
    let status = link.ofd_status().await;
    assert_eq!(status.unsent_count, last.fd_number);
    assert_eq!(status.first_unsent_fd, Some(1));
    // The shift is still open and numbering continues.
    let next = link.fiscal(Call::Receipt(receipt(9))).await;
    assert_eq!(next.fd_number, last.fd_number + 1);
    assert_eq!(next.receipt_number, Some(6));
    assert_ne!(next.fpd, last.fpd);
    child.kill().unwrap();
    child.wait().unwrap();
}
