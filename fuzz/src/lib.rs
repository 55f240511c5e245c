//! Bodies of the fuzz targets for the `protocol` crate, and seed inputs for them.
//!
//! Each `fuzz_targets/<name>.rs` is one line that calls the function of the same name here, so the
//! same bodies also run on stable Rust without libFuzzer: `examples/replay.rs` feeds them files (a
//! crash artifact, a corpus) and writes the seeds. A body returns quietly on input the protocol
//! refuses with an error; it panics — which libFuzzer reports as a crash — when the code under test
//! panics, or when a value it accepted breaks a round-trip property.

use protocol::container::{
    announced_container_len, container_crc, Container, ContainerHeader, SessionHeader,
    CONTAINER_HEADER_LEN, FLAGS_CONTAINER_ANSWER_EXPECTED, MAX_CONTAINER_LEN, SESSION_HEADER_LEN,
};
use protocol::document::{
    CorrectionRecord, Document, FiscalDocument, Fpd, ItemRecord, OfdAck, Owner, ReceiptRecord,
    Seal, ShiftReport, UnsentSummary,
};
use protocol::ferma::{
    format_local, parse_create_receipt, parse_credentials, parse_list_request, parse_local,
    parse_status_request, CreateReceipt, StatusQuery,
};
use protocol::kkt::{ErrorCode, FiscalResult, KktError, ReceiptParams};
use protocol::receipt::Receipt;
use protocol::tlv::{self, Field, Value};
use protocol::tunnel::{
    decode_frame, encode_frame, frame_len, AgentHello, AgentMessage, ControllerHello,
    ControllerMessage, Dispatch, EnrollRequest, EnrollResponse, Health, IssuedCertificate,
    JournalSummary, KktSettings, OutboxBody, OutboxEntry, Work, TUNNEL_VERSION,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;
use std::fmt::Debug;

/// The target names, as `cargo fuzz run <name>` and `replay <name>` take them.
pub const TARGETS: [&str; 4] = ["tlv", "container", "tunnel_frame", "ferma_json"];

/// Runs the body of target `name` on one input; `None` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> Option<()> {
    match name {
        "tlv" => tlv(data),
        "container" => container(data),
        "tunnel_frame" => tunnel_frame(data),
        "ferma_json" => ferma_json(data),
        _ => return None,
    }
    Some(())
}

// ---------------------------------------------------------------------------------------------
// tlv: FFD TLV codec and the documents built from it
// ---------------------------------------------------------------------------------------------

/// Arbitrary bytes as a TLV sequence, then as a fiscal document (generic and typed).
///
/// Properties: whatever decodes re-encodes; the re-encoding decodes to the same fields, is no
/// longer than the input (only non-canonical VLNs, e.g. `05 00`, shrink) and is stable.
pub fn tlv(data: &[u8]) {
    if let Ok(fields) = tlv::decode(data) {
        let bytes = tlv::encode(&fields).expect("decoded TLV must re-encode");
        assert!(bytes.len() <= data.len(), "re-encoding grew the TLV");
        let again = tlv::decode(&bytes).expect("re-encoded TLV must decode");
        assert_eq!(again, fields, "TLV changed through encode/decode");
        assert_eq!(
            tlv::encode(&again).expect("re-encodes"),
            bytes,
            "TLV encoding is not stable"
        );
    }
    document(data);
}

