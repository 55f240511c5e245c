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
