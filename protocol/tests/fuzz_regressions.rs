//! Inputs the fuzz targets in `fuzz/` found (or that their round-trip properties refuse), kept
//! here so that they stay fixed without a fuzzer.

use protocol::document::{Document, DocumentType, FiscalDocument, ShiftReport};
use protocol::ferma::{format_local, parse_list_request, parse_local};
use protocol::tlv::{Field, Value};

/// `tlv` target: a shift-opening report (2) carrying the closing report's counters 1118 and 1111.
/// They were read into the typed report although `to_document` writes them for a closing report
/// only, so the typed report changed on its way back through the generic form.
#[test]
fn shift_open_report_ignores_closing_counters() {
    let fields = vec![
        Field::new(1041, Value::String("9999078900012345".into())),
        Field::new(1040, Value::U32(40)),
        Field::new(1012, Value::UnixTime(1_764_840_900)),
        Field::new(1077, Value::Bytes(vec![0, 0, 0x80, 0x6B, 0x2E, 0x97])),
        Field::new(1018, Value::String("3245001416  ".into())),
        Field::new(1037, Value::String("0000000001012345    ".into())),
        Field::new(1038, Value::U32(3)),
        Field::new(1118, Value::U32(12)),
        Field::new(1111, Value::U32(14)),
    ];
    let doc = Document {
        doc_type: DocumentType::ShiftOpen,
        fields,
    };
    let bytes = doc.encode().expect("encodes");
    let doc = Document::decode(&bytes).expect("decodes");
    let report = ShiftReport::from_document(&doc).expect("a shift-opening report");
    assert!(!report.close);
    assert_eq!(
        (report.receipts_in_shift, report.documents_in_shift),
        (0, 0)
    );
    let typed = FiscalDocument::Shift(report);
    assert_eq!(
        FiscalDocument::from_document(&typed.to_document()),
        Ok(typed)
    );

    // A closing report still reads them.
    let mut closing = doc.clone();
    closing.doc_type = DocumentType::ShiftClose;
    let report = ShiftReport::from_document(&closing).expect("a shift-closing report");
    assert_eq!(
        (report.receipts_in_shift, report.documents_in_shift),
        (12, 14)
    );
}

/// `ferma_json` target: a list bound whose offset moves it out of the four-digit years was
/// accepted, and then printed as `10000-01-01T07:00:00` or `-001-12-31T22:00:00`, which no client
/// (nor `parse_local`) reads back.
#[test]
fn date_times_outside_four_digit_years_are_refused() {
    assert_eq!(parse_local("9999-12-31T23:00:00-05:00"), None);
    assert_eq!(parse_local("0000-01-01T00:00:00+05:00"), None);
    let e = parse_list_request(br#"{"StartDateLocal":"9999-12-31T23:00:00-05:00"}"#)
        .expect_err("refused");
    assert_eq!(e.field.as_deref(), Some("Request.StartDateLocal"));

    // The edges that stay inside still read, and print back.
    for s in [
        "9999-12-31T23:59:59",
        "9999-12-31T20:59:59Z",
        "0000-01-01T00:00:00",
        "0000-01-01T00:00:00+03:00",
    ] {
        let t = parse_local(s).unwrap_or_else(|| panic!("{s} refused"));
        assert_eq!(parse_local(&format_local(t)), Some(t), "{s}");
    }
}

/// `tunnel_frame` target: a valid message followed by stray bytes in the same frame decoded as
/// if the bytes were not there. A frame is one message, exactly.
#[test]
fn a_frame_with_bytes_after_its_message_is_refused() {
    use protocol::tunnel::{decode_frame, encode_frame, AgentMessage, FrameError};
    let frame = encode_frame(&AgentMessage::Pong { sent_at_micros: 7 }).expect("encodes");
    let body = &frame[4..];
    assert_eq!(
        decode_frame::<AgentMessage>(body).expect("the exact body decodes"),
        AgentMessage::Pong { sent_at_micros: 7 }
    );
    for extra in [&[0u8][..], &[0, 0, 0], &[0xFF; 17]] {
        let mut longer = body.to_vec();
        longer.extend_from_slice(extra);
        match decode_frame::<AgentMessage>(&longer) {
            Err(FrameError::Trailing(n)) => assert_eq!(n, extra.len()),
            other => panic!("{} trailing bytes: {other:?}", extra.len()),
        }
    }
}

/// `container` target: an FN field with a nibble A-E, or a digit after the F padding, decoded to
/// a number that re-encoded to other bytes, so two byte strings named one FN. Now refused.
#[test]
fn a_container_fn_field_that_is_not_clean_bcd_is_refused() {
    use protocol::container::{container_crc, Container, ContainerHeader, FrameError};
    // A container from the protocol's own encoder (FN number of 16 digits: no padding), then
    // its FN field damaged with the CRC fixed up, as the fuzzer's mode 2 does.
    let good = Container {
        header: ContainerHeader {
            document_type: 1,
            version: 1,
            service_data_1: [0, 0],
            fn_number: "9999078900012345".into(),
            fd_number: 42,
            service_data_2: [0; 12],
        },
        document: vec![0x03, 0x00, 0x02, 0x00, 0xAA, 0xBB],
        message_sign: [7; 8],
        trailer: Vec::new(),
    };
    let bytes = good.encode().expect("encodes");
    assert_eq!(Container::decode(&bytes).expect("decodes"), good);
    for (at, nibble_byte) in [(9 + 2, 0x3Au8), (9 + 7, 0xF1), (9, 0xC0)] {
        let mut bad = bytes.clone();
        bad[at] = nibble_byte;
        let crc = container_crc(&bad);
        bad[2..4].copy_from_slice(&crc.to_le_bytes());
        assert!(
            matches!(Container::decode(&bad), Err(FrameError::FnBcd(_))),
            "byte {at} = {nibble_byte:#04x}: {:?}",
            Container::decode(&bad)
        );
    }
}

proptest::proptest! {
    /// `ferma_json` target: a float in a field we only echo (the registry keeps the request as
    /// sent) came back one unit in the last place off when written with 17 significant digits.
    /// serde_json's `float_roundtrip` reads every literal to the nearest double, so the echo is
    /// exact.
    #[test]
    fn a_float_the_shop_sent_is_echoed_bit_for_bit(x in proptest::num::f64::NORMAL) {
        let literal = format!("{x:.16e}");
        let body = format!(
            r#"{{"Request":{{"Inn":"3245001416","Type":"Income","InvoiceId":"f","Extra":{literal},
            "CustomerReceipt":{{"TaxationSystem":"Common","Email":"a@b.ru",
            "Items":[{{"Label":"x","Price":1,"Quantity":1,"Amount":1,"Vat":"Vat20"}}]}}}}}}"#
        );
        let parsed = protocol::ferma::parse_create_receipt(body.as_bytes()).expect("accepted");
        let echoed = parsed.request["Extra"].as_f64().expect("a number");
        let exact: f64 = literal.parse().expect("Rust's parser is exact");
        proptest::prop_assert_eq!(echoed.to_bits(), exact.to_bits(), "{}", literal);
    }
}
