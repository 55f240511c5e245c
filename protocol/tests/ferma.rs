//! The Ferma contract (../shared/reference/ferma-api.md) as clients exercise it: payloads real CMS
//! modules send, the errors they must get back, and the exact JSON names they parse.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use protocol::ferma::{
    self, codes, failure, format_iso, format_local, local_from_unix, parse_create_receipt,
    parse_credentials, parse_list_request, parse_local, parse_status_request, qr_string,
    registry_item, success, AuthTokenData, CashboxInfo, CreateReceipt, Device, FermaError,
    ListQuery, ReceiptCreated, ReceiptStatus, StatusData, StatusQuery, MOSCOW_OFFSET_SECS,
};
use protocol::receipt::{
    limits, CalendarDate, Kopecks, Measure, PaymentMethod, PaymentSubject, Payments, Person,
    Quantity, ReceiptType, TaxationSystem, VatRate,
};
use serde_json::{json, Value};

const INN: &str = "3245001416";

fn create(v: &Value) -> Result<CreateReceipt, FermaError> {
    parse_create_receipt(v.to_string().as_bytes())
}

fn accepted(v: &Value) -> CreateReceipt {
    match create(v) {
        Ok(c) => c,
        Err(e) => panic!("refused: {e}"),
    }
}

fn refused(v: &Value) -> FermaError {
    match create(v) {
        Ok(c) => panic!("accepted: {:?}", c.receipt),
        Err(e) => e,
    }
}

/// Asserts the error's code and field, and that the message starts with the field's path.
fn assert_names(e: &FermaError, code: i32, field: &str) {
    assert_eq!(e.code, code, "{e}");
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(
        e.message.starts_with(&format!("{field}: ")),
        "message does not start with the path: {}",
        e.message
    );
}

/// What a WooCommerce/OpenCart module sends: nothing beyond these fields.
fn minimal() -> Value {
    json!({
        "Request": {
            "Inn": INN,
            "Type": "Income",
            "InvoiceId": "order-1042",
            "LocalDate": "04.12.2026 10:15:00",
            "CustomerReceipt": {
                "TaxationSystem": "Common",
                "Email": "buyer@example.ru",
                "Phone": "+79161234567",
                "Items": [
                    {"Label": "Молоко 3,2%", "Price": 89.9, "Quantity": 2, "Amount": 179.8, "Vat": "Vat10"}
                ]
            }
        }
    })
}

fn with(mut v: Value, path: &[&str], value: Value) -> Value {
    let mut cur = &mut v;
    for (i, k) in path.iter().enumerate() {
        if i + 1 == path.len() {
            break;
        }
        cur = match k.parse::<usize>() {
            Ok(n) => &mut cur[n],
            Err(_) => &mut cur[*k],
        };
    }
    let last = path[path.len() - 1];
    match (last.parse::<usize>(), cur.as_array_mut()) {
        (Ok(n), Some(a)) if n == a.len() => a.push(value),
        (Ok(n), _) => cur[n] = value,
        (Err(_), _) => cur[last] = value,
    }
    v
}

fn item_field(v: Value, i: usize, field: &str, value: Value) -> Value {
    let i = i.to_string();
    with(
        v,
        &["Request", "CustomerReceipt", "Items", &i, field],
        value,
    )
}

// ---------------------------------------------------------------------------------------------
// Create receipt: accepted shapes
// ---------------------------------------------------------------------------------------------

#[test]
fn minimal_cms_payload_gets_the_defaults() {
    let c = accepted(&minimal());
    assert_eq!(c.inn, INN);
    assert_eq!(c.invoice_id, "order-1042");
    assert_eq!(c.local_date.as_deref(), Some("04.12.2026 10:15:00"));
    assert_eq!(c.callback_url, None);
    let r = &c.receipt;
    assert_eq!(r.kind, ReceiptType::Income);
    assert_eq!(r.taxation, TaxationSystem::Common);
    assert_eq!(r.items.len(), 1);
    let item = &r.items[0];
    assert_eq!(item.label, "Молоко 3,2%");
    assert_eq!(item.price, Kopecks(8990));
    assert_eq!(item.quantity, Quantity(2000));
    assert_eq!(item.amount, Kopecks(17980));
    assert_eq!(item.vat, VatRate::Vat10);
    assert_eq!(item.payment_method, PaymentMethod::FullPayment);
    assert_eq!(item.payment_subject, PaymentSubject::GOODS);
    assert_eq!(item.measure, Measure::Piece);
    assert_eq!(
        r.payments,
        Payments {
            electronic: Kopecks(17980),
            ..Payments::default()
        }
    );
    assert_eq!(r.email.as_deref(), Some("buyer@example.ru"));
    assert_eq!(r.phone.as_deref(), Some("+79161234567"));
    assert_eq!(r.cashier, None);
    assert_eq!(r.client, None);
    assert_eq!(r.correction, None);
    // The request is kept as received, for the registry echo.
    assert_eq!(c.request, minimal()["Request"]);
}

#[test]
fn prepayment_receipts_default_to_full_prepayment() {
    let v = with(minimal(), &["Request", "Type"], json!("IncomePrepayment"));
    let c = accepted(&v);
    assert_eq!(
        c.receipt.items[0].payment_method,
        PaymentMethod::FullPrepayment
    );
}

