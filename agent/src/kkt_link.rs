//! Register links: WebSocket at `/kkt` (network registers) and serial lines (one JSON message per
//! line). Both feed the same driver, which reads the register's hello, attaches it, forwards
//! requests in order and matches answers by id, and turns pushed events into journal entries.

use crate::agent::{Agent, KktRequest};
use futures_util::{SinkExt, StreamExt};
use protocol::kkt::{KktMessage, Request, LINK_VERSION, MAX_MESSAGE_BYTES};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HttpRequest, Response as HttpResponse,
};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

/// A register must say hello this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests waiting to be written to one register; a register does one thing at a time, so a
/// short queue is plenty and applies backpressure to the executor.
const REQUEST_QUEUE: usize = 16;

/// Accepts registers on `/kkt` until the listener fails.
pub async fn serve_ws(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    #[allow(clippy::result_large_err)]
                    // the handshake callback's type is tungstenite's
                    let check_path = |req: &HttpRequest, resp: HttpResponse| {
                        if req.uri().path() == "/kkt" {
                            Ok(resp)
                        } else {
                            let mut e =
                                ErrorResponse::new(Some("registers connect to /kkt".into()));
                            *e.status_mut() =
                                tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                            Err(e)
                        }
                    };
                    // Small buffers: a shelf agent holds a connection per register (up to
                    // thousands) and register messages are small; the default 128 KiB read
                    // buffer per connection cost ~155 KiB of RSS per register.
                    let config = WebSocketConfig::default()
                        .read_buffer_size(4 * 1024)
                        .write_buffer_size(0)
                        .max_write_buffer_size(MAX_MESSAGE_BYTES * 2)
                        .max_message_size(Some(MAX_MESSAGE_BYTES))
                        .max_frame_size(Some(MAX_MESSAGE_BYTES));
                    match tokio_tungstenite::accept_hdr_async_with_config(
                        tcp,
                        check_path,
                        Some(config),
                    )
                    .await
                    {
                        Ok(ws) => {
                            let (mut sink, mut stream) = ws.split();
                            let (in_tx, in_rx) = mpsc::channel::<String>(64);
                            let (out_tx, mut out_rx) = mpsc::channel::<String>(64);
                            tokio::spawn(async move {
                                while let Some(text) = out_rx.recv().await {
                                    if sink.send(Message::text(text)).await.is_err() {
                                        break;
                                    }
                                }
                                let _ = sink.close().await;
                            });
                            tokio::spawn(async move {
                                while let Some(Ok(msg)) = stream.next().await {
                                    match msg {
                                        Message::Text(t)
                                            if in_tx.send(t.to_string()).await.is_err() =>
                                        {
                                            break
                                        }
                                        Message::Close(_) => break,
                                        _ => {}
                                    }
                                }
                            });
                            drive(agent, format!("ws {peer}"), in_rx, out_tx).await;
                        }
                        Err(e) => debug!(%peer, error = %e, "WebSocket handshake failed"),
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Attaches a register on a serial line, reopening it after errors.
pub async fn serve_serial(agent: Arc<Agent>, path: PathBuf, baud: u32) {
    loop {
        match serialport::new(path.to_string_lossy(), baud)
            .timeout(Duration::from_millis(200))
            .open()
        {
            Ok(port) => {
                let (in_rx, out_tx) = serial_pump(port);
                drive(
                    agent.clone(),
                    format!("serial {}", path.display()),
                    in_rx,
                    out_tx,
                )
                .await;
            }
            Err(e) => warn!(path = %path.display(), error = %e, "cannot open the serial line"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Moves lines between a serial port and channels with two blocking threads (serialport is
/// synchronous). The threads end when the port fails or the channels close.
pub fn serial_pump(
    port: Box<dyn serialport::SerialPort>,
) -> (mpsc::Receiver<String>, mpsc::Sender<String>) {
    let (in_tx, in_rx) = mpsc::channel::<String>(64);
    let (out_tx, mut out_rx) = mpsc::channel::<String>(64);
    let mut reader = match port.try_clone() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot clone the serial port handle");
            return (in_rx, out_tx);
        }
    };
    let mut writer = port;
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => continue,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let text = String::from_utf8_lossy(&line).trim().to_owned();
                        if !text.is_empty() && in_tx.blocking_send(text).is_err() {
                            return;
                        }
                    }
                    if buf.len() > MAX_MESSAGE_BYTES {
                        warn!("serial line longer than a message; dropping it");
                        buf.clear();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if in_tx.is_closed() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    std::thread::spawn(move || {
        while let Some(line) = out_rx.blocking_recv() {
            let mut bytes = line.into_bytes();
            bytes.push(b'\n');
            if writer
                .write_all(&bytes)
                .and_then(|_| writer.flush())
                .is_err()
            {
                return;
            }
        }
    });
    (in_rx, out_tx)
}

/// Drives one register link until it closes.
pub async fn drive(
    agent: Arc<Agent>,
    transport: String,
    mut incoming: mpsc::Receiver<String>,
    outgoing: mpsc::Sender<String>,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, incoming.recv()).await {
        Ok(Some(text)) => match KktMessage::from_json(&text) {
            Ok(KktMessage::Hello(h)) if h.version == LINK_VERSION => h,
            Ok(KktMessage::Hello(h)) => {
                warn!(%transport, version = h.version, "register speaks another link version");
                return;
            }
            Ok(_) => {
                warn!(%transport, "register did not start with hello");
                return;
            }
            Err(e) => {
                warn!(%transport, error = %e, "malformed hello");
                return;
            }
        },
        _ => {
            debug!(%transport, "no hello");
            return;
        }
    };
    let zn = hello.zn.clone();
    let (req_tx, mut req_rx) = mpsc::channel::<KktRequest>(REQUEST_QUEUE);
    let close = Arc::new(tokio::sync::Notify::new());
    let generation = agent.attach(hello, transport.clone(), req_tx, close.clone());
    let mut pending: HashMap<
        u64,
        oneshot::Sender<Result<protocol::kkt::Reply, protocol::kkt::KktError>>,
    > = HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        tokio::select! {
            _ = close.notified() => {
                info!(kkt = %zn, %transport, "dropping the register's link");
                break;
            }
            req = req_rx.recv() => {
                let Some((call, reply)) = req else { break };
                let id = next_id;
                next_id += 1;
                let text = KktMessage::Request(Request { id, call }).to_json();
                if outgoing.send(text).await.is_err() {
                    break;
                }
                pending.insert(id, reply);
            }
            msg = incoming.recv() => {
                let Some(text) = msg else { break };
                match KktMessage::from_json(&text) {
                    Ok(KktMessage::Response(r)) => {
                        if let Some(tx) = pending.remove(&r.id) {
                            let _ = tx.send(r.outcome);
                        } else {
                            warn!(kkt = %zn, id = r.id, "answer to no outstanding request");
                        }
                    }
                    Ok(KktMessage::Event(ev)) => agent.on_kkt_event(&zn, ev),
                    Ok(KktMessage::Hello(_)) => warn!(kkt = %zn, "second hello ignored"),
                    Ok(KktMessage::Request(_)) => warn!(kkt = %zn, "a register does not send requests"),
                    Err(e) => warn!(kkt = %zn, error = %e, "malformed message from the register"),
                }
            }
        }
    }
    // Dropping `pending` tells every waiting caller the outcome is unknown.
    drop(pending);
    agent.detach(&zn, generation);
    info!(kkt = %zn, %transport, "register link closed");
}

/// Binds the register listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
