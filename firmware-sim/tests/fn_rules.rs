//! Rules of the fiscal drive (FN) and the register core, tested through the crate's public API.
//!
//! Both cores are pure: time is passed in, nothing sleeps. Every refusal is checked for its exact
//! error code and raw FN code, and for leaving the state untouched — a refused call never moves the
//! FD counter, which is what makes "error" a proof of "not fiscalized".

#![allow(clippy::unwrap_used)]

use firmware_sim::drive::{
    fn_code, verify_fpd, DriveConfig, FiscalDrive, FnModel, Formed, Phase, DAY, OFD_WAIT_LIMIT,
    RESERVED_FOR_CLOSING, SHIFT_LIMIT,
};
use firmware_sim::register::{archived_document, Register};
use proptest::prelude::*;
use protocol::document::{DocumentType, FiscalDocument};
use protocol::kkt::{
    Call, ErrorCode, FfdVersion, FnWarnings, GetFnDocument, KktError, OfdEndpoint, Operator,
    ReceiptParams, RegistrationParams, Reply, ReregistrationParams, ReregistrationReason,
    ShiftState,
};
use protocol::receipt::{
    line_amount, CalendarDate, Correction, Item, Kopecks, Measure, PaymentMethod, PaymentSubject,
    Payments, Person, Quantity, Receipt, ReceiptType, TaxationSystem, VatRate,
};

const INN: &str = "3245001416";
const ZN: &str = "0000000000000001";
const FN_NUMBER: &str = "9999078900000001";
const SECRET: [u8; 32] = [7; 32];
/// 2026-01-01 00:00:00 UTC.
const T0: u32 = 1_767_225_600;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn rnm_for(inn: &str, zn: &str) -> String {
    protocol::checksum::rnm("0000000001", inn, zn).expect("rnm")
}

fn ofd(port: u16) -> OfdEndpoint {
    OfdEndpoint {
        name: "ООО Такском".into(),
        inn: "7704211201".into(),
        host: "127.0.0.1".into(),
        port,
    }
}

fn reg_params() -> RegistrationParams {
    RegistrationParams {
        rnm: rnm_for(INN, ZN),
        user_inn: INN.into(),
        user_name: "ООО Ромашка".into(),
        taxation_systems: vec![TaxationSystem::Common, TaxationSystem::SimpleIn],
        // A shop's counter register: it prints, so cash sales need no buyer contact.
        internet: false,
        encryption: false,
        ofd: ofd(7777),
        settlement_address: "г. Москва, ул. Тверская, д. 1".into(),
        settlement_place: "shop.example.ru".into(),
        fns_site: "www.nalog.gov.ru".into(),
        cashier: Some(Person {
            name: "Иванов И. И.".into(),
            inn: None,
        }),
    }
}

fn rereg(reasons: &[ReregistrationReason]) -> ReregistrationParams {
    ReregistrationParams {
        reasons: reasons.to_vec(),
        registration: reg_params(),
    }
}

fn config() -> DriveConfig {
    DriveConfig::new(FN_NUMBER.into(), SECRET)
}

fn op() -> Operator {
    Operator {
        cashier: Some(Person {
            name: "Петрова А. С.".into(),
            inn: None,
        }),
    }
}

fn item(label: &str, price: u64, quantity: u64) -> Item {
    let amount = line_amount(Kopecks(price), Quantity(quantity)).expect("amount");
    Item {
        label: label.into(),
        price: Kopecks(price),
        quantity: Quantity(quantity),
        amount,
        vat: VatRate::Vat20,
        payment_method: PaymentMethod::FullPayment,
        payment_subject: PaymentSubject::GOODS,
        measure: Measure::Piece,
    }
}

fn receipt_of(kind: ReceiptType, items: Vec<Item>) -> Receipt {
    let total = items
        .iter()
        .try_fold(Kopecks(0), |a, i| a.checked_add(i.amount))
        .expect("total");
    Receipt {
        kind,
        taxation: TaxationSystem::Common,
        items,
        payments: Payments {
            cash: total,
            ..Payments::default()
        },
        email: None,
        phone: None,
        cashier: None,
        client: None,
        correction: None,
        settlement_address: None,
        settlement_place: None,
    }
}

/// A valid sale: amount = price × quantity, paid in cash in full.
fn sale(price: u64, quantity: u64) -> ReceiptParams {
    ReceiptParams {
        receipt: receipt_of(
            ReceiptType::Income,
            vec![item("Молоко 3,2%", price, quantity)],
        ),
        additional_attribute: Some("job-42".into()),
    }
}

fn correction() -> ReceiptParams {
    let mut r = receipt_of(
        ReceiptType::IncomeCorrection,
        vec![item("Хлеб", 4500, 2000)],
    );
    r.correction = Some(Correction {
        by_instruction: false,
        description: "Сбой ККТ".into(),
        date: CalendarDate {
            year: 2025,
            month: 12,
            day: 31,
        },
        number: "1".into(),
    });
    ReceiptParams {
        receipt: r,
        additional_attribute: None,
    }
}

/// A drive registered at `T0` (FD 1).
fn registered_with(config: DriveConfig) -> FiscalDrive {
    let mut d = FiscalDrive::new(config);
    d.register(T0, ZN, &reg_params()).expect("registration");
    d
}

fn registered() -> FiscalDrive {
    registered_with(config())
}

/// A drive registered at `T0` with a shift opened at `T0` (FD 2).
fn with_shift() -> FiscalDrive {
    let mut d = registered();
    d.open_shift(T0, &op()).expect("open shift");
    d
}

fn new_register() -> Register {
    Register::new(ZN.into(), config())
}

fn registered_register() -> Register {
    let mut r = new_register();
    handle_ok(&mut r, &Call::Register(reg_params()), T0);
    r
}

/// Asserts an error with the exact KKT code and raw FN code.
#[track_caller]
fn refused<T: std::fmt::Debug>(
    r: Result<T, KktError>,
    code: ErrorCode,
    raw: Option<u8>,
) -> KktError {
    match r {
        Ok(v) => panic!("expected refusal {code}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code, code, "wrong code: {e}");
            assert_eq!(e.fn_code, raw, "wrong FN code: {e}");
            e
        }
    }
}

/// Runs a drive operation that must be refused and asserts it changed nothing at all.
#[track_caller]
fn drive_refuses(
    d: &mut FiscalDrive,
    code: ErrorCode,
    raw: Option<u8>,
    f: impl FnOnce(&mut FiscalDrive) -> Result<Formed, KktError>,
) -> KktError {
    let before = d.clone();
    let e = refused(f(d), code, raw);
    assert_eq!(
        d.last_fd, before.last_fd,
        "a refused call moved the FD counter"
    );
    assert_eq!(*d, before, "a refused call changed the drive");
    e
}

/// Runs a register call that must be refused; asserts no document and no state change.
#[track_caller]
fn register_refuses(
    r: &mut Register,
    call: &Call,
    now: u32,
    code: ErrorCode,
    raw: Option<u8>,
) -> KktError {
    let before = r.clone();
    let out = r.handle(call, now);
    assert!(out.formed.is_none(), "a refused call formed a document");
    let e = refused(out.reply, code, raw);
    assert_eq!(
        r.drive.last_fd,
        before.drive.last_fd,
        "a refused {} moved the FD counter",
        call.method()
    );
    assert_eq!(
        *r,
        before,
        "a refused {} changed the register",
        call.method()
    );
    e
}

/// Runs a register call that must form a document; checks the reply is that document's result.
#[track_caller]
fn handle_ok(r: &mut Register, call: &Call, now: u32) -> Formed {
    let fd_before = r.drive.last_fd;
    let out = r.handle(call, now);
    let formed = match (out.reply, out.formed) {
        (Ok(Reply::Fiscal(result)), Some(f)) => {
            assert_eq!(result, f.result);
            f
        }
        (reply, formed) => panic!(
            "{} did not form a document: {reply:?} {formed:?}",
            call.method()
        ),
    };
    assert_eq!(formed.result.fd_number, fd_before + 1);
    assert_eq!(r.drive.last_fd, fd_before + 1);
    formed
}

fn unsent_fds(d: &FiscalDrive) -> Vec<u32> {
    d.unsent.iter().map(|(fd, _)| *fd).collect()
}

