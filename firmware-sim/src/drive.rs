//! The fiscal drive (FN) as a pure state machine: every method takes the current time and returns a
//! decision — a formed document or the error code the real drive would give. No I/O: the shell
//! persists what a method returns *before* it answers anyone (see `store`).
//!
//! Rules (reference/fiscal.md):
//! * phases 1 (ready) → 3 (fiscal, after registration) → 7 (archive closed, still owes the OFD) →
//!   15 (archive read only, everything delivered);
//! * every formed document takes the next FD number and a fiscal sign (FPD), and joins the queue of
//!   documents owed to the OFD, which must be delivered oldest first;
//! * blocks, checked before a document is formed: shift over 24 h (0x16, closing still allowed),
//!   oldest unsent older than 30 days (0x15), unsent storage exhausted (0x14), service life over
//!   (0x05), archive full (0x06); warnings at 30 and 3 days of validity and at 90 % of capacity;
//! * registrations per FN are limited; a registration whose RNM does not belong to the ZN and INN
//!   is refused.
//!
//! The FPD is HMAC-SHA256 over the document (without its own FPD) under a per-drive secret, cut to
//! six bytes. The real algorithm is secret; what matters to the rest of the system is that it is
//! deterministic, per-drive and covers every byte of the document.

use hmac::{Hmac, KeyInit, Mac};
use protocol::checksum::check_rnm;
use protocol::document::{
    CorrectionRecord, CurrentStateReport, FiscalDocument, FnClosureReport, FnFlags, Fpd,
    ItemRecord, Owner, ReceiptRecord, RegistrationReport, ReregistrationReasons, Seal, ShiftReport,
    UnsentSummary,
};
use protocol::kkt::{
    ErrorCode, FfdVersion, FiscalResult, FnInfo, FnWarnings, KktError, Operator, ReceiptParams,
    RegistrationParams, RegistrationSummary, ReregistrationParams, ShiftState, ShiftStatus,
    XReport,
};
use protocol::receipt::Kopecks;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::VecDeque;

pub const DAY: u32 = 86_400;
/// A shift may stay open this long; after it receipts are refused (FN code 0x16).
pub const SHIFT_LIMIT: u32 = DAY;
/// Oldest unsent document older than this blocks the FN (0x15).
pub const OFD_WAIT_LIMIT: u32 = 30 * DAY;

/// FN block codes (raw FN error codes carried in `KktError::fn_code`).
pub mod fn_code {
    pub const SERVICE_LIFE_OVER: u8 = 0x05;
    pub const ARCHIVE_FULL: u8 = 0x06;
    pub const CRYPTO_EXHAUSTED: u8 = 0x12;
    pub const OFD_STORAGE_EXHAUSTED: u8 = 0x14;
    pub const OFD_WAIT_EXHAUSTED: u8 = 0x15;
    pub const SHIFT_OVER_24H: u8 = 0x16;
    pub const WRONG_STATE: u8 = 0x02;
}

/// FN model: its service life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FnModel {
    Months13,
    Months15,
    Months36,
}

impl FnModel {
    pub fn validity_days(self) -> u32 {
        match self {
            Self::Months13 => 410,
            Self::Months15 => 470,
            Self::Months36 => 1110,
        }
    }
}

/// What is fixed when the drive is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    pub fn_number: String,
    pub model: FnModel,
    /// Documents the archive holds (real drives: hundreds of thousands; not public).
    pub capacity: u32,
    /// Documents the FN may hold unsent before it refuses new ones (0x14).
    pub unsent_capacity: u32,
    pub registrations_max: u32,
    pub ffd_version: FfdVersion,
    /// Key of the fiscal sign.
    pub secret: [u8; 32],
}

impl DriveConfig {
    pub fn new(fn_number: String, secret: [u8; 32]) -> Self {
        DriveConfig {
            fn_number,
            model: FnModel::Months15,
            capacity: 250_000,
            unsent_capacity: 100_000,
            registrations_max: 12,
            ffd_version: FfdVersion::V1_2,
            secret,
        }
    }
}

/// Documents the FN keeps aside so that a full archive can still close the shift and the archive.
pub const RESERVED_FOR_CLOSING: u32 = 2;

