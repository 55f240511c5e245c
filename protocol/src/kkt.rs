//! The KKT link: versioned JSON messages between a register and its agent, over WebSocket (one
//! message per text frame) or a serial line (one message per line).
//!
//! The register opens the connection and says [`Hello`]. The agent then sends [`Request`]s, each
//! with an id the register echoes in its [`Response`]; the register also pushes [`Event`]s (OFD
//! acknowledgements, status changes) at any time. A register executes one request at a time, in
//! order, as a real KKT does.
//!
//! An error answer ([`KktError`]) means the command was refused before the FN formed a document:
//! the FN forms a document atomically and the register answers with its result, so "error" is a
//! proof of "not fiscalized". Only a missing answer (lost link, crash) leaves the outcome unknown,
//! and that is resolved by reading the FN's last FD number and its archive.

use crate::document::{DocumentType, FiscalDocument};
use crate::receipt::{Kopecks, Person, Receipt, TaxationSystem};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of this protocol, sent in [`Hello`]. Bumped on any incompatible change.
pub const LINK_VERSION: u16 = 1;

/// Largest message either side accepts. A receipt of 100 items is ~40 KiB of JSON; an archive
/// read-back carries the document twice (typed and hex). Anything larger is an error, not a
/// reason to allocate.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Model name of the simulated register (and of the real one it stands for).
pub const MODEL: &str = "Эфир Pro ФС";

/// Every message on the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum KktMessage {
    Hello(Hello),
    Request(Request),
    Response(Response),
    Event(Event),
}

/// Why a link message could not be read.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("message is {0} bytes; the limit is {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("peer speaks link version {0}; this side speaks {LINK_VERSION}")]
    Version(u16),
}

impl KktMessage {
    pub fn to_json(&self) -> String {
        // Every type here serializes infallibly (no maps with non-string keys, no custom errors).
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"type":"serializationFailed","error":{:?}}}"#,
                e.to_string()
            )
        })
    }

    pub fn from_json(s: &str) -> Result<Self, LinkError> {
        if s.len() > MAX_MESSAGE_BYTES {
            return Err(LinkError::TooLarge(s.len()));
        }
        Ok(serde_json::from_str(s)?)
    }
}

/// FFD version a register and its FN speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FfdVersion {
    #[serde(rename = "1.05")]
    V1_05,
    #[serde(rename = "1.1")]
    V1_1,
    #[serde(rename = "1.2")]
    V1_2,
}

impl std::fmt::Display for FfdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1_05 => "1.05",
            Self::V1_1 => "1.1",
            Self::V1_2 => "1.2",
        })
    }
}

impl std::str::FromStr for FfdVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.05" => Ok(Self::V1_05),
            "1.1" => Ok(Self::V1_1),
            "1.2" => Ok(Self::V1_2),
            other => Err(format!("FFD {other:?} is not one of 1.05, 1.1, 1.2")),
        }
    }
}

impl FfdVersion {
    /// Tag 1209 value.
    pub fn code(self) -> u8 {
        match self {
            Self::V1_05 => 2,
            Self::V1_1 => 3,
            Self::V1_2 => 4,
        }
    }
}

/// The register's first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    pub version: u16,
    pub model: String,
    /// Factory number.
    pub zn: String,
    pub fn_number: String,
    pub firmware: String,
    pub ffd_version: FfdVersion,
}

/// A command for the register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub call: Call,
}

crate::wire::dual_enum! {
/// The register's methods (`method` and `params` on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call (CallShape, "Call", tag = "method", content = "params") {
    GetDeviceStatus,
    GetFnInfo,
    GetShiftStatus,
    OpenShift(Operator),
    CloseShift(Operator),
    /// A cash receipt (document 3).
    Receipt(ReceiptParams),
    /// A correction receipt (document 31).
    Correction(ReceiptParams),
    /// Non-fiscal shift totals; forms no document.
    ReportX,
    /// Report on the current state of settlements (document 21).
    ReportCurrentState,
    OfdExchangeStatus,
    Register(RegistrationParams),
    Reregister(ReregistrationParams),
    /// Closes the FN archive (document 6); the FN then only sends what it owes the OFD.
    CloseFn(Operator),
    /// Reads a document back from the FN archive.
    GetFnDocument(GetFnDocument),
    /// Points the register at an OFD (host and port of its TCP endpoint).
    SetOfd(OfdEndpoint),
}
}