fn ack_all(d: &mut FiscalDrive, now: u32) {
    while let Some(fd) = d.next_unsent() {
        assert!(d.ofd_ack(fd, now));
    }
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

#[test]
fn a_new_drive_is_in_phase_1_and_refuses_all_fiscal_work() {
    let mut d = FiscalDrive::new(config());
    assert_eq!(d.phase, Phase::Ready);
    assert_eq!(d.phase.code(), 1);
    let info = d.info(T0);
    assert_eq!(info.phase, 1);
    assert_eq!(info.last_fd_number, 0);
    assert_eq!(info.valid_until, 0);
    assert_eq!(info.registrations_done, 0);
    assert_eq!(info.registrations_left, 12);
    assert_eq!(info.warnings, FnWarnings::default());
    assert_eq!(info.block, None);
    assert!(info.registration.is_none());
    assert_eq!(d.shift_state(T0), ShiftState::Closed);

    let need = ErrorCode::REGISTRATION_NEEDED;
    drive_refuses(&mut d, need, None, |d| d.receipt(T0, &sale(100, 1000)));
    drive_refuses(&mut d, need, None, |d| d.receipt(T0, &correction()));
    drive_refuses(&mut d, need, None, |d| d.open_shift(T0, &op()));
    drive_refuses(&mut d, need, None, |d| d.close_shift(T0, &op()));
    drive_refuses(&mut d, need, None, |d| d.current_state_report(T0));
    drive_refuses(&mut d, need, None, |d| d.close_archive(T0, &op()));
    assert!(!d.ofd_ack(1, T0));
    assert_eq!(d.last_fd, 0);
}

#[test]
fn registration_moves_the_drive_to_phase_3_with_fd_1() {
    let mut d = FiscalDrive::new(config());
    let f = d.register(T0, ZN, &reg_params()).expect("register");
    assert_eq!(d.phase, Phase::Fiscal);
    assert_eq!(d.phase.code(), 3);
    assert_eq!(d.info(T0).phase, 3);
    assert_eq!(f.result.document_type, DocumentType::Registration);
    assert_eq!(f.result.fd_number, 1);
    assert_eq!(f.result.fn_number, FN_NUMBER);
    assert_eq!(f.result.rnm, rnm_for(INN, ZN));
    assert_eq!(f.result.zn, ZN);
    assert_eq!(f.result.date_time, T0);
    assert_eq!(d.last_fd, 1);
    assert_eq!(d.registrations_done, 1);
    assert_eq!(unsent_fds(&d), vec![1]);
    let FiscalDocument::Registration(doc) = &f.document else {
        panic!("not a registration report: {:?}", f.document);
    };
    assert_eq!(doc.reregistration, None);
    assert_eq!(doc.taxation_systems, 1 | 2);
    assert_eq!(doc.zn, ZN);
    let info = d.info(T0);
    assert_eq!(info.registrations_left, 11);
    let summary = info.registration.expect("registration summary");
    assert_eq!(summary.rnm, rnm_for(INN, ZN));
    assert_eq!(summary.user_inn, INN);
    assert_eq!(summary.ofd, ofd(7777));
}

#[test]
fn closing_the_archive_goes_to_phase_7_and_to_15_once_everything_is_acked() {
    let mut d = with_shift();
    d.receipt(T0 + 60, &sale(8990, 2000)).expect("receipt");
    d.close_shift(T0 + 120, &op()).expect("close shift");
    let f = d.close_archive(T0 + 180, &op()).expect("close archive");
    assert_eq!(f.result.document_type, DocumentType::FnClosure);
    assert_eq!(f.result.fd_number, 5);
    let FiscalDocument::FnClosure(doc) = &f.document else {
        panic!("not a closure report");
    };
    // The closure report states what was still owed when it was formed.
    assert_eq!(doc.unsent.count, 4);
    assert_eq!(doc.unsent.first_fd, Some(1));
    assert_eq!(d.phase, Phase::PostFiscal);
    assert_eq!(d.info(T0).phase, 7);
    assert_eq!(unsent_fds(&d), vec![1, 2, 3, 4, 5]);

    let closed = ErrorCode::ARCHIVE_CLOSED;
    drive_refuses(&mut d, closed, None, |d| {
        d.receipt(T0 + 200, &sale(100, 1000))
    });
    drive_refuses(&mut d, closed, None, |d| d.open_shift(T0 + 200, &op()));
    drive_refuses(&mut d, closed, None, |d| d.close_shift(T0 + 200, &op()));
    drive_refuses(&mut d, closed, None, |d| d.close_archive(T0 + 200, &op()));
    drive_refuses(&mut d, closed, None, |d| d.current_state_report(T0 + 200));
    drive_refuses(&mut d, closed, None, |d| {
        d.reregister(
            T0 + 200,
            ZN,
            &rereg(&[ReregistrationReason::KktSettingsChanged]),
        )
    });

    for fd in 1..=4 {
        assert!(d.ofd_ack(fd, T0 + 300));
        assert_eq!(
            d.phase,
            Phase::PostFiscal,
            "still owes the OFD after ack {fd}"
        );
    }
    assert!(d.ofd_ack(5, T0 + 300));
    assert_eq!(d.phase, Phase::ReadOnly);
    assert_eq!(d.info(T0).phase, 15);
    assert!(d.unsent.is_empty());
    drive_refuses(&mut d, closed, None, |d| {
        d.receipt(T0 + 400, &sale(100, 1000))
    });
    drive_refuses(&mut d, closed, None, |d| d.open_shift(T0 + 400, &op()));
    drive_refuses(&mut d, closed, None, |d| d.close_archive(T0 + 400, &op()));
}

#[test]
fn closure_with_nothing_else_unsent_stays_in_phase_7_until_its_own_report_is_acked() {
    let mut d = registered();
    ack_all(&mut d, T0 + 10);
    assert!(d.unsent.is_empty());
    let f = d.close_archive(T0 + 20, &op()).expect("close archive");
    let FiscalDocument::FnClosure(doc) = &f.document else {
        panic!("not a closure report");
    };
    assert_eq!(doc.unsent.count, 0);
    // The closure report itself is owed to the OFD.
    assert_eq!(d.phase, Phase::PostFiscal);
    assert_eq!(unsent_fds(&d), vec![2]);
    assert!(d.ofd_ack(2, T0 + 30));
    assert_eq!(d.phase, Phase::ReadOnly);
}

#[test]
fn the_archive_is_not_closed_with_a_shift_open() {
    let mut d = with_shift();
    drive_refuses(&mut d, ErrorCode::SHIFT_OPEN, None, |d| {
        d.close_archive(T0 + 1, &op())
    });
    assert_eq!(d.phase, Phase::Fiscal);
}

// ---------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------

#[test]
fn registration_is_refused_when_the_rnm_does_not_belong_to_the_zn_and_inn() {
    let mut d = FiscalDrive::new(config());
    let refuse = ErrorCode::REGISTRATION_REFUSED;

    // One digit of the checksum off.
    let mut p = reg_params();
    let last = p.rnm.pop().expect("digit");
    p.rnm.push(if last == '0' { '1' } else { '0' });
    let e = drive_refuses(&mut d, refuse, None, |d| d.register(T0, ZN, &p));
    assert!(e.text.starts_with("rnm:"), "{}", e.text);

    // The RNM of another register.
    let p = RegistrationParams {
        rnm: rnm_for(INN, "0000000000000002"),
        ..reg_params()
    };
    drive_refuses(&mut d, refuse, None, |d| d.register(T0, ZN, &p));

    // The right RNM on another register.
    drive_refuses(&mut d, refuse, None, |d| {
        d.register(T0, "0000000000000002", &reg_params())
    });

    // The RNM of another taxpayer.
    let p = RegistrationParams {
        rnm: rnm_for("7707083893", ZN),
        ..reg_params()
    };
    drive_refuses(&mut d, refuse, None, |d| d.register(T0, ZN, &p));

    // Not 16 digits.
    let p = RegistrationParams {
        rnm: "12345".into(),
        ..reg_params()
    };
    drive_refuses(&mut d, refuse, None, |d| d.register(T0, ZN, &p));

    assert_eq!(d.phase, Phase::Ready);
    assert_eq!(d.registrations_done, 0);
}

#[test]
fn registration_is_refused_for_an_invalid_inn_even_with_a_matching_rnm() {
    let mut d = FiscalDrive::new(config());
    for inn in ["3245001417", "324500141", "32450014a6", "112233445566"] {
        let p = RegistrationParams {
            rnm: rnm_for(inn, ZN),
            user_inn: inn.into(),
            ..reg_params()
        };
        let e = drive_refuses(&mut d, ErrorCode::REGISTRATION_REFUSED, None, |d| {
            d.register(T0, ZN, &p)
        });
        assert!(e.text.starts_with("userInn:"), "{inn}: {}", e.text);
    }
    // A valid 12-digit INN is accepted.
    let p = RegistrationParams {
        rnm: rnm_for("504404744207", ZN),
        user_inn: "504404744207".into(),
        ..reg_params()
    };
    d.register(T0, ZN, &p).expect("12-digit INN");
}

#[test]
fn registration_needs_a_taxation_system() {
    let mut d = FiscalDrive::new(config());
    let p = RegistrationParams {
        taxation_systems: vec![],
        ..reg_params()
    };
    let e = drive_refuses(&mut d, ErrorCode::INVALID_PARAMETER, None, |d| {
        d.register(T0, ZN, &p)
    });
    assert!(e.text.starts_with("taxationSystems"), "{}", e.text);
}

#[test]
fn text_cp866_cannot_hold_is_refused_before_anything_changes() {
    let mut d = FiscalDrive::new(config());
    let p = RegistrationParams {
        user_name: "Кофейня ☕".into(),
        ..reg_params()
    };
    drive_refuses(&mut d, ErrorCode::INVALID_PARAMETER, None, |d| {
        d.register(T0, ZN, &p)
    });
    let mut d = with_shift();
    let mut s = sale(100, 1000);
    s.receipt.items[0].label = "Чай ☕".into();
    drive_refuses(&mut d, ErrorCode::INVALID_PARAMETER, None, |d| {
        d.receipt(T0 + 1, &s)
    });
}

#[test]
fn registering_twice_is_a_wrong_fn_state() {
    let mut d = registered();
    drive_refuses(
        &mut d,
        ErrorCode::WRONG_FN_STATE,
        Some(fn_code::WRONG_STATE),
        |d| d.register(T0 + 1, ZN, &reg_params()),
    );
    d.open_shift(T0 + 2, &op()).expect("open");
    drive_refuses(
        &mut d,
        ErrorCode::WRONG_FN_STATE,
        Some(fn_code::WRONG_STATE),
        |d| d.register(T0 + 3, ZN, &reg_params()),
    );
}

#[test]
fn reregistration_is_refused_with_the_shift_open() {
    let mut d = with_shift();
    drive_refuses(&mut d, ErrorCode::SHIFT_OPEN, None, |d| {
        d.reregister(T0 + 1, ZN, &rereg(&[ReregistrationReason::OfdChanged]))
    });
    d.close_shift(T0 + 2, &op()).expect("close");
    let f = d
        .reregister(T0 + 3, ZN, &rereg(&[ReregistrationReason::OfdChanged]))
        .expect("reregister");
    assert_eq!(f.result.document_type, DocumentType::Reregistration);
}

#[test]
fn reregistration_needs_a_reason_and_fn_replaced_needs_a_new_fn() {
    let mut d = registered();
    drive_refuses(&mut d, ErrorCode::INVALID_PARAMETER, None, |d| {
        d.reregister(T0 + 1, ZN, &rereg(&[]))
    });
    drive_refuses(
        &mut d,
        ErrorCode::WRONG_FN_STATE,
        Some(fn_code::WRONG_STATE),
        |d| d.reregister(T0 + 1, ZN, &rereg(&[ReregistrationReason::FnReplaced])),
    );
    // Re-registration checks the RNM like registration does.
    let mut p = rereg(&[ReregistrationReason::UserDetailsChanged]);
    p.registration.rnm = rnm_for(INN, "0000000000000002");
    drive_refuses(&mut d, ErrorCode::REGISTRATION_REFUSED, None, |d| {
        d.reregister(T0 + 1, ZN, &p)
    });
}

#[test]
fn reregistration_reports_its_reasons() {
    let mut d = registered();
    let f = d
        .reregister(
            T0 + 1,
            ZN,
            &rereg(&[
                ReregistrationReason::KktSettingsChanged,
                ReregistrationReason::OfdChanged,
            ]),
        )
        .expect("reregister");
    let FiscalDocument::Registration(doc) = &f.document else {
        panic!("not a registration report");
    };
    let reasons = doc.reregistration.expect("reasons");
    assert_eq!(reasons.reason, 2);
    assert_eq!(reasons.changes, 0b1010);
    // Re-registration does not restart the service life.
    assert_eq!(d.valid_until, Some(T0 + 470 * DAY));
}

#[test]
fn registrations_run_out_after_registrations_max() {
    let mut cfg = config();
    cfg.registrations_max = 4;
    let mut d = registered_with(cfg);
    let reason = [ReregistrationReason::KktSettingsChanged];
    for n in 2..=4 {
        let f = d
            .reregister(T0 + n, ZN, &rereg(&reason))
            .expect("reregister");
        assert_eq!(f.result.fd_number, n);
        assert_eq!(d.registrations_done, n);
        assert_eq!(d.info(T0).registrations_left, 4 - n);
    }
    drive_refuses(&mut d, ErrorCode::REGISTRATIONS_EXHAUSTED, None, |d| {
        d.reregister(T0 + 10, ZN, &rereg(&reason))
    });
    assert_eq!(d.info(T0).registrations_left, 0);

    // The default drive allows 12: one registration and eleven re-registrations.
    let mut d = registered();
    for n in 0..11 {
        d.reregister(T0 + 1 + n, ZN, &rereg(&reason))
            .expect("reregister");
    }
    drive_refuses(&mut d, ErrorCode::REGISTRATIONS_EXHAUSTED, None, |d| {
        d.reregister(T0 + 20, ZN, &rereg(&reason))
    });
    assert_eq!(d.last_fd, 12);
    // Work goes on with the registration it has.
    d.open_shift(T0 + 30, &op()).expect("open");
    d.receipt(T0 + 31, &sale(100, 1000)).expect("receipt");
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

#[test]
fn every_document_takes_the_next_fd_number() {
    let mut d = FiscalDrive::new(config());
    let mut fds = Vec::new();
    let mut t = T0;
    let mut push = |f: Formed, d: &FiscalDrive| {
        assert_eq!(f.result.fd_number, f.document.seal().fd_number);
        assert_eq!(f.result.fd_number, d.last_fd);
        assert_eq!(d.info(T0).last_fd_number, d.last_fd);
        assert_eq!(d.info(T0).documents_used, d.last_fd);
        fds.push(f.result.fd_number);
    };
    let f = d.register(t, ZN, &reg_params()).expect("register");
    push(f, &d);
    for _shift in 0..3 {
        t += 60;
        let f = d.open_shift(t, &op()).expect("open");
        push(f, &d);
        for _ in 0..3 {
            t += 60;
            let f = d.receipt(t, &sale(12_345, 1500)).expect("receipt");
            push(f, &d);
        }
        t += 60;
        let f = d.receipt(t, &correction()).expect("correction");
        push(f, &d);
        t += 60;
        let f = d.current_state_report(t).expect("report");
        push(f, &d);
        t += 60;
        let f = d.close_shift(t, &op()).expect("close");
        push(f, &d);
    }
    t += 60;
    let f = d
        .reregister(t, ZN, &rereg(&[ReregistrationReason::UserDetailsChanged]))
        .expect("rereg");
    push(f, &d);
    t += 60;
    let f = d
        .current_state_report(t)
        .expect("report with the shift closed");
    push(f, &d);
    t += 60;
    let f = d.close_archive(t, &op()).expect("close archive");
    push(f, &d);
    let n = u32::try_from(fds.len()).expect("count");
    assert_eq!(fds, (1..=n).collect::<Vec<_>>());
    assert_eq!(unsent_fds(&d), fds);
}

#[test]
fn shift_and_receipt_numbers_and_documents_in_shift() {
    let mut d = registered();
    assert_eq!(d.shift_status(T0).number, 0);
    for shift in 1..=3u32 {
        let base = T0 + shift * DAY;
        let open = d.open_shift(base, &op()).expect("open");
        assert_eq!(open.result.document_type, DocumentType::ShiftOpen);
        assert_eq!(open.result.shift_number, shift);
        assert_eq!(open.result.receipt_number, None);
        assert_eq!(d.shift_state(base), ShiftState::Opened);
        let status = d.shift_status(base);
        assert_eq!(status.number, shift);
        assert_eq!(status.opened_at, Some(base));
        assert_eq!(status.expires_at, Some(base + SHIFT_LIMIT));
        assert_eq!(status.receipts, 0);
        assert_eq!(status.documents, 1);
        drive_refuses(&mut d, ErrorCode::SHIFT_OPEN, None, |d| {
            d.open_shift(base + 1, &op())
        });

        let receipts = shift + 1;
        for n in 1..=receipts {
            let f = d.receipt(base + n, &sale(1000, 1000)).expect("receipt");
            assert_eq!(f.result.shift_number, shift);
            assert_eq!(
                f.result.receipt_number,
                Some(n),
                "receipt numbers restart each shift"
            );
            assert_eq!(f.result.total, Some(Kopecks(1000)));
        }
        d.current_state_report(base + 100).expect("report");
        let x = d.x_report();
        assert_eq!(x.shift_number, shift);
        assert_eq!(x.receipts, receipts);
        assert_eq!(x.income, Kopecks(1000 * u64::from(receipts)));
        assert_eq!(x.cash, Kopecks(1000 * u64::from(receipts)));

        let close = d.close_shift(base + 200, &op()).expect("close");
        assert_eq!(close.result.document_type, DocumentType::ShiftClose);
        assert_eq!(close.result.shift_number, shift);
        let FiscalDocument::Shift(report) = &close.document else {
            panic!("not a shift report");
        };
        assert!(report.close);
        assert_eq!(report.receipts_in_shift, receipts);
        // Opening report + receipts + current-state report + the closing report itself.
        assert_eq!(report.documents_in_shift, 1 + receipts + 1 + 1);
        assert_eq!(report.cashier, "Петрова А. С.");
        assert_eq!(d.shift_state(base + 200), ShiftState::Closed);
        drive_refuses(&mut d, ErrorCode::SHIFT_CLOSED, None, |d| {
            d.close_shift(base + 201, &op())
        });
        drive_refuses(&mut d, ErrorCode::SHIFT_CLOSED, None, |d| {
            d.receipt(base + 201, &sale(100, 1000))
        });
    }
}

#[test]
fn x_report_totals_by_settlement_sign() {
    let mut d = with_shift();
    let mut r = sale(1000, 1000);
    d.receipt(T0 + 1, &r).expect("income");
    r.receipt.kind = ReceiptType::IncomeReturn;
    d.receipt(T0 + 2, &r).expect("return");
    r.receipt.kind = ReceiptType::Expense;
    r.receipt.payments = Payments {
        electronic: Kopecks(1000),
        ..Payments::default()
    };
    d.receipt(T0 + 3, &r).expect("expense");
    r.receipt.kind = ReceiptType::ExpenseReturn;
    d.receipt(T0 + 4, &r).expect("expense return");
    let x = d.x_report();
    assert_eq!(x.receipts, 4);
    assert_eq!(x.income, Kopecks(1000));
    assert_eq!(x.income_return, Kopecks(1000));
    assert_eq!(x.expense, Kopecks(1000));
    assert_eq!(x.expense_return, Kopecks(1000));
    assert_eq!(x.cash, Kopecks(2000));
    assert_eq!(x.electronic, Kopecks(2000));
}

// ---------------------------------------------------------------------------------------------
// 24 h shift limit
// ---------------------------------------------------------------------------------------------

#[test]
fn a_shift_takes_receipts_for_24_hours_and_can_still_be_closed_after() {
    let opened = T0 + 3600;
    let mut d = registered();
    d.open_shift(opened, &op()).expect("open");

    let last_second = opened + SHIFT_LIMIT - 1;
    assert_eq!(SHIFT_LIMIT, 86_400);
    assert_eq!(d.shift_state(last_second), ShiftState::Opened);
    let f = d.receipt(last_second, &sale(100, 1000)).expect("at +86399");
    assert_eq!(f.result.date_time, last_second);

    let limit = opened + 86_400;
    assert_eq!(d.shift_state(limit), ShiftState::Expired);
    assert_eq!(d.shift_status(limit).state, ShiftState::Expired);
    drive_refuses(
        &mut d,
        ErrorCode::SHIFT_EXPIRED,
        Some(fn_code::SHIFT_OVER_24H),
        |d| d.receipt(limit, &sale(100, 1000)),
    );
    assert_eq!(fn_code::SHIFT_OVER_24H, 0x16);
    drive_refuses(&mut d, ErrorCode::SHIFT_EXPIRED, Some(0x16), |d| {
        d.receipt(limit + 10 * DAY, &correction())
    });
    // An expired shift is no block of the FN itself: only receipts are refused.
    assert_eq!(d.block(limit), None);
    d.current_state_report(limit + 1)
        .expect("report in an expired shift");

    let late = limit + 5 * DAY;
    let close = d.close_shift(late, &op()).expect("closing after 24 h");
    assert_eq!(close.result.shift_number, 1);
    assert_eq!(d.shift_state(late), ShiftState::Closed);
    d.open_shift(late + 1, &op()).expect("new shift");
    let f = d
        .receipt(late + 2, &sale(100, 1000))
        .expect("receipt in the new shift");
    assert_eq!(f.result.shift_number, 2);
    assert_eq!(f.result.receipt_number, Some(1));
}

// ---------------------------------------------------------------------------------------------
// Service life
// ---------------------------------------------------------------------------------------------

#[test]
fn service_life_runs_from_registration() {
    for (model, days) in [
        (FnModel::Months13, 410),
        (FnModel::Months15, 470),
        (FnModel::Months36, 1110),
    ] {
        assert_eq!(model.validity_days(), days);
        let mut cfg = config();
        cfg.model = model;
        let registered_at = T0 + 12_345;
        let mut d = FiscalDrive::new(cfg);
        assert_eq!(d.valid_until, None);
        d.register(registered_at, ZN, &reg_params())
            .expect("register");
        assert_eq!(d.valid_until, Some(registered_at + days * DAY));
        assert_eq!(
            d.info(registered_at).valid_until,
            registered_at + days * DAY
        );
    }
    assert_eq!(config().model, FnModel::Months15);
}

#[test]
fn validity_warnings_at_30_and_3_days() {
    // Everything delivered, so that no OFD block mixes in.
    let mut d = registered();
    ack_all(&mut d, T0);
    let end = T0 + 470 * DAY;
    let w = |now: u32| d.warnings(now);

    assert_eq!(w(T0), FnWarnings::default());
    let before_30 = w(end - 30 * DAY - 1);
    assert!(!before_30.resource_exhausted);
    assert!(!before_30.need_replacement);
    let at_30 = w(end - 30 * DAY);
    assert!(at_30.resource_exhausted);
    assert!(!at_30.need_replacement);
    assert!(!at_30.critical_error);
    let before_3 = w(end - 3 * DAY - 1);
    assert!(before_3.resource_exhausted);
    assert!(!before_3.need_replacement);
    let at_3 = w(end - 3 * DAY);
    assert!(at_3.resource_exhausted);
    assert!(at_3.need_replacement);
    assert!(!at_3.critical_error);
    assert_eq!(d.info(end - 3 * DAY).warnings, at_3);
    assert_eq!(d.block(end - 1), None);
    assert!(w(end).critical_error);

    // The flags travel in the shift reports.
    let mut d = registered();
    ack_all(&mut d, end - 10 * DAY);
    let open = d.open_shift(end - 10 * DAY, &op()).expect("open");
    let FiscalDocument::Shift(report) = &open.document else {
        panic!("not a shift report");
    };
    assert!(report.flags.resource_30_days);
    assert!(!report.flags.replace_urgently);
    assert_eq!(report.key_resource_days, 10);
}

#[test]
fn an_expired_fn_refuses_receipts_with_0x05() {
    let end = T0 + 470 * DAY;
    let mut d = registered();
    ack_all(&mut d, end - DAY);
    d.open_shift(end - 3600, &op()).expect("open");
    d.receipt(end - 1, &sale(100, 1000))
        .expect("last second of life");

    let e = drive_refuses(
        &mut d,
        ErrorCode::FN_EXPIRED,
        Some(fn_code::SERVICE_LIFE_OVER),
        |d| d.receipt(end, &sale(100, 1000)),
    );
    assert_eq!(fn_code::SERVICE_LIFE_OVER, 0x05);
    assert_eq!(d.block(end), Some(e));
    assert_eq!(d.info(end).block, Some(0x05));
    // Closing stays possible: it is how the FN gets replaced.
    d.close_shift(end + 60, &op()).expect("close shift");
    drive_refuses(&mut d, ErrorCode::FN_EXPIRED, Some(0x05), |d| {
        d.open_shift(end + 120, &op())
    });
    d.close_archive(end + 180, &op()).expect("close archive");
    assert_eq!(d.phase, Phase::PostFiscal);
}

#[test]
fn the_expire_knob_ends_the_service_life_now() {
    let mut d = with_shift();
    d.expire(T0 + 100);
    assert_eq!(d.valid_until, Some(T0 + 100));
    d.receipt(T0 + 99, &sale(100, 1000)).expect("before");
    drive_refuses(&mut d, ErrorCode::FN_EXPIRED, Some(0x05), |d| {
        d.receipt(T0 + 100, &sale(100, 1000))
    });
}

// ---------------------------------------------------------------------------------------------
// Archive capacity
// ---------------------------------------------------------------------------------------------

fn small(capacity: u32) -> DriveConfig {
    let mut c = config();
    c.capacity = capacity;
    c
}

#[test]
fn a_full_archive_refuses_receipts_but_closes_the_shift_and_the_archive() {
    assert_eq!(RESERVED_FOR_CLOSING, 2);
    let mut d = registered_with(small(20));
    d.open_shift(T0, &op()).expect("open"); // FD 2
    for n in 3..=17 {
        let f = d.receipt(T0 + n, &sale(100, 1000)).expect("receipt");
        assert_eq!(f.result.fd_number, n);
    }
    assert_eq!(d.last_fd, 17);
    assert!(!d.warnings(T0).memory_overflow, "17 of 20 is under 90 %");
    d.receipt(T0 + 18, &sale(100, 1000)).expect("FD 18");
    assert!(d.warnings(T0).memory_overflow, "18 of 20 is 90 %");
    assert!(d.info(T0).warnings.memory_overflow);

    // 18 + the 2 documents kept for closing = 20: the archive is full for everything else.
    drive_refuses(
        &mut d,
        ErrorCode::FN_ARCHIVE_FULL,
        Some(fn_code::ARCHIVE_FULL),
        |d| d.receipt(T0 + 19, &sale(100, 1000)),
    );
    assert_eq!(fn_code::ARCHIVE_FULL, 0x06);
    assert_eq!(d.info(T0).block, Some(0x06));
    assert!(d.warnings(T0).critical_error);
    drive_refuses(&mut d, ErrorCode::FN_ARCHIVE_FULL, Some(0x06), |d| {
        d.current_state_report(T0 + 19)
    });

    let close = d.close_shift(T0 + 20, &op()).expect("close shift");
    assert_eq!(close.result.fd_number, 19);
    drive_refuses(&mut d, ErrorCode::FN_ARCHIVE_FULL, Some(0x06), |d| {
        d.open_shift(T0 + 21, &op())
    });
    drive_refuses(&mut d, ErrorCode::FN_ARCHIVE_FULL, Some(0x06), |d| {
        d.reregister(
            T0 + 21,
            ZN,
            &rereg(&[ReregistrationReason::KktSettingsChanged]),
        )
    });
    let closure = d.close_archive(T0 + 22, &op()).expect("close archive");
    assert_eq!(closure.result.fd_number, 20);
    assert_eq!(d.last_fd, d.config.capacity);
    assert_eq!(d.phase, Phase::PostFiscal);
    ack_all(&mut d, T0 + 23);
    assert_eq!(d.phase, Phase::ReadOnly);
}

#[test]
fn the_fill_archive_knob_fills_the_archive_now() {
    let mut d = with_shift();
    d.receipt(T0 + 1, &sale(100, 1000)).expect("receipt");
    d.fill_archive();
    assert_eq!(d.config.capacity, d.last_fd + RESERVED_FOR_CLOSING);
    assert!(d.warnings(T0).critical_error);
    assert_eq!(d.info(T0).block, Some(0x06));
    drive_refuses(&mut d, ErrorCode::FN_ARCHIVE_FULL, Some(0x06), |d| {
        d.receipt(T0 + 2, &sale(100, 1000))
    });
    drive_refuses(&mut d, ErrorCode::FN_ARCHIVE_FULL, Some(0x06), |d| {
        d.receipt(T0 + 2, &correction())
    });
    d.close_shift(T0 + 3, &op()).expect("close shift");
    d.close_archive(T0 + 4, &op()).expect("close archive");
    assert!(d.last_fd <= d.config.capacity);
}

/// Nothing but closing may use the documents kept for closing: otherwise a full FN could end up
/// with a shift it can neither close nor get past.
#[test]
fn reports_cannot_eat_the_documents_kept_for_closing() {
    // Shift open, archive full.
    let mut d = with_shift();
    d.fill_archive();
    for t in 1..=5 {
        let _ = d.current_state_report(T0 + t);
    }
    d.close_shift(T0 + 10, &op())
        .expect("the shift can always be closed");
    d.close_archive(T0 + 11, &op())
        .expect("the archive can always be closed");
    assert!(d.last_fd <= d.config.capacity);

    // Shift closed, archive full.
    let mut d = registered();
    d.fill_archive();
    for t in 1..=5 {
        let _ = d.current_state_report(T0 + t);
        let _ = d.reregister(
            T0 + t,
            ZN,
            &rereg(&[ReregistrationReason::KktSettingsChanged]),
        );
    }
    d.close_archive(T0 + 11, &op())
        .expect("the archive can always be closed");
    assert!(d.last_fd <= d.config.capacity);
}

// ---------------------------------------------------------------------------------------------
// Documents owed to the OFD
// ---------------------------------------------------------------------------------------------

#[test]
fn the_oldest_unsent_document_blocks_the_fn_after_30_days() {
    assert_eq!(OFD_WAIT_LIMIT, 30 * DAY);
    let mut d = registered(); // FD 1 at T0, never acknowledged
    let limit = T0 + 30 * DAY;
    d.open_shift(limit - 3600, &op())
        .expect("open within 30 days");
    d.receipt(limit, &sale(100, 1000))
        .expect("exactly 30 days is not older than 30 days");
    assert_eq!(d.block(limit), None);

    let e = drive_refuses(
        &mut d,
        ErrorCode::OFD_WAIT_EXHAUSTED,
        Some(fn_code::OFD_WAIT_EXHAUSTED),
        |d| d.receipt(limit + 1, &sale(100, 1000)),
    );
    assert_eq!(fn_code::OFD_WAIT_EXHAUSTED, 0x15);
    assert!(e.text.contains("document 1"), "{}", e.text);
    assert_eq!(d.info(limit + 1).block, Some(0x15));
    assert!(d.warnings(limit + 1).critical_error);
    // The shift can still be closed, but a new one is not opened.
    d.close_shift(limit + 2, &op()).expect("close");
    drive_refuses(&mut d, ErrorCode::OFD_WAIT_EXHAUSTED, Some(0x15), |d| {
        d.open_shift(limit + 3, &op())
    });

    // Delivering the oldest lifts the block: the next oldest is recent.
    assert!(d.ofd_ack(1, limit + 4));
    assert_eq!(d.block(limit + 5), None);
    d.open_shift(limit + 5, &op()).expect("open after the ack");
    d.receipt(limit + 6, &sale(100, 1000))
        .expect("receipt after the ack");
}

#[test]
fn the_ofd_timeout_warning_follows_the_oldest_unsent_document() {
    let mut d = registered();
    assert!(!d.warnings(T0 + 7 * DAY).ofd_timeout);
    assert!(d.warnings(T0 + 7 * DAY + 1).ofd_timeout);
    assert!(d.info(T0 + 7 * DAY + 1).warnings.ofd_timeout);
    assert!(
        !d.warnings(T0 + 7 * DAY + 1).critical_error,
        "a warning, not a block"
    );
    assert!(d.ofd_ack(1, T0 + 8 * DAY));
    assert!(!d.warnings(T0 + 8 * DAY).ofd_timeout);
    assert_eq!(d.last_ack_at, Some(T0 + 8 * DAY));
}

#[test]
fn unsent_storage_exhausted_blocks_with_0x14() {
    let mut cfg = config();
    cfg.unsent_capacity = 5;
    let mut d = registered_with(cfg);
    d.open_shift(T0, &op()).expect("open");
    for n in 3..=5 {
        d.receipt(T0 + n, &sale(100, 1000)).expect("receipt");
    }
    assert_eq!(d.unsent.len(), 5);
    drive_refuses(
        &mut d,
        ErrorCode::STORAGE_EXHAUSTED,
        Some(fn_code::OFD_STORAGE_EXHAUSTED),
        |d| d.receipt(T0 + 6, &sale(100, 1000)),
    );
    assert_eq!(fn_code::OFD_STORAGE_EXHAUSTED, 0x14);
    assert_eq!(d.info(T0 + 6).block, Some(0x14));
    assert!(d.ofd_ack(1, T0 + 7));
    d.receipt(T0 + 8, &sale(100, 1000)).expect("room again");
    drive_refuses(&mut d, ErrorCode::STORAGE_EXHAUSTED, Some(0x14), |d| {
        d.receipt(T0 + 9, &sale(100, 1000))
    });
    // Closing does not wait for the OFD.
    d.close_shift(T0 + 10, &op()).expect("close");
}

#[test]
fn only_the_oldest_unsent_document_can_be_acknowledged() {
    let mut d = with_shift();
    d.receipt(T0 + 1, &sale(100, 1000)).expect("receipt"); // FD 3
    assert_eq!(d.next_unsent(), Some(1));
    for wrong in [0, 2, 3, 4, 99, u32::MAX] {
        let before = d.clone();
        assert!(!d.ofd_ack(wrong, T0 + 2), "ack of {wrong}");
        assert_eq!(d, before, "an out-of-order ack changed the drive");
    }
    assert!(d.ofd_ack(1, T0 + 3));
    assert_eq!(d.last_ack_at, Some(T0 + 3));
    let before = d.clone();
    assert!(!d.ofd_ack(1, T0 + 4), "a repeated ack is stale");
    assert_eq!(d, before);
    assert_eq!(d.next_unsent(), Some(2));
    let summary = d.unsent_summary();
    assert_eq!(summary.count, 2);
    assert_eq!(summary.first_fd, Some(2));
    assert_eq!(summary.first_date_time, Some(T0));
    assert!(d.ofd_ack(2, T0 + 5));
    assert!(d.ofd_ack(3, T0 + 5));
    assert_eq!(d.next_unsent(), None);
    assert!(!d.ofd_ack(4, T0 + 6));
    assert_eq!(d.unsent_summary().count, 0);
}

// ---------------------------------------------------------------------------------------------
// Fiscal sign
// ---------------------------------------------------------------------------------------------

/// One of each kind of document, formed by a drive with `secret`.
fn one_of_each(secret: [u8; 32]) -> Vec<Formed> {
    let mut d = FiscalDrive::new(DriveConfig::new(FN_NUMBER.into(), secret));
    let mut out = vec![d.register(T0, ZN, &reg_params()).expect("register")];
    out.push(
        d.reregister(T0 + 1, ZN, &rereg(&[ReregistrationReason::OfdChanged]))
            .expect("rereg"),
    );
    out.push(d.open_shift(T0 + 2, &op()).expect("open"));
    out.push(d.receipt(T0 + 3, &sale(8990, 2000)).expect("receipt"));
    out.push(d.receipt(T0 + 4, &correction()).expect("correction"));
    out.push(d.current_state_report(T0 + 5).expect("report"));
    out.push(d.close_shift(T0 + 6, &op()).expect("close"));
    out.push(d.close_archive(T0 + 7, &op()).expect("closure"));
    out
}

#[test]
fn the_fiscal_sign_covers_every_byte_of_the_document() {
    for f in one_of_each(SECRET) {
        let kind = f.result.document_type;
        assert!(verify_fpd(&SECRET, &f.bytes), "{kind:?} does not verify");
        assert!(
            !verify_fpd(&[8; 32], &f.bytes),
            "{kind:?} verifies under another key"
        );
        assert_eq!(f.result.fpd, f.document.seal().fpd.printed());
        assert_ne!(f.document.seal().fpd.0, [0; 6]);
        assert_eq!(
            f.document.to_document().encode().expect("encode"),
            f.bytes,
            "the bytes are the document"
        );
        for i in 0..f.bytes.len() {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut b = f.bytes.clone();
                b[i] ^= mask;
                assert!(
                    !verify_fpd(&SECRET, &b),
                    "{kind:?}: byte {i} ^ {mask:#04x} still verifies"
                );
            }
        }
        assert!(!verify_fpd(&SECRET, &f.bytes[..f.bytes.len() - 1]));
        assert!(!verify_fpd(&SECRET, &[]));
    }
}

#[test]
fn the_fiscal_sign_is_deterministic_and_per_drive() {
    let a = one_of_each(SECRET);
    let a2 = one_of_each(SECRET);
    let b = one_of_each([9; 32]);
    assert_eq!(a.len(), b.len());
    for ((a, a2), b) in a.iter().zip(&a2).zip(&b) {
        assert_eq!(a.bytes, a2.bytes, "same drive, same input, same document");
        assert_eq!(a.result.fd_number, b.result.fd_number);
        assert_ne!(
            a.result.fpd, b.result.fpd,
            "{:?}: two drives gave the same FPD",
            a.result.document_type
        );
        assert!(verify_fpd(&[9; 32], &b.bytes));
        assert!(!verify_fpd(&SECRET, &b.bytes));
    }
}

// ---------------------------------------------------------------------------------------------
// Register core
// ---------------------------------------------------------------------------------------------

#[test]
fn register_hello_and_registration_through_the_link() {
    let mut r = new_register();
    let hello = r.hello();
    assert_eq!(hello.zn, ZN);
    assert_eq!(hello.fn_number, FN_NUMBER);
    let status = r.status(T0);
    assert!(!status.fiscal);
    assert!(status.fn_present);
    assert_eq!(r.ofd, None);
    register_refuses(
        &mut r,
        &Call::Receipt(sale(100, 1000)),
        T0,
        ErrorCode::REGISTRATION_NEEDED,
        None,
    );
    let f = handle_ok(&mut r, &Call::Register(reg_params()), T0);
    assert_eq!(f.result.zn, ZN);
    assert_eq!(r.ofd, Some(ofd(7777)));
    assert!(r.status(T0).fiscal);

    // Re-registration points the register at the new OFD.
    let mut p = rereg(&[ReregistrationReason::OfdChanged]);
    p.registration.ofd = ofd(4000);
    handle_ok(&mut r, &Call::Reregister(p), T0 + 1);
    assert_eq!(r.ofd, Some(ofd(4000)));
    // A refused re-registration does not.
    let mut p = rereg(&[ReregistrationReason::OfdChanged]);
    p.registration.ofd = ofd(5000);
    p.registration.rnm = rnm_for(INN, "0000000000000002");
    register_refuses(
        &mut r,
        &Call::Reregister(p),
        T0 + 2,
        ErrorCode::REGISTRATION_REFUSED,
        None,
    );

    let out = r.handle(&Call::SetOfd(ofd(12345)), T0 + 3);
    assert!(matches!(out.reply, Ok(Reply::Done)));
    assert!(out.formed.is_none());
    assert_eq!(r.ofd, Some(ofd(12345)));
    let out = r.handle(&Call::OfdExchangeStatus, T0 + 3);
    let Ok(Reply::OfdExchange(s)) = out.reply else {
        panic!("no exchange status");
    };
    assert_eq!(s.unsent_count, 2);
    assert_eq!(s.first_unsent_fd, Some(1));
    assert_eq!(s.ofd, Some(ofd(12345)));
}

#[test]
fn out_of_paper_refuses_documents_but_answers_status() {
    let mut r = registered_register();
    r.paper_present = false;
    let no_paper = ErrorCode::NO_PAPER;
    register_refuses(&mut r, &Call::OpenShift(op()), T0 + 1, no_paper, None);
    let out = r.handle(&Call::GetDeviceStatus, T0 + 1);
    let Ok(Reply::DeviceStatus(s)) = out.reply else {
        panic!("getDeviceStatus failed without paper");
    };
    assert!(out.formed.is_none());
    assert!(!s.paper_present);
    assert!(!s.cover_open);
    assert_eq!(s.date_time, T0 + 1);
    assert!(matches!(
        r.handle(&Call::GetFnInfo, T0 + 1).reply,
        Ok(Reply::FnInfo(_))
    ));
    assert!(matches!(
        r.handle(&Call::GetShiftStatus, T0 + 1).reply,
        Ok(Reply::ShiftStatus(_))
    ));

    r.paper_present = true;
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 2);
    r.paper_present = false;
    for call in [
        Call::Receipt(sale(100, 1000)),
        Call::Correction(correction()),
        Call::CloseShift(op()),
        Call::ReportCurrentState,
        Call::CloseFn(op()),
        Call::Reregister(rereg(&[ReregistrationReason::OfdChanged])),
    ] {
        register_refuses(&mut r, &call, T0 + 3, no_paper, None);
    }
    // Non-fiscal reports need no document.
    assert!(matches!(
        r.handle(&Call::ReportX, T0 + 3).reply,
        Ok(Reply::XReport(_))
    ));
    r.paper_present = true;
    handle_ok(&mut r, &Call::Receipt(sale(100, 1000)), T0 + 4);
}