/// A fiscal document in TLV: the generic [`Document`], its accessors, and the typed documents.
///
/// Properties: a decoded document re-encodes and decodes to itself; a typed document read from it
/// converts back to a generic document that reads as the same typed document, and survives the
/// two wire forms it travels in (JSON on the KKT link, postcard in the tunnel).
pub fn document(data: &[u8]) {
    let Ok(doc) = Document::decode(data) else {
        return;
    };
    let bytes = doc.encode().expect("decoded document must re-encode");
    assert_eq!(
        Document::decode(&bytes).as_ref(),
        Ok(&doc),
        "document changed through encode/decode"
    );
    doc.signed_bytes()
        .expect("signed bytes of a decoded document");
    let _ = (doc.fd_number(), doc.fn_number(), doc.date_time(), doc.fpd());

    if let Ok(typed) = FiscalDocument::from_document(&doc) {
        let back = typed.to_document();
        assert_eq!(back.doc_type, doc.doc_type, "typed document changed type");
        assert_eq!(
            FiscalDocument::from_document(&back).as_ref(),
            Ok(&typed),
            "typed document changed through to_document/from_document"
        );
        // The archive and the OFD exchange need the typed document's own bytes; they may exceed
        // a TLV's 65535 bytes only by the padding the FN adds, never fail otherwise.
        if let Err(e) = back.encode() {
            assert!(
                matches!(e, tlv::EncodeError::TooLong { .. }),
                "typed document does not encode: {e}"
            );
        }
        let _ = FiscalResult::from_document(&typed, "0000000000000001", 1);
        json_round_trip(&typed);
        postcard_round_trip(&typed);
    }
    if let Ok(ack) = OfdAck::from_document(&doc) {
        assert_eq!(
            OfdAck::from_document(&ack.to_document()).as_ref(),
            Ok(&ack),
            "OFD ack changed through to_document/from_document"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// container: OFD session header and container
// ---------------------------------------------------------------------------------------------

/// OFD exchange framing. The first byte picks how the rest is read:
/// * 0 — a message as the simulated OFD reads it off a socket: 30-byte session header, its announced
///   container length checked, then that many bytes as a container;
/// * 1 — the rest as one container, as is;
/// * 2 — the rest as one container with its length field and CRC fixed up first, so that the
///   fuzzer gets past the CRC and into the body (document, message sign, trailer).
///
/// Properties: a decoded session header re-encodes to the same header; a decoded container
/// re-encodes to the same bytes (the FN field is read strictly, so it has one encoding), and
/// decodes back to the same container.
pub fn container(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => session_stream(rest),
        1 => container_bytes(rest),
        _ => {
            let mut b = rest.to_vec();
            if b.len() >= 4 && b.len() <= usize::from(u16::MAX) {
                let len = b.len() as u16;
                b[..2].copy_from_slice(&len.to_le_bytes());
                let crc = container_crc(&b);
                b[2..4].copy_from_slice(&crc.to_le_bytes());
            }
            container_bytes(&b);
        }
    }
}

fn session_stream(data: &[u8]) {
    let Ok(header) = SessionHeader::decode(data) else {
        return;
    };
    let encoded = header.encode();
    let again = SessionHeader::decode(&encoded).expect("re-encoded session header must decode");
    // The FN number is read leniently (bytes as UTF-8 with replacement, then trimmed) and written
    // padded or cut to 16 bytes; only an FN number that fits 16 bytes can come back unchanged.
    if header.fn_number.len() <= 16 {
        assert_eq!(
            again, header,
            "session header changed through encode/decode"
        );
    }
    assert_eq!(
        (&encoded[..8], &encoded[24..]),
        (&data[..8], &data[24..SESSION_HEADER_LEN]),
        "session header bytes outside the FN field changed"
    );
    let Ok(len) = announced_container_len(&header) else {
        return;
    };
    assert!((CONTAINER_HEADER_LEN..=MAX_CONTAINER_LEN).contains(&len));
    let body = &data[SESSION_HEADER_LEN..];
    if body.len() >= len {
        container_bytes(&body[..len]);
    }
}

fn container_bytes(b: &[u8]) {
    let Ok(c) = Container::decode(b) else {
        return;
    };
    assert_eq!(c.len(), b.len(), "Container::len disagrees with the bytes");
    let encoded = c.encode().expect("decoded container must re-encode");
    assert_eq!(
        encoded.len(),
        b.len(),
        "re-encoded container has another length"
    );
    let again = Container::decode(&encoded).expect("re-encoded container must decode");
    assert_eq!(again, c, "container changed through encode/decode");
    assert_eq!(encoded, b, "container bytes changed through decode/encode");
    if c.parse_document().is_ok() {
        document(&c.document);
    }
}

// ---------------------------------------------------------------------------------------------
// tunnel_frame: agent <-> controller frames
// ---------------------------------------------------------------------------------------------

/// A byte stream of tunnel frames (`u32` LE length, postcard body) as one side reads it. The first
/// byte picks the message type: agent messages, controller messages, enrollment request, answer.
///
/// Properties: an oversized length prefix is refused by [`frame_len`]; a decoded message
/// re-encodes to a frame whose prefix [`frame_len`] accepts and whose body is no longer than the
/// one read (the decoder refuses bytes after the message), and which decodes to the same message;
/// the message also survives JSON.
pub fn tunnel_frame(data: &[u8]) {
    let Some((&kind, stream)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => frames::<AgentMessage>(stream),
        1 => frames::<ControllerMessage>(stream),
        2 => frames::<EnrollRequest>(stream),
        _ => frames::<EnrollResponse>(stream),
    }
}

fn frames<T>(mut stream: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    while let Some((prefix, rest)) = stream.split_first_chunk::<4>() {
        let Ok(len) = frame_len(*prefix) else {
            assert!(u32::from_le_bytes(*prefix) as usize > protocol::tunnel::MAX_FRAME);
            return;
        };
        if rest.len() < len {
            // The peer stopped mid-frame; what arrived is still fed to the decoder.
            frame_body::<T>(rest);
            return;
        }
        let (body, next) = rest.split_at(len);
        frame_body::<T>(body);
        stream = next;
    }
}

fn frame_body<T>(body: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(msg) = decode_frame::<T>(body) else {
        return;
    };
    let frame = encode_frame(&msg).expect("decoded message must re-encode");
    let (prefix, again) = frame.split_first_chunk::<4>().expect("prefix");
    let len = frame_len(*prefix).expect("re-encoded frame's prefix must be accepted");
    assert_eq!(len, again.len(), "prefix does not match the body");
    assert!(len <= body.len(), "re-encoding grew the frame");
    let decoded: T = decode_frame(again).expect("re-encoded frame must decode");
    assert_eq!(decoded, msg, "message changed through encode/decode");
    json_round_trip(&msg);
}

// ---------------------------------------------------------------------------------------------
// ferma_json: the Ferma REST request parsers
// ---------------------------------------------------------------------------------------------

/// A request body as every Ferma parser reads it: create receipt, status, list, credentials.
///
/// Properties: what a parser accepts, written back as the JSON a client would send, parses to the
/// same value; an accepted receipt is valid and survives the JSON and postcard forms in which it
/// travels to the register; date-time bounds print in a form that reads back.
pub fn ferma_json(data: &[u8]) {
    if let Ok(c) = parse_create_receipt(data) {
        c.receipt
            .validate()
            .expect("an accepted receipt must be valid");
        let body = json!({ "Request": c.request }).to_string();
        let again = parse_create_receipt(body.as_bytes())
            .unwrap_or_else(|e| panic!("accepted request refused when sent again: {e}\n{body}"));
        // serde_json's `float_roundtrip` feature makes a float literal read back bit for bit, so
        // the echoed request must come back exactly.
        assert_eq!(
            again.request, c.request,
            "echoed request changed when sent again"
        );
        let echo = serde_json::Value::Null;
        assert_eq!(
            CreateReceipt {
                request: echo.clone(),
                ..again
            },
            CreateReceipt {
                request: echo,
                ..c.clone()
            },
            "create-receipt request changed when sent again"
        );
        receipt_round_trip(&c.receipt);
    }
    if let Ok(q) = parse_status_request(data) {
        let body = match &q {
            StatusQuery::ReceiptId(id) => json!({"Request": {"ReceiptId": id}}),
            StatusQuery::InvoiceId(id) => json!({"Request": {"InvoiceId": id}}),
        }
        .to_string();
        let again = parse_status_request(body.as_bytes())
            .unwrap_or_else(|e| panic!("accepted status request refused when sent again: {e}"));
        assert_eq!(again, q, "status request changed when sent again");
    }
    if let Ok(q) = parse_list_request(data) {
        let mut r = serde_json::Map::new();
        if let Some(id) = &q.receipt_id {
            r.insert("ReceiptId".into(), json!(id));
        }
        for (name, t) in [("StartDateLocal", q.start), ("EndDateLocal", q.end)] {
            if let Some(t) = t {
                let printed = format_local(t);
                assert_eq!(
                    parse_local(&printed),
                    Some(t),
                    "an accepted date-time {t} prints as {printed:?}, which does not read back"
                );
                r.insert(name.into(), json!(printed));
            }
        }
        let body = json!({ "Request": r }).to_string();
        let again = parse_list_request(body.as_bytes()).unwrap_or_else(|e| {
            panic!("accepted list request refused when sent again: {e}\n{body}")
        });
        assert_eq!(again, q, "list request changed when sent again");
    }
    if let Ok(c) = parse_credentials(data) {
        let body = json!({"Request": {"Login": c.login, "Password": c.password}}).to_string();
        let again = parse_credentials(body.as_bytes())
            .unwrap_or_else(|e| panic!("accepted credentials refused when sent again: {e}"));
        assert_eq!(again, c, "credentials changed when sent again");
    }
}

/// The receipt goes to the register as a dispatch (postcard, tunnel) and a call (JSON, KKT link).
fn receipt_round_trip(receipt: &Receipt) {
    let params = ReceiptParams {
        receipt: receipt.clone(),
        additional_attribute: Some("job-1".into()),
    };
    json_round_trip(&params);
    let dispatch = ControllerMessage::Dispatch(Dispatch {
        job: "job-1".into(),
        attempt: 1,
        kkt: "0000000001012345".into(),
        work: Work::Receipt(params),
    });
    let frame = encode_frame(&dispatch).expect("a dispatch of an accepted receipt must encode");
    let back: ControllerMessage = decode_frame(&frame[4..]).expect("dispatch must decode");
    assert_eq!(back, dispatch, "receipt changed through the tunnel");
}

// ---------------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------------

fn json_round_trip<T>(v: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let s = serde_json::to_string(v).expect("serializes to JSON");
    let back: T = serde_json::from_str(&s)
        .unwrap_or_else(|e| panic!("its own JSON does not read back: {e}\n{s}"));
    assert_eq!(&back, v, "value changed through JSON");
}

fn postcard_round_trip<T>(v: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frame = encode_frame(v).expect("serializes to postcard");
    let back: T = decode_frame(&frame[4..]).expect("its own postcard reads back");
    assert_eq!(&back, v, "value changed through postcard");
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

fn seal(fd_number: u32) -> Seal {
    Seal {
        fn_number: "9999078900012345".into(),
        fd_number,
        date_time: 1_764_840_900,
        fpd: Fpd([0x31, 0x04, 0x8D, 0x6B, 0x2E, 0x97]),
    }
}

fn owner() -> Owner {
    Owner {
        user_name: "ООО Ромашка".into(),
        user_inn: "3245001416".into(),
        rnm: "0000000001012345".into(),
    }
}

fn receipt_record(correction: bool) -> ReceiptRecord {
    ReceiptRecord {
        seal: seal(42),
        owner: owner(),
        zn: "00106701234567".into(),
        shift_number: 3,
        receipt_number: 7,
        operation: 1,
        taxation: 1,
        items: vec![ItemRecord {
            name: "Молоко 3,2%".into(),
            price: 8990,
            quantity_milli: 2000,
            sum: 17980,
            vat: 2,
            payment_method: 4,
            payment_subject: 1,
            measure: 0,
        }],
        total: 17980,
        cash: 0,
        electronic: 17980,
        prepayment: 0,
        credit: 0,
        counter_provision: 0,
        customer_contact: Some("buyer@example.ru".into()),
        cashier: Some("Иванова А.".into()),
        cashier_inn: None,
        buyer_name: None,
        buyer_inn: None,
        settlement_address: Some("г. Брянск, ул. Ленина, 1".into()),
        settlement_place: Some("shop.example.ru".into()),
        additional_attribute: Some("job-1".into()),
        correction: correction.then(|| CorrectionRecord {
            by_instruction: false,
            description: "пересорт".into(),
            date: 1_764_806_400,
            number: "1".into(),
        }),
    }
}

fn seed_documents() -> Vec<Document> {
    vec![
        receipt_record(false).to_document(),
        receipt_record(true).to_document(),
        ShiftReport {
            seal: seal(40),
            owner: owner(),
            close: true,
            shift_number: 3,
            cashier: "Иванова А.".into(),
            receipts_in_shift: 12,
            documents_in_shift: 14,
            unsent: UnsentSummary {
                count: 2,
                first_fd: Some(39),
                first_date_time: Some(1_764_800_000),
            },
            flags: Default::default(),
            key_resource_days: 400,
        }
        .to_document(),
        OfdAck {
            ofd_inn: "7704211201".into(),
            fn_number: "9999078900012345".into(),
            fd_number: 42,
            date_time: 1_764_840_901,
            result_code: 0,
            fpo: vec![1, 2, 3, 4, 5, 6, 7, 8],
        }
        .to_document(),
    ]
}

fn ferma_bodies() -> Vec<serde_json::Value> {
    let receipt = json!({
        "Request": {
            "Inn": "3245001416",
            "Type": "Income",
            "InvoiceId": "order-1042",
            "LocalDate": "04.12.2026 10:15:00",
            "CallbackUrl": "https://shop.example.ru/ferma",
            "CustomerReceipt": {
                "TaxationSystem": "Common",
                "Email": "buyer@example.ru",
                "Phone": "+79161234567",
                "PaymentType": 1,
                "Items": [
                    {"Label": "Молоко 3,2%", "Price": 89.9, "Quantity": 2, "Amount": 179.8,
                     "Vat": "Vat10", "Measure": "PIECE", "PaymentMethod": 4},
                    {"Label": "Доставка", "Price": "300.00", "Quantity": "1", "Amount": 300,
                     "Vat": "VatNo", "PaymentType": 4}
                ],
                "PaymentItems": [{"PaymentType": 1, "Sum": 479.8}]
            }
        }
    });
    let correction = json!({
        "Request": {
            "Inn": "3245001416",
            "Type": "IncomeCorrection",
            "InvoiceId": "corr-7",
            "CustomerReceipt": {
                "TaxationSystem": "SimpleIn",
                "Items": [{"Label": "Пересорт", "Price": 10, "Quantity": 1, "Amount": 10, "Vat": "VatNo"}]
            },
            "CorrectionInfo": {"Type": "SELF", "Description": "пересорт", "ReceiptDate": "04.12.2026", "ReceiptId": "1"}
        }
    });
    vec![
        receipt,
        correction,
        json!({"Request": {"ReceiptId": "6a1f8c1e-0d5b-4e8e-9c55-2b1f0e6f7a10"}}),
        json!({"Request": {"InvoiceId": "order-1042"}}),
        json!({"Request": {"StartDateUtc": "2026-12-04T00:00:00", "EndDateUtc": "2026-12-05T00:00:00+03:00"}}),
        json!({"Request": {"StartDateLocal": "04.12.2026 00:00", "ReceiptId": "x"}}),
        json!({"Login": "demo", "Password": "demo"}),
        json!({"Request": {"Login": 123, "Password": "p"}}),
    ]
}

fn agent_messages() -> Vec<AgentMessage> {
    let typed = FiscalDocument::Receipt(receipt_record(false));
    vec![
        AgentMessage::Hello(AgentHello {
            version: TUNNEL_VERSION,
            agent_id: "agent-1".into(),
            store_epoch: 7,
            software: "agent 0.1.0".into(),
            journal: JournalSummary::default(),
        }),
        AgentMessage::Accepted {
            job: "job-1".into(),
            attempt: 1,
        },
        AgentMessage::Refused {
            job: "job-2".into(),
            attempt: 3,
            reason: "unknown register".into(),
        },
        AgentMessage::Outbox(OutboxEntry {
            seq: 5,
            body: OutboxBody::Completed {
                job: "job-1".into(),
                attempt: 1,
                kkt: "0000000001012345".into(),
                result: FiscalResult::from_document(&typed, "00106701234567", 3),
            },
        }),
        AgentMessage::Outbox(OutboxEntry {
            seq: 6,
            body: OutboxBody::NotFiscalized {
                job: "job-2".into(),
                attempt: 1,
                kkt: "0000000001012345".into(),
                error: KktError::new(ErrorCode(1), "out of paper"),
            },
        }),
        AgentMessage::Heartbeat(Health {
            rtt_micros: Some(900),
            version: "0.1.0".into(),
            ..Health::default()
        }),
        AgentMessage::Pong { sent_at_micros: 1 },
        AgentMessage::Renew {
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        },
    ]
}

fn controller_messages() -> Vec<ControllerMessage> {
    let mut out = vec![
        ControllerMessage::Hello(ControllerHello {
            version: TUNNEL_VERSION,
            controller_id: "controller-1".into(),
            applied_upto: 4,
        }),
        ControllerMessage::Ack { upto: 6 },
        ControllerMessage::Settings {
            kkt: "0000000001012345".into(),
            settings: KktSettings::default(),
        },
        ControllerMessage::Ping { sent_at_micros: 2 },
        ControllerMessage::Renewed(Err("CSR key does not match".into())),
    ];
    if let Ok(c) = parse_create_receipt(ferma_bodies()[0].to_string().as_bytes()) {
        out.push(ControllerMessage::Dispatch(Dispatch {
            job: "job-1".into(),
            attempt: 1,
            kkt: "0000000001012345".into(),
            work: Work::Receipt(ReceiptParams {
                receipt: c.receipt,
                additional_attribute: None,
            }),
        }));
    }
    out
}

fn framed<T: Serialize>(kind: u8, msgs: &[T]) -> Vec<u8> {
    let mut out = vec![kind];
    for m in msgs {
        out.extend(encode_frame(m).unwrap_or_default());
    }
    out
}

/// Valid inputs for target `name`, built with the protocol's own encoders (empty for an unknown
/// name). Each is one file of a starting corpus.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "tlv" => {
            let mut out: Vec<Vec<u8>> = seed_documents()
                .iter()
                .filter_map(|d| d.encode().ok())
                .collect();
            out.extend(tlv::encode(&[Field::new(1020, Value::Vln(404_969))]).ok());
            out
        }
        "container" => {
            let mut out = Vec::new();
            for (i, doc) in seed_documents().iter().enumerate() {
                let Ok(document) = doc.encode() else { continue };
                let c = Container {
                    header: ContainerHeader {
                        document_type: 1,
                        version: 1,
                        service_data_1: [0, 0],
                        fn_number: "9999078900012345".into(),
                        fd_number: 42 + i as u32,
                        service_data_2: [0; 12],
                    },
                    document,
                    message_sign: [0xAB; 8],
                    trailer: vec![0, 0],
                };
                let Ok(body) = c.encode() else { continue };
                let session = SessionHeader {
                    app_version: [0, 1],
                    fn_number: "9999078900012345".into(),
                    container_length: body.len() as u16,
                    flags: FLAGS_CONTAINER_ANSWER_EXPECTED,
                    crc: 0,
                };
                let mut stream = vec![0];
                stream.extend(session.encode());
                stream.extend(&body);
                out.push(stream);
                let mut raw = vec![1];
                raw.extend(&body);
                out.push(raw);
            }
            out
        }
        "tunnel_frame" => vec![
            framed(0, &agent_messages()),
            framed(1, &controller_messages()),
            framed(
                2,
                &[EnrollRequest {
                    version: TUNNEL_VERSION,
                    token: format!("kt1.{}.{}", "ab".repeat(16), "01".repeat(32)),
                    csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
                    name: "shelf-1".into(),
                }],
            ),
            framed(
                3,
                &[
                    EnrollResponse::Enrolled {
                        agent_id: "agent-1".into(),
                        certificate: IssuedCertificate {
                            cert_pem: "-----BEGIN CERTIFICATE-----".into(),
                            ca_pem: "-----BEGIN CERTIFICATE-----".into(),
                            not_after: 1_800_000_000,
                        },
                    },
                    EnrollResponse::Refused {
                        reason: "token used".into(),
                    },
                ],
            ),
        ],
        "ferma_json" => ferma_bodies()
            .iter()
            .map(|v| v.to_string().into_bytes())
            .collect(),
        _ => Vec::new(),
    }
}
