//! The tunnel between an agent and the controller: postcard messages in length-prefixed frames on
//! one bidirectional QUIC stream per connection (mutual TLS, ALPN [`ALPN_TUNNEL`]).
//!
//! Framing: `u32` little-endian length, then that many bytes of postcard. A frame longer than
//! [`MAX_FRAME`] is refused before its body is read. Each side's first frame is its hello, which
//! carries [`TUNNEL_VERSION`]; a peer with another version, a frame that does not decode, or an
//! oversized frame is disconnected with a logged reason.
//!
//! The exactly-once contract (DESIGN.md §3) in message terms:
//! * the controller records an assignment, then sends [`Dispatch`]; the job belongs to that agent
//!   until an [`OutboxBody::Completed`] or [`OutboxBody::NotFiscalized`] for it arrives;
//! * the agent journals a dispatch durably, then answers [`AgentMessage::Accepted`];
//! * everything the agent must report travels as an [`OutboxEntry`] with a per-agent sequence
//!   number, committed before it is sent; the controller applies entries idempotently (by job id)
//!   and acknowledges cumulatively ([`ControllerMessage::Ack`]); the agent deletes what is acked;
//! * after a reconnect the agent's [`AgentHello`] lists the jobs it holds; the controller releases
//!   the jobs it had assigned to this agent that are not in the list, and only those.

use crate::kkt::{
    Call, DeviceStatus, Event, FiscalResult, FnInfo, Hello, KktError, OfdEndpoint,
    OfdExchangeStatus, ReceiptParams, Reply, ShiftStatus,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const TUNNEL_VERSION: u16 = 1;
/// ALPN of the tunnel (client certificate required).
pub const ALPN_TUNNEL: &[u8] = b"kkt-tunnel/1";
/// ALPN of enrollment (no client certificate yet; the token authenticates).
pub const ALPN_ENROLL: &[u8] = b"kkt-enroll/1";
/// Largest frame either side accepts. A dispatch carries one receipt (≤ 100 items, ~20 KiB in
/// postcard); 256 KiB leaves room without letting a peer make us allocate much.
pub const MAX_FRAME: usize = 256 * 1024;

/// A job's identity, chosen by the controller; it is also written into the receipt (tag 1192).
pub type JobId = String;

/// Messages from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(AgentHello),
    /// A register connected to the agent (or reconnected).
    Attached(Attached),
    Detached {
        kkt: String,
    },
    /// Fresh state of one register (after attach, after a document, on request).
    Status(Box<KktState>),
    /// The dispatch is journaled; the job is now the agent's.
    Accepted {
        job: JobId,
        attempt: u32,
    },
    /// The agent will not take this dispatch (unknown register, journal full); nothing was
    /// journaled, so the controller may give the job to another register at once.
    Refused {
        job: JobId,
        attempt: u32,
        reason: String,
    },
    /// Something the agent must report; durable at the agent until acknowledged.
    Outbox(OutboxEntry),
    /// Answer to a [`ControllerMessage::Command`].
    CommandResult {
        id: u64,
        kkt: String,
        outcome: Result<Reply, KktError>,
    },
    Heartbeat(Health),
    /// Echo of the controller's heartbeat, so it can measure the round trip too.
    Pong {
        sent_at_micros: u64,
    },
    /// A certificate signing request for a fresh certificate, sent before the current one expires.
    Renew {
        csr_pem: String,
    },
    /// Part of the journal summary, sent *before* the hello when the summary does not fit in one
    /// frame: the controller adds these jobs to the hello's and reconciles only once the hello
    /// itself arrives, so it never releases a job on a partial list.
    HeldJobs(Vec<HeldJob>),
}

/// Messages from the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerMessage {
    Hello(ControllerHello),
    /// Every outbox entry with `seq <= upto` is applied; the agent may delete them.
    Ack {
        upto: u64,
    },
    Dispatch(Dispatch),
    /// Settings pushed to a register (zero-touch: the agent forwards them on attach).
    Settings {
        kkt: String,
        settings: KktSettings,
    },
    /// A register command for automation (open/close shift, register, re-register, close FN,
    /// status queries). Not journaled: its effects are read back through status.
    Command {
        id: u64,
        kkt: String,
        call: Call,
    },
    Ping {
        sent_at_micros: u64,
    },
    /// Echo of an agent heartbeat.
    Pong {
        sent_at_micros: u64,
    },
    /// Answer to [`AgentMessage::Renew`].
    Renewed(Result<IssuedCertificate, String>),
}

