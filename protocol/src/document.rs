//! Fiscal documents (FFD) as typed structs, built to and parsed from TLV.
//!
//! [`Document`] is the generic form: a document type and its ordered fields. It round-trips any
//! document byte for byte, which is what the archive and the OFD exchange need. The typed structs
//! below are what the register writes and what the rest of the product reads; each one converts to
//! and from a [`Document`] with the tags of reference/fiscal.md.

use crate::tlv::{self, DecodeError, EncodeError, Field, Value};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// FFD document types (the tag of the document's STLV).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DocumentType {
    Registration,
    Reregistration,
    ShiftOpen,
    CurrentState,
    Receipt,
    CorrectionReceipt,
    Bso,
    CorrectionBso,
    ShiftClose,
    FnClosure,
    OfdAck,
}

impl DocumentType {
    pub const ALL: [DocumentType; 11] = [
        Self::Registration,
        Self::Reregistration,
        Self::ShiftOpen,
        Self::CurrentState,
        Self::Receipt,
        Self::CorrectionReceipt,
        Self::Bso,
        Self::CorrectionBso,
        Self::ShiftClose,
        Self::FnClosure,
        Self::OfdAck,
    ];

    pub fn tag(self) -> u16 {
        match self {
            Self::Registration => 1,
            Self::Reregistration => 11,
            Self::ShiftOpen => 2,
            Self::CurrentState => 21,
            Self::Receipt => 3,
            Self::CorrectionReceipt => 31,
            Self::Bso => 4,
            Self::CorrectionBso => 41,
            Self::ShiftClose => 5,
            Self::FnClosure => 6,
            Self::OfdAck => 7,
        }
    }

    pub fn from_tag(tag: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.tag() == tag)
    }
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DocumentError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("not a fiscal document: outer tag {0} is no FFD document type")]
    UnknownType(u16),
    #[error("expected exactly one document, found {0} top-level TLVs")]
    NotOne(usize),
    #[error("document {doc}: required tag {tag} is missing")]
    Missing { doc: u16, tag: u16 },
    #[error("document {doc}: tag {tag} has the wrong value type")]
    WrongType { doc: u16, tag: u16 },
    #[error("document {doc}: tag {tag} holds {value}, which is not a valid value")]
    BadValue { doc: u16, tag: u16, value: u64 },
    #[error("expected a {expected:?} document, got {got:?}")]
    WrongDocument {
        expected: &'static str,
        got: DocumentType,
    },
}

/// A document in its generic form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub doc_type: DocumentType,
    pub fields: Vec<Field>,
}

impl Document {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        tlv::encode_field(
            &Field::new(self.doc_type.tag(), Value::Stlv(self.fields.clone())),
            &mut out,
        )?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DocumentError> {
        let mut top = tlv::decode(bytes)?;
        if top.len() != 1 {
            return Err(DocumentError::NotOne(top.len()));
        }
        let Field { tag, value } = top.remove(0);
        let doc_type = DocumentType::from_tag(tag).ok_or(DocumentError::UnknownType(tag))?;
        match value {
            Value::Stlv(fields) => Ok(Document { doc_type, fields }),
            _ => Err(DocumentError::UnknownType(tag)),
        }
    }

    /// The bytes a fiscal sign covers: the whole document without its own FPD (tag 1077).
    pub fn signed_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let doc = Document {
            doc_type: self.doc_type,
            fields: self
                .fields
                .iter()
                .filter(|f| f.tag != TAG_FPD)
                .cloned()
                .collect(),
        };
        doc.encode()
    }

    fn reader(&self) -> Reader<'_> {
        Reader {
            doc: self.doc_type.tag(),
            fields: &self.fields,
        }
    }

    /// FD number (1040), present in every document the FN forms.
    pub fn fd_number(&self) -> Option<u32> {
        self.reader().opt_u32(TAG_FD_NUMBER).ok().flatten()
    }

    /// FN number (1041), padding removed.
    pub fn fn_number(&self) -> Option<String> {
        self.reader().opt_str(1041).ok().flatten()
    }

    /// Date-time (1012).
    pub fn date_time(&self) -> Option<u32> {
        self.reader().opt_time(TAG_DATE_TIME).ok().flatten()
    }

    /// The fiscal sign (1077), absent only in documents the FN did not form (the OFD's ack).
    pub fn fpd(&self) -> Option<Fpd> {
        self.reader().opt_fpd().ok().flatten()
    }
}