#[test]
fn full_payload_maps_every_field() {
    let v = json!({
        "Request": {
            "Inn": INN,
            "Type": "IncomeReturn",
            "InvoiceId": "order-77",
            "CallbackUrl": "https://shop.example.ru/ferma/callback?id=77",
            "Cashier": {"Name": "Иванова А. А.", "Inn": "504404744207"},
            "CustomerReceipt": {
                "TaxationSystem": "SimpleInOut",
                "Email": " buyer@example.ru ",
                "Phone": "8 (916) 123-45-67",
                "PaymentType": 4,
                "BillAddress": "г. Брянск, ул. Ленина, 1",
                "ClientInfo": {"Name": "ООО Ромашка", "Inn": "7707083893"},
                "Items": [
                    {"Label": "Доставка", "Price": 300, "Quantity": 1, "Amount": 300,
                     "Vat": "Vat20", "PaymentMethod": 4, "Measure": "PIECE"},
                    {"Label": "Сыр", "Price": "1000.50", "Quantity": "0.25", "Amount": "250.13",
                     "Vat": "CalculatedVat10110", "PaymentMethod": "3", "PaymentType": 1,
                     "Measure": "KILOGRAM"}
                ],
                "PaymentItems": [
                    {"PaymentType": 0, "Sum": 100},
                    {"PaymentType": 1, "Sum": 150.13},
                    {"PaymentType": 1, "Sum": "250"},
                    {"PaymentType": 2, "Sum": 50},
                    {"PaymentType": 3, "Sum": 0},
                    {"PaymentType": 4, "Sum": 0}
                ]
            }
        }
    });
    let c = accepted(&v);
    assert_eq!(
        c.callback_url.as_deref(),
        Some("https://shop.example.ru/ferma/callback?id=77")
    );
    let r = &c.receipt;
    assert_eq!(r.kind, ReceiptType::IncomeReturn);
    assert_eq!(r.taxation, TaxationSystem::SimpleInOut);
    assert_eq!(r.email.as_deref(), Some("buyer@example.ru"));
    assert_eq!(r.phone.as_deref(), Some("+79161234567"));
    assert_eq!(
        r.settlement_address.as_deref(),
        Some("г. Брянск, ул. Ленина, 1")
    );
    assert_eq!(
        r.cashier,
        Some(Person {
            name: "Иванова А. А.".into(),
            inn: Some("504404744207".into())
        })
    );
    assert_eq!(
        r.client,
        Some(Person {
            name: "ООО Ромашка".into(),
            inn: Some("7707083893".into())
        })
    );
    let (a, b) = (&r.items[0], &r.items[1]);
    assert_eq!(
        a.payment_subject,
        PaymentSubject(4),
        "receipt-level default"
    );
    assert_eq!(a.vat, VatRate::Vat20);
    assert_eq!(b.price, Kopecks(100_050));
    assert_eq!(b.quantity, Quantity(250));
    assert_eq!(b.amount, Kopecks(25_013));
    assert_eq!(b.vat, VatRate::CalculatedVat10110);
    assert_eq!(b.payment_method, PaymentMethod::Advance);
    assert_eq!(b.payment_subject, PaymentSubject::GOODS);
    assert_eq!(b.measure, Measure::Kilogram);
    assert_eq!(
        r.payments,
        Payments {
            cash: Kopecks(10_000),
            electronic: Kopecks(40_013),
            prepayment: Kopecks(5_000),
            credit: Kopecks(0),
            counter_provision: Kopecks(0),
        }
    );
}

#[test]
fn every_correction_type_with_correction_info() {
    for (kind, sign) in [
        ("IncomeCorrection", 1),
        ("IncomeReturnCorrection", 2),
        ("BuyCorrection", 3),
        ("ExpenseReturnCorrection", 4),
    ] {
        let v = with(minimal(), &["Request", "Type"], json!(kind));
        let v = with(
            v,
            &["Request", "CustomerReceipt", "CorrectionInfo"],
            json!({"Type": "SELF", "Description": "Сбой ККТ", "ReceiptDate": "01.12.26", "ReceiptId": "0"}),
        );
        let c = accepted(&v);
        assert_eq!(c.receipt.kind.settlement_sign(), sign);
        let corr = c.receipt.correction.expect("correction kept");
        assert!(!corr.by_instruction);
        assert_eq!(corr.description, "Сбой ККТ");
        assert_eq!(
            corr.date,
            CalendarDate {
                year: 2026,
                month: 12,
                day: 1
            }
        );
        assert_eq!(corr.number, "0");
    }

    let v = with(minimal(), &["Request", "Type"], json!("IncomeCorrection"));
    let instruction = with(
        v.clone(),
        &["Request", "CustomerReceipt", "CorrectionInfo"],
        json!({"Type": "INSTRUCTION", "Description": "Предписание", "ReceiptDate": "2026-11-30", "ReceiptId": "42-П"}),
    );
    let corr = accepted(&instruction).receipt.correction.expect("kept");
    assert!(corr.by_instruction);
    assert_eq!(corr.number, "42-П");
    assert_eq!(
        corr.date,
        CalendarDate {
            year: 2026,
            month: 11,
            day: 30
        }
    );

    // A correction without CorrectionInfo, with a bad date, without the instruction's number.
    let e = refused(&v);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.CorrectionInfo",
    );
    let bad_date = with(
        v.clone(),
        &["Request", "CustomerReceipt", "CorrectionInfo"],
        json!({"Type": "SELF", "Description": "Сбой", "ReceiptDate": "30.02.2026"}),
    );
    assert_names(
        &refused(&bad_date),
        codes::VALIDATION,
        "Request.CustomerReceipt.CorrectionInfo.ReceiptDate",
    );
    let no_number = with(
        v,
        &["Request", "CustomerReceipt", "CorrectionInfo"],
        json!({"Type": "INSTRUCTION", "Description": "Предписание", "ReceiptDate": "01.12.2026"}),
    );
    assert_names(
        &refused(&no_number),
        codes::VALIDATION,
        "Request.CustomerReceipt.CorrectionInfo.ReceiptId",
    );
}

#[test]
fn unwrapped_body_is_accepted_and_echoed() {
    let inner = minimal()["Request"].clone();
    let c = accepted(&inner);
    assert_eq!(c.receipt, accepted(&minimal()).receipt);
    assert_eq!(c.request, inner);
}

#[test]
fn unknown_fields_nulls_and_loose_types_are_tolerated() {
    let v = json!({
        "Request": {
            "Inn": 3245001416u64,
            "Type": "income",
            "InvoiceId": 1042,
            "LocalDate": null,
            "CallbackUrl": "",
            "Cashier": null,
            "SomethingNew": {"deep": [1, 2, 3]},
            "customerReceipt": {
                "TaxationSystem": "0",
                "Email": "",
                "Phone": null,
                "ClientInfo": {"Name": "", "Inn": ""},
                "PaymentAgentInfo": null,
                "AutomatNumber": "A1",
                "CustomUserProperty": {"Name": "Ключ", "Value": "Значение"},
                "Timezone": 2,
                "IsInternet": true,
                "PaymentItems": [],
                "CorrectionInfo": {"Type": "whatever"},
                "Items": [{
                    "Label": "Хлеб", "Price": "45", "Quantity": 1.0, "Amount": null,
                    "Vat": "VATNO", "PaymentMethod": null, "Measure": null,
                    "MarkingCode": null, "AgentInfo": {"Type": "AGENT"}
                }]
            }
        },
        "Extra": true
    });
    let c = accepted(&v);
    assert_eq!(c.inn, INN);
    assert_eq!(c.invoice_id, "1042");
    assert_eq!(c.local_date, None);
    assert_eq!(c.callback_url, None);
    let r = &c.receipt;
    assert_eq!(r.taxation, TaxationSystem::Common);
    assert_eq!(r.email, None);
    assert_eq!(r.client, None);
    assert_eq!(r.correction, None, "ignored on a non-correction type");
    assert_eq!(r.items[0].amount, Kopecks(4500), "Price × Quantity");
    assert_eq!(r.items[0].vat, VatRate::VatNo);
    assert_eq!(r.payments.electronic, Kopecks(4500));
    assert_eq!(c.request, v["Request"]);
}

