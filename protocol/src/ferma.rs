//! The Ferma (OFD.ru cloud KKT) JSON contract: request parsers and answer shapes
//! (reference/ferma-api.md). No I/O: the HTTP layer hands a body in and serialises what comes back.
//!
//! Requests are read by walking a [`serde_json::Value`] rather than by deriving `Deserialize`,
//! because existing Ferma clients are sloppy in ways the real service forgives: numbers sent as
//! strings and strings as numbers, `null` for "absent", unknown fields, keys in another case (the
//! real service is case-insensitive), bodies with or without the `{"Request": ...}` wrapper. Walking
//! the tree also lets every error name the field by its Ferma path, and keeps the `Request` object
//! exactly as received so that the registry can echo it back.
//!
//! Error paths always start with `Request.`, even when the client left the wrapper out, so that one
//! message format matches Ferma's documentation whatever the client sent.

use crate::checksum::validate_inn;
use crate::receipt::{
    limits, line_amount, AmountError, CalendarDate, Correction, Item, Kopecks, Measure, Mismatch,
    PaymentMethod, PaymentSubject, Payments, Person, Problem, Quantity, Receipt, ReceiptType,
    TaxationSystem, ValidationError, VatRate,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};
use std::fmt;
use thiserror::Error;

/// Ferma error codes, as clients branch on them. Never 0: some clients treat 0 as success.
pub mod codes {
    /// Malformed JSON, a value of the wrong JSON type, a missing body or wrapper.
    pub const BAD_REQUEST: i32 = 1000;
    /// Token expired or unknown: clients log in again and resend.
    pub const AUTH: i32 = 1001;
    /// Wrong login or password.
    pub const LOGIN: i32 = 1002;
    /// A field is present with the right JSON type but an invalid value (the message names it).
    pub const VALIDATION: i32 = 1010;
    /// No such receipt.
    pub const NOT_FOUND: i32 = 1018;
    /// The InvoiceId is taken; see [`super::FermaError::invoice_exists`].
    pub const INVOICE_EXISTS: i32 = 1019;
    /// The INN is not one the account may fiscalize for.
    pub const FORBIDDEN_INN: i32 = 1020;
    /// The INN's queue is full (HTTP 503 with Retry-After).
    pub const OVERLOADED: i32 = 1030;
    pub const INTERNAL: i32 = 1500;
}

use codes::{BAD_REQUEST, VALIDATION};

/// Longest `InvoiceId` accepted. Long enough for the composite ids CMS modules build
/// (site, order, timestamp, random suffix), short enough to stay a cheap index key.
pub const INVOICE_ID_MAX_CHARS: usize = 128;

/// Longest `CallbackUrl` accepted; longer URLs are refused by common HTTP servers anyway.
pub const CALLBACK_URL_MAX_CHARS: usize = 2048;

/// An error as a Ferma client receives it: a code to branch on and a message for a human that
/// names the field by its Ferma path and says what to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct FermaError {
    pub code: i32,
    /// The Ferma path of the offending field (`Request.CustomerReceipt.Items[2].Amount`), when one is
    /// to blame.
    pub field: Option<String>,
    pub message: String,
}

impl FermaError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        FermaError {
            code,
            field: None,
            message: message.into(),
        }
    }

    /// An error about one field; the message starts with its path so that it reads on its own.
    pub fn at(code: i32, field: impl Into<String>, problem: impl fmt::Display) -> Self {
        let field = field.into();
        FermaError {
            code,
            message: format!("{field}: {problem}"),
            field: Some(field),
        }
    }

    pub fn validation(field: impl Into<String>, problem: impl fmt::Display) -> Self {
        Self::at(VALIDATION, field, problem)
    }

    pub fn bad_request(field: impl Into<String>, problem: impl fmt::Display) -> Self {
        Self::at(BAD_REQUEST, field, problem)
    }

    /// Error 1019. Clients recover the existing receipt with the regex `--([a-f0-9-]+)--`, so the id
    /// sits between double dashes at the end, and double dashes inside the shown InvoiceId are
    /// collapsed so that the regex cannot match there first.
    pub fn invoice_exists(invoice_id: &str, receipt_id: &str) -> Self {
        let mut shown = String::with_capacity(invoice_id.len());
        for c in invoice_id.chars() {
            if !(c == '-' && shown.ends_with('-')) {
                shown.push(c);
            }
        }
        FermaError {
            code: codes::INVOICE_EXISTS,
            field: Some("Request.InvoiceId".into()),
            message: format!("Чек с InvoiceId «{shown}» уже существует --{receipt_id}--"),
        }
    }

    /// The HTTP status to answer with. Clients branch on the envelope's `Status`, not on this, but
    /// the reference requires a non-200 code for failures.
    pub fn http_status(&self) -> u16 {
        match self.code {
            codes::AUTH | codes::LOGIN => 401,
            codes::FORBIDDEN_INN => 403,
            codes::NOT_FOUND => 404,
            codes::INVOICE_EXISTS => 409,
            codes::OVERLOADED => 503,
            codes::INTERNAL => 500,
            _ => 400,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Envelopes and answer shapes
// ---------------------------------------------------------------------------------------------

/// `{"Status":"Success","Data":...}`. Data that cannot be encoded as JSON (a map with non-string
/// keys) is a bug on our side and becomes an INTERNAL failure envelope rather than a panic.
pub fn success(data: impl Serialize) -> Value {
    match serde_json::to_value(data) {
        Ok(data) => json!({ "Status": "Success", "Data": data }),
        Err(e) => failure(&FermaError::new(
            codes::INTERNAL,
            format!("the answer could not be encoded: {e}"),
        )),
    }
}

/// `{"Status":"Failed","Error":{"Code":..,"Message":..}}`. The field path is already in the message;
/// Ferma's error object has no other members and some clients map it onto a fixed type.
pub fn failure(err: &FermaError) -> Value {
    json!({ "Status": "Failed", "Error": { "Code": err.code, "Message": err.message } })
}

/// `Data` of CreateAuthToken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthTokenData {
    #[serde(rename = "AuthToken")]
    pub auth_token: String,
    /// Local naive time, like every `...Utc` field Ferma sends.
    #[serde(rename = "ExpirationDateUtc")]
    pub expiration_date_utc: String,
}

impl AuthTokenData {
    pub fn new(token: &str, expires: LocalSecs) -> Self {
        AuthTokenData {
            auth_token: token.to_owned(),
            expiration_date_utc: format_local(expires),
        }
    }
}

/// `Data` of a created receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptCreated {
    #[serde(rename = "ReceiptId")]
    pub receipt_id: String,
}

/// Receipt status as Ferma numbers and names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReceiptStatus {
    New,
    Processed,
    Confirmed,
    KktError,
}

impl ReceiptStatus {
    pub const ALL: [ReceiptStatus; 4] =
        [Self::New, Self::Processed, Self::Confirmed, Self::KktError];

    pub fn code(self) -> u8 {
        match self {
            Self::New => 0,
            Self::Processed => 1,
            Self::Confirmed => 2,
            Self::KktError => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::New => "NEW",
            Self::Processed => "PROCESSED",
            Self::Confirmed => "CONFIRMED",
            Self::KktError => "KKT_ERROR",
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Callbacks fire on these; nothing changes afterwards.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Confirmed | Self::KktError)
    }

    /// `StatusMessage` when the caller has nothing more specific. Typed clients (C#, Go) map the
    /// field onto a string, so it is never null.
    pub fn default_message(self) -> &'static str {
        match self {
            Self::New => "Чек принят и ожидает фискализации",
            Self::Processed => "Чек фискализирован, ожидается подтверждение ОФД",
            Self::Confirmed => "Чек передан в ОФД",
            Self::KktError => "Ошибка ККТ",
        }
    }
}