#[test]
fn an_open_cover_refuses_documents() {
    let mut r = registered_register();
    r.cover_open = true;
    register_refuses(
        &mut r,
        &Call::OpenShift(op()),
        T0 + 1,
        ErrorCode::COVER_OPEN,
        None,
    );
    // Cover and paper both wrong: the cover is reported first.
    r.paper_present = false;
    register_refuses(
        &mut r,
        &Call::OpenShift(op()),
        T0 + 1,
        ErrorCode::COVER_OPEN,
        None,
    );
    let out = r.handle(&Call::GetDeviceStatus, T0 + 1);
    let Ok(Reply::DeviceStatus(s)) = out.reply else {
        panic!("no status");
    };
    assert!(s.cover_open);
    r.cover_open = false;
    r.paper_present = true;
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 2);
    r.cover_open = true;
    register_refuses(
        &mut r,
        &Call::Receipt(sale(100, 1000)),
        T0 + 3,
        ErrorCode::COVER_OPEN,
        None,
    );
}

#[test]
fn corrections_go_through_the_correction_method_only() {
    let mut r = registered_register();
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 1);
    let e = register_refuses(
        &mut r,
        &Call::Receipt(correction()),
        T0 + 2,
        ErrorCode::INVALID_PARAMETER,
        None,
    );
    assert!(e.text.starts_with("receipt.type"), "{}", e.text);
    let e = register_refuses(
        &mut r,
        &Call::Correction(sale(100, 1000)),
        T0 + 2,
        ErrorCode::INVALID_PARAMETER,
        None,
    );
    assert!(e.text.starts_with("receipt.type"), "{}", e.text);

    let f = handle_ok(&mut r, &Call::Correction(correction()), T0 + 3);
    assert_eq!(f.result.document_type, DocumentType::CorrectionReceipt);
    assert_eq!(f.result.receipt_number, Some(1));
    let FiscalDocument::Receipt(doc) = &f.document else {
        panic!("not a receipt");
    };
    let c = doc.correction.as_ref().expect("correction basis");
    assert_eq!(c.description, "Сбой ККТ");
    assert_eq!(c.date, 1_767_139_200, "2025-12-31 at midnight");
    let f = handle_ok(&mut r, &Call::Receipt(sale(100, 1000)), T0 + 4);
    assert_eq!(f.result.document_type, DocumentType::Receipt);
    assert_eq!(f.result.receipt_number, Some(2));
}

