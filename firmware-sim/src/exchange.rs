//! Moving OFD protocol messages over a byte stream: one session header, then one container. Both
//! the register (client) and the OFD (server) use these, so the framing rules live in one place.

use protocol::container::{
    announced_container_len, Container, ContainerHeader, FrameError, SessionHeader,
    FLAGS_CONTAINER_ANSWER_EXPECTED, SESSION_HEADER_LEN,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, Error)]
pub enum ExchangeError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Frame(#[from] FrameError),
    #[error("session header names FN {session} but the container holds FN {container}")]
    FnMismatch { session: String, container: String },
}

/// Reads one message. `Ok(None)` is a clean end of stream between messages.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(SessionHeader, Container)>, ExchangeError> {
    let mut head = [0u8; SESSION_HEADER_LEN];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let session = SessionHeader::decode(&head)?;
    // The length is checked before the body is read: a peer cannot make us allocate more.
    let len = announced_container_len(&session)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let container = Container::decode(&body)?;
    let session_fn = session.fn_number.trim();
    if !session_fn.is_empty() && session_fn != container.header.fn_number {
        return Err(ExchangeError::FnMismatch {
            session: session_fn.to_owned(),
            container: container.header.fn_number.clone(),
        });
    }
    Ok(Some((session, container)))
}

/// Writes one message: a session header announcing the container, then the container.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    container: &Container,
) -> Result<(), ExchangeError> {
    let bytes = container.encode()?;
    let session = SessionHeader {
        app_version: [0x00, 0x01],
        fn_number: container.header.fn_number.clone(),
        container_length: bytes.len() as u16,
        flags: FLAGS_CONTAINER_ANSWER_EXPECTED,
        crc: 0,
    };
    let mut out = Vec::with_capacity(SESSION_HEADER_LEN + bytes.len());
    out.extend_from_slice(&session.encode());
    out.extend_from_slice(&bytes);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

/// Wraps a document's TLV bytes in a container.
pub fn container_for(
    fn_number: &str,
    fd_number: u32,
    document_type: u16,
    document: Vec<u8>,
    message_sign: [u8; 8],
) -> Container {
    Container {
        header: ContainerHeader {
            document_type: u8::try_from(document_type).unwrap_or(0),
            version: 1,
            service_data_1: [0, 0],
            fn_number: fn_number.to_owned(),
            fd_number,
            service_data_2: [0; 12],
        },
        document,
        message_sign,
        trailer: Vec::new(),
    }
}

/// An 8-byte keyed MAC: the simulated message fiscal sign (KKT) or operator sign (OFD).
pub fn sign8(key: &[u8; 32], data: &[u8]) -> [u8; 8] {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
        .expect("HMAC-SHA256 takes keys of any length");
    mac.update(data);
    let tag = mac.finalize().into_bytes();
    let mut out = [0u8; 8];
    out.copy_from_slice(&tag[..8]);
    out
}
