//! Ready-made registration data and receipts in real shapes (a valid INN, the RNM computed for the
//! register's ZN, amounts that add up): what the tests, the benchmarks and the demo register and sell.

use protocol::checksum::{rnm, RnmError};
use protocol::kkt::{OfdEndpoint, ReceiptParams, RegistrationParams};
use protocol::receipt::*;
use std::net::SocketAddr;

/// INN of the demo organisation (valid checksum).
pub const DEMO_INN: &str = "3245001416";

/// The RNM sequence the "tax service" issues to every simulated register.
pub const RNM_SEQUENCE: &str = "0000000001";

pub fn ofd_endpoint(addr: SocketAddr) -> OfdEndpoint {
    OfdEndpoint {
        name: "ОФД-симулятор".into(),
        inn: crate::ofd::OFD_INN.into(),
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// Registration card of register `zn` for `inn`, sending to `ofd`.
pub fn registration(zn: &str, inn: &str, ofd: OfdEndpoint) -> Result<RegistrationParams, RnmError> {
    Ok(RegistrationParams {
        rnm: rnm(RNM_SEQUENCE, inn, zn)?,
        user_inn: inn.into(),
        user_name: "ООО \"Ромашка\"".into(),
        taxation_systems: vec![TaxationSystem::Common, TaxationSystem::SimpleIn],
        internet: true,
        encryption: false,
        ofd,
        settlement_address: "г. Москва, ул. Тверская, д. 1".into(),
        settlement_place: "shop.example.ru".into(),
        fns_site: "www.nalog.gov.ru".into(),
        cashier: None,
    })
}

/// Receipt number `n`: one item of 1.5 kg at (10.00 + n kopecks) ₽, paid electronically, with the
/// job id `job` in tag 1192.
pub fn receipt(n: u64, job: Option<String>) -> ReceiptParams {
    let price = Kopecks(1000 + n);
    let quantity = Quantity(1500);
    let amount = line_amount(price, quantity).unwrap_or_default();
    ReceiptParams {
        receipt: Receipt {
            kind: ReceiptType::Income,
            taxation: TaxationSystem::Common,
            items: vec![Item {
                label: format!("Товар №{n}"),
                price,
                quantity,
                amount,
                vat: VatRate::Vat20,
                payment_method: PaymentMethod::FullPayment,
                payment_subject: PaymentSubject::GOODS,
                measure: Measure::Kilogram,
            }],
            payments: Payments {
                electronic: amount,
                ..Payments::default()
            },
            email: Some("buyer@example.ru".into()),
            phone: None,
            cashier: None,
            client: None,
            correction: None,
            settlement_address: None,
            settlement_place: None,
        },
        additional_attribute: job,
    }
}