/// FN life phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Ready,
    Fiscal,
    PostFiscal,
    ReadOnly,
}

impl Phase {
    pub fn code(self) -> u8 {
        match self {
            Self::Ready => 1,
            Self::Fiscal => 3,
            Self::PostFiscal => 7,
            Self::ReadOnly => 15,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub params: RegistrationParams,
    pub zn: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shift {
    pub number: u32,
    pub open: bool,
    pub opened_at: u32,
    pub receipts: u32,
    pub documents: u32,
    pub totals: XReport,
}

/// A document the FN has formed; the shell stores `bytes` in the archive before answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formed {
    pub document: FiscalDocument,
    pub bytes: Vec<u8>,
    pub result: FiscalResult,
}

/// The state of one fiscal drive. Serializable: this is what persists between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiscalDrive {
    pub config: DriveConfig,
    pub phase: Phase,
    pub registration: Option<Registration>,
    pub registrations_done: u32,
    pub valid_until: Option<u32>,
    pub last_fd: u32,
    pub shift: Shift,
    /// Documents owed to the OFD, oldest first: (FD number, date-time).
    pub unsent: VecDeque<(u32, u32)>,
    pub last_ack_at: Option<u32>,
}

type HmacSha256 = Hmac<Sha256>;

impl FiscalDrive {
    pub fn new(config: DriveConfig) -> Self {
        FiscalDrive {
            config,
            phase: Phase::Ready,
            registration: None,
            registrations_done: 0,
            valid_until: None,
            last_fd: 0,
            shift: Shift::default(),
            unsent: VecDeque::new(),
            last_ack_at: None,
        }
    }

    pub fn fn_number(&self) -> &str {
        &self.config.fn_number
    }

    fn err(code: ErrorCode, text: impl Into<String>) -> KktError {
        KktError::new(code, text)
    }

    fn fn_err(code: ErrorCode, fn_code: u8, text: impl Into<String>) -> KktError {
        KktError::new(code, text).with_fn_code(fn_code)
    }

    pub fn shift_state(&self, now: u32) -> ShiftState {
        if !self.shift.open {
            ShiftState::Closed
        } else if now >= self.shift.opened_at.saturating_add(SHIFT_LIMIT) {
            ShiftState::Expired
        } else {
            ShiftState::Opened
        }
    }

    pub fn warnings(&self, now: u32) -> FnWarnings {
        let left = self.valid_until.map(|v| v.saturating_sub(now));
        FnWarnings {
            need_replacement: left.is_some_and(|l| l <= 3 * DAY),
            resource_exhausted: left.is_some_and(|l| l <= 30 * DAY),
            memory_overflow: u64::from(self.last_fd) * 10 >= u64::from(self.config.capacity) * 9,
            ofd_timeout: self
                .unsent
                .front()
                .is_some_and(|(_, t)| now.saturating_sub(*t) > 7 * DAY),
            critical_error: self.block(now).is_some(),
        }
    }

    /// The block that stops receipts right now, as (KKT code, FN code, explanation).
    pub fn block(&self, now: u32) -> Option<KktError> {
        if self.valid_until.is_some_and(|v| now >= v) {
            return Some(Self::fn_err(
                ErrorCode::FN_EXPIRED,
                fn_code::SERVICE_LIFE_OVER,
                "FN service life is over: close the archive and replace the FN",
            ));
        }
        if self.last_fd + RESERVED_FOR_CLOSING >= self.config.capacity {
            return Some(Self::fn_err(
                ErrorCode::FN_ARCHIVE_FULL,
                fn_code::ARCHIVE_FULL,
                "FN archive is full: close the shift and the archive, then replace the FN",
            ));
        }
        if self.unsent.len() as u32 >= self.config.unsent_capacity {
            return Some(Self::fn_err(
                ErrorCode::STORAGE_EXHAUSTED,
                fn_code::OFD_STORAGE_EXHAUSTED,
                "FN storage for documents owed to the OFD is exhausted: restore the OFD link",
            ));
        }
        if let Some((fd, t)) = self.unsent.front() {
            if now.saturating_sub(*t) > OFD_WAIT_LIMIT {
                return Some(Self::fn_err(
                    ErrorCode::OFD_WAIT_EXHAUSTED,
                    fn_code::OFD_WAIT_EXHAUSTED,
                    format!(
                        "document {fd} has waited for the OFD more than 30 days: restore the OFD link"
                    ),
                ));
            }
        }
        None
    }