impl Call {
    /// The method name as it appears on the wire, for logs.
    pub fn method(&self) -> &'static str {
        match self {
            Self::GetDeviceStatus => "getDeviceStatus",
            Self::GetFnInfo => "getFnInfo",
            Self::GetShiftStatus => "getShiftStatus",
            Self::OpenShift(_) => "openShift",
            Self::CloseShift(_) => "closeShift",
            Self::Receipt(_) => "receipt",
            Self::Correction(_) => "correction",
            Self::ReportX => "reportX",
            Self::ReportCurrentState => "reportCurrentState",
            Self::OfdExchangeStatus => "ofdExchangeStatus",
            Self::Register(_) => "register",
            Self::Reregister(_) => "reregister",
            Self::CloseFn(_) => "closeFn",
            Self::GetFnDocument(_) => "getFnDocument",
            Self::SetOfd(_) => "setOfd",
        }
    }

    /// Whether a successful call forms a fiscal document (and so moves the FD counter).
    pub fn forms_document(&self) -> bool {
        matches!(
            self,
            Self::OpenShift(_)
                | Self::CloseShift(_)
                | Self::Receipt(_)
                | Self::Correction(_)
                | Self::ReportCurrentState
                | Self::Register(_)
                | Self::Reregister(_)
                | Self::CloseFn(_)
        )
    }
}

/// Who performs an operation (the cashier printed on the document).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operator {
    #[serde(default)]
    pub cashier: Option<Person>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptParams {
    pub receipt: Receipt,
    /// Written to tag 1192 (additional receipt attribute). The product puts its job id here, so a
    /// document read back from the archive after a crash can be matched to its job.
    #[serde(default)]
    pub additional_attribute: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetFnDocument {
    pub fd_number: u32,
}

/// The OFD a register sends its documents to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfdEndpoint {
    pub name: String,
    pub inn: String,
    pub host: String,
    pub port: u16,
}

/// Registration details, as on the registration card from the tax service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationParams {
    pub rnm: String,
    pub user_inn: String,
    pub user_name: String,
    pub taxation_systems: Vec<TaxationSystem>,
    /// Internet mode (tag 1108): receipts are sent electronically, no printout.
    pub internet: bool,
    #[serde(default)]
    pub encryption: bool,
    pub ofd: OfdEndpoint,
    pub settlement_address: String,
    pub settlement_place: String,
    #[serde(default = "default_fns_site")]
    pub fns_site: String,
    #[serde(default)]
    pub cashier: Option<Person>,
}

fn default_fns_site() -> String {
    "www.nalog.gov.ru".to_owned()
}

/// Re-registration reasons (tag 1101).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReregistrationReason {
    FnReplaced,
    OfdChanged,
    UserDetailsChanged,
    KktSettingsChanged,
}

