//! Property tests for the wire codecs: `decode(encode(x)) == x` for every TLV value, document,
//! container and link message, and decoding arbitrary or damaged bytes never panics.
//!
//! Generators stay inside what each codec promises to carry: TLV values match [`tag_kind`] of their
//! tag; strings are CP866-representable; strings in typed documents do not end in a space (readers
//! trim the FN's padding) and fit their padded width; fields a report does not carry are left at
//! their default.

#![allow(clippy::unwrap_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use protocol::checksum;
use protocol::container::{
    container_crc, Container, ContainerHeader, FrameError, SessionHeader, MAX_CONTAINER_LEN,
    MESSAGE_SIGN_LEN,
};
use protocol::document::{
    CorrectionRecord, CurrentStateReport, Document, DocumentType, FiscalDocument, FnClosureReport,
    FnFlags, Fpd, ItemRecord, OfdAck, Owner, ReceiptRecord, RegistrationReport,
    ReregistrationReasons, Seal, ShiftReport, UnsentSummary,
};
use protocol::kkt::{
    ArchivedDocument, Call, DeviceStatus, ErrorCode, Event, FfdVersion, FiscalResult, FnInfo,
    FnWarnings, GetFnDocument, Hello, KktError, KktMessage, OfdAckEvent, OfdEndpoint,
    OfdExchangeStatus, Operator, ReceiptParams, RegistrationParams, RegistrationSummary, Reply,
    Request, ReregistrationParams, ReregistrationReason, Response, ShiftState, ShiftStatus,
    XReport,
};
use protocol::receipt::{
    line_amount, CalendarDate, Correction, Item, Kopecks, Measure, PaymentMethod, PaymentSubject,
    Payments, Person, Problem, Quantity, Receipt, ReceiptType, TaxationSystem, VatRate,
};
use protocol::tlv::{self, tag_kind, Field, TagKind, Value, MAX_FVLN_DECIMALS};

// ---------------------------------------------------------------------------------------------
// Strings
// ---------------------------------------------------------------------------------------------

/// Any CP866-representable text (generic TLV does not trim, so trailing spaces are fine): mostly
/// ASCII printable and Cyrillic, sometimes every CP866 character (box drawing, control bytes).
fn cp866_any(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        3 => proptest::string::string_regex(&format!("[ -~А-яЁё]{{0,{max}}}"))
            .expect("regex")
            .boxed(),
        1 => vec(any::<u8>(), 0..=max)
            .prop_map(|b| tlv::cp866_decode(&b))
            .boxed(),
    ]
    .boxed()
}

/// CP866 text of at most `max` characters that does not end in a space (the FN's padding, which
/// readers trim); may be empty. Mostly ASCII printable and Cyrillic, sometimes any CP866 character
/// (tabs, line breaks, the no-break space 0xFF are text, not padding).
fn text(max: usize) -> BoxedStrategy<String> {
    assert!(max >= 1);
    prop_oneof![
        3 => proptest::string::string_regex(&format!("([ -~А-яЁё]{{0,{}}}[!-~А-яЁё])?", max - 1))
            .expect("regex")
            .boxed(),
        1 => vec(any::<u8>(), 0..=max)
            .prop_map(|mut b| {
                while b.last() == Some(&b' ') {
                    b.pop();
                }
                tlv::cp866_decode(&b)
            })
            .boxed(),
    ]
    .boxed()
}

/// Like [`text`] but never empty and never blank (what receipt validation requires).
fn nonblank(max: usize) -> BoxedStrategy<String> {
    assert!(max >= 1);
    proptest::string::string_regex(&format!(
        "[!-~А-яЁё]([ -~А-яЁё]{{0,{}}}[!-~А-яЁё])?",
        max - 1
    ))
    .expect("regex")
    .prop_filter("fits", move |s| s.chars().count() <= max)
    .boxed()
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    proptest::option::of(s).boxed()
}

/// Any Unicode text, control characters included: JSON must escape and restore all of it.
fn json_str() -> BoxedStrategy<String> {
    vec(any::<char>(), 0..12)
        .prop_map(|v| v.into_iter().collect())
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// 1. TLV
// ---------------------------------------------------------------------------------------------

const BYTE_TAGS: &[u16] = &[
    1001, 1002, 1022, 1054, 1055, 1056, 1062, 1199, 1212, 1214, 2108,
];
const U32_TAGS: &[u16] = &[1038, 1040, 1042, 1097, 1116, 1205, 1213];
const VLN_TAGS: &[u16] = &[1020, 1031, 1043, 1079, 1081, 1215, 1217];
const FVLN_TAGS: &[u16] = &[1023];
const STRING_TAGS: &[u16] = &[1008, 1013, 1018, 1021, 1030, 1037, 1041, 1048, 1177, 1192];
const TIME_TAGS: &[u16] = &[1012, 1098, 1178];
const BYTES_TAGS: &[u16] = &[0, 1077, 1078, 9999, 65535];
/// Item, correction basis, OFD message, and document types nested inside a document.
const STLV_TAGS: &[u16] = &[1059, 1174, 1068, 1084, 1223, 1224, 1, 3, 7];

#[test]
fn tag_pools_cover_every_tag_kind() {
    let pools: [(&[u16], TagKind); 8] = [
        (BYTE_TAGS, TagKind::Byte),
        (U32_TAGS, TagKind::U32),
        (VLN_TAGS, TagKind::Vln),
        (FVLN_TAGS, TagKind::Fvln),
        (STRING_TAGS, TagKind::String),
        (TIME_TAGS, TagKind::UnixTime),
        (BYTES_TAGS, TagKind::Bytes),
        (STLV_TAGS, TagKind::Stlv),
    ];
    for (pool, kind) in pools {
        for &tag in pool {
            assert_eq!(tag_kind(tag), kind, "tag {tag}");
        }
    }
}

fn vln() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        0..=0xFFu64,
        0x100..=0xFF_FFFFu64,
        Just(u64::MAX),
        any::<u64>()
    ]
    .boxed()
}

/// A value of the kind `tag_kind` says (never STLV; nesting is built by [`field`]).
fn leaf_value(kind: TagKind) -> BoxedStrategy<Value> {
    match kind {
        TagKind::Byte => any::<u8>().prop_map(Value::Byte).boxed(),
        TagKind::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        TagKind::Vln => vln().prop_map(Value::Vln).boxed(),
        TagKind::Fvln => (0..=MAX_FVLN_DECIMALS, vln())
            .prop_map(|(decimals, mantissa)| Value::Fvln { decimals, mantissa })
            .boxed(),
        TagKind::String => cp866_any(24).prop_map(Value::String).boxed(),
        TagKind::UnixTime => any::<u32>().prop_map(Value::UnixTime).boxed(),
        TagKind::Bytes | TagKind::Stlv => vec(any::<u8>(), 0..24).prop_map(Value::Bytes).boxed(),
    }
}

fn leaf_field() -> BoxedStrategy<Field> {
    let known: Vec<u16> = [
        BYTE_TAGS,
        U32_TAGS,
        VLN_TAGS,
        FVLN_TAGS,
        STRING_TAGS,
        TIME_TAGS,
        BYTES_TAGS,
    ]
    .concat();
    let unknown = any::<u16>().prop_filter("unknown tag", |t| tag_kind(*t) == TagKind::Bytes);
    prop_oneof![
        4 => select(known),
        1 => unknown,
    ]
    .prop_flat_map(|tag| leaf_value(tag_kind(tag)).prop_map(move |v| Field::new(tag, v)))
    .boxed()
}

/// A field, with STLVs nested up to three levels deep.
fn field() -> BoxedStrategy<Field> {
    leaf_field()
        .prop_recursive(3, 48, 5, |inner| {
            (select(STLV_TAGS), vec(inner, 0..5))
                .prop_map(|(tag, children)| Field::new(tag, Value::Stlv(children)))
        })
        .boxed()
}

fn fields() -> BoxedStrategy<Vec<Field>> {
    vec(field(), 0..8).boxed()
}

fn document() -> BoxedStrategy<Document> {
    (select(DocumentType::ALL.to_vec()), fields())
        .prop_map(|(doc_type, fields)| Document { doc_type, fields })
        .boxed()
}