#[test]
fn report_x_needs_an_open_shift_and_forms_no_document() {
    let mut r = registered_register();
    register_refuses(&mut r, &Call::ReportX, T0, ErrorCode::SHIFT_CLOSED, None);
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 1);
    handle_ok(&mut r, &Call::Receipt(sale(2500, 2000)), T0 + 2);
    let before = r.clone();
    let out = r.handle(&Call::ReportX, T0 + 3);
    assert!(out.formed.is_none());
    let Ok(Reply::XReport(x)) = out.reply else {
        panic!("no X report");
    };
    assert_eq!(x.shift_number, 1);
    assert_eq!(x.receipts, 1);
    assert_eq!(x.income, Kopecks(5000));
    assert_eq!(r, before, "an X report changes nothing");
    // Still available in an expired shift, to see what is about to be closed.
    assert!(matches!(
        r.handle(&Call::ReportX, T0 + 1 + 2 * DAY).reply,
        Ok(Reply::XReport(_))
    ));
}

/// Internet mode (tag 1108) and the FN's FFD decide what a register may fiscalize, like the
/// taxation systems: a register that prints nothing needs the buyer's contact, and a drive older
/// than FFD 1.2 has no code for the VAT rates of 2025-2026.
#[test]
fn internet_mode_and_ffd_decide_what_a_register_takes() {
    for (internet, ffd) in [
        (true, FfdVersion::V1_2),
        (false, FfdVersion::V1_2),
        (false, FfdVersion::V1_05),
    ] {
        let mut r = Register::new(
            ZN.into(),
            DriveConfig {
                ffd_version: ffd,
                ..config()
            },
        );
        handle_ok(
            &mut r,
            &Call::Register(RegistrationParams {
                internet,
                ..reg_params()
            }),
            T0,
        );
        handle_ok(&mut r, &Call::OpenShift(op()), T0 + 1);

        let mut no_contact = sale(100, 1000);
        no_contact.receipt.email = None;
        no_contact.receipt.phone = None;
        if internet {
            let e = register_refuses(
                &mut r,
                &Call::Receipt(no_contact.clone()),
                T0 + 2,
                ErrorCode::INVALID_PARAMETER,
                None,
            );
            assert!(e.text.starts_with("receipt.email"), "{}", e.text);
            no_contact.receipt.phone = Some("+79161234567".into());
        }
        handle_ok(&mut r, &Call::Receipt(no_contact), T0 + 3);

        let mut vat22 = sale(100, 1000);
        vat22.receipt.items[0].vat = VatRate::Vat22;
        vat22.receipt.email = Some("buyer@example.ru".into());
        if ffd < FfdVersion::V1_2 {
            let e = register_refuses(
                &mut r,
                &Call::Receipt(vat22),
                T0 + 4,
                ErrorCode::INVALID_PARAMETER,
                None,
            );
            assert!(e.text.starts_with("receipt.items[0].vat"), "{}", e.text);
            assert!(e.text.contains("FFD 1.05"), "{}", e.text);
        } else {
            let f = handle_ok(&mut r, &Call::Receipt(vat22), T0 + 4);
            let FiscalDocument::Receipt(doc) = &f.document else {
                panic!("not a receipt");
            };
            assert_eq!(doc.items[0].vat, VatRate::Vat22.code());
        }
    }
}