impl ReregistrationReason {
    pub fn code(self) -> u8 {
        match self {
            Self::FnReplaced => 1,
            Self::OfdChanged => 2,
            Self::UserDetailsChanged => 3,
            Self::KktSettingsChanged => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReregistrationParams {
    pub reasons: Vec<ReregistrationReason>,
    pub registration: RegistrationParams,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireResponse", into = "WireResponse")]
pub struct Response {
    pub id: u64,
    pub outcome: Result<Reply, KktError>,
}

/// `{id, result}` or `{id, error}` on the wire.
#[derive(Serialize, Deserialize)]
struct WireResponse {
    id: u64,
    #[serde(default)]
    result: Option<Reply>,
    #[serde(default)]
    error: Option<KktError>,
}

impl TryFrom<WireResponse> for Response {
    type Error = &'static str;
    fn try_from(w: WireResponse) -> Result<Self, Self::Error> {
        let outcome = match (w.result, w.error) {
            (Some(r), None) => Ok(r),
            (None, Some(e)) => Err(e),
            _ => return Err("a response carries exactly one of `result` and `error`"),
        };
        Ok(Response { id: w.id, outcome })
    }
}

impl From<Response> for WireResponse {
    fn from(r: Response) -> Self {
        match r.outcome {
            Ok(result) => WireResponse {
                id: r.id,
                result: Some(result),
                error: None,
            },
            Err(error) => WireResponse {
                id: r.id,
                result: None,
                error: Some(error),
            },
        }
    }
}

crate::wire::dual_enum! {
/// A successful result, one shape per kind of method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply (ReplyShape, "Reply", tag = "kind", content = "data") {
    DeviceStatus(DeviceStatus),
    FnInfo(FnInfo),
    ShiftStatus(ShiftStatus),
    /// A document was formed.
    Fiscal(FiscalResult),
    XReport(XReport),
    OfdExchange(OfdExchangeStatus),
    FnDocument(Box<ArchivedDocument>),
    /// A setting was applied.
    Done,
}
}

/// The shift as the register sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ShiftState {
    Closed,
    Opened,
    /// Open for more than 24 h: receipts are refused, closing is allowed.
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// The register's clock, Unix seconds.
    pub date_time: u32,
    pub shift: ShiftState,
    /// The FN refuses receipts (expired, full, OFD wait exhausted, ...); `getFnInfo` says why.
    pub blocked: bool,
    pub cover_open: bool,
    pub paper_present: bool,
    /// Registered and in fiscal mode.
    pub fiscal: bool,
    pub fn_present: bool,
    pub model: String,
    pub zn: String,
    pub firmware: String,
}

/// The FN's warning flags (reference/fiscal.md, "Warning flags").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FnWarnings {
    /// bit 0: 3 days of validity left.
    pub need_replacement: bool,
    /// bit 1: validity ends within 30 days.
    pub resource_exhausted: bool,
    /// bit 2: archive 90 % full.
    pub memory_overflow: bool,
    /// bit 3: OFD answer timeout exceeded.
    pub ofd_timeout: bool,
    /// The FN is blocked: a receipt will be refused.
    pub critical_error: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FnInfo {
    pub fn_number: String,
    /// 0 set-up, 1 ready for fiscalization, 3 fiscal mode, 7 post-fiscal, 15 archive read only.
    pub phase: u8,
    /// Number of the last document the FN formed (0 when none). The agent's exactly-once check
    /// compares this with the number it recorded before sending a receipt.
    pub last_fd_number: u32,
    pub registrations_done: u32,
    pub registrations_left: u32,
    /// End of validity, Unix seconds.
    pub valid_until: u32,
    pub ffd_version: FfdVersion,
    pub warnings: FnWarnings,
    /// The FN error code that blocks receipts right now, if any.
    #[serde(default)]
    pub block: Option<u8>,
    pub documents_used: u32,
    pub documents_capacity: u32,
    #[serde(default)]
    pub registration: Option<RegistrationSummary>,
}

/// What the FN was registered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationSummary {
    pub rnm: String,
    pub user_inn: String,
    pub user_name: String,
    pub taxation_systems: Vec<TaxationSystem>,
    pub internet: bool,
    pub ofd: OfdEndpoint,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShiftStatus {
    pub state: ShiftState,
    /// Number of the current (or last) shift; 0 before the first.
    pub number: u32,
    #[serde(default)]
    pub opened_at: Option<u32>,
    /// When the 24 h limit runs out.
    #[serde(default)]
    pub expires_at: Option<u32>,
    pub receipts: u32,
    pub documents: u32,
}

/// What a formed document proves: exactly what the Ferma status `Device` block relays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FiscalResult {
    pub document_type: DocumentType,
    pub fd_number: u32,
    /// Printed fiscal sign (bytes 3–6 of tag 1077).
    pub fpd: u32,
    pub shift_number: u32,
    /// Receipt number within the shift; receipts only.
    #[serde(default)]
    pub receipt_number: Option<u32>,
    pub fn_number: String,
    pub rnm: String,
    pub zn: String,
    /// Unix seconds, the register's clock.
    pub date_time: u32,
    #[serde(default)]
    pub total: Option<Kopecks>,
    /// Tag 1192 of a receipt: the job id the agent put there.
    #[serde(default)]
    pub additional_attribute: Option<String>,
}

impl FiscalResult {
    /// The result a document proves; `shift_number` is needed for documents that do not carry it.
    pub fn from_document(doc: &FiscalDocument, zn: &str, shift_number: u32) -> Self {
        let seal = doc.seal();
        let mut r = FiscalResult {
            document_type: doc.to_document().doc_type,
            fd_number: seal.fd_number,
            fpd: seal.fpd.printed(),
            shift_number,
            receipt_number: None,
            fn_number: seal.fn_number.clone(),
            rnm: String::new(),
            zn: zn.to_owned(),
            date_time: seal.date_time,
            total: None,
            additional_attribute: None,
        };
        match doc {
            FiscalDocument::Registration(d) => r.rnm = d.owner.rnm.clone(),
            FiscalDocument::Shift(d) => {
                r.rnm = d.owner.rnm.clone();
                r.shift_number = d.shift_number;
            }
            FiscalDocument::CurrentState(d) => {
                r.rnm = d.owner.rnm.clone();
                r.shift_number = d.shift_number;
            }
            FiscalDocument::Receipt(d) => {
                r.rnm = d.owner.rnm.clone();
                r.shift_number = d.shift_number;
                r.receipt_number = Some(d.receipt_number);
                r.total = Some(Kopecks(d.total));
                r.additional_attribute = d.additional_attribute.clone();
            }
            FiscalDocument::FnClosure(d) => r.rnm = d.owner.rnm.clone(),
        }
        r
    }
}

/// Non-fiscal shift totals (X report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct XReport {
    pub shift_number: u32,
    pub receipts: u32,
    pub income: Kopecks,
    pub income_return: Kopecks,
    pub expense: Kopecks,
    pub expense_return: Kopecks,
    pub cash: Kopecks,
    pub electronic: Kopecks,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfdExchangeStatus {
    pub unsent_count: u32,
    #[serde(default)]
    pub first_unsent_fd: Option<u32>,
    #[serde(default)]
    pub first_unsent_date_time: Option<u32>,
    #[serde(default)]
    pub last_ack_at: Option<u32>,
    #[serde(default)]
    pub ofd: Option<OfdEndpoint>,
}

/// A document read back from the FN archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchivedDocument {
    pub result: FiscalResult,
    pub document: FiscalDocument,
    /// The document's TLV bytes, hex: what the FN signed and the OFD received.
    pub tlv_hex: String,
    /// Whether the OFD has acknowledged it.
    pub acknowledged: bool,
}

