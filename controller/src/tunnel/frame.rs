//! Reading and writing tunnel frames on a QUIC stream (the format is in `protocol::tunnel`).
//!
//! A frame's length prefix is checked against `MAX_FRAME` before its body is read, so a peer
//! cannot make us allocate more than that per connection.

use protocol::tunnel::{decode_frame, encode_frame, frame_len, FrameError};
use quinn::{ReadExactError, RecvStream, SendStream};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReadFrameError {
    /// The peer finished its stream at a frame boundary.
    #[error("the peer closed its stream")]
    Finished,
    /// The peer broke the framing rules: the connection must be closed with this reason.
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("connection lost: {0}")]
    Lost(quinn::ReadError),
}

/// Reads one frame and decodes it. `buf` is reused between calls.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
) -> Result<T, ReadFrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(ReadFrameError::Finished),
        Err(ReadExactError::FinishedEarly(_)) => return Err(ReadFrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(ReadFrameError::Lost(e)),
    }
    let len = frame_len(prefix)?;
    buf.clear();
    buf.resize(len, 0);
    match recv.read_exact(buf).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Err(ReadFrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(ReadFrameError::Lost(e)),
    }
    Ok(decode_frame(buf)?)
}

/// Encodes and writes one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), WriteFrameError> {
    let bytes = encode_frame(msg)?;
    send.write_all(&bytes).await?;
    Ok(())
}

#[derive(Debug, Error)]
pub enum WriteFrameError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection lost: {0}")]
    Lost(#[from] quinn::WriteError),
}