#[test]
fn a_receipt_under_an_unregistered_taxation_system_is_refused() {
    let mut r = registered_register();
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 1);
    let mut s = sale(100, 1000);
    s.receipt.taxation = TaxationSystem::Patent;
    let e = register_refuses(
        &mut r,
        &Call::Receipt(s.clone()),
        T0 + 2,
        ErrorCode::INVALID_PARAMETER,
        None,
    );
    assert!(e.text.starts_with("receipt.taxation"), "{}", e.text);
    s.receipt.taxation = TaxationSystem::SimpleIn;
    let f = handle_ok(&mut r, &Call::Receipt(s), T0 + 3);
    let FiscalDocument::Receipt(doc) = &f.document else {
        panic!("not a receipt");
    };
    assert_eq!(doc.taxation, 2);
}

#[test]
fn an_invalid_receipt_is_refused_naming_the_field() {
    let mut r = registered_register();
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 1);
    let invalid = ErrorCode::INVALID_PARAMETER;

    let mut s = sale(8990, 2000);
    s.receipt.items[0].amount = Kopecks(17_981);
    s.receipt.payments.cash = Kopecks(17_981);
    let e = register_refuses(&mut r, &Call::Receipt(s), T0 + 2, invalid, None);
    assert!(e.text.starts_with("receipt.items[0].amount"), "{}", e.text);

    let mut s = sale(8990, 2000);
    s.receipt.payments.cash = Kopecks(1);
    let e = register_refuses(&mut r, &Call::Receipt(s), T0 + 2, invalid, None);
    assert!(e.text.starts_with("receipt.payments"), "{}", e.text);

    let mut s = sale(8990, 2000);
    s.receipt.items.clear();
    s.receipt.payments = Payments::default();
    let e = register_refuses(&mut r, &Call::Receipt(s), T0 + 2, invalid, None);
    assert!(e.text.starts_with("receipt.items"), "{}", e.text);

    let mut s = correction();
    s.receipt.correction = None;
    let e = register_refuses(&mut r, &Call::Correction(s), T0 + 2, invalid, None);
    assert!(e.text.starts_with("receipt.correction"), "{}", e.text);

    let mut s = sale(8990, 2000);
    s.receipt.client = Some(Person {
        name: "ООО Лютик".into(),
        inn: Some("3245001417".into()),
    });
    let e = register_refuses(&mut r, &Call::Receipt(s), T0 + 2, invalid, None);
    assert!(e.text.starts_with("receipt.client.inn"), "{}", e.text);
    assert_eq!(r.drive.last_fd, 2);
}