crate::wire::dual_enum! {
/// An event the register pushes unasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event (EventShape, "Event", tag = "event", content = "data") {
    /// The OFD acknowledged a document; the FN marked it delivered.
    OfdAck(OfdAckEvent),
    /// Paper, cover, shift or block state changed.
    StatusChanged(DeviceStatus),
}
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfdAckEvent {
    pub fn_number: String,
    pub fd_number: u32,
    /// When the OFD acknowledged, Unix seconds (OFD's clock).
    pub acked_at: u32,
    /// Documents still waiting after this one.
    pub unsent_count: u32,
}

/// An error answer: an ATOL-style code, the raw FN code when the FN refused, and text for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[serde(rename_all = "camelCase")]
#[error("KKT error {code}: {text}")]
pub struct KktError {
    pub code: ErrorCode,
    #[serde(default)]
    pub fn_code: Option<u8>,
    pub text: String,
}

impl KktError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        KktError {
            code,
            fn_code: None,
            text: text.into(),
        }
    }

    pub fn with_fn_code(mut self, fn_code: u8) -> Self {
        self.fn_code = Some(fn_code);
        self
    }
}

/// ATOL-style error code. A number rather than an enum so that codes from other firmware still
/// parse; the named constants are the ones this product acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

impl ErrorCode {
    pub const NO_CONNECTION: Self = Self(2);
    /// The request is malformed or a parameter is invalid; `text` names the field.
    pub const INVALID_PARAMETER: Self = Self(16);
    pub const NO_PAPER: Self = Self(44);
    pub const COVER_OPEN: Self = Self(45);
    pub const PREVIOUS_UNFINISHED: Self = Self(55);
    pub const SHIFT_EXPIRED: Self = Self(68);
    pub const SHIFT_CLOSED: Self = Self(73);
    pub const SHIFT_OPEN: Self = Self(83);
    pub const WRONG_FN_STATE: Self = Self(117);
    pub const FN_EXPIRED: Self = Self(120);
    pub const FN_ARCHIVE_FULL: Self = Self(121);
    pub const CRYPTO_EXHAUSTED: Self = Self(136);
    pub const STORAGE_EXHAUSTED: Self = Self(137);
    pub const OFD_REJECTED: Self = Self(138);
    pub const UNSENT_DOCUMENTS: Self = Self(139);
    pub const OFD_WAIT_EXHAUSTED: Self = Self(140);
    pub const FN_NOT_FOUND: Self = Self(166);
    /// Registration data does not check out (RNM does not belong to this ZN and INN, ...).
    pub const REGISTRATION_REFUSED: Self = Self(171);
    pub const REGISTRATIONS_EXHAUSTED: Self = Self(172);
    pub const NO_SUCH_DOCUMENT: Self = Self(173);
    pub const ARCHIVE_CLOSED: Self = Self(224);
    pub const REGISTRATION_NEEDED: Self = Self(225);