    pub fn info(&self, now: u32) -> FnInfo {
        FnInfo {
            fn_number: self.config.fn_number.clone(),
            phase: self.phase.code(),
            last_fd_number: self.last_fd,
            registrations_done: self.registrations_done,
            registrations_left: self
                .config
                .registrations_max
                .saturating_sub(self.registrations_done),
            valid_until: self.valid_until.unwrap_or(0),
            ffd_version: self.config.ffd_version,
            warnings: self.warnings(now),
            block: self.block(now).and_then(|e| e.fn_code),
            documents_used: self.last_fd,
            documents_capacity: self.config.capacity,
            registration: self.registration.as_ref().map(|r| RegistrationSummary {
                rnm: r.params.rnm.clone(),
                user_inn: r.params.user_inn.clone(),
                user_name: r.params.user_name.clone(),
                taxation_systems: r.params.taxation_systems.clone(),
                internet: r.params.internet,
                ofd: r.params.ofd.clone(),
            }),
        }
    }

    pub fn shift_status(&self, now: u32) -> ShiftStatus {
        ShiftStatus {
            state: self.shift_state(now),
            number: self.shift.number,
            opened_at: self.shift.open.then_some(self.shift.opened_at),
            expires_at: self
                .shift
                .open
                .then_some(self.shift.opened_at.saturating_add(SHIFT_LIMIT)),
            receipts: self.shift.receipts,
            documents: self.shift.documents,
        }
    }

    pub fn x_report(&self) -> XReport {
        XReport {
            shift_number: self.shift.number,
            ..self.shift.totals
        }
    }

    pub fn unsent_summary(&self) -> UnsentSummary {
        UnsentSummary {
            count: self.unsent.len() as u32,
            first_fd: self.unsent.front().map(|(fd, _)| *fd),
            first_date_time: self.unsent.front().map(|(_, t)| *t),
        }
    }

    fn flags(&self, now: u32) -> FnFlags {
        let w = self.warnings(now);
        FnFlags {
            resource_30_days: w.resource_exhausted,
            replace_urgently: w.need_replacement,
            memory_90_percent: w.memory_overflow,
            ofd_timeout: w.ofd_timeout,
        }
    }

    fn key_resource_days(&self, now: u32) -> u32 {
        self.valid_until.map_or(0, |v| v.saturating_sub(now) / DAY)
    }

    fn owner(&self) -> Result<Owner, KktError> {
        let r = self.registration.as_ref().ok_or_else(|| {
            Self::err(
                ErrorCode::REGISTRATION_NEEDED,
                "the KKT is not registered: register it first",
            )
        })?;
        Ok(Owner {
            user_name: r.params.user_name.clone(),
            user_inn: r.params.user_inn.clone(),
            rnm: r.params.rnm.clone(),
        })
    }

    fn zn(&self) -> String {
        self.registration
            .as_ref()
            .map(|r| r.zn.clone())
            .unwrap_or_default()
    }

    fn require_fiscal(&self) -> Result<(), KktError> {
        match self.phase {
            Phase::Fiscal => Ok(()),
            Phase::Ready => Err(Self::err(
                ErrorCode::REGISTRATION_NEEDED,
                "the FN is not in fiscal mode: register the KKT first",
            )),
            Phase::PostFiscal | Phase::ReadOnly => Err(Self::err(
                ErrorCode::ARCHIVE_CLOSED,
                "the FN archive is closed: fit a new FN and re-register",
            )),
        }
    }

    /// A placeholder seal; [`Self::seal`] fills the real one once the document is complete.
    fn next_seal(&self, now: u32) -> Seal {
        Seal {
            fn_number: self.config.fn_number.clone(),
            fd_number: self.last_fd + 1,
            date_time: now,
            fpd: Fpd([0; 6]),
        }
    }

