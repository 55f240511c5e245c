//! The register ("Эфир Pro ФС") as a pure core: it answers link calls from its state, its FN and the
//! time it is given, and says which document (if any) it formed. The shell (`device`) stores that
//! document and the new state before it sends the answer, and serves archive reads itself.

use crate::drive::{DriveConfig, FiscalDrive, Formed};
use protocol::document::{Document, FiscalDocument};
use protocol::kkt::{
    ArchivedDocument, Call, DeviceStatus, ErrorCode, FiscalResult, Hello, KktError, OfdEndpoint,
    OfdExchangeStatus, Reply, ShiftState, LINK_VERSION, MODEL,
};
use serde::{Deserialize, Serialize};

pub const FIRMWARE: &str = concat!("sim-", env!("CARGO_PKG_VERSION"));

/// Everything that persists about one register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub zn: String,
    pub drive: FiscalDrive,
    pub paper_present: bool,
    pub cover_open: bool,
    /// Where documents go; set by registration or `setOfd`.
    pub ofd: Option<OfdEndpoint>,
    /// The register's clock minus the host's, in seconds (moved by the control API).
    pub clock_offset: i64,
    /// Drives fitted before this one (FN replacement).
    pub drives_replaced: u32,
}

/// What a call did.
#[derive(Debug)]
pub struct Outcome {
    pub reply: Result<Reply, KktError>,
    /// The document the FN formed, to be stored before the reply is sent.
    pub formed: Option<Formed>,
}

impl Register {
    pub fn new(zn: String, drive: DriveConfig) -> Self {
        Register {
            zn,
            drive: FiscalDrive::new(drive),
            paper_present: true,
            cover_open: false,
            ofd: None,
            clock_offset: 0,
            drives_replaced: 0,
        }
    }

    /// The register's time given the host's.
    pub fn clock(&self, host_now: u64) -> u32 {
        let t = i64::try_from(host_now).unwrap_or(i64::MAX) + self.clock_offset;
        u32::try_from(t.max(0)).unwrap_or(u32::MAX)
    }

    pub fn hello(&self) -> Hello {
        Hello {
            version: LINK_VERSION,
            model: MODEL.to_owned(),
            zn: self.zn.clone(),
            fn_number: self.drive.fn_number().to_owned(),
            firmware: FIRMWARE.to_owned(),
            ffd_version: self.drive.config.ffd_version,
        }
    }

    pub fn status(&self, now: u32) -> DeviceStatus {
        DeviceStatus {
            date_time: now,
            shift: self.drive.shift_state(now),
            blocked: self.drive.block(now).is_some(),
            cover_open: self.cover_open,
            paper_present: self.paper_present,
            fiscal: self.drive.phase == crate::drive::Phase::Fiscal,
            fn_present: true,
            model: MODEL.to_owned(),
            zn: self.zn.clone(),
            firmware: FIRMWARE.to_owned(),
        }
    }

    pub fn ofd_status(&self) -> OfdExchangeStatus {
        let u = self.drive.unsent_summary();
        OfdExchangeStatus {
            unsent_count: u.count,
            first_unsent_fd: u.first_fd,
            first_unsent_date_time: u.first_date_time,
            last_ack_at: self.drive.last_ack_at,
            ofd: self.ofd.clone(),
        }
    }

    /// The printer must be ready for anything that forms (and so prints) a document.
    fn printer_ready(&self) -> Result<(), KktError> {
        if self.cover_open {
            return Err(KktError::new(
                ErrorCode::COVER_OPEN,
                "the cover is open: close it",
            ));
        }
        if !self.paper_present {
            return Err(KktError::new(
                ErrorCode::NO_PAPER,
                "out of paper: load a roll",
            ));
        }
        Ok(())
    }

