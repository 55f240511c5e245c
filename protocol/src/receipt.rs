//! The receipt model: what a shop asks to fiscalize, independent of any wire format.
//!
//! Money is integer kopecks and quantities are thousandths — never floats — because a receipt is a
//! tax document and must add up to the kopeck. [`Receipt::validate`] enforces the rules a KKT and the
//! tax service would enforce later, so that a bad receipt is refused at the door, with the field named,
//! instead of failing on a register after the shop has been told "accepted".

use crate::checksum::{validate_inn, InnError};
use crate::kkt::FfdVersion;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// An amount of money in kopecks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Kopecks(pub u64);

impl Kopecks {
    pub fn checked_add(self, other: Kopecks) -> Option<Kopecks> {
        self.0.checked_add(other.0).map(Kopecks)
    }

    /// Parses rubles written in decimal ("12", "12.3", "12.34"); more than two decimals is refused,
    /// not rounded, because rounding money silently is how receipts stop adding up.
    pub fn parse_rubles(s: &str) -> Result<Kopecks, AmountError> {
        parse_fixed(s, 2).map(Kopecks)
    }
}

impl fmt::Display for Kopecks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// A quantity in thousandths of the unit (3 decimals, as FFD allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(pub u64);

impl Quantity {
    pub const ONE: Quantity = Quantity(1000);

    pub fn parse(s: &str) -> Result<Quantity, AmountError> {
        parse_fixed(s, 3).map(Quantity)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// Why a decimal amount could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmountError {
    #[error("{0:?} is not a non-negative decimal number")]
    NotANumber(String),
    #[error("{value:?} has more than {max} decimal places")]
    TooPrecise { value: String, max: u32 },
    #[error("{0:?} is too large")]
    TooLarge(String),
}

fn parse_fixed(s: &str, decimals: u32) -> Result<u64, AmountError> {
    let nan = || AmountError::NotANumber(s.to_owned());
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(nan());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || (s.contains('.') && frac.is_empty()) {
        return Err(nan());
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > decimals as usize {
        return Err(AmountError::TooPrecise {
            value: s.to_owned(),
            max: decimals,
        });
    }
    let too_large = || AmountError::TooLarge(s.to_owned());
    let int: u64 = int.parse().map_err(|_| too_large())?;
    let frac_val: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| nan())?
    };
    let scale = 10u64.pow(decimals);
    let frac_scaled = frac_val * 10u64.pow(decimals - frac.len() as u32);
    int.checked_mul(scale)
        .and_then(|v| v.checked_add(frac_scaled))
        .ok_or_else(too_large)
}

/// Receipt type, in the Ferma API's names (reference/ferma-api.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReceiptType {
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
}

impl ReceiptType {
    /// Settlement sign, tag 1054.
    pub fn settlement_sign(self) -> u8 {
        use ReceiptType::*;
        match self {
            Income | IncomePrepayment | IncomeCorrection => 1,
            IncomeReturn | IncomeReturnPrepayment | IncomeReturnCorrection => 2,
            Expense | BuyCorrection => 3,
            ExpenseReturn | ExpenseReturnCorrection => 4,
        }
    }

    pub fn is_correction(self) -> bool {
        use ReceiptType::*;
        matches!(
            self,
            IncomeCorrection | IncomeReturnCorrection | BuyCorrection | ExpenseReturnCorrection
        )
    }

    /// The payment method items get when the shop does not say: a prepayment receipt is a full
    /// prepayment, everything else a full payment.
    pub fn default_payment_method(self) -> PaymentMethod {
        match self {
            ReceiptType::IncomePrepayment | ReceiptType::IncomeReturnPrepayment => {
                PaymentMethod::FullPrepayment
            }
            _ => PaymentMethod::FullPayment,
        }
    }
}

/// Taxation system; the discriminant is its bit in tags 1062/1055.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaxationSystem {
    Common,
    SimpleIn,
    SimpleInOut,
    Unified,
    UnifiedAgricultural,
    Patent,
}

