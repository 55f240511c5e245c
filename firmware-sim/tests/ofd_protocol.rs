//! The OFD against raw bytes: it checks what real OFDs check and survives hostile peers.
#![allow(clippy::unwrap_used)]

use firmware_sim::drive::{DriveConfig, FiscalDrive};
use firmware_sim::exchange::{container_for, read_message, sign8, write_message};
use firmware_sim::fixtures::{ofd_endpoint, registration, DEMO_INN};
use firmware_sim::ofd::{result_code, DocumentQuery, Ofd};
use protocol::document::OfdAck;
use protocol::kkt::Operator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NOW: u32 = 1_796_342_400;

fn drive_with_documents(n: usize) -> (FiscalDrive, Vec<Vec<u8>>) {
    drive_numbered("9999078900000001", n)
}

fn drive_numbered(fn_number: &str, n: usize) -> (FiscalDrive, Vec<Vec<u8>>) {
    let mut d = FiscalDrive::new(DriveConfig::new(fn_number.into(), [7; 32]));
    let zn = "0000000000000001";
    let params = registration(zn, DEMO_INN, ofd_endpoint(([127, 0, 0, 1], 1).into())).unwrap();
    let mut docs = vec![d.register(NOW, zn, &params).unwrap().bytes];
    while docs.len() < n {
        let f = if d.shift.open {
            d.close_shift(NOW, &Operator::default())
        } else {
            d.open_shift(NOW, &Operator::default())
        };
        docs.push(f.unwrap().bytes);
    }
    (d, docs)
}

async fn start() -> (std::sync::Arc<Ofd>, std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ofd = Ofd::open(dir.path()).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(ofd.clone().serve_tcp(l));
    (ofd, addr, dir)
}

async fn send(stream: &mut TcpStream, fd: u32, doc: &[u8]) -> OfdAck {
    let c = container_for(
        "9999078900000001",
        fd,
        0,
        doc.to_vec(),
        sign8(&[7; 32], doc),
    );
    write_message(stream, &c).await.unwrap();
    let (_, answer) = read_message(stream).await.unwrap().unwrap();
    OfdAck::from_document(&answer.parse_document().unwrap()).unwrap()
}

#[tokio::test]
async fn acknowledges_in_order_deduplicates_and_refuses_gaps() {
    let (ofd, addr, _dir) = start().await;
    let (_, docs) = drive_with_documents(4);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let a1 = send(&mut s, 1, &docs[0]).await;
    assert_eq!((a1.fd_number, a1.result_code), (1, result_code::OK));
    assert_eq!(a1.fpo.len(), 8);
    // A gap: document 3 before 2.
    assert_eq!(
        send(&mut s, 3, &docs[2]).await.result_code,
        result_code::OUT_OF_ORDER
    );
    assert_eq!(send(&mut s, 2, &docs[1]).await.result_code, result_code::OK);
    // A resend after a lost ack is acknowledged again, stored once.
    assert_eq!(send(&mut s, 2, &docs[1]).await.result_code, result_code::OK);
    // Another document under a stored number is a conflict, never acknowledged.
    let (_, impostor) = drive_with_documents(2);
    let mut forged = impostor[1].clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(
        send(&mut s, 2, &forged).await.result_code,
        result_code::CONFLICT
    );
    let stored = ofd
        .documents("9999078900000001", &DocumentQuery::default())
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(ofd.stats().duplicates, 1);
    // The container's FD must be the document's.
    assert_eq!(
        send(&mut s, 4, &docs[2]).await.result_code,
        result_code::MALFORMED
    );
    // A KKT that switched to this OFD starts its FN's stream where it is, not at 1.
    let (_, other) = drive_numbered("9999078900000002", 6);
    let c = container_for("9999078900000002", 5, 0, other[4].clone(), [0; 8]);
    let mut s2 = TcpStream::connect(addr).await.unwrap();
    write_message(&mut s2, &c).await.unwrap();
    let (_, answer) = read_message(&mut s2).await.unwrap().unwrap();
    let ack = OfdAck::from_document(&answer.parse_document().unwrap()).unwrap();
    assert_eq!(
        (ack.fn_number.as_str(), ack.result_code),
        ("9999078900000002", result_code::OK)
    );
    // A document under another FN's container is refused.
    let c = container_for("9999078900000002", 6, 0, docs[3].clone(), [0; 8]);
    write_message(&mut s2, &c).await.unwrap();
    let (_, answer) = read_message(&mut s2).await.unwrap().unwrap();
    let ack = OfdAck::from_document(&answer.parse_document().unwrap()).unwrap();
    assert_eq!(ack.result_code, result_code::MALFORMED);
    let by_range = ofd
        .documents(
            "9999078900000001",
            &DocumentQuery {
                from_fd: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(by_range.len(), 1);
}

#[tokio::test]
async fn refuses_documents_dated_more_than_a_day_ahead() {
    let (ofd, addr, _dir) = start().await;
    // A registration report formed by a drive whose clock runs three days ahead.
    let future = (firmware_sim::device::host_now() + 3 * 86_400) as u32;
    let zn = "0000000000000001";
    let mut drive = FiscalDrive::new(DriveConfig::new("9999078900000001".into(), [7; 32]));
    let params = registration(zn, DEMO_INN, ofd_endpoint(([127, 0, 0, 1], 1).into())).unwrap();
    let doc = drive.register(future, zn, &params).unwrap().bytes;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        send(&mut s, 1, &doc).await.result_code,
        result_code::FROM_THE_FUTURE
    );
    assert_eq!(ofd.stats().accepted, 0);
}

#[tokio::test]
async fn garbage_and_bad_crc_close_only_that_connection() {
    let (ofd, addr, _dir) = start().await;
    let (_, docs) = drive_with_documents(1);

    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&[0x55; 64]).await.unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        garbage.read(&mut buf).await.unwrap_or(0),
        0,
        "closed, no answer"
    );

    let mut damaged = TcpStream::connect(addr).await.unwrap();
    let c = container_for("9999078900000001", 1, 1, docs[0].clone(), [0; 8]);
    let mut bytes = c.encode().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let session = protocol::container::SessionHeader {
        app_version: [0, 1],
        fn_number: "9999078900000001".into(),
        container_length: bytes.len() as u16,
        flags: 0x14,
        crc: 0,
    };
    damaged.write_all(&session.encode()).await.unwrap();
    damaged.write_all(&bytes).await.unwrap();
    assert_eq!(
        damaged.read(&mut buf).await.unwrap_or(0),
        0,
        "closed, no answer"
    );

    // An announced length over 32 KiB is refused before any body is read.
    let mut huge = TcpStream::connect(addr).await.unwrap();
    let mut h = session.encode();
    h[24..26].copy_from_slice(&u16::MAX.to_le_bytes());
    huge.write_all(&h).await.unwrap();
    assert_eq!(huge.read(&mut buf).await.unwrap_or(0), 0);

    // Others are served as before.
    let mut good = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        send(&mut good, 1, &docs[0]).await.result_code,
        result_code::OK
    );
    assert_eq!(ofd.stats().accepted, 1);
}