    /// Signs a complete document, takes its FD number and queues it for the OFD.
    fn seal(&mut self, mut document: FiscalDocument, now: u32) -> Formed {
        // `encodable` ran before any state changed, so encoding cannot fail here.
        let signed = document.to_document().signed_bytes().unwrap_or_default();
        document.seal_mut().fpd = Fpd(mac6(&self.config.secret, &signed));
        let generic = document.to_document();
        let bytes = generic.encode().unwrap_or_default();
        self.last_fd += 1;
        self.unsent.push_back((self.last_fd, now));
        if self.shift.open {
            self.shift.documents += 1;
        }
        let result = FiscalResult::from_document(&document, &self.zn(), self.shift.number);
        Formed {
            document,
            bytes,
            result,
        }
    }

    /// Checks that a document can be written as TLV (CP866 text, sizes) before anything changes.
    fn encodable(doc: &FiscalDocument) -> Result<(), KktError> {
        doc.to_document()
            .encode()
            .map(|_| ())
            .map_err(|e| Self::err(ErrorCode::INVALID_PARAMETER, e.to_string()))
    }

    fn check_registration(&self, zn: &str, p: &RegistrationParams) -> Result<(), KktError> {
        check_rnm(&p.rnm, &p.user_inn, zn)
            .map_err(|e| Self::err(ErrorCode::REGISTRATION_REFUSED, format!("rnm: {e}")))?;
        protocol::checksum::validate_inn(&p.user_inn)
            .map_err(|e| Self::err(ErrorCode::REGISTRATION_REFUSED, format!("userInn: {e}")))?;
        if p.taxation_systems.is_empty() {
            return Err(Self::err(
                ErrorCode::INVALID_PARAMETER,
                "taxationSystems: name at least one taxation system",
            ));
        }
        if self.registrations_done >= self.config.registrations_max {
            return Err(Self::err(
                ErrorCode::REGISTRATIONS_EXHAUSTED,
                "this FN has no registrations left: replace the FN",
            ));
        }
        Ok(())
    }

    fn registration_document(
        &self,
        now: u32,
        zn: &str,
        p: &RegistrationParams,
        reasons: Option<ReregistrationReasons>,
    ) -> FiscalDocument {
        let taxation_systems = p.taxation_systems.iter().fold(0u8, |m, t| m | t.bit());
        FiscalDocument::Registration(RegistrationReport {
            seal: self.next_seal(now),
            owner: Owner {
                user_name: p.user_name.clone(),
                user_inn: p.user_inn.clone(),
                rnm: p.rnm.clone(),
            },
            zn: zn.to_owned(),
            reregistration: reasons,
            taxation_systems,
            internet: p.internet,
            auto_mode: true,
            offline: false,
            encryption: p.encryption,
            ofd_name: p.ofd.name.clone(),
            ofd_inn: p.ofd.inn.clone(),
            fns_site: p.fns_site.clone(),
            settlement_address: p.settlement_address.clone(),
            settlement_place: p.settlement_place.clone(),
            cashier: p
                .cashier
                .as_ref()
                .map(|c| c.name.clone())
                .unwrap_or_default(),
            ffd_version: self.config.ffd_version.code(),
        })
    }

    /// Registration report (1): phase 1 → 3.
    pub fn register(
        &mut self,
        now: u32,
        zn: &str,
        p: &RegistrationParams,
    ) -> Result<Formed, KktError> {
        if self.phase != Phase::Ready {
            return Err(Self::fn_err(
                ErrorCode::WRONG_FN_STATE,
                fn_code::WRONG_STATE,
                "the FN is already registered: use reregister",
            ));
        }
        self.check_registration(zn, p)?;
        let doc = self.registration_document(now, zn, p, None);
        Self::encodable(&doc)?;
        self.registration = Some(Registration {
            params: p.clone(),
            zn: zn.to_owned(),
        });
        self.registrations_done += 1;
        self.phase = Phase::Fiscal;
        self.valid_until = Some(now.saturating_add(self.config.model.validity_days() * DAY));
        Ok(self.seal(doc, now))
    }