pub const TAG_FPD: u16 = 1077;
pub const TAG_FD_NUMBER: u16 = 1040;
pub const TAG_DATE_TIME: u16 = 1012;

/// Fiscal sign of a document (tag 1077): six bytes; the printed number is bytes 3–6 big-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fpd(pub [u8; 6]);

impl Fpd {
    /// The number printed on the receipt and in the QR code.
    pub fn printed(&self) -> u32 {
        u32::from_be_bytes([self.0[2], self.0[3], self.0[4], self.0[5]])
    }
}

/// Reads typed values out of a field list, naming the tag on failure.
struct Reader<'a> {
    doc: u16,
    fields: &'a [Field],
}

impl<'a> Reader<'a> {
    fn find(&self, tag: u16) -> Option<&'a Value> {
        self.fields.iter().find(|f| f.tag == tag).map(|f| &f.value)
    }
    fn missing(&self, tag: u16) -> DocumentError {
        DocumentError::Missing { doc: self.doc, tag }
    }
    fn wrong(&self, tag: u16) -> DocumentError {
        DocumentError::WrongType { doc: self.doc, tag }
    }
    fn opt_str(&self, tag: u16) -> Result<Option<String>, DocumentError> {
        match self.find(tag) {
            None => Ok(None),
            // Strip the FN's padding (spaces) and nothing else: a tab, line break or no-break
            // space at the end is part of the text.
            Some(Value::String(s)) => Ok(Some(s.trim_end_matches(' ').to_owned())),
            Some(_) => Err(self.wrong(tag)),
        }
    }
    fn str(&self, tag: u16) -> Result<String, DocumentError> {
        self.opt_str(tag)?.ok_or_else(|| self.missing(tag))
    }
    fn opt_u32(&self, tag: u16) -> Result<Option<u32>, DocumentError> {
        match self.find(tag) {
            None => Ok(None),
            Some(Value::U32(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(tag)),
        }
    }
    fn u32(&self, tag: u16) -> Result<u32, DocumentError> {
        self.opt_u32(tag)?.ok_or_else(|| self.missing(tag))
    }
    fn opt_time(&self, tag: u16) -> Result<Option<u32>, DocumentError> {
        match self.find(tag) {
            None => Ok(None),
            Some(Value::UnixTime(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(tag)),
        }
    }
    fn time(&self, tag: u16) -> Result<u32, DocumentError> {
        self.opt_time(tag)?.ok_or_else(|| self.missing(tag))
    }
    fn opt_byte(&self, tag: u16) -> Result<Option<u8>, DocumentError> {
        match self.find(tag) {
            None => Ok(None),
            Some(Value::Byte(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(tag)),
        }
    }
    fn byte(&self, tag: u16) -> Result<u8, DocumentError> {
        self.opt_byte(tag)?.ok_or_else(|| self.missing(tag))
    }
    fn flag(&self, tag: u16) -> Result<bool, DocumentError> {
        Ok(self.opt_byte(tag)?.unwrap_or(0) != 0)
    }
    fn vln(&self, tag: u16) -> Result<u64, DocumentError> {
        match self.find(tag) {
            None => Ok(0),
            Some(Value::Vln(v)) => Ok(*v),
            Some(_) => Err(self.wrong(tag)),
        }
    }
    fn req_vln(&self, tag: u16) -> Result<u64, DocumentError> {
        match self.find(tag) {
            None => Err(self.missing(tag)),
            Some(_) => self.vln(tag),
        }
    }
    fn opt_fpd(&self) -> Result<Option<Fpd>, DocumentError> {
        match self.find(TAG_FPD) {
            None => Ok(None),
            Some(Value::Bytes(b)) => {
                let arr: [u8; 6] = b.as_slice().try_into().map_err(|_| self.wrong(TAG_FPD))?;
                Ok(Some(Fpd(arr)))
            }
            Some(_) => Err(self.wrong(TAG_FPD)),
        }
    }
    fn fpd(&self) -> Result<Fpd, DocumentError> {
        self.opt_fpd()?.ok_or_else(|| self.missing(TAG_FPD))
    }
    fn bytes(&self, tag: u16) -> Result<Vec<u8>, DocumentError> {
        match self.find(tag) {
            None => Err(self.missing(tag)),
            Some(Value::Bytes(b)) => Ok(b.clone()),
            Some(_) => Err(self.wrong(tag)),
        }
    }
    fn all_stlv(&self, tag: u16) -> Result<Vec<&'a [Field]>, DocumentError> {
        self.fields
            .iter()
            .filter(|f| f.tag == tag)
            .map(|f| match &f.value {
                Value::Stlv(children) => Ok(children.as_slice()),
                _ => Err(self.wrong(tag)),
            })
            .collect()
    }
}

/// Appends typed fields, padding fixed-width strings the way the FN does.
#[derive(Default)]
struct Writer {
    fields: Vec<Field>,
}

impl Writer {
    fn str(&mut self, tag: u16, s: &str) -> &mut Self {
        self.fields
            .push(Field::new(tag, Value::String(s.to_owned())));
        self
    }
    fn padded(&mut self, tag: u16, s: &str, width: usize) -> &mut Self {
        self.str(tag, &format!("{s:<width$}"))
    }
    fn opt_str(&mut self, tag: u16, s: &Option<String>) -> &mut Self {
        if let Some(s) = s {
            self.str(tag, s);
        }
        self
    }
    fn u32(&mut self, tag: u16, v: u32) -> &mut Self {
        self.fields.push(Field::new(tag, Value::U32(v)));
        self
    }
    fn time(&mut self, tag: u16, v: u32) -> &mut Self {
        self.fields.push(Field::new(tag, Value::UnixTime(v)));
        self
    }
    fn byte(&mut self, tag: u16, v: u8) -> &mut Self {
        self.fields.push(Field::new(tag, Value::Byte(v)));
        self
    }
    fn flag(&mut self, tag: u16, v: bool) -> &mut Self {
        self.byte(tag, u8::from(v))
    }
    fn vln(&mut self, tag: u16, v: u64) -> &mut Self {
        self.fields.push(Field::new(tag, Value::Vln(v)));
        self
    }
    fn bytes(&mut self, tag: u16, v: &[u8]) -> &mut Self {
        self.fields.push(Field::new(tag, Value::Bytes(v.to_vec())));
        self
    }
    fn stlv(&mut self, tag: u16, children: Vec<Field>) -> &mut Self {
        self.fields.push(Field::new(tag, Value::Stlv(children)));
        self
    }
    /// The seal every FN-formed document carries: FN number, FD number, date-time, FPD.
    fn seal(&mut self, s: &Seal) -> &mut Self {
        self.padded(1041, &s.fn_number, 16)
            .u32(TAG_FD_NUMBER, s.fd_number)
            .time(TAG_DATE_TIME, s.date_time)
            .bytes(TAG_FPD, &s.fpd.0)
    }
    fn done(&mut self, doc_type: DocumentType) -> Document {
        Document {
            doc_type,
            fields: std::mem::take(&mut self.fields),
        }
    }
}

/// What the FN stamps on every document it forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seal {
    pub fn_number: String,
    pub fd_number: u32,
    /// Unix seconds.
    pub date_time: u32,
    pub fpd: Fpd,
}

