//! OFD exchange framing: the 30-byte session header and the container (32-byte header + body).
//!
//! Layout and CRC rule follow reference/fiscal.md and reproduce `../shared/vectors/ofd-container.json`
//! byte for byte. The container body is the document STLV, an 8-byte message fiscal sign, and
//! whatever trailer the sender appended (the vector carries two zero bytes); the trailer is kept so
//! that a decoded container re-encodes to the same bytes and the same CRC.

use crate::checksum::CRC16;
use thiserror::Error;

pub const SESSION_SIGNATURE: [u8; 4] = [0x2A, 0x08, 0x41, 0x0A];
pub const SESSION_VERSION: [u8; 2] = [0x81, 0xA2];
pub const SESSION_HEADER_LEN: usize = 30;
pub const CONTAINER_HEADER_LEN: usize = 32;
/// Containers are at most 32 KiB (reference/fiscal.md); anything larger is refused before reading it.
pub const MAX_CONTAINER_LEN: usize = 32 * 1024;
/// Message type of a container (`A5`).
pub const MESSAGE_TYPE: u8 = 0xA5;
/// Session flags seen in real exchanges: "contains a container, answer expected".
pub const FLAGS_CONTAINER_ANSWER_EXPECTED: u16 = 0x0014;
pub const MESSAGE_SIGN_LEN: usize = 8;

/// Why bytes are not a valid session header or container.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("need {need} bytes, have {have}")]
    Short { need: usize, have: usize },
    #[error("bad session signature {0:02x?}; not an OFD protocol session")]
    Signature([u8; 4]),
    #[error("unsupported session protocol version {0:02x?}")]
    SessionVersion([u8; 2]),
    #[error("container length {0} is outside 32..=32768")]
    Length(usize),
    #[error("container length field says {header} bytes, {actual} were supplied")]
    LengthMismatch { header: usize, actual: usize },
    #[error("container CRC is {stored:#06x}, computed {computed:#06x}: the container was damaged")]
    Crc { stored: u16, computed: u16 },
    #[error("message type {0:#04x} is not a container (A5)")]
    MessageType(u8),
    #[error("FN number {0:?} cannot be written as BCD")]
    FnNumber(String),
    #[error("FN number field {0:02x?} is not BCD digits padded with F")]
    FnBcd([u8; 8]),
    #[error("FD number {0} does not fit the container's 3-byte field")]
    FdNumber(u32),
    #[error("body is shorter than a document and its 8-byte message sign")]
    Body,
    #[error("document in the container: {0}")]
    Document(#[from] crate::document::DocumentError),
}

/// The 30-byte header that opens every message of the KKT ↔ OFD exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHeader {
    /// Application protocol version, as the two bytes on the wire (`00 01` in the vector).
    pub app_version: [u8; 2],
    /// FN number, up to 16 ASCII characters (space-padded on the wire, trimmed here).
    pub fn_number: String,
    pub container_length: u16,
    pub flags: u16,
    pub crc: u16,
}

impl SessionHeader {
    pub fn encode(&self) -> [u8; SESSION_HEADER_LEN] {
        let mut out = [0u8; SESSION_HEADER_LEN];
        out[0..4].copy_from_slice(&SESSION_SIGNATURE);
        out[4..6].copy_from_slice(&SESSION_VERSION);
        out[6..8].copy_from_slice(&self.app_version);
        let fn_padded = format!("{:<16}", self.fn_number);
        let fn_bytes = fn_padded.as_bytes();
        let n = fn_bytes.len().min(16);
        out[8..8 + n].copy_from_slice(&fn_bytes[..n]);
        out[24..26].copy_from_slice(&self.container_length.to_le_bytes());
        out[26..28].copy_from_slice(&self.flags.to_le_bytes());
        out[28..30].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        if b.len() < SESSION_HEADER_LEN {
            return Err(FrameError::Short {
                need: SESSION_HEADER_LEN,
                have: b.len(),
            });
        }
        let sig = [b[0], b[1], b[2], b[3]];
        if sig != SESSION_SIGNATURE {
            return Err(FrameError::Signature(sig));
        }
        let ver = [b[4], b[5]];
        if ver != SESSION_VERSION {
            return Err(FrameError::SessionVersion(ver));
        }
        let fn_number = String::from_utf8_lossy(&b[8..24]).trim_end().to_owned();
        Ok(SessionHeader {
            app_version: [b[6], b[7]],
            fn_number,
            container_length: u16::from_le_bytes([b[24], b[25]]),
            flags: u16::from_le_bytes([b[26], b[27]]),
            crc: u16::from_le_bytes([b[28], b[29]]),
        })
    }
}

/// The fixed part of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerHeader {
    pub document_type: u8,
    pub version: u8,
    pub service_data_1: [u8; 2],
    /// FN number as digits (BCD on the wire, padded with F).
    pub fn_number: String,
    pub fd_number: u32,
    pub service_data_2: [u8; 12],
}

/// A container: header, document, message sign, trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub header: ContainerHeader,
    /// The document as TLV bytes (one STLV).
    pub document: Vec<u8>,
    pub message_sign: [u8; MESSAGE_SIGN_LEN],
    pub trailer: Vec<u8>,
}