/// The exactly-once proof property: whatever the reason, a refusal leaves the FD counter (and
/// everything else) where it was.
#[test]
fn no_refused_call_moves_the_fd_counter() {
    let receipt = || Call::Receipt(sale(100, 1000));
    let rereg_call = |reasons: &[ReregistrationReason]| Call::Reregister(rereg(reasons));

    // Phase 1.
    let mut r = new_register();
    let need = ErrorCode::REGISTRATION_NEEDED;
    for call in [
        receipt(),
        Call::Correction(correction()),
        Call::OpenShift(op()),
        Call::CloseShift(op()),
        Call::ReportCurrentState,
        Call::CloseFn(op()),
        rereg_call(&[ReregistrationReason::OfdChanged]),
    ] {
        register_refuses(&mut r, &call, T0, need, None);
    }
    register_refuses(&mut r, &Call::ReportX, T0, ErrorCode::SHIFT_CLOSED, None);
    let mut bad = reg_params();
    bad.user_inn = "3245001417".into();
    register_refuses(
        &mut r,
        &Call::Register(bad),
        T0,
        ErrorCode::REGISTRATION_REFUSED,
        None,
    );

    // Phase 3, shift closed.
    handle_ok(&mut r, &Call::Register(reg_params()), T0);
    register_refuses(
        &mut r,
        &Call::Register(reg_params()),
        T0,
        ErrorCode::WRONG_FN_STATE,
        Some(0x02),
    );
    register_refuses(&mut r, &receipt(), T0, ErrorCode::SHIFT_CLOSED, None);
    register_refuses(
        &mut r,
        &Call::CloseShift(op()),
        T0,
        ErrorCode::SHIFT_CLOSED,
        None,
    );
    register_refuses(
        &mut r,
        &rereg_call(&[ReregistrationReason::FnReplaced]),
        T0,
        ErrorCode::WRONG_FN_STATE,
        Some(0x02),
    );
    register_refuses(
        &mut r,
        &Call::GetFnDocument(GetFnDocument { fd_number: 1 }),
        T0,
        ErrorCode::INVALID_PARAMETER,
        None,
    );

    // Shift open.
    handle_ok(&mut r, &Call::OpenShift(op()), T0);
    register_refuses(
        &mut r,
        &Call::OpenShift(op()),
        T0,
        ErrorCode::SHIFT_OPEN,
        None,
    );
    register_refuses(
        &mut r,
        &Call::CloseFn(op()),
        T0,
        ErrorCode::SHIFT_OPEN,
        None,
    );
    register_refuses(
        &mut r,
        &rereg_call(&[ReregistrationReason::OfdChanged]),
        T0,
        ErrorCode::SHIFT_OPEN,
        None,
    );
    register_refuses(
        &mut r,
        &receipt(),
        T0 + DAY,
        ErrorCode::SHIFT_EXPIRED,
        Some(0x16),
    );

    // Blocks.
    let ofd_wait = T0 + 30 * DAY + 1;
    let mut r2 = r.clone();
    handle_ok(&mut r2, &Call::CloseShift(op()), T0 + 60);
    handle_ok(&mut r2, &Call::OpenShift(op()), ofd_wait - 120);
    register_refuses(
        &mut r2,
        &receipt(),
        ofd_wait,
        ErrorCode::OFD_WAIT_EXHAUSTED,
        Some(0x15),
    );
    let mut r3 = r.clone();
    r3.drive.config.unsent_capacity = 2;
    register_refuses(
        &mut r3,
        &receipt(),
        T0,
        ErrorCode::STORAGE_EXHAUSTED,
        Some(0x14),
    );
    let mut r4 = r.clone();
    r4.drive.fill_archive();
    register_refuses(
        &mut r4,
        &receipt(),
        T0,
        ErrorCode::FN_ARCHIVE_FULL,
        Some(0x06),
    );
    register_refuses(
        &mut r4,
        &Call::ReportCurrentState,
        T0,
        ErrorCode::FN_ARCHIVE_FULL,
        Some(0x06),
    );
    let mut r5 = r.clone();
    r5.drive.expire(T0 + 10);
    register_refuses(
        &mut r5,
        &receipt(),
        T0 + 10,
        ErrorCode::FN_EXPIRED,
        Some(0x05),
    );
    assert!(r5.status(T0 + 10).blocked);

    // Phase 7.
    handle_ok(&mut r, &Call::CloseShift(op()), T0 + 60);
    handle_ok(&mut r, &Call::CloseFn(op()), T0 + 61);
    let closed = ErrorCode::ARCHIVE_CLOSED;
    for call in [
        receipt(),
        Call::OpenShift(op()),
        Call::CloseFn(op()),
        Call::ReportCurrentState,
        rereg_call(&[ReregistrationReason::OfdChanged]),
    ] {
        register_refuses(&mut r, &call, T0 + 62, closed, None);
    }
    assert!(!r.status(T0 + 62).fiscal);
}