#[test]
fn taxation_systems_by_name_and_number() {
    for (i, t) in TaxationSystem::ALL.iter().enumerate() {
        for given in [json!(i), json!(i.to_string()), json!(format!("{t:?}"))] {
            let v = with(
                minimal(),
                &["Request", "CustomerReceipt", "TaxationSystem"],
                given,
            );
            assert_eq!(accepted(&v).receipt.taxation, *t);
        }
    }
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "TaxationSystem"],
        json!(6),
    );
    assert_names(
        &refused(&v),
        codes::VALIDATION,
        "Request.CustomerReceipt.TaxationSystem",
    );
}

#[test]
fn every_vat_name_and_the_legacy_18_percent() {
    for (name, rate) in [
        ("VatNo", VatRate::VatNo),
        ("Vat0", VatRate::Vat0),
        ("Vat5", VatRate::Vat5),
        ("Vat7", VatRate::Vat7),
        ("Vat10", VatRate::Vat10),
        ("Vat20", VatRate::Vat20),
        ("Vat22", VatRate::Vat22),
        ("CalculatedVat5105", VatRate::CalculatedVat5105),
        ("CalculatedVat7107", VatRate::CalculatedVat7107),
        ("CalculatedVat10110", VatRate::CalculatedVat10110),
        ("CalculatedVat20120", VatRate::CalculatedVat20120),
        ("CalculatedVat22122", VatRate::CalculatedVat22122),
        ("Vat18", VatRate::Vat20),
        ("CalculatedVat18118", VatRate::CalculatedVat20120),
    ] {
        let v = item_field(minimal(), 0, "Vat", json!(name));
        assert_eq!(accepted(&v).receipt.items[0].vat, rate, "{name}");
    }
}

#[test]
fn measures_by_name_and_code() {
    for m in Measure::ALL {
        let name = serde_json::to_value(m).unwrap();
        let v = item_field(minimal(), 0, "Measure", name);
        assert_eq!(accepted(&v).receipt.items[0].measure, m);
        let v = item_field(minimal(), 0, "Measure", json!(m.code()));
        assert_eq!(accepted(&v).receipt.items[0].measure, m);
    }
    let v = item_field(minimal(), 0, "Measure", json!("BUCKET"));
    let e = refused(&v);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Measure",
    );
    assert!(e.message.contains("KILOGRAM"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Money
// ---------------------------------------------------------------------------------------------

#[test]
fn php_float_noise_is_read_as_the_kopeck_meant() {
    // 0.1 + 0.2 in PHP, sent with serialize_precision = -1.
    let v = item_field(minimal(), 0, "Price", json!(0.1 + 0.2));
    let v = item_field(v, 0, "Quantity", json!(1));
    let v = item_field(v, 0, "Amount", json!(0.30000000000000004));
    let c = accepted(&v);
    assert_eq!(c.receipt.items[0].price, Kopecks(30));
    assert_eq!(c.receipt.items[0].amount, Kopecks(30));
    let v = item_field(v, 0, "Amount", json!("0.30000000000000004"));
    assert_eq!(accepted(&v).receipt.items[0].amount, Kopecks(30));
}

#[test]
fn a_third_decimal_of_a_ruble_is_refused_naming_the_field() {
    let v = item_field(minimal(), 0, "Price", json!(10.005));
    let e = refused(&v);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Price",
    );
    assert!(e.message.contains("10.005"), "{e}");
    assert!(e.message.contains("2 decimal places"), "{e}");

    let v = item_field(minimal(), 0, "Quantity", json!("1.0005"));
    assert_names(
        &refused(&v),
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Quantity",
    );
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "PaymentItems"],
        json!([{"PaymentType": 1, "Sum": 179.801}]),
    );
    assert_names(
        &refused(&v),
        codes::VALIDATION,
        "Request.CustomerReceipt.PaymentItems[0].Sum",
    );
}

#[test]
fn negative_and_non_numeric_money_is_refused() {
    let e = refused(&item_field(minimal(), 0, "Price", json!(-89.9)));
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Price",
    );
    assert!(e.message.contains("negative"), "{e}");
    let e = refused(&item_field(minimal(), 0, "Amount", json!("сто рублей")));
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Amount",
    );
    let e = refused(&item_field(minimal(), 0, "Amount", json!({"value": 1})));
    assert_names(
        &e,
        codes::BAD_REQUEST,
        "Request.CustomerReceipt.Items[0].Amount",
    );
    let e = refused(&item_field(minimal(), 0, "Price", json!(1e30)));
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Price",
    );
    assert!(e.message.contains("too large"), "{e}");
}

#[test]
fn amount_must_be_price_times_quantity() {
    let two = json!({"Label": "Хлеб", "Price": 45, "Quantity": 1, "Amount": 45, "Vat": "VatNo"});
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "Items", "1"],
        two,
    );
    let v = with(
        v,
        &["Request", "CustomerReceipt", "Items", "2"],
        json!({"Label": "Сыр", "Price": 6, "Quantity": 2, "Amount": 10, "Vat": "Vat20"}),
    );
    let e = refused(&v);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[2].Amount",
    );
    assert_eq!(
        e.message,
        "Request.CustomerReceipt.Items[2].Amount: is 10.00 but Price × Quantity is 12.00; \
         send Amount = Price × Quantity rounded to the kopeck and put any discount into Price"
    );
}

#[test]
fn payments_must_add_up_to_the_items() {
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "PaymentItems"],
        json!([{"PaymentType": 0, "Sum": 100}]),
    );
    let e = refused(&v);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.PaymentItems",
    );
    assert!(e.message.contains("179.80"), "{e}");
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "PaymentItems"],
        json!([{"PaymentType": 5, "Sum": 179.8}]),
    );
    assert_names(
        &refused(&v),
        codes::VALIDATION,
        "Request.CustomerReceipt.PaymentItems[0].PaymentType",
    );
}