/// The register that fiscalized a receipt (`Data.Device` of the status answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    #[serde(rename = "DeviceId")]
    pub device_id: u64,
    #[serde(rename = "RNM")]
    pub rnm: String,
    #[serde(rename = "ZN")]
    pub zn: String,
    #[serde(rename = "FN")]
    pub fn_number: String,
    #[serde(rename = "FDN")]
    pub fdn: String,
    /// Decimal string: clients put it into the QR code as is.
    #[serde(rename = "FPD")]
    pub fpd: String,
    #[serde(rename = "ShiftNumber")]
    pub shift_number: u32,
    #[serde(rename = "ReceiptNumInShift", default)]
    pub receipt_num_in_shift: Option<u32>,
    #[serde(rename = "DeviceType")]
    pub device_type: String,
    #[serde(rename = "OfdReceiptUrl")]
    pub ofd_receipt_url: String,
}

/// `Data` of the status answer, and the body of a callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusData {
    #[serde(rename = "ReceiptId")]
    pub receipt_id: String,
    #[serde(rename = "StatusCode")]
    pub status_code: u8,
    #[serde(rename = "StatusName")]
    pub status_name: String,
    #[serde(rename = "StatusMessage")]
    pub status_message: String,
    /// Local naive time despite the name, as the real service sends it.
    #[serde(rename = "ModifiedDateUtc")]
    pub modified_date_utc: String,
    #[serde(rename = "ReceiptDateUtc")]
    pub receipt_date_utc: String,
    #[serde(rename = "ModifiedDateTimeIso")]
    pub modified_date_time_iso: String,
    #[serde(rename = "ReceiptDateTimeIso")]
    pub receipt_date_time_iso: String,
    /// `null` until the receipt is fiscalized.
    #[serde(rename = "Device")]
    pub device: Option<Device>,
}

impl StatusData {
    /// `message: None` uses [`ReceiptStatus::default_message`].
    pub fn new(
        receipt_id: &str,
        status: ReceiptStatus,
        message: Option<String>,
        modified: LocalSecs,
        receipt_date: LocalSecs,
        device: Option<Device>,
    ) -> Self {
        StatusData {
            receipt_id: receipt_id.to_owned(),
            status_code: status.code(),
            status_name: status.name().to_owned(),
            status_message: message.unwrap_or_else(|| status.default_message().to_owned()),
            modified_date_utc: format_local(modified),
            receipt_date_utc: format_local(receipt_date),
            modified_date_time_iso: format_iso(modified),
            receipt_date_time_iso: format_iso(receipt_date),
            device,
        }
    }

    pub fn status(&self) -> Option<ReceiptStatus> {
        ReceiptStatus::from_code(self.status_code)
    }
}

/// `cashboxInfoHolder` of a registry item. Its names are camel case where the rest of Ferma is
/// Pascal case; clients read them as the real service spells them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CashboxInfo {
    #[serde(rename = "DeviceId")]
    pub device_id: u64,
    #[serde(rename = "FDN")]
    pub fdn: String,
    #[serde(rename = "FN")]
    pub fn_number: String,
    #[serde(rename = "FPD")]
    pub fpd: String,
    #[serde(rename = "RNM")]
    pub rnm: String,
    #[serde(rename = "ZN")]
    pub zn: String,
    #[serde(rename = "checkNumInShift", default)]
    pub check_num_in_shift: Option<u32>,
    #[serde(rename = "shiftNum")]
    pub shift_num: u32,
    /// Rubles as a JSON number (`179.8`), like every amount in the Ferma API.
    #[serde(
        rename = "totalSum",
        serialize_with = "rubles_out",
        deserialize_with = "rubles_in"
    )]
    pub total_sum: Kopecks,
}

impl CashboxInfo {
    pub fn from_device(device: &Device, total: Kopecks) -> Self {
        CashboxInfo {
            device_id: device.device_id,
            fdn: device.fdn.clone(),
            fn_number: device.fn_number.clone(),
            fpd: device.fpd.clone(),
            rnm: device.rnm.clone(),
            zn: device.zn.clone(),
            check_num_in_shift: device.receipt_num_in_shift,
            shift_num: device.shift_number,
            total_sum: total,
        }
    }
}

/// `k / 100` as an f64 is the double nearest the decimal (the division is correctly rounded and
/// both operands are exact below 2^53), so its shortest representation prints the exact rubles.
fn rubles_out<S: Serializer>(k: &Kopecks, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(k.0 as f64 / 100.0)
}

fn rubles_in<'de, D: Deserializer<'de>>(d: D) -> Result<Kopecks, D::Error> {
    let v = Value::deserialize(d)?;
    money(&v, "totalSum").map_err(serde::de::Error::custom)
}

/// One entry of the `list` / `list2` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryItem {
    #[serde(rename = "ReceiptId")]
    pub receipt_id: String,
    #[serde(rename = "InvoiceId")]
    pub invoice_id: String,
    #[serde(rename = "StatusCode")]
    pub status_code: u8,
    #[serde(rename = "StatusName")]
    pub status_name: String,
    #[serde(rename = "StatusMessage")]
    pub status_message: String,
    #[serde(rename = "ModifiedDateUtc")]
    pub modified_date_utc: String,
    #[serde(rename = "ReceiptDateUtc")]
    pub receipt_date_utc: String,
    #[serde(rename = "ModifiedDateTimeIso")]
    pub modified_date_time_iso: String,
    #[serde(rename = "ReceiptDateTimeIso")]
    pub receipt_date_time_iso: String,
    /// The client's `Request` with `cashboxInfoHolder` added.
    #[serde(rename = "Receipt")]
    pub receipt: Value,
}

/// Builds a registry entry. `request` is echoed with `cashboxInfoHolder` set (`null` until
/// fiscalized); a request that is not a JSON object (never the case for one that
/// [`parse_create_receipt`] accepted) is echoed unchanged.
pub fn registry_item(
    status: &StatusData,
    invoice_id: &str,
    request: &Value,
    cashbox: Option<CashboxInfo>,
) -> RegistryItem {
    let mut receipt = request.clone();
    if let Value::Object(map) = &mut receipt {
        let holder = cashbox
            .and_then(|c| serde_json::to_value(c).ok())
            .unwrap_or(Value::Null);
        map.insert("cashboxInfoHolder".into(), holder);
    }
    RegistryItem {
        receipt_id: status.receipt_id.clone(),
        invoice_id: invoice_id.to_owned(),
        status_code: status.status_code,
        status_name: status.status_name.clone(),
        status_message: status.status_message.clone(),
        modified_date_utc: status.modified_date_utc.clone(),
        receipt_date_utc: status.receipt_date_utc.clone(),
        modified_date_time_iso: status.modified_date_time_iso.clone(),
        receipt_date_time_iso: status.receipt_date_time_iso.clone(),
        receipt,
    }
}