#[test]
fn an_archived_receipt_reads_back_with_the_same_result() {
    let mut r = registered_register();
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 1);
    handle_ok(&mut r, &Call::Receipt(sale(100, 1000)), T0 + 2);
    let mut s = sale(8990, 2000);
    s.additional_attribute = Some("4f1c2a9e-job".into());
    let f = handle_ok(&mut r, &Call::Receipt(s), T0 + 3);

    let a = archived_document(&f.bytes, ZN, false).expect("archived");
    assert_eq!(a.result, f.result);
    assert_eq!(a.result.fd_number, 4);
    assert_eq!(a.result.fpd, f.result.fpd);
    assert_eq!(a.result.shift_number, 1);
    assert_eq!(a.result.receipt_number, Some(2));
    assert_eq!(
        a.result.additional_attribute.as_deref(),
        Some("4f1c2a9e-job")
    );
    assert_eq!(a.result.total, Some(Kopecks(17_980)));
    assert_eq!(a.result.rnm, rnm_for(INN, ZN));
    assert_eq!(a.result.fn_number, FN_NUMBER);
    assert_eq!(a.result.date_time, T0 + 3);
    assert_eq!(a.document, f.document);
    assert!(!a.acknowledged);
    let hex: String = f.bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(a.tlv_hex, hex);
    assert!(
        archived_document(&f.bytes, ZN, true)
            .expect("acked")
            .acknowledged
    );

    let c = handle_ok(&mut r, &Call::Correction(correction()), T0 + 4);
    let a = archived_document(&c.bytes, ZN, true).expect("archived correction");
    assert_eq!(a.result, c.result);

    let e = refused(
        archived_document(&f.bytes[..f.bytes.len() - 3], ZN, false),
        ErrorCode::WRONG_FN_STATE,
        None,
    );
    assert!(e.text.contains("unreadable"), "{}", e.text);
}

// ---------------------------------------------------------------------------------------------
// FN replacement
// ---------------------------------------------------------------------------------------------

fn new_fn() -> DriveConfig {
    DriveConfig::new("9999078900000002".into(), [3; 32])
}

#[test]
fn the_fn_is_replaced_only_in_phase_15() {
    let mut r = new_register();
    let refuse = |r: &mut Register| {
        let before = r.clone();
        let e = refused(r.replace_fn(new_fn()), ErrorCode::WRONG_FN_STATE, None);
        assert_eq!(*r, before);
        e
    };
    let e = refuse(&mut r);
    assert!(e.text.contains("phase 1"), "{}", e.text);
    handle_ok(&mut r, &Call::Register(reg_params()), T0);
    let e = refuse(&mut r);
    assert!(e.text.contains("phase 3"), "{}", e.text);
    handle_ok(&mut r, &Call::CloseFn(op()), T0 + 1);
    let e = refuse(&mut r);
    assert!(e.text.contains("phase 7"), "{}", e.text);
    assert!(r.drive.ofd_ack(1, T0 + 2));
    refuse(&mut r);
    assert!(r.drive.ofd_ack(2, T0 + 2));
    assert_eq!(r.drive.phase, Phase::ReadOnly);
    r.replace_fn(new_fn()).expect("phase 15");
}