fn max_depth(fields: &[Field]) -> usize {
    fields
        .iter()
        .map(|f| match &f.value {
            Value::Stlv(c) => 1 + max_depth(c),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn the_field_generator_reaches_nested_stlvs() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = fields();
    let deepest = (0..500)
        .map(|_| max_depth(&strategy.new_tree(&mut runner).expect("tree").current()))
        .max()
        .unwrap_or(0);
    assert!(deepest >= 3, "deepest nesting generated: {deepest}");
}

proptest! {
    #[test]
    fn tlv_round_trips(fs in fields()) {
        let bytes = tlv::encode(&fs).expect("consistent fields encode");
        prop_assert_eq!(tlv::decode(&bytes), Ok(fs));
    }

    #[test]
    fn vln_and_fvln_edges_round_trip(v in vln(), decimals in 0..=MAX_FVLN_DECIMALS) {
        let fs = vec![
            Field::new(1020, Value::Vln(v)),
            Field::new(1023, Value::Fvln { decimals, mantissa: v }),
        ];
        let bytes = tlv::encode(&fs).expect("encodes");
        // VLN is trimmed of its high zero bytes, zero is one zero byte.
        let vln_len = usize::from(u16::from_le_bytes([bytes[2], bytes[3]]));
        let expected_len = (8 - v.leading_zeros() as usize / 8).max(1);
        prop_assert_eq!(vln_len, expected_len);
        prop_assert_eq!(tlv::decode(&bytes), Ok(fs));
    }

    #[test]
    fn fvln_beyond_max_decimals_is_refused_both_ways(
        decimals in (MAX_FVLN_DECIMALS + 1)..=u8::MAX,
        mantissa in vln(),
    ) {
        let f = Field::new(1023, Value::Fvln { decimals, mantissa });
        let refused = matches!(tlv::encode(&[f]), Err(tlv::EncodeError::BadDecimals { .. }));
        prop_assert!(refused, "encode accepted {} decimal places", decimals);
        let raw = [0xFF, 0x03, 2, 0, decimals, 1];
        let refused = matches!(tlv::decode(&raw), Err(tlv::DecodeError::BadDecimals { .. }));
        prop_assert!(refused, "decode accepted {} decimal places", decimals);
    }

    #[test]
    fn cp866_is_a_bijection_on_bytes(b in vec(any::<u8>(), 0..64)) {
        // Every byte reads as a character and writes back as the same byte, so strings survive
        // decode → encode byte for byte.
        prop_assert_eq!(tlv::cp866_encode(1030, &tlv::cp866_decode(&b)), Ok(b));
    }

    #[test]
    fn canonical_vln_bytes_survive_decode_encode(raw in vec(any::<u8>(), 1..=8)) {
        let mut bytes = vec![0xFC, 0x03, raw.len() as u8, 0];
        bytes.extend(&raw);
        let fields = tlv::decode(&bytes).expect("1..=8 VLN bytes decode");
        let again = tlv::encode(&fields).expect("re-encodes");
        let canonical = raw == [0] || raw.last() != Some(&0);
        if canonical {
            prop_assert_eq!(again, bytes);
        } else {
            // High zero bytes are not kept: the value survives, the bytes do not.
            prop_assert_eq!(tlv::decode(&again), Ok(fields));
        }
    }

    #[test]
    fn nesting_is_refused_exactly_past_max_depth(depth in 0..(tlv::MAX_DEPTH + 4)) {
        let mut f = Field::new(1030, Value::String("x".into()));
        for _ in 0..depth {
            f = Field::new(1059, Value::Stlv(vec![f]));
        }
        let bytes = tlv::encode(std::slice::from_ref(&f)).expect("encodes");
        let decoded = tlv::decode(&bytes);
        if depth <= tlv::MAX_DEPTH {
            prop_assert_eq!(decoded, Ok(vec![f]));
        } else {
            prop_assert_eq!(decoded, Err(tlv::DecodeError::TooDeep));
        }
    }

    #[test]
    fn generic_document_round_trips(doc in document()) {
        let bytes = doc.encode().expect("encodes");
        prop_assert_eq!(Document::decode(&bytes), Ok(doc));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Typed documents
// ---------------------------------------------------------------------------------------------

fn fpd() -> impl Strategy<Value = Fpd> {
    any::<[u8; 6]>().prop_map(Fpd)
}

fn seal() -> impl Strategy<Value = Seal> {
    (text(16), any::<u32>(), any::<u32>(), fpd()).prop_map(
        |(fn_number, fd_number, date_time, fpd)| Seal {
            fn_number,
            fd_number,
            date_time,
            fpd,
        },
    )
}

fn owner() -> impl Strategy<Value = Owner> {
    (text(40), text(12), text(20)).prop_map(|(user_name, user_inn, rnm)| Owner {
        user_name,
        user_inn,
        rnm,
    })
}

fn unsent() -> impl Strategy<Value = UnsentSummary> {
    (any::<u32>(), opt(any::<u32>()), opt(any::<u32>())).prop_map(
        |(count, first_fd, first_date_time)| UnsentSummary {
            count,
            first_fd,
            first_date_time,
        },
    )
}

fn fn_flags() -> impl Strategy<Value = FnFlags> {
    any::<[bool; 4]>().prop_map(|[a, b, c, d]| FnFlags {
        resource_30_days: a,
        replace_urgently: b,
        memory_90_percent: c,
        ofd_timeout: d,
    })
}

fn registration_report() -> impl Strategy<Value = RegistrationReport> {
    let rereg = opt((any::<u8>(), any::<u32>())
        .prop_map(|(reason, changes)| ReregistrationReasons { reason, changes }));
    (
        (
            seal(),
            owner(),
            text(20),
            rereg,
            any::<u8>(),
            any::<[bool; 4]>(),
        ),
        (
            text(40),
            text(12),
            text(30),
            text(60),
            text(40),
            text(40),
            any::<u8>(),
        ),
    )
        .prop_map(
            |(
                (
                    seal,
                    owner,
                    zn,
                    reregistration,
                    taxation_systems,
                    [internet, auto_mode, offline, encryption],
                ),
                (
                    ofd_name,
                    ofd_inn,
                    fns_site,
                    settlement_address,
                    settlement_place,
                    cashier,
                    ffd_version,
                ),
            )| RegistrationReport {
                seal,
                owner,
                zn,
                reregistration,
                taxation_systems,
                internet,
                auto_mode,
                offline,
                encryption,
                ofd_name,
                ofd_inn,
                fns_site,
                settlement_address,
                settlement_place,
                cashier,
                ffd_version,
            },
        )
}

fn shift_report() -> impl Strategy<Value = ShiftReport> {
    (
        seal(),
        owner(),
        any::<bool>(),
        any::<u32>(),
        text(40),
        any::<u32>(),
        any::<u32>(),
        unsent(),
        fn_flags(),
        any::<u32>(),
    )
        .prop_map(
            |(
                seal,
                owner,
                close,
                shift_number,
                cashier,
                receipts,
                documents,
                unsent,
                flags,
                key,
            )| {
                ShiftReport {
                    seal,
                    owner,
                    close,
                    shift_number,
                    cashier,
                    // An opening report does not carry the shift's counters.
                    receipts_in_shift: if close { receipts } else { 0 },
                    documents_in_shift: if close { documents } else { 0 },
                    unsent,
                    flags,
                    key_resource_days: key,
                }
            },
        )
}

fn current_state_report() -> impl Strategy<Value = CurrentStateReport> {
    (seal(), owner(), any::<u32>(), any::<bool>(), unsent()).prop_map(
        |(seal, owner, shift_number, offline, unsent)| CurrentStateReport {
            seal,
            owner,
            shift_number,
            offline,
            unsent,
        },
    )
}

fn item_record() -> impl Strategy<Value = ItemRecord> {
    (text(64), vln(), vln(), vln(), any::<[u8; 4]>()).prop_map(
        |(name, price, quantity_milli, sum, [vat, payment_method, payment_subject, measure])| {
            ItemRecord {
                name,
                price,
                quantity_milli,
                sum,
                vat,
                payment_method,
                payment_subject,
                measure,
            }
        },
    )
}

fn correction_record() -> impl Strategy<Value = CorrectionRecord> {
    (any::<bool>(), text(60), any::<u32>(), text(30)).prop_map(
        |(by_instruction, description, date, number)| CorrectionRecord {
            by_instruction,
            description,
            date,
            number,
        },
    )
}

fn receipt_record() -> impl Strategy<Value = ReceiptRecord> {
    (
        (
            seal(),
            owner(),
            text(20),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            any::<u8>(),
            vec(item_record(), 0..6),
        ),
        (vln(), vln(), vln(), vln(), vln(), vln()),
        (
            opt(text(64)),
            opt(text(40)),
            opt(text(12)),
            opt(text(40)),
            opt(text(12)),
            opt(text(60)),
            opt(text(40)),
            opt(text(36)),
            opt(correction_record()),
        ),
    )
        .prop_map(
            |(
                (seal, owner, zn, shift_number, receipt_number, operation, taxation, items),
                (total, cash, electronic, prepayment, credit, counter_provision),
                (
                    customer_contact,
                    cashier,
                    cashier_inn,
                    buyer_name,
                    buyer_inn,
                    settlement_address,
                    settlement_place,
                    additional_attribute,
                    correction,
                ),
            )| ReceiptRecord {
                seal,
                owner,
                zn,
                shift_number,
                receipt_number,
                operation,
                taxation,
                items,
                total,
                cash,
                electronic,
                prepayment,
                credit,
                counter_provision,
                customer_contact,
                cashier,
                cashier_inn,
                buyer_name,
                buyer_inn,
                settlement_address,
                settlement_place,
                additional_attribute,
                correction,
            },
        )
}

fn fn_closure_report() -> impl Strategy<Value = FnClosureReport> {
    (seal(), owner(), text(20), text(40), unsent()).prop_map(
        |(seal, owner, zn, cashier, unsent)| FnClosureReport {
            seal,
            owner,
            zn,
            cashier,
            unsent,
        },
    )
}

fn ofd_ack() -> impl Strategy<Value = OfdAck> {
    (
        text(12),
        text(16),
        any::<u32>(),
        any::<u32>(),
        any::<u8>(),
        vec(any::<u8>(), 0..40),
    )
        .prop_map(
            |(ofd_inn, fn_number, fd_number, date_time, result_code, fpo)| OfdAck {
                ofd_inn,
                fn_number,
                fd_number,
                date_time,
                result_code,
                fpo,
            },
        )
}

fn fiscal_document() -> BoxedStrategy<FiscalDocument> {
    prop_oneof![
        registration_report().prop_map(FiscalDocument::Registration),
        shift_report().prop_map(FiscalDocument::Shift),
        current_state_report().prop_map(FiscalDocument::CurrentState),
        receipt_record().prop_map(FiscalDocument::Receipt),
        fn_closure_report().prop_map(FiscalDocument::FnClosure),
    ]
    .boxed()
}

/// to_document → encode → decode, checking the generic form survives the bytes unchanged.
fn through_bytes(doc: &Document) -> Result<Document, TestCaseError> {
    let bytes = doc
        .encode()
        .map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    let back = Document::decode(&bytes).map_err(|e| TestCaseError::fail(format!("decode: {e}")))?;
    prop_assert_eq!(&back, doc);
    Ok(back)
}

/// The seal's fields are readable from the generic form too.
fn check_seal(doc: &Document, seal: &Seal) -> Result<(), TestCaseError> {
    prop_assert_eq!(doc.fd_number(), Some(seal.fd_number));
    prop_assert_eq!(doc.date_time(), Some(seal.date_time));
    prop_assert_eq!(doc.fpd(), Some(seal.fpd));
    Ok(())
}

proptest! {
    #[test]
    fn registration_report_round_trips(x in registration_report()) {
        let doc = through_bytes(&x.to_document())?;
        let expected = if x.reregistration.is_some() {
            DocumentType::Reregistration
        } else {
            DocumentType::Registration
        };
        prop_assert_eq!(doc.doc_type, expected);
        check_seal(&doc, &x.seal)?;
        prop_assert_eq!(RegistrationReport::from_document(&doc), Ok(x));
    }

    #[test]
    fn shift_report_round_trips(x in shift_report()) {
        let doc = through_bytes(&x.to_document())?;
        let expected = if x.close { DocumentType::ShiftClose } else { DocumentType::ShiftOpen };
        prop_assert_eq!(doc.doc_type, expected);
        check_seal(&doc, &x.seal)?;
        prop_assert_eq!(ShiftReport::from_document(&doc), Ok(x));
    }

    #[test]
    fn current_state_report_round_trips(x in current_state_report()) {
        let doc = through_bytes(&x.to_document())?;
        check_seal(&doc, &x.seal)?;
        prop_assert_eq!(CurrentStateReport::from_document(&doc), Ok(x));
    }

    #[test]
    fn receipt_record_round_trips(x in receipt_record()) {
        let doc = through_bytes(&x.to_document())?;
        let expected = if x.correction.is_some() {
            DocumentType::CorrectionReceipt
        } else {
            DocumentType::Receipt
        };
        prop_assert_eq!(doc.doc_type, expected);
        check_seal(&doc, &x.seal)?;
        prop_assert_eq!(ReceiptRecord::from_document(&doc), Ok(x));
    }

    #[test]
    fn fn_closure_report_round_trips(x in fn_closure_report()) {
        let doc = through_bytes(&x.to_document())?;
        check_seal(&doc, &x.seal)?;
        prop_assert_eq!(FnClosureReport::from_document(&doc), Ok(x));
    }

    #[test]
    fn ofd_ack_round_trips(x in ofd_ack()) {
        let doc = through_bytes(&x.to_document())?;
        prop_assert_eq!(doc.fd_number(), Some(x.fd_number));
        prop_assert_eq!(doc.date_time(), Some(x.date_time));
        prop_assert_eq!(doc.fpd(), None, "the OFD's ack carries no FPD");
        prop_assert!(FiscalDocument::from_document(&doc).is_err());
        prop_assert_eq!(OfdAck::from_document(&doc), Ok(x));
    }

    #[test]
    fn fiscal_document_round_trips(x in fiscal_document()) {
        let doc = through_bytes(&x.to_document())?;
        check_seal(&doc, x.seal())?;
        // The signed bytes are the document without its FPD.
        let signed = doc.signed_bytes().expect("encodes");
        let unsigned = Document::decode(&signed).expect("decodes");
        prop_assert_eq!(unsigned.fpd(), None);
        prop_assert_eq!(unsigned.fields.len() + 1, doc.fields.len());
        let back = FiscalDocument::from_document(&doc);
        prop_assert_eq!(back.as_ref(), Ok(&x));
        // Typed readers refuse each other's documents instead of misreading them.
        let others = [
            RegistrationReport::from_document(&doc).is_ok(),
            ShiftReport::from_document(&doc).is_ok(),
            CurrentStateReport::from_document(&doc).is_ok(),
            ReceiptRecord::from_document(&doc).is_ok(),
            FnClosureReport::from_document(&doc).is_ok(),
            OfdAck::from_document(&doc).is_ok(),
        ];
        prop_assert_eq!(others.iter().filter(|ok| **ok).count(), 1);
    }

    #[test]
    fn item_quantity_reads_any_fvln_scale_exactly(
        x in receipt_record(),
        decimals in 0..=MAX_FVLN_DECIMALS,
        mantissa in vln(),
    ) {
        // Another register may write the quantity with any number of decimals; the reader gives
        // thousandths when that is exact and refuses the item otherwise.
        prop_assume!(!x.items.is_empty());
        let mut doc = x.to_document();
        for f in &mut doc.fields {
            if let Value::Stlv(children) = &mut f.value {
                for c in children.iter_mut().filter(|c| c.tag == 1023) {
                    c.value = Value::Fvln { decimals, mantissa };
                }
            }
        }
        let doc = through_bytes(&doc)?;
        let m = u128::from(mantissa);
        let exact = if decimals <= 3 {
            Some(m * 10u128.pow(u32::from(3 - decimals)))
        } else {
            let div = 10u128.pow(u32::from(decimals - 3));
            (m % div == 0).then_some(m / div)
        }
        .and_then(|q| u64::try_from(q).ok());
        match (ReceiptRecord::from_document(&doc), exact) {
            (Ok(back), Some(q)) => {
                prop_assert!(back.items.iter().all(|i| i.quantity_milli == q));
                let mut expected = x.clone();
                expected.items.iter_mut().for_each(|i| i.quantity_milli = q);
                prop_assert_eq!(back, expected);
            }
            (Err(protocol::document::DocumentError::BadValue { tag: 1023, value, .. }), None) => {
                prop_assert_eq!(value, mantissa);
            }
            (got, exact) => prop_assert!(false, "read {:?}, exact quantity {:?}", got, exact),
        }
    }
}

/// Found by `text()` reaching all of CP866: readers used to `trim_end()` every string, which also
/// ate a trailing tab, line break or no-break space (CP866 0xFF) that was part of the text. Only
/// the FN's space padding may go.
#[test]
fn readers_trim_padding_spaces_only() {
    let ack = OfdAck {
        ofd_inn: "7704211201\u{A0}".into(),
        fn_number: "9999078900001234\t".into(),
        fd_number: 7,
        date_time: 1_700_000_000,
        result_code: 0,
        fpo: vec![1, 2, 3],
    };
    let bytes = ack.to_document().encode().expect("encodes");
    let doc = Document::decode(&bytes).expect("decodes");
    assert_eq!(OfdAck::from_document(&doc), Ok(ack.clone()));
    let padded = OfdAck {
        fn_number: "99990789".into(),
        ..ack
    };
    let doc = padded.to_document();
    assert!(doc
        .fields
        .contains(&Field::new(1041, Value::String("99990789        ".into()))));
    assert_eq!(OfdAck::from_document(&doc), Ok(padded));
}

// ---------------------------------------------------------------------------------------------
// 3. Container and session header
// ---------------------------------------------------------------------------------------------

fn fn_digits() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[0-9]{1,16}").expect("regex")
}

fn container_header() -> impl Strategy<Value = ContainerHeader> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<[u8; 2]>(),
        fn_digits(),
        // The header carries the FD number in three bytes.
        0..=0xFF_FFFFu32,
        any::<[u8; 12]>(),
    )
        .prop_map(
            |(document_type, version, service_data_1, fn_number, fd_number, service_data_2)| {
                ContainerHeader {
                    document_type,
                    version,
                    service_data_1,
                    fn_number,
                    fd_number,
                    service_data_2,
                }
            },
        )
}

/// A document the container carries: mostly typed FN documents, sometimes arbitrary generic ones.
fn carried_document() -> BoxedStrategy<Document> {
    prop_oneof![
        fiscal_document().prop_map(|d| d.to_document()),
        ofd_ack().prop_map(|d| d.to_document()),
        document(),
    ]
    .boxed()
}

fn container() -> impl Strategy<Value = (Container, Document)> {
    (
        container_header(),
        carried_document(),
        any::<[u8; MESSAGE_SIGN_LEN]>(),
        vec(any::<u8>(), 0..=4),
    )
        .prop_map(|(header, doc, message_sign, trailer)| {
            let document = doc.encode().expect("generated documents encode");
            (
                Container {
                    header,
                    document,
                    message_sign,
                    trailer,
                },
                doc,
            )
        })
}

fn session_header() -> impl Strategy<Value = SessionHeader> {
    let fn_number = prop_oneof![
        proptest::string::string_regex("[0-9]{0,16}").expect("regex"),
        proptest::string::string_regex("([ -~]{0,15}[!-~])?").expect("regex"),
    ];
    (
        any::<[u8; 2]>(),
        fn_number,
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(
            |(app_version, fn_number, container_length, flags, crc)| SessionHeader {
                app_version,
                fn_number,
                container_length,
                flags,
                crc,
            },
        )
}

proptest! {
    #[test]
    fn container_round_trips((c, doc) in container()) {
        prop_assume!(c.len() <= MAX_CONTAINER_LEN);
        let bytes = c.encode().expect("encodes");
        prop_assert_eq!(bytes.len(), c.len());
        prop_assert_eq!(u16::from_le_bytes([bytes[2], bytes[3]]), container_crc(&bytes));
        let back = Container::decode(&bytes).expect("decodes");
        prop_assert_eq!(&back, &c);
        prop_assert_eq!(back.parse_document().expect("document parses"), doc);
        prop_assert_eq!(back.encode().expect("re-encodes"), bytes);
    }

    #[test]
    fn oversized_container_is_refused((c, _) in container(), extra in 0..64usize) {
        let room = MAX_CONTAINER_LEN - (c.len() - c.trailer.len());
        let big = Container { trailer: vec![0; room + 1 + extra], ..c };
        prop_assert_eq!(big.encode(), Err(FrameError::Length(big.len())));
    }

    #[test]
    fn container_of_exactly_max_len_round_trips((c, _) in container()) {
        let room = MAX_CONTAINER_LEN - (c.len() - c.trailer.len());
        let full = Container { trailer: vec![0xA5; room], ..c };
        prop_assert_eq!(full.len(), MAX_CONTAINER_LEN);
        let bytes = full.encode().expect("32 KiB is allowed");
        prop_assert_eq!(Container::decode(&bytes), Ok(full));
    }

    #[test]
    fn damaged_container_is_refused((c, _) in container(), at in any::<Index>(), bit in 0..8u8) {
        let mut bytes = c.encode().expect("encodes");
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        // CRC-16 catches every single-bit error, including one in the CRC field itself.
        prop_assert!(Container::decode(&bytes).is_err(), "flip at {} went unnoticed", i);
    }

    #[test]
    fn session_header_round_trips(h in session_header()) {
        let bytes = h.encode();
        prop_assert_eq!(SessionHeader::decode(&bytes), Ok(h));
    }
}

// ---------------------------------------------------------------------------------------------
// 4. KKT link
// ---------------------------------------------------------------------------------------------

fn kopecks() -> impl Strategy<Value = Kopecks> {
    vln().prop_map(Kopecks)
}

fn person() -> impl Strategy<Value = Person> {
    (json_str(), opt(json_str())).prop_map(|(name, inn)| Person { name, inn })
}

fn receipt_type() -> impl Strategy<Value = ReceiptType> {
    use ReceiptType::*;
    select(vec![
        Income,
        IncomeReturn,
        IncomePrepayment,
        IncomeReturnPrepayment,
        Expense,
        ExpenseReturn,
        IncomeCorrection,
        IncomeReturnCorrection,
        BuyCorrection,
        ExpenseReturnCorrection,
    ])
}

fn taxation() -> impl Strategy<Value = TaxationSystem> {
    select(TaxationSystem::ALL.to_vec())
}

fn payment_method() -> impl Strategy<Value = PaymentMethod> {
    (1..=7u8).prop_map(|c| PaymentMethod::from_code(c).expect("1..=7 are payment methods"))
}

fn item(label: BoxedStrategy<String>) -> impl Strategy<Value = Item> {
    (
        label,
        kopecks(),
        any::<u64>().prop_map(Quantity),
        kopecks(),
        select(VatRate::ALL.to_vec()),
        payment_method(),
        any::<u8>().prop_map(PaymentSubject),
        select(Measure::ALL.to_vec()),
    )
        .prop_map(
            |(label, price, quantity, amount, vat, payment_method, payment_subject, measure)| {
                Item {
                    label,
                    price,
                    quantity,
                    amount,
                    vat,
                    payment_method,
                    payment_subject,
                    measure,
                }
            },
        )
}

fn payments() -> impl Strategy<Value = Payments> {
    (kopecks(), kopecks(), kopecks(), kopecks(), kopecks()).prop_map(
        |(cash, electronic, prepayment, credit, counter_provision)| Payments {
            cash,
            electronic,
            prepayment,
            credit,
            counter_provision,
        },
    )
}

fn calendar_date() -> impl Strategy<Value = CalendarDate> {
    (any::<u16>(), any::<u8>(), any::<u8>()).prop_map(|(year, month, day)| CalendarDate {
        year,
        month,
        day,
    })
}

fn correction() -> impl Strategy<Value = Correction> {
    (any::<bool>(), json_str(), calendar_date(), json_str()).prop_map(
        |(by_instruction, description, date, number)| Correction {
            by_instruction,
            description,
            date,
            number,
        },
    )
}

/// Any receipt, valid or not: the link carries what it is given.
fn any_receipt() -> impl Strategy<Value = Receipt> {
    (
        receipt_type(),
        taxation(),
        vec(item(json_str()), 0..4),
        payments(),
        opt(json_str()),
        opt(json_str()),
        opt(person()),
        opt(person()),
        opt(correction()),
        opt(json_str()),
        opt(json_str()),
    )
        .prop_map(
            |(
                kind,
                taxation,
                items,
                payments,
                email,
                phone,
                cashier,
                client,
                correction,
                settlement_address,
                settlement_place,
            )| Receipt {
                kind,
                taxation,
                items,
                payments,
                email,
                phone,
                cashier,
                client,
                correction,
                settlement_address,
                settlement_place,
            },
        )
}

fn ffd_version() -> impl Strategy<Value = FfdVersion> {
    select(vec![FfdVersion::V1_05, FfdVersion::V1_1, FfdVersion::V1_2])
}

fn operator() -> impl Strategy<Value = Operator> {
    opt(person()).prop_map(|cashier| Operator { cashier })
}

fn receipt_params() -> impl Strategy<Value = ReceiptParams> {
    (any_receipt(), opt(json_str())).prop_map(|(receipt, additional_attribute)| ReceiptParams {
        receipt,
        additional_attribute,
    })
}

fn ofd_endpoint() -> impl Strategy<Value = OfdEndpoint> {
    (json_str(), json_str(), json_str(), any::<u16>()).prop_map(|(name, inn, host, port)| {
        OfdEndpoint {
            name,
            inn,
            host,
            port,
        }
    })
}

fn registration_params() -> impl Strategy<Value = RegistrationParams> {
    (
        (json_str(), json_str(), json_str(), vec(taxation(), 0..4)),
        (any::<bool>(), any::<bool>(), ofd_endpoint()),
        (json_str(), json_str(), json_str(), opt(person())),
    )
        .prop_map(
            |(
                (rnm, user_inn, user_name, taxation_systems),
                (internet, encryption, ofd),
                (settlement_address, settlement_place, fns_site, cashier),
            )| RegistrationParams {
                rnm,
                user_inn,
                user_name,
                taxation_systems,
                internet,
                encryption,
                ofd,
                settlement_address,
                settlement_place,
                fns_site,
                cashier,
            },
        )
}

fn reregistration_params() -> impl Strategy<Value = ReregistrationParams> {
    use ReregistrationReason::*;
    let reason = select(vec![
        FnReplaced,
        OfdChanged,
        UserDetailsChanged,
        KktSettingsChanged,
    ]);
    (vec(reason, 0..4), registration_params()).prop_map(|(reasons, registration)| {
        ReregistrationParams {
            reasons,
            registration,
        }
    })
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        Just(Call::GetDeviceStatus),
        Just(Call::GetFnInfo),
        Just(Call::GetShiftStatus),
        operator().prop_map(Call::OpenShift),
        operator().prop_map(Call::CloseShift),
        receipt_params().prop_map(Call::Receipt),
        receipt_params().prop_map(Call::Correction),
        Just(Call::ReportX),
        Just(Call::ReportCurrentState),
        Just(Call::OfdExchangeStatus),
        registration_params().prop_map(Call::Register),
        reregistration_params().prop_map(Call::Reregister),
        operator().prop_map(Call::CloseFn),
        any::<u32>().prop_map(|fd_number| Call::GetFnDocument(GetFnDocument { fd_number })),
        ofd_endpoint().prop_map(Call::SetOfd),
    ]
}

fn shift_state() -> impl Strategy<Value = ShiftState> {
    select(vec![
        ShiftState::Closed,
        ShiftState::Opened,
        ShiftState::Expired,
    ])
}

fn device_status() -> impl Strategy<Value = DeviceStatus> {
    (
        any::<u32>(),
        shift_state(),
        any::<[bool; 5]>(),
        json_str(),
        json_str(),
        json_str(),
    )
        .prop_map(
            |(
                date_time,
                shift,
                [blocked, cover_open, paper_present, fiscal, fn_present],
                model,
                zn,
                firmware,
            )| {
                DeviceStatus {
                    date_time,
                    shift,
                    blocked,
                    cover_open,
                    paper_present,
                    fiscal,
                    fn_present,
                    model,
                    zn,
                    firmware,
                }
            },
        )
}

fn registration_summary() -> impl Strategy<Value = RegistrationSummary> {
    (
        json_str(),
        json_str(),
        json_str(),
        vec(taxation(), 0..4),
        any::<bool>(),
        ofd_endpoint(),
    )
        .prop_map(
            |(rnm, user_inn, user_name, taxation_systems, internet, ofd)| RegistrationSummary {
                rnm,
                user_inn,
                user_name,
                taxation_systems,
                internet,
                ofd,
            },
        )
}

fn fn_info() -> impl Strategy<Value = FnInfo> {
    (
        (
            json_str(),
            any::<u8>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (
            ffd_version(),
            any::<[bool; 5]>(),
            opt(any::<u8>()),
            any::<u32>(),
            any::<u32>(),
            opt(registration_summary()),
        ),
    )
        .prop_map(
            |(
                (
                    fn_number,
                    phase,
                    last_fd_number,
                    registrations_done,
                    registrations_left,
                    valid_until,
                ),
                (
                    ffd_version,
                    [a, b, c, d, e],
                    block,
                    documents_used,
                    documents_capacity,
                    registration,
                ),
            )| FnInfo {
                fn_number,
                phase,
                last_fd_number,
                registrations_done,
                registrations_left,
                valid_until,
                ffd_version,
                warnings: FnWarnings {
                    need_replacement: a,
                    resource_exhausted: b,
                    memory_overflow: c,
                    ofd_timeout: d,
                    critical_error: e,
                },
                block,
                documents_used,
                documents_capacity,
                registration,
            },
        )
}

fn shift_status() -> impl Strategy<Value = ShiftStatus> {
    (
        shift_state(),
        any::<u32>(),
        opt(any::<u32>()),
        opt(any::<u32>()),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(state, number, opened_at, expires_at, receipts, documents)| ShiftStatus {
                state,
                number,
                opened_at,
                expires_at,
                receipts,
                documents,
            },
        )
}

fn fiscal_result() -> impl Strategy<Value = FiscalResult> {
    (
        (
            select(DocumentType::ALL.to_vec()),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            opt(any::<u32>()),
        ),
        (
            json_str(),
            json_str(),
            json_str(),
            any::<u32>(),
            opt(kopecks()),
            opt(json_str()),
        ),
    )
        .prop_map(
            |(
                (document_type, fd_number, fpd, shift_number, receipt_number),
                (fn_number, rnm, zn, date_time, total, additional_attribute),
            )| FiscalResult {
                document_type,
                fd_number,
                fpd,
                shift_number,
                receipt_number,
                fn_number,
                rnm,
                zn,
                date_time,
                total,
                additional_attribute,
            },
        )
}

fn x_report() -> impl Strategy<Value = XReport> {
    (any::<u32>(), any::<u32>(), vec(kopecks(), 6)).prop_map(|(shift_number, receipts, k)| {
        XReport {
            shift_number,
            receipts,
            income: k[0],
            income_return: k[1],
            expense: k[2],
            expense_return: k[3],
            cash: k[4],
            electronic: k[5],
        }
    })
}

fn ofd_exchange_status() -> impl Strategy<Value = OfdExchangeStatus> {
    (
        any::<u32>(),
        opt(any::<u32>()),
        opt(any::<u32>()),
        opt(any::<u32>()),
        opt(ofd_endpoint()),
    )
        .prop_map(
            |(unsent_count, first_unsent_fd, first_unsent_date_time, last_ack_at, ofd)| {
                OfdExchangeStatus {
                    unsent_count,
                    first_unsent_fd,
                    first_unsent_date_time,
                    last_ack_at,
                    ofd,
                }
            },
        )
}

fn archived_document() -> impl Strategy<Value = ArchivedDocument> {
    (fiscal_result(), fiscal_document(), any::<bool>()).prop_map(
        |(result, document, acknowledged)| {
            let bytes = document.to_document().encode().expect("encodes");
            ArchivedDocument {
                result,
                document,
                tlv_hex: bytes.iter().map(|b| format!("{b:02x}")).collect(),
                acknowledged,
            }
        },
    )
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        device_status().prop_map(Reply::DeviceStatus),
        fn_info().prop_map(Reply::FnInfo),
        shift_status().prop_map(Reply::ShiftStatus),
        fiscal_result().prop_map(Reply::Fiscal),
        x_report().prop_map(Reply::XReport),
        ofd_exchange_status().prop_map(Reply::OfdExchange),
        archived_document().prop_map(|d| Reply::FnDocument(Box::new(d))),
        Just(Reply::Done),
    ]
}

fn kkt_error() -> impl Strategy<Value = KktError> {
    (any::<u16>(), opt(any::<u8>()), json_str()).prop_map(|(code, fn_code, text)| KktError {
        code: ErrorCode(code),
        fn_code,
        text,
    })
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (json_str(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(fn_number, fd_number, acked_at, unsent_count)| Event::OfdAck(OfdAckEvent {
                fn_number,
                fd_number,
                acked_at,
                unsent_count,
            })
        ),
        device_status().prop_map(Event::StatusChanged),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        json_str(),
        json_str(),
        json_str(),
        json_str(),
        ffd_version(),
    )
        .prop_map(
            |(version, model, zn, fn_number, firmware, ffd_version)| Hello {
                version,
                model,
                zn,
                fn_number,
                firmware,
                ffd_version,
            },
        )
}

fn kkt_message() -> impl Strategy<Value = KktMessage> {
    let outcome = prop_oneof![reply().prop_map(Ok), kkt_error().prop_map(Err)];
    prop_oneof![
        hello().prop_map(KktMessage::Hello),
        (any::<u64>(), call()).prop_map(|(id, call)| KktMessage::Request(Request { id, call })),
        (any::<u64>(), outcome)
            .prop_map(|(id, outcome)| KktMessage::Response(Response { id, outcome })),
        event().prop_map(KktMessage::Event),
    ]
}

proptest! {
    #[test]
    fn kkt_message_round_trips(m in kkt_message()) {
        let json = m.to_json();
        prop_assert!(!json.contains("serializationFailed"), "{}", json);
        let back = KktMessage::from_json(&json);
        prop_assert!(back.is_ok(), "{json}: {:?}", back);
        prop_assert_eq!(back.expect("checked"), m);
    }

    #[test]
    fn every_call_round_trips_with_its_method_name(id in any::<u64>(), c in call()) {
        let m = KktMessage::Request(Request { id, call: c.clone() });
        let json = m.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        prop_assert_eq!(v["type"].as_str(), Some("request"));
        prop_assert_eq!(v["method"].as_str(), Some(c.method()));
        prop_assert_eq!(v["id"].as_u64(), Some(id));
        let back = KktMessage::from_json(&json);
        prop_assert!(back.is_ok(), "{json}: {:?}", back);
        prop_assert_eq!(back.expect("checked"), m);
    }

    #[test]
    fn every_reply_and_error_round_trips(
        id in any::<u64>(),
        outcome in prop_oneof![reply().prop_map(Ok), kkt_error().prop_map(Err)],
    ) {
        let m = KktMessage::Response(Response { id, outcome });
        let json = m.to_json();
        let back = KktMessage::from_json(&json);
        prop_assert!(back.is_ok(), "{json}: {:?}", back);
        prop_assert_eq!(back.expect("checked"), m);
    }

    #[test]
    fn every_event_round_trips(e in event()) {
        let m = KktMessage::Event(e);
        let back = KktMessage::from_json(&m.to_json());
        prop_assert!(back.is_ok(), "{:?}", back);
        prop_assert_eq!(back.expect("checked"), m);
    }

    #[test]
    fn receipt_json_round_trips(r in any_receipt()) {
        let json = serde_json::to_string(&r).expect("serializes");
        let back: Receipt = serde_json::from_str(&json).expect("deserializes");
        prop_assert_eq!(back, r);
    }

    #[test]
    fn fiscal_document_json_round_trips(d in fiscal_document()) {
        let json = serde_json::to_string(&d).expect("serializes");
        let back: FiscalDocument = serde_json::from_str(&json).expect("deserializes");
        prop_assert_eq!(back, d);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Robustness: no input makes a decoder panic
// ---------------------------------------------------------------------------------------------

/// Runs every reader over a document that decoded: they may refuse it, never panic.
fn read_every_way(doc: &Document) {
    let _ = doc.fd_number();
    let _ = doc.date_time();
    let _ = doc.fpd();
    let _ = doc.signed_bytes();
    let _ = doc.encode();
    let _ = FiscalDocument::from_document(doc);
    let _ = RegistrationReport::from_document(doc);
    let _ = ShiftReport::from_document(doc);
    let _ = CurrentStateReport::from_document(doc);
    let _ = ReceiptRecord::from_document(doc);
    let _ = FnClosureReport::from_document(doc);
    let _ = OfdAck::from_document(doc);
}

/// Decodes bytes every way there is and reads whatever decodes.
fn decode_every_way(bytes: &[u8]) {
    if let Ok(fields) = tlv::decode(bytes) {
        // What decodes re-encodes, and reads back the same (the bytes may differ only where the
        // input was not canonical, e.g. a VLN with high zero bytes).
        let again = tlv::encode(&fields).expect("decoded fields re-encode");
        assert_eq!(tlv::decode(&again).as_ref(), Ok(&fields));
    }
    if let Ok(doc) = Document::decode(bytes) {
        read_every_way(&doc);
    }
    if let Ok(c) = Container::decode(bytes) {
        if let Ok(doc) = c.parse_document() {
            read_every_way(&doc);
        }
        let _ = c.encode();
    }
    let _ = SessionHeader::decode(bytes);
    let _ = KktMessage::from_json(&String::from_utf8_lossy(bytes));
}

/// Byte strings shaped like TLV: plausible tags (documents, STLVs, every value kind) with declared
/// lengths that may or may not match the payload that follows. Random bytes rarely get past the
/// first header; these reach the value readers and the nesting.
fn tlv_ish() -> impl Strategy<Value = Vec<u8>> {
    let tags: Vec<u16> = [
        BYTE_TAGS,
        U32_TAGS,
        VLN_TAGS,
        FVLN_TAGS,
        STRING_TAGS,
        TIME_TAGS,
        BYTES_TAGS,
        STLV_TAGS,
        &[2, 5, 6, 11, 21, 31][..],
    ]
    .concat();
    let chunk =
        (select(tags), 0..24u16, vec(any::<u8>(), 0..24)).prop_map(|(tag, len, payload)| {
            let mut out = tag.to_le_bytes().to_vec();
            out.extend(len.to_le_bytes());
            out.extend(payload);
            out
        });
    vec(chunk, 0..8).prop_map(|chunks| chunks.concat())
}

/// Flips bytes, then maybe truncates or extends.
fn mutate(mut bytes: Vec<u8>, flips: &[(Index, u8)], cut: Option<Index>, extra: &[u8]) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes.extend_from_slice(extra);
    bytes
}

fn mutation() -> impl Strategy<Value = (Vec<(Index, u8)>, Option<Index>, Vec<u8>)> {
    (
        vec((any::<Index>(), 1..=u8::MAX), 0..4),
        opt(any::<Index>()),
        vec(any::<u8>(), 0..3),
    )
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..256)) {
        decode_every_way(&bytes);
    }

    #[test]
    fn decoding_tlv_shaped_bytes_never_panics(bytes in tlv_ish()) {
        decode_every_way(&bytes);
        // Wrapped as a document, so the typed readers see it too.
        let mut doc = vec![3, 0];
        doc.extend((bytes.len() as u16).to_le_bytes());
        doc.extend(&bytes);
        decode_every_way(&doc);
    }

    #[test]
    fn decoding_arbitrary_text_never_panics(s in ".{0,256}", t in any::<String>()) {
        let _ = KktMessage::from_json(&s);
        let _ = KktMessage::from_json(&t);
        decode_every_way(s.as_bytes());
    }

    #[test]
    fn decoding_a_damaged_document_never_panics(
        d in fiscal_document(),
        (flips, cut, extra) in mutation(),
    ) {
        let bytes = d.to_document().encode().expect("encodes");
        decode_every_way(&mutate(bytes, &flips, cut, &extra));
    }

    #[test]
    fn decoding_a_damaged_container_never_panics(
        (c, _) in container(),
        (flips, cut, extra) in mutation(),
        fix_up in any::<bool>(),
    ) {
        let bytes = c.encode().expect("encodes");
        let mut damaged = mutate(bytes, &flips, cut, &extra);
        if fix_up && damaged.len() >= 4 {
            // Make length and CRC agree with the damage, so the body is actually read.
            let len = damaged.len() as u16;
            damaged[0..2].copy_from_slice(&len.to_le_bytes());
            let crc = container_crc(&damaged);
            damaged[2..4].copy_from_slice(&crc.to_le_bytes());
        }
        decode_every_way(&damaged);
    }

    #[test]
    fn decoding_a_damaged_link_message_never_panics(
        m in kkt_message(),
        (flips, cut, extra) in mutation(),
    ) {
        let json = m.to_json().into_bytes();
        let damaged = mutate(json, &flips, cut, &extra);
        let _ = KktMessage::from_json(&String::from_utf8_lossy(&damaged));
    }

    #[test]
    fn checksums_never_panic(a in ".{0,24}", b in "[0-9]{0,24}", c in ".{0,24}") {
        let _ = checksum::validate_inn(&a);
        let _ = checksum::validate_inn(&b);
        let _ = checksum::rnm(&b, &a, &c);
        let _ = checksum::check_rnm(&b, &a, &c);
        let _ = checksum::check_rnm(&a, &b, &c);
    }
}