impl TaxationSystem {
    pub const ALL: [TaxationSystem; 6] = [
        Self::Common,
        Self::SimpleIn,
        Self::SimpleInOut,
        Self::Unified,
        Self::UnifiedAgricultural,
        Self::Patent,
    ];

    pub fn bit(self) -> u8 {
        match self {
            Self::Common => 1,
            Self::SimpleIn => 2,
            Self::SimpleInOut => 4,
            Self::Unified => 8,
            Self::UnifiedAgricultural => 16,
            Self::Patent => 32,
        }
    }

    pub fn from_bit(bit: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.bit() == bit)
    }
}

/// VAT rate; [`VatRate::code`] is tag 1199.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VatRate {
    Vat20,
    Vat10,
    CalculatedVat20120,
    CalculatedVat10110,
    Vat0,
    VatNo,
    Vat5,
    Vat7,
    CalculatedVat5105,
    CalculatedVat7107,
    Vat22,
    CalculatedVat22122,
}

impl VatRate {
    pub const ALL: [VatRate; 12] = [
        Self::Vat20,
        Self::Vat10,
        Self::CalculatedVat20120,
        Self::CalculatedVat10110,
        Self::Vat0,
        Self::VatNo,
        Self::Vat5,
        Self::Vat7,
        Self::CalculatedVat5105,
        Self::CalculatedVat7107,
        Self::Vat22,
        Self::CalculatedVat22122,
    ];

    pub fn code(self) -> u8 {
        // 1..=10 as reference/fiscal.md lists; 22 % (from 2026) takes the next two codes.
        match self {
            Self::Vat20 => 1,
            Self::Vat10 => 2,
            Self::CalculatedVat20120 => 3,
            Self::CalculatedVat10110 => 4,
            Self::Vat0 => 5,
            Self::VatNo => 6,
            Self::Vat5 => 7,
            Self::Vat7 => 8,
            Self::CalculatedVat5105 => 9,
            Self::CalculatedVat7107 => 10,
            Self::Vat22 => 11,
            Self::CalculatedVat22122 => 12,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.code() == code)
    }
}

/// Payment method, tag 1214.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PaymentMethod {
    FullPrepayment = 1,
    Prepayment = 2,
    Advance = 3,
    FullPayment = 4,
    PartialPaymentAndCredit = 5,
    TransferOnCredit = 6,
    CreditPayment = 7,
}

impl PaymentMethod {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        use PaymentMethod::*;
        [
            FullPrepayment,
            Prepayment,
            Advance,
            FullPayment,
            PartialPaymentAndCredit,
            TransferOnCredit,
            CreditPayment,
        ]
        .into_iter()
        .find(|m| m.code() == code)
    }
}

/// Payment subject (what is sold), tag 1212: 1 goods … 33; kept as its code because FFD keeps adding
/// values and the register, not we, is the authority on which ones it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PaymentSubject(pub u8);

impl PaymentSubject {
    pub const GOODS: PaymentSubject = PaymentSubject(1);
    pub const MAX: u8 = 33;
}

/// Measure of quantity (FFD 1.2 tag 2108); serde names as the Ferma API spells them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Measure {
    #[default]
    Piece,
    Gram,
    Kilogram,
    Ton,
    Centimeter,
    Decimeter,
    Meter,
    SquareCentimeter,
    SquareDecimeter,
    SquareMeter,
    Milliliter,
    Liter,
    CubicMeter,
    KilowattHour,
    Gigacalorie,
    Day,
    Hour,
    Minute,
    Second,
    Kilobyte,
    Megabyte,
    Gigabyte,
    Terabyte,
    Other,
}

impl Measure {
    pub const ALL: [Measure; 24] = [
        Self::Piece,
        Self::Gram,
        Self::Kilogram,
        Self::Ton,
        Self::Centimeter,
        Self::Decimeter,
        Self::Meter,
        Self::SquareCentimeter,
        Self::SquareDecimeter,
        Self::SquareMeter,
        Self::Milliliter,
        Self::Liter,
        Self::CubicMeter,
        Self::KilowattHour,
        Self::Gigacalorie,
        Self::Day,
        Self::Hour,
        Self::Minute,
        Self::Second,
        Self::Kilobyte,
        Self::Megabyte,
        Self::Gigabyte,
        Self::Terabyte,
        Self::Other,
    ];