impl Seal {
    fn read(r: &Reader<'_>) -> Result<Self, DocumentError> {
        Ok(Seal {
            fn_number: r.str(1041)?,
            fd_number: r.u32(TAG_FD_NUMBER)?,
            date_time: r.time(TAG_DATE_TIME)?,
            fpd: r.fpd()?,
        })
    }
}

/// Who the register is registered to; repeated in every document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    pub user_name: String,
    pub user_inn: String,
    pub rnm: String,
}

impl Owner {
    fn write(&self, w: &mut Writer) {
        w.str(1048, &self.user_name)
            .padded(1018, &self.user_inn, 12)
            .padded(1037, &self.rnm, 20);
    }
    fn read(r: &Reader<'_>) -> Result<Self, DocumentError> {
        Ok(Owner {
            user_name: r.opt_str(1048)?.unwrap_or_default(),
            user_inn: r.str(1018)?,
            rnm: r.str(1037)?,
        })
    }
}

/// Registration (1) or re-registration (11) report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationReport {
    pub seal: Seal,
    pub owner: Owner,
    pub zn: String,
    /// Present only in a re-registration report: 1101 reason and 1205 change bitmask.
    pub reregistration: Option<ReregistrationReasons>,
    /// 1062 bitmask of registered taxation systems.
    pub taxation_systems: u8,
    pub internet: bool,
    pub auto_mode: bool,
    pub offline: bool,
    pub encryption: bool,
    pub ofd_name: String,
    pub ofd_inn: String,
    pub fns_site: String,
    pub settlement_address: String,
    pub settlement_place: String,
    pub cashier: String,
    /// 1209: 2 = FFD 1.05, 3 = 1.1, 4 = 1.2.
    pub ffd_version: u8,
}