// ---------------------------------------------------------------------------------------------
// Create receipt: refusals naming the field
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_inn_names_request_inn() {
    let e = refused(&with(minimal(), &["Request", "Inn"], json!("3245001417")));
    assert_names(&e, codes::VALIDATION, "Request.Inn");
    assert!(e.message.contains("check digit"), "{e}");
    let e = refused(&with(minimal(), &["Request", "Inn"], json!("12345")));
    assert_names(&e, codes::VALIDATION, "Request.Inn");
    let mut v = minimal();
    v["Request"].as_object_mut().unwrap().remove("Inn");
    let e = refused(&v);
    assert_names(&e, codes::VALIDATION, "Request.Inn");
    assert!(e.message.contains("required"), "{e}");
    // 12-digit INNs and surrounding blanks.
    let v = with(minimal(), &["Request", "Inn"], json!(" 504404744207 "));
    assert_eq!(accepted(&v).inn, "504404744207");
}

#[test]
fn unknown_type_lists_the_allowed_ones() {
    let e = refused(&with(minimal(), &["Request", "Type"], json!("Sale")));
    assert_names(&e, codes::VALIDATION, "Request.Type");
    for t in [
        "Income",
        "IncomeReturnPrepayment",
        "ExpenseReturnCorrection",
    ] {
        assert!(e.message.contains(t), "{e}");
    }
}

#[test]
fn unknown_vat_names_the_item() {
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "Items", "1"],
        json!({"Label": "Хлеб", "Price": 45, "Quantity": 1, "Amount": 45, "Vat": "Vat13"}),
    );
    let e = refused(&v);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[1].Vat",
    );
    assert!(e.message.contains("CalculatedVat22122"), "{e}");
    let e = refused(&item_field(minimal(), 0, "Vat", Value::Null));
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Vat",
    );
}

#[test]
fn empty_or_missing_items_are_refused() {
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "Items"],
        json!([]),
    );
    let e = refused(&v);
    assert_names(&e, codes::VALIDATION, "Request.CustomerReceipt.Items");
    assert!(e.message.contains("at least one item"), "{e}");
    let mut v = minimal();
    v["Request"]["CustomerReceipt"]
        .as_object_mut()
        .unwrap()
        .remove("Items");
    assert_names(
        &refused(&v),
        codes::VALIDATION,
        "Request.CustomerReceipt.Items",
    );
    let v = with(
        minimal(),
        &["Request", "CustomerReceipt", "Items"],
        json!("milk"),
    );
    assert_names(
        &refused(&v),
        codes::BAD_REQUEST,
        "Request.CustomerReceipt.Items",
    );
}

#[test]
fn more_items_than_a_receipt_holds_is_refused() {
    let item = minimal()["Request"]["CustomerReceipt"]["Items"][0].clone();
    let many = |n: usize| {
        with(
            minimal(),
            &["Request", "CustomerReceipt", "Items"],
            Value::Array(vec![item.clone(); n]),
        )
    };
    assert_eq!(
        accepted(&many(limits::ITEMS)).receipt.items.len(),
        limits::ITEMS
    );
    let e = refused(&many(limits::ITEMS + 1));
    assert_names(&e, codes::VALIDATION, "Request.CustomerReceipt.Items");
    assert!(e.message.contains("101"), "{e}");
    assert!(e.message.contains("split"), "{e}");
}

#[test]
fn too_long_or_empty_label_is_refused() {
    let v = item_field(minimal(), 0, "Label", json!("ж".repeat(128)));
    accepted(&v);
    let e = refused(&item_field(minimal(), 0, "Label", json!("ж".repeat(129))));
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Label",
    );
    assert!(e.message.contains("129"), "{e}");
    let e = refused(&item_field(minimal(), 0, "Label", json!("  ")));
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Label",
    );
}

#[test]
fn contacts_people_and_subjects_name_their_fields() {
    let cr =
        |field: &str, value: Value| with(minimal(), &["Request", "CustomerReceipt", field], value);
    assert_names(
        &refused(&cr("Email", json!("not-an-email"))),
        codes::VALIDATION,
        "Request.CustomerReceipt.Email",
    );
    assert_names(
        &refused(&cr("Phone", json!("12345"))),
        codes::VALIDATION,
        "Request.CustomerReceipt.Phone",
    );
    assert_names(
        &refused(&cr(
            "ClientInfo",
            json!({"Name": "ООО", "Inn": "3245001417"}),
        )),
        codes::VALIDATION,
        "Request.CustomerReceipt.ClientInfo.Inn",
    );
    assert_names(
        &refused(&cr("PaymentType", json!(34))),
        codes::VALIDATION,
        "Request.CustomerReceipt.PaymentType",
    );
    assert_names(
        &refused(&item_field(minimal(), 0, "PaymentType", json!(300))),
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].PaymentType",
    );
    assert_names(
        &refused(&item_field(minimal(), 0, "PaymentMethod", json!(8))),
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].PaymentMethod",
    );
    assert_names(
        &refused(&item_field(minimal(), 0, "Quantity", json!(0))),
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Quantity",
    );
    let v = with(
        minimal(),
        &["Request", "Cashier"],
        json!({"Name": "", "Inn": "504404744207"}),
    );
    assert_names(&refused(&v), codes::VALIDATION, "Request.Cashier.Name");
}

#[test]
fn invoice_id_and_callback_url_are_checked() {
    let e = refused(&with(minimal(), &["Request", "InvoiceId"], json!(" ")));
    assert_names(&e, codes::VALIDATION, "Request.InvoiceId");
    let long = "x".repeat(ferma::INVOICE_ID_MAX_CHARS + 1);
    let e = refused(&with(minimal(), &["Request", "InvoiceId"], json!(long)));
    assert_names(&e, codes::VALIDATION, "Request.InvoiceId");
    let max = "x".repeat(ferma::INVOICE_ID_MAX_CHARS);
    accepted(&with(minimal(), &["Request", "InvoiceId"], json!(max)));

    for bad in [
        "ftp://x.ru/cb",
        "shop.ru/cb",
        "https://",
        "http:///cb",
        "https://a b",
    ] {
        let e = refused(&with(minimal(), &["Request", "CallbackUrl"], json!(bad)));
        assert_names(&e, codes::VALIDATION, "Request.CallbackUrl");
    }
    let c = accepted(&with(
        minimal(),
        &["Request", "CallbackUrl"],
        json!("HTTP://127.0.0.1:8080/cb"),
    ));
    assert_eq!(c.callback_url.as_deref(), Some("HTTP://127.0.0.1:8080/cb"));
}