    pub fn code(self) -> u8 {
        use Measure::*;
        match self {
            Piece => 0,
            Gram => 10,
            Kilogram => 11,
            Ton => 12,
            Centimeter => 20,
            Decimeter => 21,
            Meter => 22,
            SquareCentimeter => 30,
            SquareDecimeter => 31,
            SquareMeter => 32,
            Milliliter => 40,
            Liter => 41,
            CubicMeter => 42,
            KilowattHour => 50,
            Gigacalorie => 51,
            Day => 70,
            Hour => 71,
            Minute => 72,
            Second => 73,
            Kilobyte => 80,
            Megabyte => 81,
            Gigabyte => 82,
            Terabyte => 83,
            Other => 255,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.code() == code)
    }
}

/// One line of a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    pub label: String,
    pub price: Kopecks,
    pub quantity: Quantity,
    pub amount: Kopecks,
    pub vat: VatRate,
    pub payment_method: PaymentMethod,
    pub payment_subject: PaymentSubject,
    #[serde(default)]
    pub measure: Measure,
}

/// How the buyer paid, by kind (tags 1031, 1081, 1215, 1216, 1217).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payments {
    #[serde(default)]
    pub cash: Kopecks,
    #[serde(default)]
    pub electronic: Kopecks,
    #[serde(default)]
    pub prepayment: Kopecks,
    #[serde(default)]
    pub credit: Kopecks,
    #[serde(default)]
    pub counter_provision: Kopecks,
}

impl Payments {
    pub fn total(&self) -> Option<Kopecks> {
        self.cash
            .checked_add(self.electronic)?
            .checked_add(self.prepayment)?
            .checked_add(self.credit)?
            .checked_add(self.counter_provision)
    }
}

/// A person named on the receipt (cashier or buyer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Person {
    pub name: String,
    #[serde(default)]
    pub inn: Option<String>,
}

/// A calendar date without a zone (a correction names the day of the settlement it corrects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CalendarDate {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

impl CalendarDate {
    pub fn is_valid(&self) -> bool {
        let leap = (self.year % 4 == 0 && self.year % 100 != 0) || self.year % 400 == 0;
        let days = match self.month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return false,
        };
        (2000..=2099).contains(&self.year) && (1..=days).contains(&self.day)
    }

    /// Days since 1970-01-01 (civil-from-days inverse, valid for the Gregorian calendar).
    pub fn days_since_epoch(&self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }
}

/// Why the receipt corrects an earlier settlement (correction receipts only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Correction {
    /// `false`: on the seller's own initiative (SELF); `true`: by the tax authority (INSTRUCTION).
    pub by_instruction: bool,
    pub description: String,
    pub date: CalendarDate,
    /// The instruction's number, or the id of the receipt being corrected.
    pub number: String,
}

/// A receipt as the register is asked to fiscalize it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    #[serde(rename = "type")]
    pub kind: ReceiptType,
    pub taxation: TaxationSystem,
    pub items: Vec<Item>,
    pub payments: Payments,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub cashier: Option<Person>,
    #[serde(default)]
    pub client: Option<Person>,
    #[serde(default)]
    pub correction: Option<Correction>,
    #[serde(default)]
    pub settlement_address: Option<String>,
    #[serde(default)]
    pub settlement_place: Option<String>,
}

/// Limits that validation enforces, set where the FFD or the register sets them.
pub mod limits {
    /// Item name (tag 1030).
    pub const LABEL_CHARS: usize = 128;
    /// Names of people (1021, 1227) and free text (1177).
    pub const NAME_CHARS: usize = 256;
    /// Buyer contact (1008).
    pub const CONTACT_CHARS: usize = 64;
    /// A document must fit one OFD container (32 KiB) with room to spare; an item costs at most
    /// ~170 bytes, so 100 items keep every receipt well inside it. Larger orders are split by the shop.
    pub const ITEMS: usize = 100;
}