    /// Re-registration report (11). On a fresh FN (phase 1) only with reason "FN replaced"; on a
    /// drive in fiscal mode with the shift closed for any reason.
    pub fn reregister(
        &mut self,
        now: u32,
        zn: &str,
        p: &ReregistrationParams,
    ) -> Result<Formed, KktError> {
        use protocol::kkt::ReregistrationReason as R;
        if p.reasons.is_empty() {
            return Err(Self::err(
                ErrorCode::INVALID_PARAMETER,
                "reasons: name at least one re-registration reason",
            ));
        }
        let fn_replaced = p.reasons.contains(&R::FnReplaced);
        match self.phase {
            Phase::Ready if fn_replaced => {}
            Phase::Ready => {
                return Err(Self::err(
                    ErrorCode::REGISTRATION_NEEDED,
                    "a new FN is re-registered only with reason fnReplaced (or registered)",
                ))
            }
            Phase::Fiscal if fn_replaced => {
                return Err(Self::fn_err(
                    ErrorCode::WRONG_FN_STATE,
                    fn_code::WRONG_STATE,
                    "reason fnReplaced needs a new FN: close this archive and fit a new FN",
                ))
            }
            Phase::Fiscal => {
                if self.shift.open {
                    return Err(Self::err(
                        ErrorCode::SHIFT_OPEN,
                        "close the shift before re-registering",
                    ));
                }
            }
            Phase::PostFiscal | Phase::ReadOnly => self.require_fiscal()?,
        }
        // Only closing may use the documents kept for closing (RESERVED_FOR_CLOSING).
        if self.last_fd + RESERVED_FOR_CLOSING >= self.config.capacity {
            return Err(Self::fn_err(
                ErrorCode::FN_ARCHIVE_FULL,
                fn_code::ARCHIVE_FULL,
                "FN archive is full: close the archive and replace the FN",
            ));
        }
        self.check_registration(zn, &p.registration)?;
        let changes = p
            .reasons
            .iter()
            .fold(0u32, |m, r| m | (1 << (r.code() - 1)));
        let reason = p.reasons.iter().map(|r| r.code()).min().unwrap_or(4);
        let doc = self.registration_document(
            now,
            zn,
            &p.registration,
            Some(ReregistrationReasons { reason, changes }),
        );
        Self::encodable(&doc)?;
        self.registration = Some(Registration {
            params: p.registration.clone(),
            zn: zn.to_owned(),
        });
        self.registrations_done += 1;
        if self.phase == Phase::Ready {
            self.phase = Phase::Fiscal;
            self.valid_until = Some(now.saturating_add(self.config.model.validity_days() * DAY));
        }
        Ok(self.seal(doc, now))
    }

    fn shift_report(
        &self,
        now: u32,
        close: bool,
        op: &Operator,
    ) -> Result<FiscalDocument, KktError> {
        Ok(FiscalDocument::Shift(ShiftReport {
            seal: self.next_seal(now),
            owner: self.owner()?,
            close,
            shift_number: if close {
                self.shift.number
            } else {
                self.shift.number + 1
            },
            cashier: cashier_name(op),
            receipts_in_shift: if close { self.shift.receipts } else { 0 },
            // The closing report counts itself.
            documents_in_shift: if close { self.shift.documents + 1 } else { 0 },
            unsent: self.unsent_summary(),
            flags: self.flags(now),
            key_resource_days: self.key_resource_days(now),
        }))
    }

    pub fn open_shift(&mut self, now: u32, op: &Operator) -> Result<Formed, KktError> {
        self.require_fiscal()?;
        if self.shift.open {
            return Err(Self::err(
                ErrorCode::SHIFT_OPEN,
                "the shift is already open",
            ));
        }
        if let Some(block) = self.block(now) {
            return Err(block);
        }
        let doc = self.shift_report(now, false, op)?;
        Self::encodable(&doc)?;
        self.shift = Shift {
            number: self.shift.number + 1,
            open: true,
            opened_at: now,
            receipts: 0,
            documents: 0,
            totals: XReport::default(),
        };
        Ok(self.seal(doc, now))
    }

    /// Closing is allowed past 24 h and with most blocks: it is how a blocked KKT gets unstuck.
    pub fn close_shift(&mut self, now: u32, op: &Operator) -> Result<Formed, KktError> {
        self.require_fiscal()?;
        if !self.shift.open {
            return Err(Self::err(ErrorCode::SHIFT_CLOSED, "the shift is not open"));
        }
        if self.last_fd >= self.config.capacity {
            return Err(Self::fn_err(
                ErrorCode::FN_ARCHIVE_FULL,
                fn_code::ARCHIVE_FULL,
                "FN archive is full",
            ));
        }
        let doc = self.shift_report(now, true, op)?;
        Self::encodable(&doc)?;
        let formed = self.seal(doc, now);
        self.shift.open = false;
        Ok(formed)
    }