/// The receipt QR string (FNS format) clients print: `t=YYYYMMDDTHHMM&s=<rubles>&fn=&i=&fp=&n=`,
/// where `n` is the settlement sign (1 income, 2 income return, 3 expense, 4 expense return).
pub fn qr_string(
    date_time: LocalSecs,
    total: Kopecks,
    fn_number: &str,
    fdn: &str,
    fpd: &str,
    kind: ReceiptType,
) -> String {
    let c = Civil::from_local(date_time);
    format!(
        "t={:04}{:02}{:02}T{:02}{:02}&s={total}&fn={fn_number}&i={fdn}&fp={fpd}&n={}",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        kind.settlement_sign()
    )
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// Local (Moscow, naive) seconds since 1970-01-01T00:00:00 — the wall-clock reading encoded like a
/// Unix time. Ferma's dates are all Moscow wall-clock readings, and registers stamp documents the
/// same way, so keeping this form avoids a conversion at every boundary.
pub type LocalSecs = i64;

/// Moscow has kept UTC+3 all year since 2014.
pub const MOSCOW_OFFSET_SECS: i64 = 3 * 3600;

pub fn local_from_unix(unix_secs: i64) -> LocalSecs {
    unix_secs.saturating_add(MOSCOW_OFFSET_SECS)
}

/// `"YYYY-MM-DDTHH:MM:SS"`, the zone-less layout clients parse `...Utc` fields with.
pub fn format_local(t: LocalSecs) -> String {
    let c = Civil::from_local(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// `"YYYY-MM-DDTHH:MM:SS+03:00"` for the `...DateTimeIso` fields.
pub fn format_iso(t: LocalSecs) -> String {
    format!("{}+03:00", format_local(t))
}

/// Reads a date-time the way clients write them: `YYYY-MM-DDTHH:MM[:SS[.fff]]` (a space for the
/// `T` too), optionally with `Z` or an offset — converted to Moscow time — and the legacy
/// `DD.MM.YYYY HH:MM[:SS]` of `LocalDate`. Fractions of a second are dropped. Date-only strings are
/// refused: as an end date, midnight would silently exclude the day the client meant.
pub fn parse_local(s: &str) -> Option<LocalSecs> {
    let mut c = Cursor(s.trim().as_bytes());
    let (year, month, day) = if c.0.get(2) == Some(&b'.') {
        let day = c.digits(2)?;
        c.eat(b'.').then_some(())?;
        let month = c.digits(2)?;
        c.eat(b'.').then_some(())?;
        (c.digits(4)?, month, day)
    } else {
        let year = c.digits(4)?;
        c.eat(b'-').then_some(())?;
        let month = c.digits(2)?;
        c.eat(b'-').then_some(())?;
        (year, month, c.digits(2)?)
    };
    if !(c.eat(b'T') || c.eat(b't') || c.eat(b' ')) {
        return None;
    }
    let hour = c.digits(2)?;
    c.eat(b':').then_some(())?;
    let minute = c.digits(2)?;
    let mut second = 0;
    if c.eat(b':') {
        second = c.digits(2)?;
        if (c.eat(b'.') || c.eat(b',')) && c.skip_digits() == 0 {
            return None;
        }
    }
    let offset = if c.eat(b'Z') || c.eat(b'z') {
        Some(0)
    } else if let Some(sign) = c.sign() {
        let h = c.digits(2)?;
        c.eat(b':');
        let m = if c.0.is_empty() { 0 } else { c.digits(2)? };
        if h > 23 || m > 59 {
            return None;
        }
        Some(sign * (h * 3600 + m * 60))
    } else {
        None
    };
    if !c.0.is_empty()
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let naive = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let local = match offset {
        Some(off) => naive - off + MOSCOW_OFFSET_SECS,
        None => naive,
    };
    // An offset can move the moment out of the four-digit years (9999-12-31T23:00-05:00 is
    // 10000-01-01 in Moscow), which `format_local` could not print back in this layout.
    let years = days_from_civil(0, 1, 1) * 86_400..days_from_civil(10_000, 1, 1) * 86_400;
    years.contains(&local).then_some(local)
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    /// Exactly `n` ASCII digits.
    fn digits(&mut self, n: usize) -> Option<i64> {
        let (head, rest) = self.0.split_at_checked(n)?;
        if !head.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.0 = rest;
        Some(
            head.iter()
                .fold(0i64, |acc, b| acc * 10 + i64::from(b - b'0')),
        )
    }

    fn skip_digits(&mut self) -> usize {
        let n = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
        self.0 = &self.0[n..];
        n
    }

    fn eat(&mut self, b: u8) -> bool {
        match self.0.split_first() {
            Some((first, rest)) if *first == b => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    fn sign(&mut self) -> Option<i64> {
        if self.eat(b'+') {
            Some(1)
        } else if self.eat(b'-') {
            Some(-1)
        } else {
            None
        }
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A broken-down local time. Total over `i64`: no arithmetic here can overflow for any input.
struct Civil {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
}

impl Civil {
    fn from_local(t: LocalSecs) -> Civil {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: secs / 3600,
            minute: secs % 3600 / 60,
            second: secs % 60,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON walking
// ---------------------------------------------------------------------------------------------

const RQ: &str = "Request";
const CR: &str = "Request.CustomerReceipt";

/// `None` for an empty body. A UTF-8 BOM (sent by some Windows clients) is skipped.
fn parse_json(body: &[u8]) -> Result<Option<Value>, FermaError> {
    let body = body.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(body);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map(Some).map_err(|e| {
        FermaError::new(
            BAD_REQUEST,
            format!("the body is not valid JSON ({e}); send a UTF-8 JSON object"),
        )
    })
}

fn require_body(body: &[u8], example: &str) -> Result<Value, FermaError> {
    parse_json(body)?.ok_or_else(|| {
        FermaError::new(
            BAD_REQUEST,
            format!("the body is empty; send a JSON object like {example}"),
        )
    })
}

/// The `Request` object, or the body itself when the client left the wrapper out. `"Request": null`
/// reads as an empty request.
fn into_request(body: Value) -> Result<Map<String, Value>, FermaError> {
    let mut top = match body {
        Value::Object(map) => map,
        other => {
            return Err(FermaError::new(
                BAD_REQUEST,
                format!(
                    "the body must be a JSON object like {{\"Request\": {{...}}}}, got {}",
                    kind(&other)
                ),
            ))
        }
    };
    let Some(key) = key_of(&top, RQ).map(str::to_owned) else {
        return Ok(top);
    };
    match top.remove(&key) {
        Some(Value::Object(r)) => Ok(r),
        Some(Value::Null) | None => Ok(Map::new()),
        Some(other) => Err(FermaError::bad_request(
            RQ,
            format!("must be a JSON object, got {}", kind(&other)),
        )),
    }
}

/// The key spelled `name`, or failing that spelled like it in another case: the real service
/// matches keys case-insensitively and clients rely on it.
fn key_of<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    if let Some((k, _)) = map.get_key_value(name) {
        return Some(k.as_str());
    }
    map.keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .map(String::as_str)
}

/// The member `name`, treating `null` as absent.
fn get<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    key_of(map, name)
        .and_then(|k| map.get(k))
        .filter(|v| !v.is_null())
}

fn sub(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required<'a>(
    map: &'a Map<String, Value>,
    prefix: &str,
    name: &str,
    hint: &str,
) -> Result<&'a Value, FermaError> {
    get(map, name)
        .ok_or_else(|| FermaError::validation(sub(prefix, name), format!("is required; {hint}")))
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, FermaError> {
    v.as_object().ok_or_else(|| {
        FermaError::bad_request(path, format!("must be a JSON object, got {}", kind(v)))
    })
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a [Value], FermaError> {
    v.as_array().map(Vec::as_slice).ok_or_else(|| {
        FermaError::bad_request(path, format!("must be a JSON array, got {}", kind(v)))
    })
}

/// A float in plain decimal: Rust's `Display` gives the shortest representation that reads back
/// to the same double, and never an exponent.
fn float_text(f: f64) -> String {
    if f == 0.0 {
        "0".into()
    } else {
        format!("{f}")
    }
}

fn number_text(n: &serde_json::Number) -> String {
    if let Some(u) = n.as_u64() {
        u.to_string()
    } else if let Some(i) = n.as_i64() {
        i.to_string()
    } else {
        n.as_f64().map(float_text).unwrap_or_default()
    }
}

/// A string member; numbers are taken as their decimal text because PHP modules send order ids and
/// INNs as integers.
fn text(v: &Value, path: &str) -> Result<String, FermaError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(number_text(n)),
        other => Err(FermaError::bad_request(
            path,
            format!("must be a string, got {}", kind(other)),
        )),
    }
}

fn opt_text(
    map: &Map<String, Value>,
    prefix: &str,
    name: &str,
) -> Result<Option<String>, FermaError> {
    get(map, name)
        .map(|v| text(v, &sub(prefix, name)))
        .transpose()
}

/// Trimmed, and `None` when blank: CMS modules send `""` for "not given".
fn trimmed(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// A number or numeric string, as decimal text.
fn decimal_text(v: &Value, path: &str) -> Result<String, FermaError> {
    match v {
        Value::String(s) => Ok(s.trim().to_owned()),
        Value::Number(n) => Ok(number_text(n)),
        other => Err(FermaError::bad_request(
            path,
            format!("must be a number, got {}", kind(other)),
        )),
    }
}

fn whole(v: &Value, path: &str) -> Result<u64, FermaError> {
    let s = decimal_text(v, path)?;
    s.parse::<u64>().map_err(|_| {
        FermaError::validation(path, format!("{s:?} is not a whole non-negative number"))
    })
}

/// Parses a decimal with at most `decimals` places, forgiving binary-float noise: a value within
/// 1e-6 of a whole unit (PHP's `0.1 + 0.2` arriving as `0.30000000000000004`) is that unit. The
/// check is done on the decimal digits, so the forgiveness is exact and never rounds real money.
fn lenient_fixed(
    s: &str,
    decimals: usize,
    parse: fn(&str) -> Result<u64, AmountError>,
) -> Result<u64, AmountError> {
    let original = match parse(s) {
        Err(e @ AmountError::TooPrecise { .. }) => e,
        other => return other,
    };
    let Some((int, frac)) = s.split_once('.') else {
        return Err(original);
    };
    // `parse` accepted the digits, so `frac` is ASCII and longer than `decimals`.
    let Some((keep, rest)) = frac.split_at_checked(decimals) else {
        return Err(original);
    };
    // 1e-6 of the unit is 10^-(6 - decimals) of the last kept place: that many leading digits of
    // the remainder must all be 0 (just above) or all be 9 (just below).
    let noise = 6 - decimals;
    let base = parse(&format!("{int}.{keep}"))?;
    let head: Vec<u8> = rest
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(noise)
        .collect();
    if head.iter().all(|&b| b == b'0') {
        Ok(base)
    } else if rest.len() >= noise && head.iter().all(|&b| b == b'9') {
        base.checked_add(1)
            .ok_or_else(|| AmountError::TooLarge(s.to_owned()))
    } else {
        Err(original)
    }
}

fn amount_error(path: &str, s: &str, e: AmountError, what: &str) -> FermaError {
    match e {
        AmountError::NotANumber(_) => FermaError::validation(
            path,
            format!("{s:?} is not a number; send {what} as a JSON number like 123.45"),
        ),
        AmountError::TooPrecise { max, .. } => FermaError::validation(
            path,
            format!("{s} has more than {max} decimal places; round it to {max} places"),
        ),
        AmountError::TooLarge(_) => FermaError::validation(path, format!("{s} is too large")),
    }
}

/// The digits of a non-negative decimal. `-0` is zero (some serialisers write it); anything else
/// negative is refused because the direction of the money is the receipt `Type`'s business.
fn unsigned<'a>(s: &'a str, path: &str) -> Result<&'a str, FermaError> {
    match s.strip_prefix('-') {
        None => Ok(s),
        Some(rest) if rest.bytes().all(|b| b == b'0' || b == b'.') => Ok(rest),
        Some(_) => Err(FermaError::validation(
            path,
            format!(
                "is negative ({s}); send a positive amount, the receipt Type says which way the \
                 money goes"
            ),
        )),
    }
}

/// Rubles, from a JSON number or a numeric string.
fn money(v: &Value, path: &str) -> Result<Kopecks, FermaError> {
    let s = decimal_text(v, path)?;
    let digits = unsigned(&s, path)?;
    lenient_fixed(digits, 2, |x| Kopecks::parse_rubles(x).map(|k| k.0))
        .map(Kopecks)
        .map_err(|e| amount_error(path, &s, e, "rubles"))
}

fn quantity(v: &Value, path: &str) -> Result<Quantity, FermaError> {
    let s = decimal_text(v, path)?;
    let digits = unsigned(&s, path)?;
    lenient_fixed(digits, 3, |x| Quantity::parse(x).map(|q| q.0))
        .map(Quantity)
        .map_err(|e| amount_error(path, &s, e, "the quantity"))
}

/// Names compared without case and underscores, so `Vat20`, `VAT20` and `GIGA_CALORIE` /
/// `GIGACALORIE` all match.
fn norm(s: &str) -> String {
    s.trim()
        .chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// A unit variant's serde name: the names in receipt.rs are the Ferma names, kept in one place.
fn serde_name<T: Serialize>(v: T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

fn by_name<T: Copy + Serialize>(all: &[T], given: &str) -> Option<T> {
    let given = norm(given);
    all.iter().copied().find(|v| norm(&serde_name(*v)) == given)
}

fn names<T: Copy + Serialize>(all: &[T]) -> String {
    all.iter()
        .map(|v| serde_name(*v))
        .collect::<Vec<_>>()
        .join(", ")
}

const RECEIPT_TYPES: [ReceiptType; 10] = [
    ReceiptType::Income,
    ReceiptType::IncomeReturn,
    ReceiptType::IncomePrepayment,
    ReceiptType::IncomeReturnPrepayment,
    ReceiptType::Expense,
    ReceiptType::ExpenseReturn,
    ReceiptType::IncomeCorrection,
    ReceiptType::IncomeReturnCorrection,
    ReceiptType::BuyCorrection,
    ReceiptType::ExpenseReturnCorrection,
];

/// VAT names in the reference's order, for messages.
const VAT_RATES: [VatRate; 12] = [
    VatRate::VatNo,
    VatRate::Vat0,
    VatRate::Vat5,
    VatRate::Vat7,
    VatRate::Vat10,
    VatRate::Vat20,
    VatRate::Vat22,
    VatRate::CalculatedVat5105,
    VatRate::CalculatedVat7107,
    VatRate::CalculatedVat10110,
    VatRate::CalculatedVat20120,
    VatRate::CalculatedVat22122,
];

fn receipt_type(v: &Value, path: &str) -> Result<ReceiptType, FermaError> {
    let s = text(v, path)?;
    by_name(&RECEIPT_TYPES, &s).ok_or_else(|| {
        FermaError::validation(
            path,
            format!(
                "{s:?} is not a receipt type; use one of {}",
                names(&RECEIPT_TYPES)
            ),
        )
    })
}

/// Names, or their index in Ferma's order as a number or numeric string ("0".."5").
fn taxation(v: &Value, path: &str) -> Result<TaxationSystem, FermaError> {
    let s = text(v, path)?;
    let found = match s.trim().parse::<usize>() {
        Ok(n) => TaxationSystem::ALL.get(n).copied(),
        Err(_) => by_name(&TaxationSystem::ALL, &s),
    };
    found.ok_or_else(|| {
        FermaError::validation(
            path,
            format!(
                "{s:?} is not a taxation system; use one of {} (or 0..5 in that order)",
                names(&TaxationSystem::ALL)
            ),
        )
    })
}

/// The legacy 18 % names map to 20 %: when the rate changed in 2019 the FFD kept the codes (1 and
/// 3) and only the percentage moved, so a client still saying `Vat18` means what the register now
/// calls 20 %.
fn vat(v: &Value, path: &str) -> Result<VatRate, FermaError> {
    let s = text(v, path)?;
    let found = match norm(&s).as_str() {
        "vat18" => Some(VatRate::Vat20),
        "calculatedvat18118" => Some(VatRate::CalculatedVat20120),
        _ => by_name(&VAT_RATES, &s),
    };
    found.ok_or_else(|| {
        FermaError::validation(
            path,
            format!("{s:?} is not a VAT rate; use one of {}", names(&VAT_RATES)),
        )
    })
}

/// A Ferma name, or the FFD code (0, 10, 11, ... 255) as a number or numeric string.
fn measure(v: &Value, path: &str) -> Result<Measure, FermaError> {
    let s = text(v, path)?;
    let found = match s.trim().parse::<u8>() {
        Ok(code) => Measure::from_code(code),
        Err(_) => by_name(&Measure::ALL, &s),
    };
    found.ok_or_else(|| {
        FermaError::validation(
            path,
            format!(
                "{s:?} is not a measure; use one of {} (default PIECE)",
                names(&Measure::ALL)
            ),
        )
    })
}

fn payment_method(v: &Value, path: &str) -> Result<PaymentMethod, FermaError> {
    let n = whole(v, path)?;
    u8::try_from(n)
        .ok()
        .and_then(PaymentMethod::from_code)
        .ok_or_else(|| {
            FermaError::validation(
                path,
                format!(
                    "must be 1..7, got {n}; use 1 full prepayment, 2 prepayment, 3 advance, \
                     4 full payment, 5 partial payment and credit, 6 transfer on credit, \
                     7 credit payment"
                ),
            )
        })
}

fn payment_subject(v: &Value, path: &str) -> Result<PaymentSubject, FermaError> {
    let n = whole(v, path)?;
    match u8::try_from(n) {
        Ok(code @ 1..=PaymentSubject::MAX) => Ok(PaymentSubject(code)),
        _ => Err(FermaError::validation(
            path,
            format!(
                "must be 1..={}, got {n}; use a payment subject code (1 goods, 4 service, ...)",
                PaymentSubject::MAX
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// CreateAuthToken's body. `Debug` leaves the password out so that it cannot reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub login: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("login", &self.login)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// `{"Login","Password"}`, also inside `{"Request":{..}}`. An empty login or password is passed on:
/// "wrong login or password" (1002) is the answer that helps, and that is the caller's to give.
pub fn parse_credentials(body: &[u8]) -> Result<Credentials, FermaError> {
    let body = require_body(body, r#"{"Login": "...", "Password": "..."}"#)?;
    let r = into_request(body)?;
    let login = text(
        required(&r, "", "Login", "send the account's login")?,
        "Login",
    )?;
    let password = text(
        required(&r, "", "Password", "send the account's password")?,
        "Password",
    )?;
    Ok(Credentials { login, password })
}

/// A create-receipt request, checked and converted.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateReceipt {
    /// 10 or 12 digits with valid check digits.
    pub inn: String,
    /// As sent (not trimmed: it is the client's idempotency key), non-blank, at most
    /// [`INVOICE_ID_MAX_CHARS`] characters.
    pub invoice_id: String,
    /// `http://` or `https://` with a host.
    pub callback_url: Option<String>,
    /// Legacy `LocalDate`, not interpreted: the receipt is dated by the register.
    pub local_date: Option<String>,
    /// Built and [`Receipt::validate`]d.
    pub receipt: Receipt,
    /// The `Request` object as received (the body itself when unwrapped), for the registry echo.
    /// Key order is not kept: serde_json's map is sorted without its `preserve_order` feature.
    pub request: Value,
}

/// Where optional objects were found, so that errors from [`Receipt::validate`] name them where the
/// client put them.
struct Paths {
    cashier: String,
    correction: String,
}

/// Parses and validates a create-receipt body (receipts and corrections).
///
/// Defaults, as the CMS modules' minimal payloads need: `PaymentMethod` from the receipt type (full
/// payment, or full prepayment for prepayment receipts), item `PaymentType` from
/// `CustomerReceipt.PaymentType` else 1 (goods), `Measure` PIECE, `Amount` = Price × Quantity,
/// missing or empty `PaymentItems` = everything cashless, `CorrectionInfo.Type` SELF. A
/// `CorrectionInfo` on a non-correction type is ignored: the `Type` decides what the receipt is.
pub fn parse_create_receipt(body: &[u8]) -> Result<CreateReceipt, FermaError> {
    let body = require_body(body, r#"{"Request": {"Inn": ..., "Type": ..., ...}}"#)?;
    let request = into_request(body)?;
    let r = &request;

    let inn = text(
        required(r, RQ, "Inn", "send the seller's INN, 10 or 12 digits")?,
        "Request.Inn",
    )?
    .trim()
    .to_owned();
    validate_inn(&inn).map_err(|e| {
        FermaError::validation(
            "Request.Inn",
            format!("invalid INN {inn:?}: {e}; send the INN the register is registered to"),
        )
    })?;

    let kind = receipt_type(
        required(
            r,
            RQ,
            "Type",
            &format!("use one of {}", names(&RECEIPT_TYPES)),
        )?,
        "Request.Type",
    )?;

    let invoice_id = text(
        required(
            r,
            RQ,
            "InvoiceId",
            "send the order's unique id: it makes retries safe",
        )?,
        "Request.InvoiceId",
    )?;
    if invoice_id.trim().is_empty() {
        return Err(FermaError::validation(
            "Request.InvoiceId",
            "must not be blank; send the order's unique id: it makes retries safe",
        ));
    }
    let len = invoice_id.chars().count();
    if len > INVOICE_ID_MAX_CHARS {
        return Err(FermaError::validation(
            "Request.InvoiceId",
            format!("is {len} characters long; at most {INVOICE_ID_MAX_CHARS} are allowed"),
        ));
    }

    let callback_url = trimmed(opt_text(r, RQ, "CallbackUrl")?);
    if let Some(url) = &callback_url {
        check_callback_url(url)?;
    }
    let local_date = opt_text(r, RQ, "LocalDate")?.filter(|s| !s.trim().is_empty());

    let cr_value = required(
        r,
        RQ,
        "CustomerReceipt",
        "send the receipt's TaxationSystem and Items",
    )?;
    let cr = object(cr_value, CR)?;

    let taxation = taxation(
        required(
            cr,
            CR,
            "TaxationSystem",
            &format!(
                "use one of {} as the register is registered for",
                names(&TaxationSystem::ALL)
            ),
        )?,
        &sub(CR, "TaxationSystem"),
    )?;
    let default_subject = match get(cr, "PaymentType") {
        Some(v) => payment_subject(v, &sub(CR, "PaymentType"))?,
        None => PaymentSubject::GOODS,
    };
    let items = parse_items(cr, kind, default_subject)?;
    let total = items
        .iter()
        .try_fold(Kopecks(0), |acc, i| acc.checked_add(i.amount));
    let payments = parse_payments(cr, total)?;

    let email = trimmed(opt_text(cr, CR, "Email")?);
    let phone = trimmed(opt_text(cr, CR, "Phone")?).map(|p| normalise_phone(&p));

    let client = match get(cr, "ClientInfo") {
        Some(v) => person(v, &sub(CR, "ClientInfo"))?,
        None => None,
    };
    // Documented beside CustomerReceipt; some clients put it inside.
    let (cashier_value, cashier_path) = match (get(r, "Cashier"), get(cr, "Cashier")) {
        (None, Some(v)) => (Some(v), sub(CR, "Cashier")),
        (v, _) => (v, sub(RQ, "Cashier")),
    };
    let cashier = match cashier_value {
        Some(v) => person(v, &cashier_path)?,
        None => None,
    };
    let settlement_address = opt_text(cr, CR, "BillAddress")?.filter(|s| !s.trim().is_empty());

    // Documented inside CustomerReceipt; some clients put it beside it.
    let (correction_value, correction_path) =
        match (get(cr, "CorrectionInfo"), get(r, "CorrectionInfo")) {
            (None, Some(v)) => (Some(v), sub(RQ, "CorrectionInfo")),
            (v, _) => (v, sub(CR, "CorrectionInfo")),
        };
    let correction = match correction_value {
        Some(v) if kind.is_correction() => Some(correction(v, &correction_path)?),
        _ => None,
    };

    let receipt = Receipt {
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
        settlement_place: None,
    };
    let paths = Paths {
        cashier: cashier_path,
        correction: correction_path,
    };
    receipt
        .validate()
        .map_err(|e| from_validation(&e, &paths))?;

    Ok(CreateReceipt {
        inn,
        invoice_id,
        callback_url,
        local_date,
        receipt,
        request: Value::Object(request),
    })
}

fn check_callback_url(url: &str) -> Result<(), FermaError> {
    const PATH: &str = "Request.CallbackUrl";
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    let host_ok = rest.is_some_and(|r| !r.is_empty() && !r.starts_with(['/', '?', '#']));
    if !host_ok || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FermaError::validation(
            PATH,
            format!("{url:?} is not an http:// or https:// URL; send a full URL or leave CallbackUrl out"),
        ));
    }
    let len = url.chars().count();
    if len > CALLBACK_URL_MAX_CHARS {
        return Err(FermaError::validation(
            PATH,
            format!("is {len} characters long; at most {CALLBACK_URL_MAX_CHARS} are allowed"),
        ));
    }
    Ok(())
}

fn parse_items(
    cr: &Map<String, Value>,
    kind: ReceiptType,
    default_subject: PaymentSubject,
) -> Result<Vec<Item>, FermaError> {
    let path = sub(CR, "Items");
    let Some(v) = get(cr, "Items") else {
        return Ok(Vec::new());
    };
    let values = array(v, &path)?;
    if values.len() > limits::ITEMS {
        return Err(problem_error(
            "items",
            &Problem::TooMany {
                len: values.len(),
                max: limits::ITEMS,
            },
            path,
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse_item(v, &format!("{path}[{i}]"), kind, default_subject))
        .collect()
}

fn parse_item(
    v: &Value,
    path: &str,
    kind: ReceiptType,
    default_subject: PaymentSubject,
) -> Result<Item, FermaError> {
    let o = object(v, path)?;
    let label = opt_text(o, path, "Label")?.unwrap_or_default();
    let price = money(
        required(o, path, "Price", "send the unit price in rubles")?,
        &sub(path, "Price"),
    )?;
    let quantity = quantity(
        required(o, path, "Quantity", "send the quantity, up to 3 decimals")?,
        &sub(path, "Quantity"),
    )?;
    let amount = match get(o, "Amount") {
        Some(v) => money(v, &sub(path, "Amount"))?,
        // An overflowing product leaves 0 here; validate() then reports the overflow on Amount.
        None => line_amount(price, quantity).unwrap_or_default(),
    };
    let vat = vat(
        required(o, path, "Vat", &format!("use one of {}", names(&VAT_RATES)))?,
        &sub(path, "Vat"),
    )?;
    let payment_method = match get(o, "PaymentMethod") {
        Some(v) => payment_method(v, &sub(path, "PaymentMethod"))?,
        None => kind.default_payment_method(),
    };
    let payment_subject = match get(o, "PaymentType") {
        Some(v) => payment_subject(v, &sub(path, "PaymentType"))?,
        None => default_subject,
    };
    let measure = match get(o, "Measure") {
        Some(v) => measure(v, &sub(path, "Measure"))?,
        None => Measure::Piece,
    };
    Ok(Item {
        label,
        price,
        quantity,
        amount,
        vat,
        payment_method,
        payment_subject,
        measure,
    })
}

/// `PaymentItems[{PaymentType, Sum}]`; entries of one kind add up. Absent or empty means the whole
/// total was paid cashless, which is what the minimal CMS payloads mean.
fn parse_payments(cr: &Map<String, Value>, total: Option<Kopecks>) -> Result<Payments, FermaError> {
    let path = sub(CR, "PaymentItems");
    let values = match get(cr, "PaymentItems") {
        Some(v) => array(v, &path)?,
        None => &[],
    };
    let mut p = Payments::default();
    if values.is_empty() {
        // An overflowing total leaves 0 here; validate() reports the overflow on Items first.
        p.electronic = total.unwrap_or_default();
        return Ok(p);
    }
    for (j, v) in values.iter().enumerate() {
        let ep = format!("{path}[{j}]");
        let o = object(v, &ep)?;
        let kind_path = sub(&ep, "PaymentType");
        let kind = whole(
            required(
                o,
                &ep,
                "PaymentType",
                "use 0 cash, 1 cashless, 2 prepayment, 3 credit, 4 counter-provision",
            )?,
            &kind_path,
        )?;
        let sum = money(
            required(o, &ep, "Sum", "send the amount paid this way in rubles")?,
            &sub(&ep, "Sum"),
        )?;
        let slot = match kind {
            0 => &mut p.cash,
            1 => &mut p.electronic,
            2 => &mut p.prepayment,
            3 => &mut p.credit,
            4 => &mut p.counter_provision,
            n => {
                return Err(FermaError::validation(
                    kind_path,
                    format!(
                        "must be 0..4, got {n}; use 0 cash, 1 cashless, 2 prepayment, 3 credit, \
                         4 counter-provision"
                    ),
                ))
            }
        };
        *slot = slot
            .checked_add(sum)
            .ok_or_else(|| FermaError::validation(sub(&ep, "Sum"), "is too large to add up"))?;
    }
    Ok(p)
}

/// `{Name, Inn}` of the buyer or the cashier; both blank reads as "not given".
fn person(v: &Value, path: &str) -> Result<Option<Person>, FermaError> {
    let o = object(v, path)?;
    let name = opt_text(o, path, "Name")?;
    let inn = trimmed(opt_text(o, path, "Inn")?);
    if name.as_deref().is_none_or(|n| n.trim().is_empty()) && inn.is_none() {
        return Ok(None);
    }
    Ok(Some(Person {
        name: name.unwrap_or_default(),
        inn,
    }))
}

/// Strips the separators people type (`8 (999) 123-45-67`) and writes Russian numbers in the
/// international form the OFD sends SMS to. Anything else is kept as sent so that the validation
/// error shows what the client wrote.
fn normalise_phone(p: &str) -> String {
    let stripped: String = p
        .chars()
        .filter(|c| !(c.is_whitespace() || matches!(c, '-' | '(' | ')')))
        .collect();
    let national = stripped
        .strip_prefix('8')
        .or_else(|| stripped.strip_prefix('7'))
        .filter(|rest| rest.len() == 10 && rest.bytes().all(|b| b.is_ascii_digit()));
    let candidate = match national {
        Some(rest) => format!("+7{rest}"),
        None => stripped,
    };
    if crate::receipt::is_phone(&candidate) {
        candidate
    } else {
        p.to_owned()
    }
}

fn correction(v: &Value, path: &str) -> Result<Correction, FermaError> {
    let o = object(v, path)?;
    let type_path = sub(path, "Type");
    let by_instruction = match get(o, "Type") {
        None => false,
        Some(v) => {
            let s = text(v, &type_path)?;
            match norm(&s).as_str() {
                "self" | "0" => false,
                "instruction" | "1" => true,
                _ => {
                    return Err(FermaError::validation(
                        type_path,
                        format!("{s:?} is not a correction type; use SELF or INSTRUCTION"),
                    ))
                }
            }
        }
    };
    let description = opt_text(o, path, "Description")?.unwrap_or_default();
    let date_path = sub(path, "ReceiptDate");
    let date_text = text(
        required(
            o,
            path,
            "ReceiptDate",
            "send the date of the settlement being corrected as DD.MM.YYYY",
        )?,
        &date_path,
    )?;
    let date = parse_calendar_date(&date_text).ok_or_else(|| {
        FermaError::validation(
            &date_path,
            format!("{date_text:?} is not a date; send it as DD.MM.YYYY"),
        )
    })?;
    let number = trimmed(opt_text(o, path, "ReceiptId")?).unwrap_or_default();
    if by_instruction && number.is_empty() {
        return Err(FermaError::validation(
            sub(path, "ReceiptId"),
            "is required for an INSTRUCTION correction; send the number of the tax authority's instruction",
        ));
    }
    Ok(Correction {
        by_instruction,
        description,
        date,
        number,
    })
}

/// `DD.MM.YY` (20YY), `DD.MM.YYYY`, or ISO `YYYY-MM-DD` with an optional time, whose date part is
/// taken as written. Calendar validity (30 February) is left to [`Receipt::validate`].
fn parse_calendar_date(s: &str) -> Option<CalendarDate> {
    let s = s.trim();
    let number = |p: &str, lens: &[usize]| -> Option<u16> {
        if lens.contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse().ok()
        } else {
            None
        }
    };
    if let [d, m, y] = s.split('.').collect::<Vec<_>>()[..] {
        let year = number(y, &[2, 4])?;
        return Some(CalendarDate {
            year: if y.len() == 2 { 2000 + year } else { year },
            month: u8::try_from(number(m, &[1, 2])?).ok()?,
            day: u8::try_from(number(d, &[1, 2])?).ok()?,
        });
    }
    let (date, time) = s.split_at_checked(10)?;
    if !time.is_empty() && parse_local(s).is_none() {
        return None;
    }
    match date.split('-').collect::<Vec<_>>()[..] {
        [y, m, d] => Some(CalendarDate {
            year: number(y, &[4])?,
            month: u8::try_from(number(m, &[2])?).ok()?,
            day: u8::try_from(number(d, &[2])?).ok()?,
        }),
        _ => None,
    }
}

/// Which receipt the status call asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusQuery {
    ReceiptId(String),
    InvoiceId(String),
}

/// `{"Request":{"ReceiptId"}}` or `{"Request":{"InvoiceId"}}`, wrapper optional. When both are
/// given the ReceiptId wins: it is ours and cannot be ambiguous.
pub fn parse_status_request(body: &[u8]) -> Result<StatusQuery, FermaError> {
    let body = require_body(body, r#"{"Request": {"ReceiptId": "..."}}"#)?;
    let r = into_request(body)?;
    if let Some(id) = trimmed(opt_text(&r, RQ, "ReceiptId")?) {
        return Ok(StatusQuery::ReceiptId(id));
    }
    // The InvoiceId is the client's key, matched as sent.
    if let Some(id) = opt_text(&r, RQ, "InvoiceId")?.filter(|s| !s.trim().is_empty()) {
        return Ok(StatusQuery::InvoiceId(id));
    }
    Err(FermaError::validation(
        "Request.ReceiptId",
        "is required; send the ReceiptId the create call returned, or the InvoiceId",
    ))
}

/// Registry filter. Bounds are as the client sent them; whether they are inclusive is the
/// registry's rule, not the parser's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub receipt_id: Option<String>,
    pub start: Option<LocalSecs>,
    pub end: Option<LocalSecs>,
}

/// `list` and `list2` bodies. Each bound is read from its `...Local` name, else its `...Utc` name
/// (both carry local naive times); an empty body, `{}` or `{"Request":{}}` means no filter.
pub fn parse_list_request(body: &[u8]) -> Result<ListQuery, FermaError> {
    let Some(body) = parse_json(body)? else {
        return Ok(ListQuery::default());
    };
    let r = into_request(body)?;
    let receipt_id = trimmed(opt_text(&r, RQ, "ReceiptId")?);
    let start = list_date(&r, "StartDateLocal", "StartDateUtc")?;
    let end = list_date(&r, "EndDateLocal", "EndDateUtc")?;
    if let (Some((s, s_name)), Some((e, e_name))) = (start, end) {
        if e < s {
            return Err(FermaError::validation(
                sub(RQ, e_name),
                format!(
                    "{} is before {s_name} {}; swap them",
                    format_local(e),
                    format_local(s)
                ),
            ));
        }
    }
    Ok(ListQuery {
        receipt_id,
        start: start.map(|(t, _)| t),
        end: end.map(|(t, _)| t),
    })
}

fn list_date(
    r: &Map<String, Value>,
    local: &'static str,
    utc: &'static str,
) -> Result<Option<(LocalSecs, &'static str)>, FermaError> {
    for name in [local, utc] {
        let Some(s) = trimmed(opt_text(r, RQ, name)?) else {
            continue;
        };
        return match parse_local(&s) {
            Some(t) => Ok(Some((t, name))),
            None => Err(FermaError::validation(
                sub(RQ, name),
                format!("{s:?} is not a date-time; send it as YYYY-MM-DDTHH:MM:SS (Moscow time)"),
            )),
        };
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Validation errors in Ferma terms
// ---------------------------------------------------------------------------------------------

/// Error 1010 for a receipt that no register of organisation `inn` is registered to take
/// (see [`crate::receipt::Requirements`]): the shop must change the receipt, or the operator the
/// registrations; queueing it would leave it NEW forever.
pub fn unservable(inn: &str, m: &Mismatch) -> FermaError {
    let paths = Paths {
        cashier: sub(RQ, "Cashier"),
        correction: sub(CR, "CorrectionInfo"),
    };
    let path = ferma_path(m.field(), &paths);
    let advice = match m {
        Mismatch::Taxation { .. } => "send a taxation system they are registered for",
        Mismatch::NeedsContact => "give the buyer's Email or Phone",
        Mismatch::Ffd { .. } => {
            "use a rate the FN supports or move the organisation to FFD 1.2 drives"
        }
    };
    FermaError::validation(
        path,
        format!("no register of INN {inn} can take this receipt: {m}; {advice}"),
    )
}

fn from_validation(e: &ValidationError, paths: &Paths) -> FermaError {
    problem_error(&e.field, &e.problem, ferma_path(&e.field, paths))
}

/// Translates a receipt-model path (`items[2].amount`, `client.inn`) into the Ferma one.
fn ferma_path(field: &str, paths: &Paths) -> String {
    let (head, tail) = match field.split_once('.') {
        Some((h, t)) => (h, Some(t)),
        None => (field, None),
    };
    let (name, index) = match head.split_once('[') {
        Some((n, i)) => (n, format!("[{i}")),
        None => (head, String::new()),
    };
    let base = match name {
        "items" => format!("{CR}.Items{index}"),
        "payments" => sub(CR, "PaymentItems"),
        "client" => sub(CR, "ClientInfo"),
        "cashier" => paths.cashier.clone(),
        "correction" => paths.correction.clone(),
        "settlementAddress" => sub(CR, "BillAddress"),
        "taxation" => sub(CR, "TaxationSystem"),
        other => sub(CR, &pascal(other)),
    };
    match tail {
        None => base,
        Some(t) => {
            let member = match t {
                "paymentSubject" => "PaymentType".to_owned(),
                "date" => "ReceiptDate".to_owned(),
                "number" => "ReceiptId".to_owned(),
                "byInstruction" => "Type".to_owned(),
                other => pascal(other),
            };
            sub(&base, &member)
        }
    }
}

fn pascal(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The message for a model problem, in Ferma's words, with what to do about it.
fn problem_error(model_field: &str, problem: &Problem, path: String) -> FermaError {
    let is_items = model_field == "items";
    let text = match problem {
        Problem::Empty if is_items => format!("{problem}; send at least one item"),
        Problem::Empty if model_field.ends_with(".label") => {
            format!("{problem}; name the goods or service")
        }
        Problem::Empty if model_field == "correction.description" => {
            format!("{problem}; say why the correction is made")
        }
        Problem::Empty => format!("{problem}; fill it in or leave it out"),
        Problem::TooLong { .. } => format!("{problem}; shorten it"),
        Problem::TooMany { .. } => format!("{problem}; split the order into several receipts"),
        Problem::Inn(_) => format!("{problem}; check the number or leave it out"),
        Problem::AmountMismatch { expected, got } => format!(
            "is {got} but Price × Quantity is {expected}; send Amount = Price × Quantity rounded \
             to the kopeck and put any discount into Price"
        ),
        Problem::TotalMismatch { items, payments } => format!(
            "the sums add up to {payments} but the items' Amounts add up to {items}; make them \
             equal, or leave PaymentItems out to take it all as cashless"
        ),
        Problem::Overflow if is_items || model_field.ends_with(".amount") => {
            format!("{problem}; check Price, Quantity and Amount")
        }
        Problem::Overflow => format!("{problem}; check the sums"),
        Problem::OutOfRange { .. } => {
            format!("{problem}; use a payment subject code (1 goods, 4 service, ...)")
        }
        Problem::Phone(_) => format!("{problem}, or leave Phone out"),
        Problem::Email(_) => format!("{problem}; fix it or leave Email out"),
        Problem::CorrectionRequired => format!(
            "{problem}; add CorrectionInfo {{Type, Description, ReceiptDate, ReceiptId}} to \
             CustomerReceipt"
        ),
        Problem::CorrectionNotAllowed => {
            format!("{problem}; remove it or use a correction Type")
        }
        Problem::Date(_) => format!("{problem}; send it as DD.MM.YYYY"),
        Problem::NonZero => format!("{problem}; send Amount 0"),
        Problem::Zero => format!("{problem}; send a quantity greater than zero"),
    };
    FermaError::validation(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lenient_rubles(s: &str) -> Result<u64, AmountError> {
        lenient_fixed(s, 2, |x| Kopecks::parse_rubles(x).map(|k| k.0))
    }

    #[test]
    fn float_noise_is_forgiven_exactly() {
        assert_eq!(lenient_rubles("0.30000000000000004"), Ok(30));
        assert_eq!(lenient_rubles("1.1499999999999999"), Ok(115));
        assert_eq!(lenient_rubles("0.009999999"), Ok(1));
        assert_eq!(lenient_rubles("99.99999999"), Ok(10_000));
        assert_eq!(lenient_rubles("12.34"), Ok(1234));
        assert!(matches!(
            lenient_rubles("10.005"),
            Err(AmountError::TooPrecise { .. })
        ));
        // 1e-6 rubles off is the edge; more is refused.
        assert_eq!(lenient_rubles("1.0000009"), Ok(100));
        assert!(lenient_rubles("1.00001").is_err());
        assert!(lenient_rubles("1.00999").is_err());
        assert_eq!(
            lenient_fixed("2.0000000001", 3, |x| Quantity::parse(x).map(|q| q.0)),
            Ok(2000)
        );
        assert_eq!(
            lenient_fixed("0.3339999", 3, |x| Quantity::parse(x).map(|q| q.0)),
            Ok(334)
        );
        assert!(lenient_fixed("0.3335", 3, |x| Quantity::parse(x).map(|q| q.0)).is_err());
    }

    #[test]
    fn minus_zero_is_zero_and_other_negatives_are_refused() {
        assert_eq!(unsigned("-0", "p"), Ok("0"));
        assert_eq!(unsigned("-0.00", "p"), Ok("0.00"));
        assert_eq!(unsigned("12.5", "p"), Ok("12.5"));
        assert_eq!(unsigned("-0.01", "p").map_err(|e| e.code), Err(VALIDATION));
    }

    #[test]
    fn floats_render_without_exponent() {
        assert_eq!(float_text(1e21), "1000000000000000000000");
        assert_eq!(float_text(1e-7), "0.0000001");
        assert_eq!(float_text(-0.0), "0");
        assert_eq!(float_text(0.1 + 0.2), "0.30000000000000004");
    }

    #[test]
    fn model_paths_become_ferma_paths() {
        let paths = Paths {
            cashier: "Request.Cashier".into(),
            correction: "Request.CustomerReceipt.CorrectionInfo".into(),
        };
        for (model, ferma) in [
            ("items", "Request.CustomerReceipt.Items"),
            ("items[7].amount", "Request.CustomerReceipt.Items[7].Amount"),
            ("items[0].label", "Request.CustomerReceipt.Items[0].Label"),
            (
                "items[3].paymentSubject",
                "Request.CustomerReceipt.Items[3].PaymentType",
            ),
            ("payments", "Request.CustomerReceipt.PaymentItems"),
            ("phone", "Request.CustomerReceipt.Phone"),
            ("email", "Request.CustomerReceipt.Email"),
            ("client.inn", "Request.CustomerReceipt.ClientInfo.Inn"),
            ("cashier.name", "Request.Cashier.Name"),
            ("correction", "Request.CustomerReceipt.CorrectionInfo"),
            (
                "correction.date",
                "Request.CustomerReceipt.CorrectionInfo.ReceiptDate",
            ),
            (
                "correction.number",
                "Request.CustomerReceipt.CorrectionInfo.ReceiptId",
            ),
            ("settlementAddress", "Request.CustomerReceipt.BillAddress"),
            ("taxation", "Request.CustomerReceipt.TaxationSystem"),
            ("items[2].vat", "Request.CustomerReceipt.Items[2].Vat"),
            ("settlementPlace", "Request.CustomerReceipt.SettlementPlace"),
        ] {
            assert_eq!(ferma_path(model, &paths), ferma, "{model}");
        }
    }

    #[test]
    fn phones_are_normalised_only_when_simple() {
        assert_eq!(normalise_phone("8 (999) 123-45-67"), "+79991234567");
        assert_eq!(normalise_phone("+7 999 123-45-67"), "+79991234567");
        assert_eq!(normalise_phone("79991234567"), "+79991234567");
        assert_eq!(normalise_phone("+375291234567"), "+375291234567");
        assert_eq!(normalise_phone("call me"), "call me");
    }

    #[test]
    fn calendar_dates_in_every_client_form() {
        let d = |year, month, day| Some(CalendarDate { year, month, day });
        assert_eq!(parse_calendar_date("04.12.26"), d(2026, 12, 4));
        assert_eq!(parse_calendar_date("4.12.2026"), d(2026, 12, 4));
        assert_eq!(parse_calendar_date("2026-12-04"), d(2026, 12, 4));
        assert_eq!(parse_calendar_date("2026-12-04T10:00:00"), d(2026, 12, 4));
        assert_eq!(parse_calendar_date("2026-12-04Tjunk"), None);
        assert_eq!(parse_calendar_date("04.12.026"), None);
        assert_eq!(parse_calendar_date("yesterday"), None);
        assert_eq!(parse_calendar_date(""), None);
        assert_eq!(parse_calendar_date("ж.ж.жж"), None);
        assert_eq!(parse_calendar_date("жжжжжжжжжжжж"), None);
    }
}