/// A receipt the register would refuse, with the field that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// Path of the field in the receipt, e.g. `items[2].amount`.
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Problem {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} characters long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("has {len} entries; at most {max} are allowed")]
    TooMany { len: usize, max: usize },
    #[error("invalid INN: {0}")]
    Inn(InnError),
    #[error("is {got} but price × quantity is {expected}")]
    AmountMismatch { expected: Kopecks, got: Kopecks },
    #[error("payments add up to {payments} but the items add up to {items}")]
    TotalMismatch { items: Kopecks, payments: Kopecks },
    #[error("is too large to add up")]
    Overflow,
    #[error("must be 1..={max}, got {got}")]
    OutOfRange { got: u64, max: u64 },
    #[error("{0:?} is not a phone number; write it as +7XXXXXXXXXX")]
    Phone(String),
    #[error("{0:?} is not an e-mail address")]
    Email(String),
    #[error("is required for a correction receipt")]
    CorrectionRequired,
    #[error("is only allowed on a correction receipt")]
    CorrectionNotAllowed,
    #[error("{0} is not a valid calendar date")]
    Date(String),
    #[error("must be zero: the item's price and quantity are zero")]
    NonZero,
    #[error("must not be zero")]
    Zero,
}

fn err(field: impl Into<String>, problem: Problem) -> ValidationError {
    ValidationError {
        field: field.into(),
        problem,
    }
}

fn check_text(field: &str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.trim().is_empty() {
        return Err(err(field, Problem::Empty));
    }
    let len = s.chars().count();
    if len > max {
        return Err(err(field, Problem::TooLong { len, max }));
    }
    Ok(())
}

/// Price × quantity rounded half-up to the kopeck; `None` on overflow.
pub fn line_amount(price: Kopecks, quantity: Quantity) -> Option<Kopecks> {
    let exact = u128::from(price.0) * u128::from(quantity.0);
    let rounded = (exact + 500) / 1000;
    u64::try_from(rounded).ok().map(Kopecks)
}

/// Checks a phone number's shape: `+` and 11–15 digits, or 10–15 digits.
pub fn is_phone(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    let n = digits.len();
    digits.bytes().all(|b| b.is_ascii_digit())
        && if s.starts_with('+') {
            (11..=15).contains(&n)
        } else {
            (10..=15).contains(&n)
        }
}

/// Checks an e-mail address's shape: one `@`, a local part, a dotted domain, no spaces.
pub fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.chars().any(char::is_whitespace)
        && s.chars().count() <= limits::CONTACT_CHARS
}

impl Receipt {
    /// Sum of the items' amounts.
    pub fn total(&self) -> Option<Kopecks> {
        self.items
            .iter()
            .try_fold(Kopecks(0), |acc, i| acc.checked_add(i.amount))
    }

