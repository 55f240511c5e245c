//! A register driven over a real WebSocket through a full day, with its documents delivered to the
//! simulated OFD over TCP: register, open shift, 100 receipts, X report, close shift, read back.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use firmware_sim::device::{CrashMode, Fleet, FleetOptions};
use firmware_sim::ofd::{DocumentQuery, Ofd};
use protocol::document::{DocumentType, FiscalDocument};
use protocol::kkt::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

struct Bench {
    agent: TcpListener,
    fleet: Arc<Fleet>,
    ofd: Arc<Ofd>,
    ofd_addr: std::net::SocketAddr,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn start(count: usize) -> Bench {
    let ofd_dir = tempfile::tempdir().unwrap();
    let ofd = Ofd::open(ofd_dir.path()).unwrap();
    let ofd_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ofd_addr = ofd_listener.local_addr().unwrap();
    tokio::spawn(ofd.clone().serve_tcp(ofd_listener));

    let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let fleet = Arc::new(
        Fleet::open(
            state.path(),
            count,
            FleetOptions {
                connect: format!("ws://{}/kkt", agent.local_addr().unwrap()),
                latency_ms: 0,
                default_ofd: None,
                capacity: None,
                ffd: protocol::kkt::FfdVersion::V1_2,
                max_backoff: Duration::from_millis(200),
            },
        )
        .unwrap(),
    );
    fleet.start();
    Bench {
        agent,
        fleet,
        ofd,
        ofd_addr,
        _dirs: (ofd_dir, state),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_day_over_websocket_reaches_the_ofd() {
    let b = start(1).await;
    let mut link = Link::accept(&b.agent).await;
    assert_eq!(link.hello.model, MODEL);
    assert_eq!(link.hello.version, LINK_VERSION);
    let zn = link.hello.zn.clone();

    let reg = link
        .fiscal(Call::Register(registration(&zn, b.ofd_addr)))
        .await;
    assert_eq!(reg.document_type, DocumentType::Registration);
    assert_eq!(reg.fd_number, 1);
    let info = link.fn_info().await;
    assert_eq!(info.phase, 3);

    let open = link.fiscal(Call::OpenShift(Operator::default())).await;
    assert_eq!(
        (open.document_type, open.shift_number),
        (DocumentType::ShiftOpen, 1)
    );

    let mut receipts = Vec::new();
    for n in 0..100 {
        let r = link.fiscal(Call::Receipt(receipt(n))).await;
        assert_eq!(r.receipt_number, Some(n as u32 + 1));
        assert_eq!(r.fd_number, 3 + n as u32);
        assert_eq!(r.zn, zn);
        assert_eq!(r.rnm, registration(&zn, b.ofd_addr).rnm);
        receipts.push(r);
    }

    let Ok(Reply::XReport(x)) = link.call(Call::ReportX).await else {
        panic!("X report")
    };
    assert_eq!(x.receipts, 100);
    let expected: u64 = receipts.iter().map(|r| r.total.unwrap().0).sum();
    assert_eq!(x.income.0, expected);
    assert_eq!(x.electronic.0, expected);

    let close = link.fiscal(Call::CloseShift(Operator::default())).await;
    assert_eq!(close.document_type, DocumentType::ShiftClose);
    assert_eq!(close.fd_number, 103);

    // Read a receipt back from the archive: the same result, and the job id in tag 1192.
    let Ok(Reply::FnDocument(doc)) = link
        .call(Call::GetFnDocument(GetFnDocument { fd_number: 50 }))
        .await
    else {
        panic!("archive read-back")
    };
    let original = &receipts[47];
    assert_eq!(doc.result.fd_number, original.fd_number);
    assert_eq!(doc.result.fpd, original.fpd);
    assert_eq!(doc.result.receipt_number, original.receipt_number);
    assert_eq!(doc.result.additional_attribute.as_deref(), Some("job-47"));
    let FiscalDocument::Receipt(rec) = &doc.document else {
        panic!("a receipt")
    };
    assert_eq!(rec.items[0].name, "Товар №47");
    let bytes: Vec<u8> = (0..doc.tlv_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&doc.tlv_hex[i..i + 2], 16).unwrap())
        .collect();
    let secret = b.fleet.device(&zn).unwrap().register().drive.config.secret;
    assert!(firmware_sim::drive::verify_fpd(&secret, &bytes));

    let missing = link
        .call(Call::GetFnDocument(GetFnDocument { fd_number: 104 }))
        .await;
    assert_eq!(missing.unwrap_err().code, ErrorCode::NO_SUCH_DOCUMENT);

    // Every document reaches the OFD, in order, and is acknowledged.
    link.wait_all_acknowledged().await;
    let fn_number = link.hello.fn_number.clone();
    let stored = b
        .ofd
        .documents(&fn_number, &DocumentQuery::default())
        .unwrap();
    assert_eq!(stored.len(), 103);
    assert!(stored.iter().zip(1..).all(|(d, fd)| d.fd_number == fd));
    assert_eq!(stored[49].fpd, Some(original.fpd));
    assert_eq!(stored[49].tlv_hex, doc.tlv_hex);
    let acks = link
        .events
        .iter()
        .filter(|e| matches!(e, Event::OfdAck(_)))
        .count();
    assert!(acks > 0, "acknowledgements are pushed as events");
    let Ok(Reply::FnDocument(doc)) = link
        .call(Call::GetFnDocument(GetFnDocument { fd_number: 50 }))
        .await
    else {
        panic!("archive read-back")
    };
    assert!(doc.acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_document_leaves_it_in_the_archive_and_unanswered() {
    let b = start(1).await;
    let mut link = Link::accept(&b.agent).await;
    let zn = link.hello.zn.clone();
    link.fiscal(Call::Register(registration(&zn, b.ofd_addr)))
        .await;
    link.fiscal(Call::OpenShift(Operator::default())).await;
    let before = link.fn_info().await.last_fd_number;

    b.fleet.device(&zn).unwrap().faults().crash_next_receipt = Some(CrashMode::Reboot);
    assert!(
        link.try_call(Call::Receipt(receipt(7))).await.is_none(),
        "the register must not answer"
    );

    // It comes back as the same register, and the FN moved past fd_before: the agent's recovery.
    let mut link = Link::accept(&b.agent).await;
    assert_eq!(link.hello.zn, zn);
    let info = link.fn_info().await;
    assert_eq!(info.last_fd_number, before + 1);
    let Ok(Reply::FnDocument(doc)) = link
        .call(Call::GetFnDocument(GetFnDocument {
            fd_number: info.last_fd_number,
        }))
        .await
    else {
        panic!("archive read-back")
    };
    assert_eq!(doc.result.additional_attribute.as_deref(), Some("job-7"));
    assert_eq!(doc.result.document_type, DocumentType::Receipt);

    // The fault fires once: the next receipt is answered normally.
    let r = link.fiscal(Call::Receipt(receipt(8))).await;
    assert_eq!(r.fd_number, before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_the_clock_trips_the_24_hour_rule() {
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    let b = start(1).await;
    let mut link = Link::accept(&b.agent).await;
    let zn = link.hello.zn.clone();
    link.fiscal(Call::Register(registration(&zn, b.ofd_addr)))
        .await;
    link.fiscal(Call::OpenShift(Operator::default())).await;
    link.fiscal(Call::Receipt(receipt(1))).await;

    let control = firmware_sim::control::app(b.fleet.clone());
    let res = control
        .oneshot(
            HttpRequest::post(format!("/devices/{zn}/clock"))
                .header("content-type", "application/json")
                .body(Body::from(r#"{"advanceSeconds": 86400}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let Ok(Reply::ShiftStatus(s)) = link.call(Call::GetShiftStatus).await else {
        panic!("shift status")
    };
    assert_eq!(s.state, ShiftState::Expired);
    let refused = link.call(Call::Receipt(receipt(2))).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::SHIFT_EXPIRED);
    assert_eq!(refused.fn_code, Some(0x16));
    // Closing is still allowed, and a new shift takes receipts again.
    link.fiscal(Call::CloseShift(Operator::default())).await;
    let open = link.fiscal(Call::OpenShift(Operator::default())).await;
    assert_eq!(open.shift_number, 2);
    let r = link.fiscal(Call::Receipt(receipt(3))).await;
    assert_eq!(r.receipt_number, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejecting_ofd_keeps_documents_unsent_until_it_recovers() {
    let b = start(1).await;
    b.ofd.set_faults(firmware_sim::ofd::OfdFaults {
        reject: true,
        delay_ms: 0,
    });
    let mut link = Link::accept(&b.agent).await;
    let zn = link.hello.zn.clone();
    link.fiscal(Call::Register(registration(&zn, b.ofd_addr)))
        .await;
    link.fiscal(Call::OpenShift(Operator::default())).await;
    // The OFD has answered at least once (with a rejection) before we look.
    while b.ofd.stats().refused == 0 {
        tokio::task::yield_now().await;
    }
    let status = link.ofd_status().await;
    assert_eq!(status.unsent_count, 2);
    assert_eq!(status.first_unsent_fd, Some(1));

    b.ofd.set_faults(firmware_sim::ofd::OfdFaults::default());
    b.fleet.device(&zn).unwrap().wake_ofd();
    link.wait_all_acknowledged().await;
    assert_eq!(b.ofd.stats().accepted, 2);
}