/// Why a register was re-registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReregistrationReasons {
    /// 1101: 1 FN replaced, 2 OFD changed, 3 user details changed, 4 KKT settings changed.
    pub reason: u8,
    /// 1205 bitmask (FFD 1.1+).
    pub changes: u32,
}

impl RegistrationReport {
    pub fn to_document(&self) -> Document {
        let mut w = Writer::default();
        w.seal(&self.seal);
        self.owner.write(&mut w);
        w.padded(1013, &self.zn, 20)
            .byte(1062, self.taxation_systems)
            .flag(1108, self.internet)
            .flag(1001, self.auto_mode)
            .flag(1002, self.offline)
            .flag(1056, self.encryption)
            .str(1046, &self.ofd_name)
            .padded(1017, &self.ofd_inn, 12)
            .str(1060, &self.fns_site)
            .str(1009, &self.settlement_address)
            .str(1187, &self.settlement_place)
            .str(1021, &self.cashier)
            .byte(1209, self.ffd_version);
        if let Some(r) = self.reregistration {
            w.byte(1101, r.reason).u32(1205, r.changes);
        }
        w.done(if self.reregistration.is_some() {
            DocumentType::Reregistration
        } else {
            DocumentType::Registration
        })
    }

    pub fn from_document(doc: &Document) -> Result<Self, DocumentError> {
        let rereg = match doc.doc_type {
            DocumentType::Registration => false,
            DocumentType::Reregistration => true,
            got => {
                return Err(DocumentError::WrongDocument {
                    expected: "registration report",
                    got,
                })
            }
        };
        let r = doc.reader();
        Ok(RegistrationReport {
            seal: Seal::read(&r)?,
            owner: Owner::read(&r)?,
            zn: r.str(1013)?,
            reregistration: if rereg {
                Some(ReregistrationReasons {
                    reason: r.byte(1101)?,
                    changes: r.opt_u32(1205)?.unwrap_or(0),
                })
            } else {
                None
            },
            taxation_systems: r.byte(1062)?,
            internet: r.flag(1108)?,
            auto_mode: r.flag(1001)?,
            offline: r.flag(1002)?,
            encryption: r.flag(1056)?,
            ofd_name: r.opt_str(1046)?.unwrap_or_default(),
            ofd_inn: r.opt_str(1017)?.unwrap_or_default(),
            fns_site: r.opt_str(1060)?.unwrap_or_default(),
            settlement_address: r.opt_str(1009)?.unwrap_or_default(),
            settlement_place: r.opt_str(1187)?.unwrap_or_default(),
            cashier: r.opt_str(1021)?.unwrap_or_default(),
            ffd_version: r.opt_byte(1209)?.unwrap_or(2),
        })
    }
}

/// The FN's warning flags as they appear in shift reports (1050–1053).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FnFlags {
    /// 1050: validity ends within 30 days.
    pub resource_30_days: bool,
    /// 1051: replace urgently (3 days left).
    pub replace_urgently: bool,
    /// 1052: archive 90 % full.
    pub memory_90_percent: bool,
    /// 1053: OFD answer timeout exceeded.
    pub ofd_timeout: bool,
}

/// What the FN owes the OFD, as reported in shift and state reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnsentSummary {
    /// 1097
    pub count: u32,
    /// 1116: number of the oldest unsent document.
    pub first_fd: Option<u32>,
    /// 1098: its date-time.
    pub first_date_time: Option<u32>,
}