    /// Applies the rules the register and the tax service apply. The first problem found is
    /// returned, with the path of the field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.items.is_empty() {
            return Err(err("items", Problem::Empty));
        }
        if self.items.len() > limits::ITEMS {
            return Err(err(
                "items",
                Problem::TooMany {
                    len: self.items.len(),
                    max: limits::ITEMS,
                },
            ));
        }
        for (i, item) in self.items.iter().enumerate() {
            let f = |name: &str| format!("items[{i}].{name}");
            check_text(&f("label"), &item.label, limits::LABEL_CHARS)?;
            if item.quantity.0 == 0 {
                return Err(err(f("quantity"), Problem::Zero));
            }
            let expected = line_amount(item.price, item.quantity)
                .ok_or_else(|| err(f("amount"), Problem::Overflow))?;
            if expected != item.amount {
                return Err(err(
                    f("amount"),
                    Problem::AmountMismatch {
                        expected,
                        got: item.amount,
                    },
                ));
            }
            let subject = u64::from(item.payment_subject.0);
            if !(1..=u64::from(PaymentSubject::MAX)).contains(&subject) {
                return Err(err(
                    f("paymentSubject"),
                    Problem::OutOfRange {
                        got: subject,
                        max: u64::from(PaymentSubject::MAX),
                    },
                ));
            }
        }
        let items = self
            .total()
            .ok_or_else(|| err("items", Problem::Overflow))?;
        let payments = self
            .payments
            .total()
            .ok_or_else(|| err("payments", Problem::Overflow))?;
        if items != payments {
            return Err(err("payments", Problem::TotalMismatch { items, payments }));
        }
        if let Some(phone) = &self.phone {
            if !is_phone(phone) {
                return Err(err("phone", Problem::Phone(phone.clone())));
            }
        }
        if let Some(email) = &self.email {
            if !is_email(email) {
                return Err(err("email", Problem::Email(email.clone())));
            }
        }
        for (name, person) in [("cashier", &self.cashier), ("client", &self.client)] {
            if let Some(p) = person {
                check_text(&format!("{name}.name"), &p.name, limits::NAME_CHARS)?;
                if let Some(inn) = &p.inn {
                    validate_inn(inn).map_err(|e| err(format!("{name}.inn"), Problem::Inn(e)))?;
                }
            }
        }
        for (name, text) in [
            ("settlementAddress", &self.settlement_address),
            ("settlementPlace", &self.settlement_place),
        ] {
            if let Some(t) = text {
                check_text(name, t, limits::NAME_CHARS)?;
            }
        }
        match (&self.correction, self.kind.is_correction()) {
            (None, true) => return Err(err("correction", Problem::CorrectionRequired)),
            (Some(_), false) => return Err(err("correction", Problem::CorrectionNotAllowed)),
            (Some(c), true) => {
                check_text("correction.description", &c.description, limits::NAME_CHARS)?;
                if !c.date.is_valid() {
                    return Err(err(
                        "correction.date",
                        Problem::Date(format!(
                            "{:04}-{:02}-{:02}",
                            c.date.year, c.date.month, c.date.day
                        )),
                    ));
                }
                if c.number.chars().count() > limits::NAME_CHARS {
                    return Err(err(
                        "correction.number",
                        Problem::TooLong {
                            len: c.number.chars().count(),
                            max: limits::NAME_CHARS,
                        },
                    ));
                }
            }
            (None, false) => {}
        }
        Ok(())
    }
}

/// What a register must be registered with, and what its FN must speak, to fiscalize a receipt
/// (DESIGN.md §4: "whose registration allows the receipt"). One rule for three places: the
/// balancer routes by it, the API refuses a receipt that no register of the organisation could
/// ever take (instead of queueing it forever), and the simulated register refuses it as a real one
/// would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirements {
    pub taxation: TaxationSystem,
    /// No buyer contact (tag 1008): the receipt exists only on paper, so a register registered
    /// for internet settlements only (tag 1108), which prints nothing, cannot take it.
    pub needs_paper: bool,
    /// The oldest FFD that can carry the receipt, with the first field that needs it (model path).
    /// `None`: any FFD we speak (1.05 and later).
    pub ffd: Option<(FfdVersion, String)>,
}

impl Receipt {
    pub fn requirements(&self) -> Requirements {
        // Tag 1199 codes 7..=12 (VAT 5 %, 7 %, 22 % and their calculated forms) exist only in
        // FFD 1.2; an FN speaking 1.05 or 1.1 refuses them.
        let ffd = self
            .items
            .iter()
            .position(|i| i.vat.code() > 6)
            .map(|i| (FfdVersion::V1_2, format!("items[{i}].vat")));
        Requirements {
            taxation: self.taxation,
            needs_paper: self.email.is_none() && self.phone.is_none(),
            ffd,
        }
    }
}

impl Requirements {
    /// Whether a register registered for `registered` taxation systems, with internet mode
    /// `internet`, whose FN speaks `ffd`, may fiscalize the receipt.
    pub fn check(
        &self,
        registered: &[TaxationSystem],
        internet: bool,
        ffd: FfdVersion,
    ) -> Result<(), Mismatch> {
        if !registered.contains(&self.taxation) {
            return Err(Mismatch::Taxation {
                receipt: self.taxation,
                registered: registered.to_vec(),
            });
        }
        if internet && self.needs_paper {
            return Err(Mismatch::NeedsContact);
        }
        if let Some((needs, field)) = &self.ffd {
            if ffd < *needs {
                return Err(Mismatch::Ffd {
                    field: field.clone(),
                    needs: *needs,
                    has: ffd,
                });
            }
        }
        Ok(())
    }
}