#[test]
fn a_replaced_fn_is_reregistered_with_reason_fn_replaced() {
    let mut r = registered_register();
    handle_ok(&mut r, &Call::OpenShift(op()), T0 + 1);
    handle_ok(&mut r, &Call::Receipt(sale(100, 1000)), T0 + 2);
    handle_ok(&mut r, &Call::CloseShift(op()), T0 + 3);
    handle_ok(&mut r, &Call::CloseFn(op()), T0 + 4);
    ack_all(&mut r.drive, T0 + 5);
    r.replace_fn(new_fn()).expect("replace");

    assert_eq!(r.drives_replaced, 1);
    assert_eq!(r.drive.phase, Phase::Ready);
    assert_eq!(r.drive.info(T0).phase, 1);
    assert_eq!(r.drive.last_fd, 0);
    assert_eq!(r.drive.fn_number(), "9999078900000002");
    assert_eq!(r.hello().fn_number, "9999078900000002");
    assert!(r.drive.unsent.is_empty());

    let t = T0 + 10;
    register_refuses(
        &mut r,
        &Call::Receipt(sale(100, 1000)),
        t,
        ErrorCode::REGISTRATION_NEEDED,
        None,
    );
    register_refuses(
        &mut r,
        &Call::OpenShift(op()),
        t,
        ErrorCode::REGISTRATION_NEEDED,
        None,
    );
    register_refuses(
        &mut r,
        &Call::Reregister(rereg(&[ReregistrationReason::KktSettingsChanged])),
        t,
        ErrorCode::REGISTRATION_NEEDED,
        None,
    );

    let f = handle_ok(
        &mut r,
        &Call::Reregister(rereg(&[
            ReregistrationReason::FnReplaced,
            ReregistrationReason::KktSettingsChanged,
        ])),
        t,
    );
    assert_eq!(f.result.document_type, DocumentType::Reregistration);
    assert_eq!(f.result.fd_number, 1);
    assert_eq!(f.result.fn_number, "9999078900000002");
    let FiscalDocument::Registration(doc) = &f.document else {
        panic!("not a registration report");
    };
    let reasons = doc.reregistration.expect("reasons");
    assert_eq!(reasons.reason, 1);
    assert_eq!(reasons.changes, 0b1001);
    assert_eq!(r.drive.phase, Phase::Fiscal);
    assert_eq!(r.drive.registrations_done, 1);
    assert_eq!(r.drive.valid_until, Some(t + 470 * DAY));
    assert!(verify_fpd(&[3; 32], &f.bytes));
    assert!(!verify_fpd(&SECRET, &f.bytes));

    let open = handle_ok(&mut r, &Call::OpenShift(op()), t + 1);
    assert_eq!(open.result.shift_number, 1, "shifts are counted per FN");
    let rec = handle_ok(&mut r, &Call::Receipt(sale(100, 1000)), t + 2);
    assert_eq!(rec.result.fd_number, 3);
    assert_eq!(rec.result.receipt_number, Some(1));
}

#[test]
fn a_fresh_fn_may_also_be_registered_anew() {
    let mut r = registered_register();
    handle_ok(&mut r, &Call::CloseFn(op()), T0 + 1);
    ack_all(&mut r.drive, T0 + 2);
    r.replace_fn(new_fn()).expect("replace");
    let f = handle_ok(&mut r, &Call::Register(reg_params()), T0 + 3);
    assert_eq!(f.result.document_type, DocumentType::Registration);
    assert_eq!(r.drive.phase, Phase::Fiscal);
}

// ---------------------------------------------------------------------------------------------
// Random sequences
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Open,
    Close,
    Sale { price: u64, quantity: u64 },
    BadSale,
    Correction,
    Report,
    ReportX,
    Advance(u32),
    AckOldest,
    AckOther(u32),
    TogglePaper,
    Reregister,
    CloseArchive,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Open),
        2 => Just(Op::Close),
        8 => (0u64..1_000_000, 1u64..10_000)
            .prop_map(|(price, quantity)| Op::Sale { price, quantity }),
        1 => Just(Op::BadSale),
        1 => Just(Op::Correction),
        1 => Just(Op::Report),
        1 => Just(Op::ReportX),
        5 => prop_oneof![0u32..3_600, 3_600u32..2 * DAY, 2 * DAY..40 * DAY].prop_map(Op::Advance),
        4 => Just(Op::AckOldest),
        1 => (0u32..60).prop_map(Op::AckOther),
        1 => Just(Op::TogglePaper),
        1 => Just(Op::Reregister),
        1 => Just(Op::CloseArchive),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_operations_keep_the_fn_invariants(ops in prop::collection::vec(op_strategy(), 1..120)) {
        let mut cfg = config();
        cfg.capacity = 16;
        cfg.unsent_capacity = 10;
        let mut r = Register::new(ZN.into(), cfg);
        let mut now = T0;
        handle_ok(&mut r, &Call::Register(reg_params()), now);
        let mut formed_count: u32 = 1;
        let mut fds = vec![1u32];

        for step in ops {
            let call = match step {
                Op::Open => Some(Call::OpenShift(op())),
                Op::Close => Some(Call::CloseShift(op())),
                Op::Sale { price, quantity } => Some(Call::Receipt(sale(price, quantity))),
                Op::BadSale => {
                    let mut s = sale(1000, 1000);
                    s.receipt.items[0].amount = Kopecks(1001);
                    s.receipt.payments.cash = Kopecks(1001);
                    Some(Call::Receipt(s))
                }
                Op::Correction => Some(Call::Correction(correction())),
                Op::Report => Some(Call::ReportCurrentState),
                Op::ReportX => Some(Call::ReportX),
                Op::CloseArchive => Some(Call::CloseFn(op())),
                Op::Reregister => Some(Call::Reregister(rereg(&[
                    ReregistrationReason::KktSettingsChanged,
                ]))),
                Op::Advance(s) => {
                    now = now.saturating_add(s);
                    None
                }
                Op::AckOldest => {
                    let before = r.drive.unsent.len();
                    let next = r.drive.next_unsent();
                    let ok = next.is_some_and(|fd| r.drive.ofd_ack(fd, now));
                    prop_assert_eq!(ok, next.is_some());
                    prop_assert_eq!(r.drive.unsent.len(), before - usize::from(ok));
                    prop_assert_eq!(r.drive.last_fd, formed_count);
                    None
                }
                Op::AckOther(fd) => {
                    let before = r.clone();
                    let oldest = r.drive.next_unsent() == Some(fd);
                    prop_assert_eq!(r.drive.ofd_ack(fd, now), oldest);
                    if !oldest {
                        prop_assert_eq!(&r, &before);
                    }
                    None
                }
                Op::TogglePaper => {
                    r.paper_present = !r.paper_present;
                    None
                }
            };
            if let Some(call) = call {
                let before = r.clone();
                let out = r.handle(&call, now);
                match (&out.reply, &out.formed) {
                    (Ok(Reply::Fiscal(result)), Some(f)) => {
                        prop_assert!(call.forms_document());
                        prop_assert_eq!(result, &f.result);
                        prop_assert_eq!(f.result.fd_number, before.drive.last_fd + 1);
                        prop_assert_eq!(f.result.date_time, now);
                        prop_assert!(verify_fpd(&SECRET, &f.bytes));
                        formed_count += 1;
                        fds.push(f.result.fd_number);
                    }
                    (Ok(_), None) => {
                        prop_assert!(!call.forms_document());
                        prop_assert_eq!(&r, &before);
                    }
                    (Err(e), None) => {
                        prop_assert_eq!(r.drive.last_fd, before.drive.last_fd);
                        prop_assert_eq!(&r, &before, "refused {:?} changed the register", e);
                        // Closing is never refused for lack of room.
                        if matches!(call, Call::CloseShift(_) | Call::CloseFn(_)) {
                            prop_assert_ne!(e.code, ErrorCode::FN_ARCHIVE_FULL);
                        }
                    }
                    (reply, formed) => {
                        prop_assert!(false, "inconsistent outcome {:?} {:?}", reply, formed);
                    }
                }
            }

            let d = &r.drive;
            prop_assert_eq!(d.last_fd, formed_count);
            prop_assert!(fds.windows(2).all(|w| w[1] == w[0] + 1));
            prop_assert_eq!(fds.last().copied(), Some(d.last_fd));
            let unsent = unsent_fds(d);
            prop_assert!(unsent.windows(2).all(|w| w[0] < w[1]), "unsent not sorted: {:?}", unsent);
            prop_assert!(unsent.iter().all(|fd| *fd >= 1 && *fd <= d.last_fd));
            // Delivery is oldest first, so what is owed is always the newest documents.
            if let (Some(first), Some(last)) = (unsent.first(), unsent.last()) {
                prop_assert_eq!(*last, d.last_fd);
                prop_assert_eq!(unsent.len(), (last - first + 1) as usize);
            }
            prop_assert!(d.unsent.iter().zip(d.unsent.iter().skip(1)).all(|(a, b)| a.1 <= b.1));
            prop_assert!(d.last_fd <= d.config.capacity);
            if d.phase == Phase::Fiscal {
                let reserve = if d.shift.open { 2 } else { 1 };
                prop_assert!(
                    d.last_fd + reserve <= d.config.capacity,
                    "the closing reserve was spent: {} of {}", d.last_fd, d.config.capacity
                );
            }
            prop_assert_eq!(d.phase == Phase::ReadOnly, d.phase != Phase::Fiscal && d.unsent.is_empty());
        }
    }
}