fn fn_to_bcd(fn_number: &str) -> Result<[u8; 8], FrameError> {
    let digits = fn_number.trim_end();
    if digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FrameError::FnNumber(fn_number.to_owned()));
    }
    let mut nibbles: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
    nibbles.resize(16, 0xF);
    let mut out = [0u8; 8];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        out[i] = (pair[0] << 4) | pair[1];
    }
    Ok(out)
}

/// Reads the FN field strictly: digits, then only `F` padding. Anything else (a nibble A-E, a digit
/// after the padding) has no canonical number, and a lenient reading would let two different byte
/// strings name one FN: the OFD could file a document under a number its FN never had.
fn bcd_to_fn(b: &[u8; 8]) -> Result<String, FrameError> {
    let mut s = String::with_capacity(16);
    let mut padding = false;
    for nib in b.iter().flat_map(|byte| [byte >> 4, byte & 0xF]) {
        match nib {
            0..=9 if !padding => s.push(char::from(b'0' + nib)),
            0xF => padding = true,
            _ => return Err(FrameError::FnBcd(*b)),
        }
    }
    Ok(s)
}

impl Container {
    /// Total length on the wire (header + body).
    pub fn len(&self) -> usize {
        CONTAINER_HEADER_LEN + self.document.len() + MESSAGE_SIGN_LEN + self.trailer.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let len = self.len();
        if len > MAX_CONTAINER_LEN {
            return Err(FrameError::Length(len));
        }
        if self.header.fd_number > 0x00FF_FFFF {
            return Err(FrameError::FdNumber(self.header.fd_number));
        }
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]); // CRC, filled below
        out.push(MESSAGE_TYPE);
        out.push(self.header.document_type);
        out.push(self.header.version);
        out.extend_from_slice(&self.header.service_data_1);
        out.extend_from_slice(&fn_to_bcd(&self.header.fn_number)?);
        out.extend_from_slice(&self.header.fd_number.to_be_bytes()[1..4]);
        out.extend_from_slice(&self.header.service_data_2);
        out.extend_from_slice(&self.document);
        out.extend_from_slice(&self.message_sign);
        out.extend_from_slice(&self.trailer);
        let crc = container_crc(&out);
        out[2..4].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes a whole container and checks its length and CRC.
    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        if b.len() < CONTAINER_HEADER_LEN {
            return Err(FrameError::Short {
                need: CONTAINER_HEADER_LEN,
                have: b.len(),
            });
        }
        let len = usize::from(u16::from_le_bytes([b[0], b[1]]));
        if !(CONTAINER_HEADER_LEN..=MAX_CONTAINER_LEN).contains(&len) {
            return Err(FrameError::Length(len));
        }
        if len != b.len() {
            return Err(FrameError::LengthMismatch {
                header: len,
                actual: b.len(),
            });
        }
        let stored = u16::from_le_bytes([b[2], b[3]]);
        let computed = container_crc(b);
        if stored != computed {
            return Err(FrameError::Crc { stored, computed });
        }
        if b[4] != MESSAGE_TYPE {
            return Err(FrameError::MessageType(b[4]));
        }
        let body = &b[CONTAINER_HEADER_LEN..];
        // The document is one TLV; its own length says where the message sign starts.
        if body.len() < 4 {
            return Err(FrameError::Body);
        }
        let doc_len = 4 + usize::from(u16::from_le_bytes([body[2], body[3]]));
        if body.len() < doc_len + MESSAGE_SIGN_LEN {
            return Err(FrameError::Body);
        }
        let mut message_sign = [0u8; MESSAGE_SIGN_LEN];
        message_sign.copy_from_slice(&body[doc_len..doc_len + MESSAGE_SIGN_LEN]);
        let mut service_data_2 = [0u8; 12];
        service_data_2.copy_from_slice(&b[20..32]);
        let mut fn_field = [0u8; 8];
        fn_field.copy_from_slice(&b[9..17]);
        Ok(Container {
            header: ContainerHeader {
                document_type: b[5],
                version: b[6],
                service_data_1: [b[7], b[8]],
                fn_number: bcd_to_fn(&fn_field)?,
                fd_number: u32::from_be_bytes([0, b[17], b[18], b[19]]),
                service_data_2,
            },
            document: body[..doc_len].to_vec(),
            message_sign,
            trailer: body[doc_len + MESSAGE_SIGN_LEN..].to_vec(),
        })
    }

    /// Parses the document the container carries.
    pub fn parse_document(&self) -> Result<crate::document::Document, FrameError> {
        Ok(crate::document::Document::decode(&self.document)?)
    }
}

/// CRC-16/CCITT-FALSE over the length field, the header from offset 4 on, and the body — the CRC
/// field itself is skipped.
pub fn container_crc(container: &[u8]) -> u16 {
    let mut digest = CRC16.digest();
    digest.update(&container[..2.min(container.len())]);
    if container.len() > 4 {
        digest.update(&container[4..]);
    }
    digest.finalize()
}

/// Reads the container length a session header announces and checks it before any body is read,
/// so that a peer cannot make us allocate more than [`MAX_CONTAINER_LEN`].
pub fn announced_container_len(header: &SessionHeader) -> Result<usize, FrameError> {
    let len = usize::from(header.container_length);
    if !(CONTAINER_HEADER_LEN..=MAX_CONTAINER_LEN).contains(&len) {
        return Err(FrameError::Length(len));
    }
    Ok(len)
}