impl UnsentSummary {
    fn write(&self, w: &mut Writer) {
        w.u32(1097, self.count);
        if let Some(fd) = self.first_fd {
            w.u32(1116, fd);
        }
        if let Some(t) = self.first_date_time {
            w.time(1098, t);
        }
    }
    fn read(r: &Reader<'_>) -> Result<Self, DocumentError> {
        Ok(UnsentSummary {
            count: r.opt_u32(1097)?.unwrap_or(0),
            first_fd: r.opt_u32(1116)?,
            first_date_time: r.opt_time(1098)?,
        })
    }
}

/// Shift opening (2) or closing (5) report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShiftReport {
    pub seal: Seal,
    pub owner: Owner,
    pub close: bool,
    pub shift_number: u32,
    pub cashier: String,
    /// 1118 — closing report only.
    pub receipts_in_shift: u32,
    /// 1111 — closing report only.
    pub documents_in_shift: u32,
    pub unsent: UnsentSummary,
    pub flags: FnFlags,
    /// 1213: days of key resource left.
    pub key_resource_days: u32,
}

impl ShiftReport {
    pub fn to_document(&self) -> Document {
        let mut w = Writer::default();
        w.seal(&self.seal);
        self.owner.write(&mut w);
        w.u32(1038, self.shift_number).str(1021, &self.cashier);
        if self.close {
            w.u32(1118, self.receipts_in_shift)
                .u32(1111, self.documents_in_shift);
        }
        self.unsent.write(&mut w);
        w.flag(1050, self.flags.resource_30_days)
            .flag(1051, self.flags.replace_urgently)
            .flag(1052, self.flags.memory_90_percent)
            .flag(1053, self.flags.ofd_timeout)
            .u32(1213, self.key_resource_days);
        w.done(if self.close {
            DocumentType::ShiftClose
        } else {
            DocumentType::ShiftOpen
        })
    }

    pub fn from_document(doc: &Document) -> Result<Self, DocumentError> {
        let close = match doc.doc_type {
            DocumentType::ShiftOpen => false,
            DocumentType::ShiftClose => true,
            got => {
                return Err(DocumentError::WrongDocument {
                    expected: "shift report",
                    got,
                })
            }
        };
        let r = doc.reader();
        Ok(ShiftReport {
            seal: Seal::read(&r)?,
            owner: Owner::read(&r)?,
            close,
            shift_number: r.u32(1038)?,
            cashier: r.opt_str(1021)?.unwrap_or_default(),
            // Closing report only, as `to_document` writes them: an opening report that carries
            // them would read as counters that never reach the wire again.
            receipts_in_shift: if close {
                r.opt_u32(1118)?.unwrap_or(0)
            } else {
                0
            },
            documents_in_shift: if close {
                r.opt_u32(1111)?.unwrap_or(0)
            } else {
                0
            },
            unsent: UnsentSummary::read(&r)?,
            flags: FnFlags {
                resource_30_days: r.flag(1050)?,
                replace_urgently: r.flag(1051)?,
                memory_90_percent: r.flag(1052)?,
                ofd_timeout: r.flag(1053)?,
            },
            key_resource_days: r.opt_u32(1213)?.unwrap_or(0),
        })
    }
}

/// Report on the current state of settlements (21).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentStateReport {
    pub seal: Seal,
    pub owner: Owner,
    /// Current shift number, 0 when no shift was ever opened.
    pub shift_number: u32,
    pub offline: bool,
    pub unsent: UnsentSummary,
}

impl CurrentStateReport {
    pub fn to_document(&self) -> Document {
        let mut w = Writer::default();
        w.seal(&self.seal);
        self.owner.write(&mut w);
        w.u32(1038, self.shift_number).flag(1002, self.offline);
        self.unsent.write(&mut w);
        w.done(DocumentType::CurrentState)
    }

    pub fn from_document(doc: &Document) -> Result<Self, DocumentError> {
        if doc.doc_type != DocumentType::CurrentState {
            return Err(DocumentError::WrongDocument {
                expected: "current state report",
                got: doc.doc_type,
            });
        }
        let r = doc.reader();
        Ok(CurrentStateReport {
            seal: Seal::read(&r)?,
            owner: Owner::read(&r)?,
            shift_number: r.opt_u32(1038)?.unwrap_or(0),
            offline: r.flag(1002)?,
            unsent: UnsentSummary::read(&r)?,
        })
    }
}