#[test]
fn malformed_json_and_wrong_shapes_are_bad_requests() {
    let e = parse_create_receipt(br#"{"Request": {"Inn": "3245001416",}"#).unwrap_err();
    assert_eq!(e.code, codes::BAD_REQUEST);
    assert_eq!(e.field, None);
    assert!(e.message.contains("line 1 column"), "{e}");
    for body in [&b""[..], b"   ", b"[]", b"42", b"\"x\"", b"\xff\xfe"] {
        let e = parse_create_receipt(body).unwrap_err();
        assert_eq!(e.code, codes::BAD_REQUEST, "{body:?}: {e}");
    }
    let e = create(&json!({"Request": [1]})).unwrap_err();
    assert_names(&e, codes::BAD_REQUEST, "Request");
    let e = create(&with(
        minimal(),
        &["Request", "CustomerReceipt"],
        json!("x"),
    ))
    .unwrap_err();
    assert_names(&e, codes::BAD_REQUEST, "Request.CustomerReceipt");
    let e = create(&with(minimal(), &["Request", "Inn"], json!(["3245001416"]))).unwrap_err();
    assert_names(&e, codes::BAD_REQUEST, "Request.Inn");
    let e = create(&item_field(minimal(), 0, "Label", json!(true))).unwrap_err();
    assert_names(
        &e,
        codes::BAD_REQUEST,
        "Request.CustomerReceipt.Items[0].Label",
    );
    // A BOM in front is not malformed.
    let mut body = vec![0xEF, 0xBB, 0xBF];
    body.extend_from_slice(minimal().to_string().as_bytes());
    assert!(parse_create_receipt(&body).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Other requests
// ---------------------------------------------------------------------------------------------

#[test]
fn credentials_with_and_without_wrapper() {
    let c = parse_credentials(br#"{"Login":"shop","Password":"s3cret"}"#).unwrap();
    assert_eq!((c.login.as_str(), c.password.as_str()), ("shop", "s3cret"));
    let w = parse_credentials(br#"{"Request":{"Login":"shop","Password":"s3cret"}}"#).unwrap();
    assert_eq!(w, c);
    assert!(!format!("{c:?}").contains("s3cret"));
    let e = parse_credentials(br#"{"Login":"shop"}"#).unwrap_err();
    assert_names(&e, codes::VALIDATION, "Password");
    assert_eq!(parse_credentials(b"").unwrap_err().code, codes::BAD_REQUEST);
}

#[test]
fn status_by_receipt_id_and_by_invoice_id() {
    let id = "8f1c5a9e-3d5b-4c1e-9f5e-2a7b3c4d5e6f";
    let q = |s: &str| parse_status_request(s.as_bytes());
    assert_eq!(
        q(&format!(r#"{{"Request":{{"ReceiptId":"{id}"}}}}"#)),
        Ok(StatusQuery::ReceiptId(id.into()))
    );
    assert_eq!(
        q(&format!(r#"{{"ReceiptId":"{id}"}}"#)),
        Ok(StatusQuery::ReceiptId(id.into()))
    );
    assert_eq!(
        q(r#"{"Request":{"InvoiceId":"order-1042"}}"#),
        Ok(StatusQuery::InvoiceId("order-1042".into()))
    );
    assert_eq!(
        q(r#"{"Request":{"ReceiptId":null,"InvoiceId":1042}}"#),
        Ok(StatusQuery::InvoiceId("1042".into()))
    );
    assert_eq!(
        q(&format!(
            r#"{{"Request":{{"ReceiptId":"{id}","InvoiceId":"x"}}}}"#
        )),
        Ok(StatusQuery::ReceiptId(id.into()))
    );
    let e = q(r#"{"Request":{}}"#).unwrap_err();
    assert_names(&e, codes::VALIDATION, "Request.ReceiptId");
    assert_eq!(q("{").unwrap_err().code, codes::BAD_REQUEST);
}

#[test]
fn list_with_and_without_wrapper() {
    let q = |s: &str| parse_list_request(s.as_bytes());
    let none = ListQuery::default();
    for empty in ["", "{}", r#"{"Request":{}}"#, r#"{"Request":null}"#] {
        assert_eq!(q(empty), Ok(none.clone()), "{empty:?}");
    }
    let t0 = parse_local("2026-12-01T00:00:00").unwrap();
    let t1 = parse_local("2026-12-04T23:59:59").unwrap();
    let expected = ListQuery {
        receipt_id: None,
        start: Some(t0),
        end: Some(t1),
    };
    assert_eq!(
        q(
            r#"{"Request":{"StartDateUtc":"2026-12-01T00:00:00","EndDateUtc":"2026-12-04T23:59:59"}}"#
        ),
        Ok(expected.clone())
    );
    assert_eq!(
        q(r#"{"StartDateLocal":"2026-12-01T00:00:00","EndDateLocal":"2026-12-04T23:59:59"}"#),
        Ok(expected.clone())
    );
    // *Local wins over *Utc when both are sent.
    assert_eq!(
        q(
            r#"{"StartDateLocal":"2026-12-01T00:00:00","StartDateUtc":"2020-01-01T00:00:00","EndDateLocal":"2026-12-04T23:59:59"}"#
        ),
        Ok(expected)
    );
    assert_eq!(
        q(r#"{"Request":{"ReceiptId":"abc","StartDateLocal":""}}"#),
        Ok(ListQuery {
            receipt_id: Some("abc".into()),
            ..ListQuery::default()
        })
    );
    let e = q(r#"{"Request":{"StartDateUtc":"yesterday"}}"#).unwrap_err();
    assert_names(&e, codes::VALIDATION, "Request.StartDateUtc");
    let e = q(r#"{"Request":{"StartDateLocal":"2026-12-04T00:00:00","EndDateLocal":"2026-12-01T00:00:00"}}"#)
        .unwrap_err();
    assert_names(&e, codes::VALIDATION, "Request.EndDateLocal");
    assert_eq!(q("[1]").unwrap_err().code, codes::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

#[test]
fn dates_parse_in_every_client_form() {
    let t = parse_local("2026-12-04T10:15:30").unwrap();
    // 2026-12-04 is day 20 791 since the epoch.
    assert_eq!(t, 20_791 * 86_400 + 10 * 3600 + 15 * 60 + 30);
    for same in [
        "2026-12-04 10:15:30",
        "2026-12-04T10:15:30.999",
        "2026-12-04T10:15:30.1234567",
        "2026-12-04T07:15:30Z",
        "2026-12-04T07:15:30.5Z",
        "2026-12-04T10:15:30+03:00",
        "2026-12-04T09:15:30+0200",
        "2026-12-04T02:15:30-05",
        "04.12.2026 10:15:30",
        " 2026-12-04T10:15:30 ",
    ] {
        assert_eq!(parse_local(same), Some(t), "{same}");
    }
    assert_eq!(parse_local("2026-12-04T10:15"), Some(t - 30));
    for bad in [
        "",
        "2026-12-04",
        "2026-13-04T10:15:30",
        "2026-02-29T10:15:30",
        "2026-12-04T24:00:00",
        "2026-12-04T10:60:00",
        "2026-12-04T10:15:30.",
        "2026-12-04T10:15:30+3",
        "2026-12-04T10:15:30 junk",
        "04.12.26 10:15:30",
        "ж",
    ] {
        assert_eq!(parse_local(bad), None, "{bad:?}");
    }
    assert!(parse_local("2024-02-29T00:00:00").is_some());
}

#[test]
fn formatting_round_trips_and_carries_the_moscow_offset() {
    for s in [
        "2026-12-04T10:15:30",
        "1970-01-01T00:00:00",
        "1969-12-31T23:59:59",
        "2000-02-29T12:00:00",
        "2099-12-31T23:59:59",
    ] {
        assert_eq!(parse_local(s).map(format_local).as_deref(), Some(s));
    }
    let t = parse_local("2026-12-04T10:15:30").unwrap();
    assert_eq!(format_iso(t), "2026-12-04T10:15:30+03:00");
    assert_eq!(parse_local(&format_iso(t)), Some(t));
    assert_eq!(MOSCOW_OFFSET_SECS, 10_800);
    // 2026-12-04T07:15:30Z is 10:15:30 in Moscow.
    assert_eq!(local_from_unix(t - MOSCOW_OFFSET_SECS), t);
    assert_eq!(format_local(local_from_unix(0)), "1970-01-01T03:00:00");
    assert_eq!(local_from_unix(i64::MAX), i64::MAX);
}

// ---------------------------------------------------------------------------------------------
// Answer shapes
// ---------------------------------------------------------------------------------------------

fn device() -> Device {
    Device {
        device_id: 7,
        rnm: "0149060006035849".into(),
        zn: "0149060006000651".into(),
        fn_number: "9999078900012345".into(),
        fdn: "123".into(),
        fpd: "3826494539".into(),
        shift_number: 12,
        receipt_num_in_shift: Some(5),
        device_type: "Эфир Pro ФС".into(),
        ofd_receipt_url:
            "https://check.ofd.ru/rec/3245001416/0149060006035849/9999078900012345/123/3826494539"
                .into(),
    }
}

#[test]
fn status_data_and_device_carry_ferma_names() {
    let modified = parse_local("2026-12-04T10:15:31").unwrap();
    let dated = parse_local("2026-12-04T10:15:30").unwrap();
    let s = StatusData::new(
        "rid",
        ReceiptStatus::Confirmed,
        None,
        modified,
        dated,
        Some(device()),
    );
    assert_eq!(s.status(), Some(ReceiptStatus::Confirmed));
    assert_eq!(
        serde_json::to_value(&s).unwrap(),
        json!({
            "ReceiptId": "rid",
            "StatusCode": 2,
            "StatusName": "CONFIRMED",
            "StatusMessage": "Чек передан в ОФД",
            "ModifiedDateUtc": "2026-12-04T10:15:31",
            "ReceiptDateUtc": "2026-12-04T10:15:30",
            "ModifiedDateTimeIso": "2026-12-04T10:15:31+03:00",
            "ReceiptDateTimeIso": "2026-12-04T10:15:30+03:00",
            "Device": {
                "DeviceId": 7,
                "RNM": "0149060006035849",
                "ZN": "0149060006000651",
                "FN": "9999078900012345",
                "FDN": "123",
                "FPD": "3826494539",
                "ShiftNumber": 12,
                "ReceiptNumInShift": 5,
                "DeviceType": "Эфир Pro ФС",
                "OfdReceiptUrl": "https://check.ofd.ru/rec/3245001416/0149060006035849/9999078900012345/123/3826494539"
            }
        })
    );
    let back: StatusData = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!(back, s);

    let new = StatusData::new(
        "rid",
        ReceiptStatus::KktError,
        Some("ФН заблокирован".into()),
        modified,
        dated,
        None,
    );
    let v = serde_json::to_value(&new).unwrap();
    assert_eq!(v["Device"], Value::Null);
    assert_eq!(v["StatusCode"], 3);
    assert_eq!(v["StatusName"], "KKT_ERROR");
    assert_eq!(v["StatusMessage"], "ФН заблокирован");
}

#[test]
fn statuses_have_ferma_codes_and_names() {
    let got: Vec<_> = ReceiptStatus::ALL
        .iter()
        .map(|s| (s.code(), s.name(), s.is_final()))
        .collect();
    assert_eq!(
        got,
        [
            (0, "NEW", false),
            (1, "PROCESSED", false),
            (2, "CONFIRMED", true),
            (3, "KKT_ERROR", true)
        ]
    );
    for s in ReceiptStatus::ALL {
        assert_eq!(ReceiptStatus::from_code(s.code()), Some(s));
        assert_eq!(serde_json::to_value(s).unwrap(), json!(s.name()));
    }
    assert_eq!(ReceiptStatus::from_code(4), None);
}

#[test]
fn registry_item_echoes_the_request_with_cashbox_info() {
    let c = accepted(&minimal());
    let t = parse_local("2026-12-04T10:15:30").unwrap();
    let s = StatusData::new("rid", ReceiptStatus::Processed, None, t, t, Some(device()));
    let total = c.receipt.total().unwrap();
    let item = registry_item(
        &s,
        &c.invoice_id,
        &c.request,
        Some(CashboxInfo::from_device(&device(), total)),
    );
    let v = serde_json::to_value(&item).unwrap();
    let mut receipt = minimal()["Request"].clone();
    receipt["cashboxInfoHolder"] = json!({
        "DeviceId": 7,
        "FDN": "123",
        "FN": "9999078900012345",
        "FPD": "3826494539",
        "RNM": "0149060006035849",
        "ZN": "0149060006000651",
        "checkNumInShift": 5,
        "shiftNum": 12,
        "totalSum": 179.8
    });
    assert_eq!(
        v,
        json!({
            "ReceiptId": "rid",
            "InvoiceId": "order-1042",
            "StatusCode": 1,
            "StatusName": "PROCESSED",
            "StatusMessage": ReceiptStatus::Processed.default_message(),
            "ModifiedDateUtc": "2026-12-04T10:15:30",
            "ReceiptDateUtc": "2026-12-04T10:15:30",
            "ModifiedDateTimeIso": "2026-12-04T10:15:30+03:00",
            "ReceiptDateTimeIso": "2026-12-04T10:15:30+03:00",
            "Receipt": receipt
        })
    );
    let back: ferma::RegistryItem = serde_json::from_value(v).unwrap();
    assert_eq!(back, item);

    let unfiscalized = registry_item(&s, "x", &c.request, None);
    assert_eq!(unfiscalized.receipt["cashboxInfoHolder"], Value::Null);
}

#[test]
fn cashbox_total_sum_is_rubles_exactly() {
    for (k, rubles) in [
        (0u64, json!(0.0)),
        (1, json!(0.01)),
        (30, json!(0.3)),
        (17_980, json!(179.8)),
        (123_456_789, json!(1_234_567.89)),
    ] {
        let info = CashboxInfo::from_device(&device(), Kopecks(k));
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["totalSum"], rubles);
        assert_eq!(v["totalSum"].to_string(), rubles.to_string());
        let back: CashboxInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back.total_sum, Kopecks(k));
    }
}

#[test]
fn envelopes() {
    assert_eq!(
        success(ReceiptCreated {
            receipt_id: "rid".into()
        }),
        json!({"Status": "Success", "Data": {"ReceiptId": "rid"}})
    );
    let t = parse_local("2026-12-05T10:00:00").unwrap();
    assert_eq!(
        success(AuthTokenData::new("tok", t)),
        json!({"Status": "Success", "Data": {"AuthToken": "tok", "ExpirationDateUtc": "2026-12-05T10:00:00"}})
    );
    let e = FermaError::new(codes::AUTH, "token expired");
    assert_eq!(
        failure(&e),
        json!({"Status": "Failed", "Error": {"Code": 1001, "Message": "token expired"}})
    );
    assert_eq!(e.http_status(), 401);
    assert_eq!(FermaError::new(codes::OVERLOADED, "").http_status(), 503);
    assert_eq!(FermaError::new(codes::VALIDATION, "").http_status(), 400);

    // A map with non-string keys cannot be JSON: an INTERNAL failure, not a panic.
    let bad: std::collections::BTreeMap<Vec<u8>, u8> = [(vec![1], 1)].into();
    assert_eq!(success(bad)["Error"]["Code"], codes::INTERNAL);
}

#[test]
fn invoice_exists_message_is_machine_readable() {
    let rid = "8f1c5a9e-3d5b-4c1e-9f5e-2a7b3c4d5e6f";
    for invoice in ["order-1042", "a--b--c", "--abc--", "x---"] {
        let e = FermaError::invoice_exists(invoice, rid);
        assert_eq!(e.code, codes::INVOICE_EXISTS);
        // What clients do: the first `--([a-f0-9-]+)--`.
        let found = first_dashed_hex(&e.message);
        assert_eq!(found.as_deref(), Some(rid), "{}", e.message);
    }
}

/// A hand-rolled `--([a-f0-9-]+)--` (leftmost, greedy with backtracking), to avoid a regex
/// dependency.
fn first_dashed_hex(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let class = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c) || c == b'-';
    for start in 0..b.len() {
        if !b[start..].starts_with(b"--") {
            continue;
        }
        let body = start + 2;
        let mut end = body;
        while end < b.len() && class(b[end]) {
            end += 1;
        }
        // Backtrack: the longest body followed by "--".
        let mut e = end;
        while e > body {
            if b[e..].starts_with(b"--") {
                return Some(s[body..e].to_owned());
            }
            e -= 1;
        }
    }
    None
}

#[test]
fn qr_string_in_fns_format() {
    let t = parse_local("2026-12-04T10:15:30").unwrap();
    assert_eq!(
        qr_string(
            t,
            Kopecks(17_980),
            "9999078900012345",
            "123",
            "3826494539",
            ReceiptType::IncomeReturn
        ),
        "t=20261204T1015&s=179.80&fn=9999078900012345&i=123&fp=3826494539&n=2"
    );
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// Keys that reach deep into the parser, and a few others.
const KEYS: &[&str] = &[
    "Request",
    "Inn",
    "Type",
    "InvoiceId",
    "CallbackUrl",
    "LocalDate",
    "CustomerReceipt",
    "TaxationSystem",
    "Email",
    "Phone",
    "PaymentType",
    "Items",
    "Label",
    "Price",
    "Quantity",
    "Amount",
    "Vat",
    "PaymentMethod",
    "Measure",
    "PaymentItems",
    "Sum",
    "ClientInfo",
    "Cashier",
    "Name",
    "CorrectionInfo",
    "Description",
    "ReceiptDate",
    "ReceiptId",
    "BillAddress",
    "StartDateUtc",
    "EndDateLocal",
    "Login",
    "Password",
    "x",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "Income",
            "IncomeCorrection",
            "Common",
            "Vat20",
            "3245001416",
            "0.30000000000000004",
            "10.005",
            "-1",
            "1e5",
            "SELF",
            "INSTRUCTION",
            "04.12.26",
            "2026-12-04T10:15:30Z",
            "8 (999) 123-45-67",
            "https://x.ru/cb",
            "",
            "ж",
        ])
        .prop_map(|s| json!(s)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// The minimal payload with one member somewhere replaced by an arbitrary value.
fn mutated_payload() -> impl Strategy<Value = Value> {
    let paths: Vec<Vec<&'static str>> = vec![
        vec!["Request"],
        vec!["Request", "Inn"],
        vec!["Request", "Type"],
        vec!["Request", "InvoiceId"],
        vec!["Request", "CallbackUrl"],
        vec!["Request", "Cashier"],
        vec!["Request", "CustomerReceipt"],
        vec!["Request", "CustomerReceipt", "TaxationSystem"],
        vec!["Request", "CustomerReceipt", "Phone"],
        vec!["Request", "CustomerReceipt", "ClientInfo"],
        vec!["Request", "CustomerReceipt", "CorrectionInfo"],
        vec!["Request", "CustomerReceipt", "PaymentItems"],
        vec!["Request", "CustomerReceipt", "Items"],
        vec!["Request", "CustomerReceipt", "Items", "0"],
        vec!["Request", "CustomerReceipt", "Items", "0", "Price"],
        vec!["Request", "CustomerReceipt", "Items", "0", "Quantity"],
        vec!["Request", "CustomerReceipt", "Items", "0", "Amount"],
        vec!["Request", "CustomerReceipt", "Items", "0", "Vat"],
        vec!["Request", "CustomerReceipt", "Items", "0", "Measure"],
    ];
    (
        prop::sample::select(paths),
        json_value(),
        prop::sample::select(vec!["Income", "IncomeCorrection"]),
    )
        .prop_map(|(path, value, kind)| {
            let v = with(minimal(), &["Request", "Type"], json!(kind));
            with(v, &path, value)
        })
}

fn check_error(e: &FermaError) -> Result<(), TestCaseError> {
    prop_assert!(e.code == codes::BAD_REQUEST || e.code == codes::VALIDATION);
    if let Some(f) = &e.field {
        prop_assert!(e.message.starts_with(f.as_str()), "{}", e.message);
    }
    prop_assert!(!e.message.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = parse_create_receipt(&body) {
            check_error(&e)?;
        }
        let _ = parse_status_request(&body);
        let _ = parse_list_request(&body);
        let _ = parse_credentials(&body);
    }

    #[test]
    fn never_panics_on_arbitrary_json(v in json_value()) {
        let body = v.to_string();
        match parse_create_receipt(body.as_bytes()) {
            Ok(c) => prop_assert_eq!(c.receipt.validate(), Ok(())),
            Err(e) => check_error(&e)?,
        }
        let _ = parse_status_request(body.as_bytes());
        let _ = parse_list_request(body.as_bytes());
        let _ = parse_credentials(body.as_bytes());
    }

    #[test]
    fn never_panics_on_damaged_payloads(v in mutated_payload()) {
        match create(&v) {
            Ok(c) => prop_assert_eq!(c.receipt.validate(), Ok(())),
            Err(e) => check_error(&e)?,
        }
    }

    /// Consistent items in any of the ways clients write numbers are accepted exactly.
    #[test]
    fn consistent_receipts_are_accepted_exactly(
        lines in prop::collection::vec((0u64..10_000_000, 1u64..100_000, any::<bool>()), 1..20),
    ) {
        let mut items = Vec::new();
        let mut expected = Vec::new();
        for (price, qty, as_string) in &lines {
            let amount = protocol::receipt::line_amount(Kopecks(*price), Quantity(*qty)).unwrap();
            let (p, q, a) = (Kopecks(*price).to_string(), Quantity(*qty).to_string(), amount.to_string());
            let num = |s: &str| -> Value {
                if *as_string { json!(s) } else { json!(s.parse::<f64>().unwrap()) }
            };
            items.push(json!({"Label": "x", "Price": num(&p), "Quantity": num(&q), "Amount": num(&a), "Vat": "Vat20"}));
            expected.push((Kopecks(*price), Quantity(*qty), amount));
        }
        let v = with(minimal(), &["Request", "CustomerReceipt", "Items"], Value::Array(items));
        let c = create(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got: Vec<_> = c.receipt.items.iter().map(|i| (i.price, i.quantity, i.amount)).collect();
        prop_assert_eq!(got, expected);
        prop_assert_eq!(Some(c.receipt.payments.electronic), c.receipt.total());
    }

    #[test]
    fn local_times_round_trip(t in -62_167_219_200i64..253_402_300_800) {
        let s = format_local(t);
        prop_assert_eq!(parse_local(&s), Some(t), "{}", s);
        prop_assert_eq!(parse_local(&format_iso(t)), Some(t));
    }

    #[test]
    fn formatting_never_panics(t in any::<i64>()) {
        let _ = format_local(t);
        let _ = format_iso(t);
        let _ = qr_string(t, Kopecks(u64::MAX), "", "", "", ReceiptType::Income);
    }

    #[test]
    fn parse_local_never_panics(s in ".{0,40}") {
        let _ = parse_local(&s);
    }
}

// ---------------------------------------------------------------------------------------------
// Internet settlements and what a registration allows
// ---------------------------------------------------------------------------------------------

fn without_contact() -> Value {
    let mut v = minimal();
    let cr = v["Request"]["CustomerReceipt"].as_object_mut().unwrap();
    cr.remove("Email");
    cr.remove("Phone");
    v
}

#[test]
fn a_receipt_no_register_can_take_is_refused_with_the_field_to_change() {
    let c = accepted(&item_field(without_contact(), 0, "Vat", json!("Vat22")));
    let needs = c.receipt.requirements();
    let internet_only = needs
        .check(
            &[TaxationSystem::Common],
            true,
            protocol::kkt::FfdVersion::V1_2,
        )
        .unwrap_err();
    let e = ferma::unservable(INN, &internet_only);
    assert_names(&e, codes::VALIDATION, "Request.CustomerReceipt.Email");
    assert!(
        e.message.contains(INN) && e.message.contains("Email or Phone"),
        "{e}"
    );

    let old_drive = needs
        .check(
            &[TaxationSystem::Common],
            false,
            protocol::kkt::FfdVersion::V1_05,
        )
        .unwrap_err();
    let e = ferma::unservable(INN, &old_drive);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.Items[0].Vat",
    );
    assert!(
        e.message.contains("FFD 1.2") && e.message.contains("FFD 1.05"),
        "{e}"
    );

    let patent = needs
        .check(
            &[TaxationSystem::Patent],
            false,
            protocol::kkt::FfdVersion::V1_2,
        )
        .unwrap_err();
    let e = ferma::unservable(INN, &patent);
    assert_names(
        &e,
        codes::VALIDATION,
        "Request.CustomerReceipt.TaxationSystem",
    );
}