#[test]
fn deeply_nested_json_is_refused_without_overflowing_the_stack() {
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let depth = 100_000;
        let json = format!(
            "{{\"type\":\"hello\",\"model\":{}1{}}}",
            open.repeat(depth),
            close.repeat(depth)
        );
        assert!(KktMessage::from_json(&json).is_err());
    }
    let too_large = " ".repeat(protocol::kkt::MAX_MESSAGE_BYTES + 1);
    assert!(matches!(
        KktMessage::from_json(&too_large),
        Err(protocol::kkt::LinkError::TooLarge(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// 6. Receipt model validation
// ---------------------------------------------------------------------------------------------

/// A valid INN: random digits with the check digit(s) computed.
fn valid_inn() -> impl Strategy<Value = String> {
    fn check(digits: &[u32], weights: &[u32]) -> u32 {
        let sum: u32 = digits.iter().zip(weights).map(|(a, b)| a * b).sum();
        (sum % 11) % 10
    }
    prop_oneof![
        vec(0..10u32, 9).prop_map(|mut d| {
            d.push(check(&d, &[2, 4, 10, 3, 5, 9, 4, 6, 8]));
            d
        }),
        vec(0..10u32, 10).prop_map(|mut d| {
            d.push(check(&d, &[7, 2, 4, 10, 3, 5, 9, 4, 6, 8]));
            d.push(check(&d, &[3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8]));
            d
        }),
    ]
    .prop_map(|d| {
        d.into_iter()
            .map(|x| char::from_digit(x, 10).expect("digit"))
            .collect()
    })
}

fn valid_person() -> impl Strategy<Value = Person> {
    (nonblank(64), opt(valid_inn())).prop_map(|(name, inn)| Person { name, inn })
}

fn valid_correction() -> impl Strategy<Value = Correction> {
    (
        any::<bool>(),
        nonblank(80),
        (2000..=2099u16, 1..=12u8, 1..=28u8),
        proptest::string::string_regex("[ -~А-яЁё]{0,30}").expect("regex"),
    )
        .prop_map(
            |(by_instruction, description, (year, month, day), number)| Correction {
                by_instruction,
                description,
                date: CalendarDate { year, month, day },
                number,
            },
        )
}

/// An item whose amount is exactly price × quantity.
fn valid_item() -> impl Strategy<Value = Item> {
    (
        nonblank(40),
        prop_oneof![Just(0u64), 1..=100_000u64, 1..=1_000_000_000u64],
        prop_oneof![Just(1000u64), 1..=1000u64, 1..=10_000_000u64],
        select(VatRate::ALL.to_vec()),
        payment_method(),
        1..=PaymentSubject::MAX,
        select(Measure::ALL.to_vec()),
    )
        .prop_map(
            |(label, price, quantity, vat, payment_method, subject, measure)| {
                let (price, quantity) = (Kopecks(price), Quantity(quantity));
                Item {
                    label,
                    price,
                    quantity,
                    amount: line_amount(price, quantity).expect("small enough"),
                    vat,
                    payment_method,
                    payment_subject: PaymentSubject(subject),
                    measure,
                }
            },
        )
}

/// A receipt the register would accept: payments split at random over the five kinds and adding
/// up to the items' total.
fn valid_receipt() -> impl Strategy<Value = Receipt> {
    let contacts = (
        opt(proptest::string::string_regex("[a-z0-9._]{1,10}@[a-z]{1,10}\\.(ru|com)").expect("re")),
        opt(proptest::string::string_regex("\\+7[0-9]{10}|[0-9]{10,15}").expect("regex")),
        opt(valid_person()),
        opt(valid_person()),
        opt(nonblank(60)),
        opt(nonblank(60)),
    );
    (
        receipt_type(),
        taxation(),
        vec(valid_item(), 1..8),
        contacts,
        valid_correction(),
    )
        .prop_flat_map(|(kind, taxation, items, contacts, correction)| {
            let total: u64 = items.iter().map(|i| i.amount.0).sum();
            let cuts = vec(0..=total, 4);
            (Just((kind, taxation, items, contacts, correction)), cuts)
        })
        .prop_map(
            |(
                (
                    kind,
                    taxation,
                    items,
                    (email, phone, cashier, client, address, place),
                    correction,
                ),
                mut cuts,
            )| {
                let total: u64 = items.iter().map(|i| i.amount.0).sum();
                cuts.sort_unstable();
                let parts: Vec<Kopecks> = [0, cuts[0], cuts[1], cuts[2], cuts[3]]
                    .iter()
                    .zip([cuts[0], cuts[1], cuts[2], cuts[3], total])
                    .map(|(lo, hi)| Kopecks(hi - lo))
                    .collect();
                Receipt {
                    kind,
                    taxation,
                    items,
                    payments: Payments {
                        cash: parts[0],
                        electronic: parts[1],
                        prepayment: parts[2],
                        credit: parts[3],
                        counter_provision: parts[4],
                    },
                    email,
                    phone,
                    cashier,
                    client,
                    correction: kind.is_correction().then_some(correction),
                    settlement_address: address,
                    settlement_place: place,
                }
            },
        )
}

proptest! {
    #[test]
    fn a_receipt_that_adds_up_validates(r in valid_receipt()) {
        prop_assert_eq!(r.payments.total(), r.total());
        prop_assert_eq!(r.validate(), Ok(()));
        // And it survives the link unchanged.
        let m = KktMessage::Request(Request {
            id: 1,
            call: Call::Receipt(ReceiptParams { receipt: r.clone(), additional_attribute: None }),
        });
        let back = KktMessage::from_json(&m.to_json());
        prop_assert!(back.is_ok(), "{:?}", back);
        prop_assert_eq!(back.expect("checked"), m);
    }

    #[test]
    fn one_kopeck_off_names_the_item(
        r in valid_receipt(),
        at in any::<Index>(),
        up in any::<bool>(),
        rebalance in any::<bool>(),
    ) {
        let mut r = r;
        let i = at.index(r.items.len());
        let expected = r.items[i].amount;
        let got = if up || expected.0 == 0 {
            Kopecks(expected.0 + 1)
        } else {
            Kopecks(expected.0 - 1)
        };
        r.items[i].amount = got;
        if rebalance {
            // Payments that match the damaged total do not hide the bad line.
            let total = r.total().expect("small");
            r.payments = Payments { cash: total, ..Payments::default() };
        }
        let e = r.validate().expect_err("an amount one kopeck off is refused");
        prop_assert_eq!(e.field, format!("items[{i}].amount"));
        prop_assert_eq!(e.problem, Problem::AmountMismatch { expected, got });
    }
}

// ---- Tunnel frames (postcard) -------------------------------------------------------------

mod tunnel_frames {
    use super::*;
    use protocol::tunnel::*;

    fn short() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9а-яА-Я -]{0,24}"
    }

    fn held_job() -> impl Strategy<Value = HeldJob> {
        (short(), any::<u32>(), short()).prop_map(|(job, attempt, kkt)| HeldJob {
            job,
            attempt,
            kkt,
        })
    }

    fn outbox_body() -> impl Strategy<Value = OutboxBody> {
        prop_oneof![
            (short(), any::<u32>(), short(), fiscal_result()).prop_map(
                |(job, attempt, kkt, result)| {
                    OutboxBody::Completed {
                        job,
                        attempt,
                        kkt,
                        result,
                    }
                }
            ),
            (short(), any::<u32>(), short(), kkt_error()).prop_map(|(job, attempt, kkt, error)| {
                OutboxBody::NotFiscalized {
                    job,
                    attempt,
                    kkt,
                    error,
                }
            }),
            (short(), event()).prop_map(|(kkt, event)| OutboxBody::Event { kkt, event }),
        ]
    }

    fn health() -> impl Strategy<Value = Health> {
        (
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u32>(),
            short(),
            proptest::option::of(short()),
        )
            .prop_map(|(s, rtt, j, o, old, k, v, alarm)| Health {
                sent_at_micros: s,
                rtt_micros: rtt,
                journal_depth: j,
                outbox_depth: o,
                oldest_unacked_secs: old,
                kkts: k,
                version: v,
                alarm,
            })
    }

    fn work() -> impl Strategy<Value = Work> {
        prop_oneof![
            receipt_params().prop_map(Work::Receipt),
            receipt_params().prop_map(Work::Correction),
        ]
    }

    fn agent_message() -> impl Strategy<Value = AgentMessage> {
        prop_oneof![
            (
                any::<u16>(),
                short(),
                any::<u64>(),
                vec(held_job(), 0..4),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(
                    |(version, agent_id, store_epoch, jobs, last_seq, outbox_depth)| {
                        AgentMessage::Hello(AgentHello {
                            version,
                            agent_id,
                            store_epoch,
                            software: "agent".into(),
                            journal: JournalSummary {
                                jobs,
                                last_seq,
                                outbox_depth,
                            },
                        })
                    }
                ),
            (hello(), short()).prop_map(|(hello, transport)| AgentMessage::Attached(Attached {
                hello,
                transport
            })),
            short().prop_map(|kkt| AgentMessage::Detached { kkt }),
            (
                short(),
                device_status(),
                fn_info(),
                shift_status(),
                ofd_exchange_status()
            )
                .prop_map(|(kkt, device, fn_info, shift, ofd)| {
                    AgentMessage::Status(Box::new(KktState {
                        kkt,
                        device,
                        fn_info,
                        shift,
                        ofd,
                    }))
                }),
            (short(), any::<u32>())
                .prop_map(|(job, attempt)| AgentMessage::Accepted { job, attempt }),
            (short(), any::<u32>(), short()).prop_map(|(job, attempt, reason)| {
                AgentMessage::Refused {
                    job,
                    attempt,
                    reason,
                }
            }),
            (any::<u64>(), outbox_body())
                .prop_map(|(seq, body)| AgentMessage::Outbox(OutboxEntry { seq, body })),
            (
                any::<u64>(),
                short(),
                prop_oneof![reply().prop_map(Ok), kkt_error().prop_map(Err)]
            )
                .prop_map(|(id, kkt, outcome)| AgentMessage::CommandResult {
                    id,
                    kkt,
                    outcome
                }),
            health().prop_map(AgentMessage::Heartbeat),
            any::<u64>().prop_map(|s| AgentMessage::Pong { sent_at_micros: s }),
        ]
    }

    fn controller_message() -> impl Strategy<Value = ControllerMessage> {
        prop_oneof![
            (any::<u16>(), short(), any::<u64>()).prop_map(
                |(version, controller_id, applied_upto)| {
                    ControllerMessage::Hello(ControllerHello {
                        version,
                        controller_id,
                        applied_upto,
                    })
                }
            ),
            any::<u64>().prop_map(|upto| ControllerMessage::Ack { upto }),
            (short(), any::<u32>(), short(), work()).prop_map(|(job, attempt, kkt, work)| {
                ControllerMessage::Dispatch(Dispatch {
                    job,
                    attempt,
                    kkt,
                    work,
                })
            }),
            (short(), proptest::option::of(ofd_endpoint())).prop_map(|(kkt, ofd)| {
                ControllerMessage::Settings {
                    kkt,
                    settings: KktSettings { ofd },
                }
            }),
            (any::<u64>(), short(), call())
                .prop_map(|(id, kkt, call)| ControllerMessage::Command { id, kkt, call }),
            any::<u64>().prop_map(|s| ControllerMessage::Ping { sent_at_micros: s }),
            any::<u64>().prop_map(|s| ControllerMessage::Pong { sent_at_micros: s }),
        ]
    }

    proptest! {
        #[test]
        fn agent_messages_round_trip_through_frames(m in agent_message()) {
            let frame = encode_frame(&m).expect("encodes");
            let mut prefix = [0u8; 4];
            prefix.copy_from_slice(&frame[..4]);
            prop_assert_eq!(frame_len(prefix).expect("fits"), frame.len() - 4);
            let back: AgentMessage = decode_frame(&frame[4..]).expect("decodes");
            prop_assert_eq!(back, m);
        }

        #[test]
        fn controller_messages_round_trip_through_frames(m in controller_message()) {
            let frame = encode_frame(&m).expect("encodes");
            let back: ControllerMessage = decode_frame(&frame[4..]).expect("decodes");
            prop_assert_eq!(back, m);
        }

        #[test]
        fn arbitrary_frames_never_panic(bytes in vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<AgentMessage>(&bytes);
            let _ = decode_frame::<ControllerMessage>(&bytes);
        }
    }

    proptest! {
        #[test]
        fn enrollment_and_renewal_round_trip(csr in short(), token in short(), pem in short(), not_after in any::<u64>(), ok in any::<bool>()) {
            let cert = IssuedCertificate { cert_pem: pem.clone(), ca_pem: pem.clone(), not_after };
            let renew = AgentMessage::Renew { csr_pem: csr.clone() };
            let back: AgentMessage = decode_frame(&encode_frame(&renew).expect("encodes")[4..]).expect("decodes");
            prop_assert_eq!(back, renew);
            let renewed = ControllerMessage::Renewed(if ok { Ok(cert.clone()) } else { Err(pem.clone()) });
            let back: ControllerMessage = decode_frame(&encode_frame(&renewed).expect("encodes")[4..]).expect("decodes");
            prop_assert_eq!(back, renewed);
            let req = EnrollRequest { version: TUNNEL_VERSION, token, csr_pem: csr, name: pem.clone() };
            let back: EnrollRequest = decode_frame(&encode_frame(&req).expect("encodes")[4..]).expect("decodes");
            prop_assert_eq!(back, req);
            let resp = if ok {
                EnrollResponse::Enrolled { agent_id: pem, certificate: cert }
            } else {
                EnrollResponse::Refused { reason: pem }
            };
            let back: EnrollResponse = decode_frame(&encode_frame(&resp).expect("encodes")[4..]).expect("decodes");
            prop_assert_eq!(back, resp);
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix() {
        assert!(frame_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
        assert!(frame_len((MAX_FRAME as u32).to_le_bytes()).is_ok());
    }
}