    pub fn name(self) -> &'static str {
        match self {
            Self::NO_CONNECTION => "no connection",
            Self::INVALID_PARAMETER => "invalid parameter",
            Self::NO_PAPER => "no paper",
            Self::COVER_OPEN => "cover open",
            Self::PREVIOUS_UNFINISHED => "previous operation unfinished",
            Self::SHIFT_EXPIRED => "shift longer than 24 h",
            Self::SHIFT_CLOSED => "not allowed with the shift closed",
            Self::SHIFT_OPEN => "not allowed with the shift open",
            Self::WRONG_FN_STATE => "wrong FN state",
            Self::FN_EXPIRED => "FN expired",
            Self::FN_ARCHIVE_FULL => "FN archive full",
            Self::CRYPTO_EXHAUSTED => "FN crypto resource exhausted",
            Self::STORAGE_EXHAUSTED => "FN storage for OFD documents exhausted",
            Self::OFD_REJECTED => "OFD message rejected",
            Self::UNSENT_DOCUMENTS => "FN has unsent documents",
            Self::OFD_WAIT_EXHAUSTED => "OFD transmission wait exhausted",
            Self::FN_NOT_FOUND => "FN not found",
            Self::REGISTRATION_REFUSED => "registration data refused",
            Self::REGISTRATIONS_EXHAUSTED => "no registrations left on this FN",
            Self::NO_SUCH_DOCUMENT => "no such document in the FN archive",
            Self::ARCHIVE_CLOSED => "FN archive closed",
            Self::REGISTRATION_NEEDED => "registration needed",
            _ => "unknown",
        }
    }

    /// Errors that keep this register from taking receipts until someone acts (replace the FN,
    /// load paper, reach the OFD): a balancer takes the register out of the pool on these.
    pub fn blocks_register(self) -> bool {
        matches!(
            self,
            Self::NO_PAPER
                | Self::COVER_OPEN
                | Self::FN_EXPIRED
                | Self::FN_ARCHIVE_FULL
                | Self::CRYPTO_EXHAUSTED
                | Self::STORAGE_EXHAUSTED
                | Self::OFD_WAIT_EXHAUSTED
                | Self::FN_NOT_FOUND
                | Self::ARCHIVE_CLOSED
                | Self::REGISTRATION_NEEDED
                | Self::WRONG_FN_STATE
        )
    }
}