/// One item of a receipt document (STLV 1059).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemRecord {
    pub name: String,
    /// 1079, kopecks.
    pub price: u64,
    /// 1023 as FVLN: quantity in thousandths, written with 3 decimal places.
    pub quantity_milli: u64,
    /// 1043, kopecks.
    pub sum: u64,
    pub vat: u8,
    pub payment_method: u8,
    pub payment_subject: u8,
    /// 2108 (FFD 1.2 measure code).
    pub measure: u8,
}

impl ItemRecord {
    fn to_fields(&self) -> Vec<Field> {
        let mut w = Writer::default();
        w.str(1030, &self.name).vln(1079, self.price);
        w.fields.push(Field::new(
            1023,
            Value::Fvln {
                decimals: 3,
                mantissa: self.quantity_milli,
            },
        ));
        w.vln(1043, self.sum)
            .byte(1199, self.vat)
            .byte(1214, self.payment_method)
            .byte(1212, self.payment_subject)
            .byte(2108, self.measure);
        w.fields
    }

    fn from_fields(doc: u16, fields: &[Field]) -> Result<Self, DocumentError> {
        let r = Reader { doc, fields };
        let quantity_milli = match r.find(1023) {
            Some(Value::Fvln { decimals, mantissa }) => scale_to_milli(*decimals, *mantissa)
                .ok_or(DocumentError::BadValue {
                    doc,
                    tag: 1023,
                    value: *mantissa,
                })?,
            Some(_) => return Err(r.wrong(1023)),
            None => return Err(r.missing(1023)),
        };
        Ok(ItemRecord {
            name: r.str(1030)?,
            price: r.req_vln(1079)?,
            quantity_milli,
            sum: r.req_vln(1043)?,
            vat: r.byte(1199)?,
            payment_method: r.opt_byte(1214)?.unwrap_or(4),
            payment_subject: r.opt_byte(1212)?.unwrap_or(1),
            measure: r.opt_byte(2108)?.unwrap_or(0),
        })
    }
}

/// An FVLN quantity as thousandths; `None` when it needs more precision or overflows.
fn scale_to_milli(decimals: u8, mantissa: u64) -> Option<u64> {
    if decimals <= 3 {
        mantissa.checked_mul(10u64.checked_pow(u32::from(3 - decimals))?)
    } else {
        let div = 10u64.checked_pow(u32::from(decimals - 3))?;
        (mantissa % div == 0).then_some(mantissa / div)
    }
}

/// The basis of a correction receipt (1173 + STLV 1174).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CorrectionRecord {
    /// 1173: 0 on own initiative, 1 by the tax authority's instruction.
    pub by_instruction: bool,
    pub description: String,
    /// 1178: date of the corrected settlement, Unix seconds at midnight.
    pub date: u32,
    /// 1179: number of the instruction (or of the document being corrected).
    pub number: String,
}

/// Cash receipt (3) or correction receipt (31).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptRecord {
    pub seal: Seal,
    pub owner: Owner,
    pub zn: String,
    pub shift_number: u32,
    /// 1042: receipt number within the shift.
    pub receipt_number: u32,
    /// 1054: 1 income, 2 income return, 3 expense, 4 expense return.
    pub operation: u8,
    /// 1055: applied taxation system (one bit of 1062).
    pub taxation: u8,
    pub items: Vec<ItemRecord>,
    pub total: u64,
    pub cash: u64,
    pub electronic: u64,
    pub prepayment: u64,
    pub credit: u64,
    pub counter_provision: u64,
    pub customer_contact: Option<String>,
    pub cashier: Option<String>,
    pub cashier_inn: Option<String>,
    pub buyer_name: Option<String>,
    pub buyer_inn: Option<String>,
    pub settlement_address: Option<String>,
    pub settlement_place: Option<String>,
    /// 1192: additional receipt attribute; the product stores its job id here so that a document
    /// read back from the archive can be matched to the job that asked for it.
    pub additional_attribute: Option<String>,
    pub correction: Option<CorrectionRecord>,
}