    /// Executes one call. `GetFnDocument` needs the archive and is answered by the shell through
    /// [`archived_document`]; here it is refused so that the core never pretends to read storage.
    pub fn handle(&mut self, call: &Call, now: u32) -> Outcome {
        let formed = |r: Result<Formed, KktError>| match r {
            Ok(f) => Outcome {
                reply: Ok(Reply::Fiscal(f.result.clone())),
                formed: Some(f),
            },
            Err(e) => Outcome {
                reply: Err(e),
                formed: None,
            },
        };
        let plain = |r: Result<Reply, KktError>| Outcome {
            reply: r,
            formed: None,
        };
        if call.forms_document() {
            if let Err(e) = self.printer_ready() {
                return plain(Err(e));
            }
        }
        match call {
            Call::GetDeviceStatus => plain(Ok(Reply::DeviceStatus(self.status(now)))),
            Call::GetFnInfo => plain(Ok(Reply::FnInfo(self.drive.info(now)))),
            Call::GetShiftStatus => plain(Ok(Reply::ShiftStatus(self.drive.shift_status(now)))),
            Call::OpenShift(op) => formed(self.drive.open_shift(now, op)),
            Call::CloseShift(op) => formed(self.drive.close_shift(now, op)),
            Call::Receipt(p) => {
                if p.receipt.kind.is_correction() {
                    plain(Err(KktError::new(
                        ErrorCode::INVALID_PARAMETER,
                        "receipt.type: a correction goes through the correction method",
                    )))
                } else {
                    formed(self.drive.receipt(now, p))
                }
            }
            Call::Correction(p) => {
                if p.receipt.kind.is_correction() {
                    formed(self.drive.receipt(now, p))
                } else {
                    plain(Err(KktError::new(
                        ErrorCode::INVALID_PARAMETER,
                        "receipt.type: the correction method takes correction types only",
                    )))
                }
            }
            Call::ReportX => {
                if self.drive.shift_state(now) == ShiftState::Closed {
                    plain(Err(KktError::new(
                        ErrorCode::SHIFT_CLOSED,
                        "an X report needs an open shift",
                    )))
                } else {
                    plain(Ok(Reply::XReport(self.drive.x_report())))
                }
            }
            Call::ReportCurrentState => formed(self.drive.current_state_report(now)),
            Call::OfdExchangeStatus => plain(Ok(Reply::OfdExchange(self.ofd_status()))),
            Call::Register(p) => {
                let r = self.drive.register(now, &self.zn.clone(), p);
                if r.is_ok() {
                    self.ofd = Some(p.ofd.clone());
                }
                formed(r)
            }
            Call::Reregister(p) => {
                let r = self.drive.reregister(now, &self.zn.clone(), p);
                if r.is_ok() {
                    self.ofd = Some(p.registration.ofd.clone());
                }
                formed(r)
            }
            Call::CloseFn(op) => formed(self.drive.close_archive(now, op)),
            Call::GetFnDocument(_) => plain(Err(KktError::new(
                ErrorCode::INVALID_PARAMETER,
                "getFnDocument is served from the archive by the device shell",
            ))),
            Call::SetOfd(ofd) => {
                self.ofd = Some(ofd.clone());
                plain(Ok(Reply::Done))
            }
        }
    }

    /// Physically fits a new FN. Allowed only once the old one has closed its archive and
    /// delivered everything to the OFD (phase 15): otherwise those documents would be stranded.
    pub fn replace_fn(&mut self, drive: DriveConfig) -> Result<(), KktError> {
        if self.drive.phase != crate::drive::Phase::ReadOnly {
            return Err(KktError::new(
                ErrorCode::WRONG_FN_STATE,
                format!(
                    "the FN is in phase {}: close its archive and let it deliver every document first",
                    self.drive.phase.code()
                ),
            ));
        }
        let previous = self.drive.registration.clone();
        self.drive = FiscalDrive::new(drive);
        // The KKT remembers its registration; the new FN learns it at re-registration.
        self.drive.registration = previous;
        self.drives_replaced += 1;
        Ok(())
    }
}

/// Builds the archive read-back answer from stored document bytes.
pub fn archived_document(
    bytes: &[u8],
    zn: &str,
    acknowledged: bool,
) -> Result<ArchivedDocument, KktError> {
    let corrupt = |e: String| {
        KktError::new(
            ErrorCode::WRONG_FN_STATE,
            format!("archive document is unreadable: {e}"),
        )
    };
    let doc = Document::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let typed = FiscalDocument::from_document(&doc).map_err(|e| corrupt(e.to_string()))?;
    let result = FiscalResult::from_document(&typed, zn, 0);
    Ok(ArchivedDocument {
        result,
        document: typed,
        tlv_hex: bytes.iter().map(|b| format!("{b:02x}")).collect(),
        acknowledged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::kkt::{Call, Operator, RegistrationParams};
    use protocol::receipt::{Person, TaxationSystem};

    /// The persisted form must read back exactly, with optional fields absent and present.
    #[test]
    fn state_round_trips_through_postcard() {
        let zn = "0000000000000001";
        for cashier in [
            None,
            Some(Person {
                name: "Иванов".into(),
                inn: None,
            }),
        ] {
            let mut reg = Register::new(
                zn.into(),
                DriveConfig::new("9999078900000001".into(), [1; 32]),
            );
            let params = RegistrationParams {
                rnm: protocol::checksum::rnm("0000000001", "3245001416", zn).expect("rnm"),
                user_inn: "3245001416".into(),
                user_name: "ООО".into(),
                taxation_systems: vec![TaxationSystem::Common],
                internet: true,
                encryption: false,
                ofd: OfdEndpoint {
                    name: "ОФД".into(),
                    inn: "7704211201".into(),
                    host: "127.0.0.1".into(),
                    port: 7777,
                },
                settlement_address: "Москва".into(),
                settlement_place: "shop".into(),
                fns_site: "www.nalog.gov.ru".into(),
                cashier,
            };
            assert!(reg.handle(&Call::Register(params), 1_000).reply.is_ok());
            assert!(reg
                .handle(&Call::OpenShift(Operator::default()), 1_001)
                .reply
                .is_ok());
            let bytes = postcard::to_allocvec(&reg).expect("encodes");
            let back: Register = postcard::from_bytes(&bytes).expect("decodes");
            assert_eq!(back, reg);
        }
    }
}