    /// A receipt (3) or correction receipt (31).
    pub fn receipt(&mut self, now: u32, p: &ReceiptParams) -> Result<Formed, KktError> {
        self.require_fiscal()?;
        let owner = self.owner()?;
        let reg = match &self.registration {
            Some(r) => r.params.clone(),
            None => return Err(Self::err(ErrorCode::REGISTRATION_NEEDED, "register first")),
        };
        match self.shift_state(now) {
            ShiftState::Closed => {
                return Err(Self::err(
                    ErrorCode::SHIFT_CLOSED,
                    "open a shift before the receipt",
                ))
            }
            ShiftState::Expired => {
                return Err(Self::fn_err(
                    ErrorCode::SHIFT_EXPIRED,
                    fn_code::SHIFT_OVER_24H,
                    "the shift is open longer than 24 h: close it and open a new one",
                ))
            }
            ShiftState::Opened => {}
        }
        if let Some(block) = self.block(now) {
            return Err(block);
        }
        let r = &p.receipt;
        r.validate()
            .map_err(|e| Self::err(ErrorCode::INVALID_PARAMETER, format!("receipt.{e}")))?;
        // What the registration (taxation systems, internet mode) and this FN's FFD allow.
        r.requirements()
            .check(&reg.taxation_systems, reg.internet, self.config.ffd_version)
            .map_err(|m| {
                Self::err(
                    ErrorCode::INVALID_PARAMETER,
                    format!("receipt.{}: {m}", m.field()),
                )
            })?;
        let total = r.total().unwrap_or_default();
        let doc = FiscalDocument::Receipt(ReceiptRecord {
            seal: self.next_seal(now),
            owner,
            zn: self.zn(),
            shift_number: self.shift.number,
            receipt_number: self.shift.receipts + 1,
            operation: r.kind.settlement_sign(),
            taxation: r.taxation.bit(),
            items: r
                .items
                .iter()
                .map(|i| ItemRecord {
                    name: i.label.clone(),
                    price: i.price.0,
                    quantity_milli: i.quantity.0,
                    sum: i.amount.0,
                    vat: i.vat.code(),
                    payment_method: i.payment_method.code(),
                    payment_subject: i.payment_subject.0,
                    measure: i.measure.code(),
                })
                .collect(),
            total: total.0,
            cash: r.payments.cash.0,
            electronic: r.payments.electronic.0,
            prepayment: r.payments.prepayment.0,
            credit: r.payments.credit.0,
            counter_provision: r.payments.counter_provision.0,
            customer_contact: r.email.clone().or_else(|| r.phone.clone()),
            cashier: r.cashier.as_ref().map(|c| c.name.clone()),
            cashier_inn: r.cashier.as_ref().and_then(|c| c.inn.clone()),
            buyer_name: r.client.as_ref().map(|c| c.name.clone()),
            buyer_inn: r.client.as_ref().and_then(|c| c.inn.clone()),
            settlement_address: Some(
                r.settlement_address
                    .clone()
                    .unwrap_or_else(|| reg.settlement_address.clone()),
            ),
            settlement_place: Some(
                r.settlement_place
                    .clone()
                    .unwrap_or_else(|| reg.settlement_place.clone()),
            ),
            additional_attribute: p.additional_attribute.clone(),
            correction: r.correction.as_ref().map(|c| CorrectionRecord {
                by_instruction: c.by_instruction,
                description: c.description.clone(),
                date: u32::try_from(c.date.days_since_epoch() * i64::from(DAY)).unwrap_or(0),
                number: c.number.clone(),
            }),
        });
        Self::encodable(&doc)?;
        let formed = self.seal(doc, now);
        let t = &mut self.shift.totals;
        let add = |a: &mut Kopecks, b: Kopecks| *a = a.checked_add(b).unwrap_or(*a);
        match r.kind.settlement_sign() {
            1 => add(&mut t.income, total),
            2 => add(&mut t.income_return, total),
            3 => add(&mut t.expense, total),
            _ => add(&mut t.expense_return, total),
        }
        add(&mut t.cash, r.payments.cash);
        add(&mut t.electronic, r.payments.electronic);
        t.receipts += 1;
        self.shift.receipts += 1;
        Ok(formed)
    }