impl ReceiptRecord {
    pub fn to_document(&self) -> Document {
        let mut w = Writer::default();
        w.seal(&self.seal);
        self.owner.write(&mut w);
        w.padded(1013, &self.zn, 20)
            .u32(1038, self.shift_number)
            .u32(1042, self.receipt_number)
            .byte(1054, self.operation)
            .byte(1055, self.taxation);
        if let Some(c) = &self.correction {
            w.byte(1173, u8::from(c.by_instruction));
            let mut basis = Writer::default();
            basis
                .str(1177, &c.description)
                .time(1178, c.date)
                .str(1179, &c.number);
            w.stlv(1174, basis.fields);
        }
        for item in &self.items {
            w.stlv(1059, item.to_fields());
        }
        w.vln(1020, self.total)
            .vln(1031, self.cash)
            .vln(1081, self.electronic)
            .vln(1215, self.prepayment)
            .vln(1216, self.credit)
            .vln(1217, self.counter_provision)
            .opt_str(1008, &self.customer_contact)
            .opt_str(1021, &self.cashier)
            .opt_str(1203, &self.cashier_inn)
            .opt_str(1227, &self.buyer_name)
            .opt_str(1228, &self.buyer_inn)
            .opt_str(1009, &self.settlement_address)
            .opt_str(1187, &self.settlement_place)
            .opt_str(1192, &self.additional_attribute);
        w.done(if self.correction.is_some() {
            DocumentType::CorrectionReceipt
        } else {
            DocumentType::Receipt
        })
    }

    pub fn from_document(doc: &Document) -> Result<Self, DocumentError> {
        let is_correction = match doc.doc_type {
            DocumentType::Receipt => false,
            DocumentType::CorrectionReceipt => true,
            got => {
                return Err(DocumentError::WrongDocument {
                    expected: "receipt",
                    got,
                })
            }
        };
        let tag = doc.doc_type.tag();
        let r = doc.reader();
        let correction = if is_correction {
            let basis = r.all_stlv(1174)?;
            let basis = basis.first().ok_or_else(|| r.missing(1174))?;
            let b = Reader {
                doc: tag,
                fields: basis,
            };
            Some(CorrectionRecord {
                by_instruction: r.byte(1173)? != 0,
                description: b.opt_str(1177)?.unwrap_or_default(),
                date: b.time(1178)?,
                number: b.opt_str(1179)?.unwrap_or_default(),
            })
        } else {
            None
        };
        let items = r
            .all_stlv(1059)?
            .into_iter()
            .map(|f| ItemRecord::from_fields(tag, f))
            .collect::<Result<_, _>>()?;
        Ok(ReceiptRecord {
            seal: Seal::read(&r)?,
            owner: Owner::read(&r)?,
            zn: r.opt_str(1013)?.unwrap_or_default(),
            shift_number: r.u32(1038)?,
            receipt_number: r.u32(1042)?,
            operation: r.byte(1054)?,
            taxation: r.byte(1055)?,
            items,
            total: r.req_vln(1020)?,
            cash: r.vln(1031)?,
            electronic: r.vln(1081)?,
            prepayment: r.vln(1215)?,
            credit: r.vln(1216)?,
            counter_provision: r.vln(1217)?,
            customer_contact: r.opt_str(1008)?,
            cashier: r.opt_str(1021)?,
            cashier_inn: r.opt_str(1203)?,
            buyer_name: r.opt_str(1227)?,
            buyer_inn: r.opt_str(1228)?,
            settlement_address: r.opt_str(1009)?,
            settlement_place: r.opt_str(1187)?,
            additional_attribute: r.opt_str(1192)?,
            correction,
        })
    }
}

/// FN closure report (6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FnClosureReport {
    pub seal: Seal,
    pub owner: Owner,
    pub zn: String,
    pub cashier: String,
    pub unsent: UnsentSummary,
}

impl FnClosureReport {
    pub fn to_document(&self) -> Document {
        let mut w = Writer::default();
        w.seal(&self.seal);
        self.owner.write(&mut w);
        w.padded(1013, &self.zn, 20).str(1021, &self.cashier);
        self.unsent.write(&mut w);
        w.done(DocumentType::FnClosure)
    }