/// Enrollment, on a connection with ALPN [`ALPN_ENROLL`]: the agent sends one request frame, the
/// controller answers with one response frame and closes. The agent has no certificate yet; it
/// authenticates the controller by the CA fingerprint pinned in the token, and the controller
/// authenticates the agent by the one-time token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub version: u16,
    /// The token as printed by `controller agent-token create`.
    pub token: String,
    /// PKCS#10 request for the key the agent made locally; the private key never leaves it.
    pub csr_pem: String,
    /// A name for people (host name, shelf label).
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Enrolled {
        agent_id: String,
        certificate: IssuedCertificate,
    },
    /// Unknown, expired or already used token, or a malformed request.
    Refused { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub ca_pem: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// The enrollment token: `kt1.<secret hex>.<SHA-256 of the CA certificate DER, hex>`. The secret
/// is stored only hashed at the controller; the fingerprint lets the agent trust the controller
/// before it has the CA certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollToken {
    pub secret: [u8; 16],
    pub ca_sha256: [u8; 32],
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed enrollment token: {0}; copy the whole last line printed by `controller agent-token create`")]
pub struct TokenError(&'static str);

impl EnrollToken {
    pub fn encode(&self) -> String {
        format!("kt1.{}.{}", hex(&self.secret), hex(&self.ca_sha256))
    }

    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let mut parts = s.trim().split('.');
        if parts.next() != Some("kt1") {
            return Err(TokenError("it must start with kt1."));
        }
        let secret = unhex::<16>(parts.next().ok_or(TokenError("the secret is missing"))?)
            .ok_or(TokenError("the secret must be 32 hex digits"))?;
        let ca_sha256 = unhex::<32>(
            parts
                .next()
                .ok_or(TokenError("the CA fingerprint is missing"))?,
        )
        .ok_or(TokenError("the CA fingerprint must be 64 hex digits"))?;
        if parts.next().is_some() {
            return Err(TokenError("it has extra parts"));
        }
        Ok(EnrollToken { secret, ca_sha256 })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_say_why() {
        let t = EnrollToken {
            secret: [0xAB; 16],
            ca_sha256: [0x01; 32],
        };
        assert_eq!(EnrollToken::parse(&t.encode()), Ok(t.clone()));
        assert_eq!(EnrollToken::parse(&format!("  {}\n", t.encode())), Ok(t));
        assert!(EnrollToken::parse("kt2.00.00").is_err());
        assert!(EnrollToken::parse("kt1.zz.00").is_err());
        assert!(EnrollToken::parse("kt1").is_err());
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    pub version: u16,
    pub agent_id: String,
    /// Random id of the agent's store, made when the store is created: a new epoch means the
    /// agent lost its journal, and sequence numbers start over.
    pub store_epoch: u64,
    pub software: String,
    pub journal: JournalSummary,
}

/// What the agent holds: the controller reconciles its assignments against this.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalSummary {
    /// Jobs journaled and not yet reported (accepted, executing, or awaiting recovery).
    pub jobs: Vec<HeldJob>,
    /// Highest outbox sequence number the agent has assigned (0 when none).
    pub last_seq: u64,
    /// Entries not yet acknowledged.
    pub outbox_depth: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldJob {
    pub job: JobId,
    pub attempt: u32,
    pub kkt: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerHello {
    pub version: u16,
    pub controller_id: String,
    /// Highest outbox sequence of this agent (and store epoch) the controller has applied; the
    /// agent drops entries up to it and resends the rest.
    pub applied_upto: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub hello: Hello,
    /// Serial or network attachment, for the cabinet.
    pub transport: String,
}

/// A register's full state as the agent last read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KktState {
    pub kkt: String,
    pub device: DeviceStatus,
    pub fn_info: FnInfo,
    pub shift: ShiftStatus,
    pub ofd: OfdExchangeStatus,
}

/// A job for one register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    pub job: JobId,
    /// Incremented each time the controller gives the job out again; results carry it back.
    pub attempt: u32,
    pub kkt: String,
    pub work: Work,
}

/// What a job asks the register to do: a document that must be formed exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    Receipt(ReceiptParams),
    Correction(ReceiptParams),
}

impl Work {
    pub fn params(&self) -> &ReceiptParams {
        match self {
            Work::Receipt(p) | Work::Correction(p) => p,
        }
    }

    /// The register call; the job id goes into tag 1192 so the archive can identify the receipt.
    pub fn call(&self, job: &str) -> Call {
        let mut p = self.params().clone();
        p.additional_attribute = Some(job.to_owned());
        match self {
            Work::Receipt(_) => Call::Receipt(p),
            Work::Correction(_) => Call::Correction(p),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KktSettings {
    pub ofd: Option<OfdEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub seq: u64,
    pub body: OutboxBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxBody {
    /// The register formed the document for this job.
    Completed {
        job: JobId,
        attempt: u32,
        kkt: String,
        result: FiscalResult,
    },
    /// Proven not fiscalized: the register refused (error answer), or its FN did not move past
    /// the number recorded before sending. The job may go to another register.
    NotFiscalized {
        job: JobId,
        attempt: u32,
        kkt: String,
        error: KktError,
    },
    /// A register event: OFD acknowledgement, status change.
    Event { kkt: String, event: Event },
}

impl OutboxBody {
    pub fn job(&self) -> Option<&str> {
        match self {
            OutboxBody::Completed { job, .. } | OutboxBody::NotFiscalized { job, .. } => Some(job),
            OutboxBody::Event { .. } => None,
        }
    }
}

/// Agent health, sent as a heartbeat and shown on the agent's local page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub sent_at_micros: u64,
    /// Last measured tunnel round trip.
    pub rtt_micros: Option<u64>,
    pub journal_depth: u64,
    pub outbox_depth: u64,
    pub oldest_unacked_secs: Option<u64>,
    pub kkts: u32,
    pub version: String,
    /// The agent stopped taking jobs (store full); needs an operator.
    pub alarm: Option<String>,
}

/// Why a frame was refused.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("frame does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("peer speaks tunnel version {0}, this side speaks {TUNNEL_VERSION}")]
    Version(u16),
    #[error("first frame must be a hello")]
    NoHello,
    #[error("{0} bytes follow the message in its frame")]
    Trailing(usize),
}

/// Encodes a message as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    let body = postcard::to_extend(msg, Vec::new())?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    out[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads a frame's length prefix and refuses oversized frames before any body is read.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix). The message must fill the body exactly: bytes
/// after it mean the peer and we disagree about the message's layout (a version skew the version
/// check missed, or a forged frame), and guessing at what the peer meant is how a fiscal command
/// gets misread.
pub fn decode_frame<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(msg)
}