    /// Report on the current state of settlements (21).
    pub fn current_state_report(&mut self, now: u32) -> Result<Formed, KktError> {
        self.require_fiscal()?;
        // Only closing may use the documents kept for closing (RESERVED_FOR_CLOSING).
        if self.last_fd + RESERVED_FOR_CLOSING >= self.config.capacity {
            return Err(Self::fn_err(
                ErrorCode::FN_ARCHIVE_FULL,
                fn_code::ARCHIVE_FULL,
                "FN archive is full",
            ));
        }
        let doc = FiscalDocument::CurrentState(CurrentStateReport {
            seal: self.next_seal(now),
            owner: self.owner()?,
            shift_number: self.shift.number,
            offline: false,
            unsent: self.unsent_summary(),
        });
        Ok(self.seal(doc, now))
    }

    /// FN closure report (6): phase 3 → 7; the drive reaches 15 once the OFD has acknowledged
    /// everything, the closure report included.
    pub fn close_archive(&mut self, now: u32, op: &Operator) -> Result<Formed, KktError> {
        self.require_fiscal()?;
        if self.shift.open {
            return Err(Self::err(
                ErrorCode::SHIFT_OPEN,
                "close the shift before closing the FN archive",
            ));
        }
        let doc = FiscalDocument::FnClosure(FnClosureReport {
            seal: self.next_seal(now),
            owner: self.owner()?,
            zn: self.zn(),
            cashier: cashier_name(op),
            unsent: self.unsent_summary(),
        });
        Self::encodable(&doc)?;
        let formed = self.seal(doc, now);
        self.phase = Phase::PostFiscal;
        Ok(formed)
    }

    /// The oldest document owed to the OFD: the only one the KKT may send next.
    pub fn next_unsent(&self) -> Option<u32> {
        self.unsent.front().map(|(fd, _)| *fd)
    }

    /// Applies the OFD's acknowledgement. Documents are delivered in order, so only the oldest
    /// unsent one can be acknowledged; anything else is a stale or foreign ack and changes nothing.
    pub fn ofd_ack(&mut self, fd: u32, now: u32) -> bool {
        if self.next_unsent() != Some(fd) {
            return false;
        }
        self.unsent.pop_front();
        self.last_ack_at = Some(now);
        if self.phase == Phase::PostFiscal && self.unsent.is_empty() {
            self.phase = Phase::ReadOnly;
        }
        true
    }

    /// Fault knob: makes the archive full now (the next receipt is refused with 0x06).
    pub fn fill_archive(&mut self) {
        self.config.capacity = self.last_fd + RESERVED_FOR_CLOSING;
    }

    /// Fault knob: ends the service life now.
    pub fn expire(&mut self, now: u32) {
        self.valid_until = Some(now);
    }
}

fn cashier_name(op: &Operator) -> String {
    op.cashier
        .as_ref()
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "Администратор".to_owned())
}

/// The simulated fiscal sign: HMAC-SHA256 cut to six bytes.
fn mac6(secret: &[u8; 32], data: &[u8]) -> [u8; 6] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .expect("HMAC-SHA256 takes keys of any length");
    mac.update(data);
    let tag = mac.finalize().into_bytes();
    let mut out = [0u8; 6];
    out.copy_from_slice(&tag[..6]);
    out
}

/// Recomputes a document's fiscal sign with a drive's secret: what a checker does to prove a
/// document came from that drive unaltered.
pub fn verify_fpd(secret: &[u8; 32], document_bytes: &[u8]) -> bool {
    let Ok(doc) = protocol::document::Document::decode(document_bytes) else {
        return false;
    };
    let Some(fpd) = doc.fpd() else { return false };
    let Ok(signed) = doc.signed_bytes() else {
        return false;
    };
    mac6(secret, &signed) == fpd.0
}