    pub fn from_document(doc: &Document) -> Result<Self, DocumentError> {
        if doc.doc_type != DocumentType::FnClosure {
            return Err(DocumentError::WrongDocument {
                expected: "FN closure report",
                got: doc.doc_type,
            });
        }
        let r = doc.reader();
        Ok(FnClosureReport {
            seal: Seal::read(&r)?,
            owner: Owner::read(&r)?,
            zn: r.opt_str(1013)?.unwrap_or_default(),
            cashier: r.opt_str(1021)?.unwrap_or_default(),
            unsent: UnsentSummary::read(&r)?,
        })
    }
}

/// The OFD's acknowledgement of one document (7). Formed by the OFD, not by an FN: no FPD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfdAck {
    pub ofd_inn: String,
    pub fn_number: String,
    /// The document acknowledged.
    pub fd_number: u32,
    pub date_time: u32,
    /// 1022: 0 success; anything else rejects the document and the FN keeps it unsent.
    pub result_code: u8,
    /// 1078: operator's sign over the acknowledged document.
    pub fpo: Vec<u8>,
}

impl OfdAck {
    pub fn to_document(&self) -> Document {
        let mut w = Writer::default();
        w.time(TAG_DATE_TIME, self.date_time)
            .padded(1017, &self.ofd_inn, 12)
            .padded(1041, &self.fn_number, 16)
            .u32(TAG_FD_NUMBER, self.fd_number)
            .byte(1022, self.result_code)
            .bytes(1078, &self.fpo);
        w.done(DocumentType::OfdAck)
    }

    pub fn from_document(doc: &Document) -> Result<Self, DocumentError> {
        if doc.doc_type != DocumentType::OfdAck {
            return Err(DocumentError::WrongDocument {
                expected: "OFD acknowledgement",
                got: doc.doc_type,
            });
        }
        let r = doc.reader();
        Ok(OfdAck {
            ofd_inn: r.opt_str(1017)?.unwrap_or_default(),
            fn_number: r.str(1041)?,
            fd_number: r.u32(TAG_FD_NUMBER)?,
            date_time: r.time(TAG_DATE_TIME)?,
            result_code: r.byte(1022)?,
            fpo: r.bytes(1078)?,
        })
    }
}

crate::wire::dual_enum! {
/// Any FN-formed document, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FiscalDocument (FiscalDocumentShape, "FiscalDocument", tag = "kind", content = "data") {
    Registration(RegistrationReport),
    Shift(ShiftReport),
    CurrentState(CurrentStateReport),
    Receipt(ReceiptRecord),
    FnClosure(FnClosureReport),
}
}

impl FiscalDocument {
    pub fn to_document(&self) -> Document {
        match self {
            Self::Registration(d) => d.to_document(),
            Self::Shift(d) => d.to_document(),
            Self::CurrentState(d) => d.to_document(),
            Self::Receipt(d) => d.to_document(),
            Self::FnClosure(d) => d.to_document(),
        }
    }

    pub fn from_document(doc: &Document) -> Result<Self, DocumentError> {
        use DocumentType::*;
        Ok(match doc.doc_type {
            Registration | Reregistration => {
                Self::Registration(RegistrationReport::from_document(doc)?)
            }
            ShiftOpen | ShiftClose => Self::Shift(ShiftReport::from_document(doc)?),
            CurrentState => Self::CurrentState(CurrentStateReport::from_document(doc)?),
            Receipt | CorrectionReceipt => Self::Receipt(ReceiptRecord::from_document(doc)?),
            FnClosure => Self::FnClosure(FnClosureReport::from_document(doc)?),
            got @ (Bso | CorrectionBso | OfdAck) => {
                return Err(DocumentError::WrongDocument {
                    expected: "document formed by an FN of a cloud KKT",
                    got,
                })
            }
        })
    }

    pub fn seal(&self) -> &Seal {
        match self {
            Self::Registration(d) => &d.seal,
            Self::Shift(d) => &d.seal,
            Self::CurrentState(d) => &d.seal,
            Self::Receipt(d) => &d.seal,
            Self::FnClosure(d) => &d.seal,
        }
    }

    pub fn seal_mut(&mut self) -> &mut Seal {
        match self {
            Self::Registration(d) => &mut d.seal,
            Self::Shift(d) => &mut d.seal,
            Self::CurrentState(d) => &mut d.seal,
            Self::Receipt(d) => &mut d.seal,
            Self::FnClosure(d) => &mut d.seal,
        }
    }
}