/// Why a register's registration does not allow a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Mismatch {
    #[error("taxation system {receipt:?} is not among the registered ones {registered:?}")]
    Taxation {
        receipt: TaxationSystem,
        registered: Vec<TaxationSystem>,
    },
    #[error(
        "the register is registered for internet settlements only (tag 1108) and prints nothing, \
         so the receipt needs the buyer's e-mail or phone (tag 1008)"
    )]
    NeedsContact,
    #[error("needs FFD {needs}, and the FN speaks FFD {has}")]
    Ffd {
        field: String,
        needs: FfdVersion,
        has: FfdVersion,
    },
}

impl Mismatch {
    /// The receipt field (model path, as in [`ValidationError::field`]) a shop would change.
    pub fn field(&self) -> &str {
        match self {
            Mismatch::Taxation { .. } => "taxation",
            Mismatch::NeedsContact => "email",
            Mismatch::Ffd { field, .. } => field,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Receipt {
        Receipt {
            kind: ReceiptType::Income,
            taxation: TaxationSystem::Common,
            items: vec![Item {
                label: "Молоко 3,2%".into(),
                price: Kopecks(8990),
                quantity: Quantity(2000),
                amount: Kopecks(17980),
                vat: VatRate::Vat10,
                payment_method: PaymentMethod::FullPayment,
                payment_subject: PaymentSubject::GOODS,
                measure: Measure::Piece,
            }],
            payments: Payments {
                electronic: Kopecks(17980),
                ..Payments::default()
            },
            email: Some("buyer@example.ru".into()),
            phone: None,
            cashier: None,
            client: None,
            correction: None,
            settlement_address: None,
            settlement_place: None,
        }
    }

    /// Every combination of the receipt's side (VAT rate, contact) and the register's side
    /// (internet mode, FFD, taxation systems) against the rule written out by hand.
    #[test]
    fn requirements_match_registrations_exhaustively() {
        let ffds = [FfdVersion::V1_05, FfdVersion::V1_1, FfdVersion::V1_2];
        for vat in VatRate::ALL {
            for (email, phone) in [
                (None, None),
                (Some("a@b.ru"), None),
                (None, Some("+79990001122")),
            ] {
                let mut r = sample();
                r.items.push(Item {
                    vat,
                    ..r.items[0].clone()
                });
                r.email = email.map(str::to_owned);
                r.phone = phone.map(str::to_owned);
                let needs = r.requirements();
                let contact = email.is_some() || phone.is_some();
                for internet in [false, true] {
                    for ffd in ffds {
                        for registered in
                            [vec![TaxationSystem::Common], vec![TaxationSystem::Patent]]
                        {
                            let got = needs.check(&registered, internet, ffd);
                            let expected = if !registered.contains(&TaxationSystem::Common) {
                                Some("taxation")
                            } else if internet && !contact {
                                Some("email")
                            } else if vat.code() > 6 && ffd < FfdVersion::V1_2 {
                                Some("items[1].vat")
                            } else {
                                None
                            };
                            assert_eq!(
                                got.as_ref().err().map(Mismatch::field),
                                expected,
                                "{vat:?} contact={contact} internet={internet} ffd={ffd} {registered:?}: {got:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn field_of(r: &Receipt) -> String {
        r.validate().err().map(|e| e.field).unwrap_or_default()
    }

    #[test]
    fn a_good_receipt_passes() {
        assert_eq!(sample().validate(), Ok(()));
    }

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(Kopecks::parse_rubles("12.34"), Ok(Kopecks(1234)));
        assert_eq!(Kopecks::parse_rubles("12.3"), Ok(Kopecks(1230)));
        assert_eq!(Kopecks::parse_rubles("12"), Ok(Kopecks(1200)));
        assert_eq!(Kopecks::parse_rubles("0.10"), Ok(Kopecks(10)));
        assert_eq!(Kopecks::parse_rubles("1.230"), Ok(Kopecks(123)));
        assert!(matches!(
            Kopecks::parse_rubles("1.234"),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(Kopecks::parse_rubles("-1").is_err());
        assert!(Kopecks::parse_rubles("1e3").is_err());
        assert!(Kopecks::parse_rubles("").is_err());
        assert!(Kopecks::parse_rubles("1.").is_err());
        assert!(matches!(
            Kopecks::parse_rubles("999999999999999999999"),
            Err(AmountError::TooLarge(_))
        ));
        assert_eq!(Quantity::parse("0.125"), Ok(Quantity(125)));
        assert_eq!(Kopecks(17980).to_string(), "179.80");
        assert_eq!(Quantity(1500).to_string(), "1.500");
    }

    #[test]
    fn amount_must_equal_price_times_quantity_to_the_kopeck() {
        let mut r = sample();
        r.items[0].amount = Kopecks(17981);
        r.payments.electronic = Kopecks(17981);
        let e = r.validate().err();
        assert_eq!(
            e.map(|e| (e.field, e.problem)),
            Some((
                "items[0].amount".into(),
                Problem::AmountMismatch {
                    expected: Kopecks(17980),
                    got: Kopecks(17981)
                }
            ))
        );
        // 0.333 kg at 100.01 ₽ = 33.30333 → 33.30 ₽.
        assert_eq!(
            line_amount(Kopecks(10001), Quantity(333)),
            Some(Kopecks(3330))
        );
        // Half a kopeck rounds up.
        assert_eq!(line_amount(Kopecks(1), Quantity(500)), Some(Kopecks(1)));
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut r = sample();
        r.items.clear();
        assert_eq!(field_of(&r), "items");

        let mut r = sample();
        r.items[0].label = "x".repeat(129);
        assert_eq!(field_of(&r), "items[0].label");
        r.items[0].label = "ж".repeat(128);
        assert_eq!(r.validate(), Ok(()));

        let mut r = sample();
        r.payments.electronic = Kopecks(1);
        assert_eq!(field_of(&r), "payments");

        let mut r = sample();
        r.phone = Some("12345".into());
        assert_eq!(field_of(&r), "phone");
        r.phone = Some("+79161234567".into());
        assert_eq!(r.validate(), Ok(()));

        let mut r = sample();
        r.email = Some("not-an-email".into());
        assert_eq!(field_of(&r), "email");

        let mut r = sample();
        r.client = Some(Person {
            name: "ООО Ромашка".into(),
            inn: Some("3245001417".into()),
        });
        assert_eq!(field_of(&r), "client.inn");

        let mut r = sample();
        r.items[0].payment_subject = PaymentSubject(34);
        assert_eq!(field_of(&r), "items[0].paymentSubject");

        let mut r = sample();
        r.items[0].quantity = Quantity(0);
        assert_eq!(field_of(&r), "items[0].quantity");

        let mut r = sample();
        r.items = vec![r.items[0].clone(); limits::ITEMS + 1];
        assert_eq!(field_of(&r), "items");

        let mut r = sample();
        r.kind = ReceiptType::IncomeCorrection;
        assert_eq!(field_of(&r), "correction");
        r.correction = Some(Correction {
            by_instruction: false,
            description: "Сбой ККТ".into(),
            date: CalendarDate {
                year: 2026,
                month: 2,
                day: 30,
            },
            number: "1".into(),
        });
        assert_eq!(field_of(&r), "correction.date");
    }

    #[test]
    fn calendar_dates() {
        let d = CalendarDate {
            year: 2026,
            month: 12,
            day: 4,
        };
        assert_eq!(d.days_since_epoch() * 86_400, 1_796_342_400);
        assert!(CalendarDate {
            year: 2024,
            month: 2,
            day: 29
        }
        .is_valid());
        assert!(!CalendarDate {
            year: 2025,
            month: 2,
            day: 29
        }
        .is_valid());
    }
}
