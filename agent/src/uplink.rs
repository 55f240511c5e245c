//! The tunnel to the controller: one QUIC connection with mutual TLS, one bidirectional stream of
//! postcard frames, reconnected with capped backoff.
//!
//! A session: hello with the journal summary → the controller's hello says what it already
//! applied → acknowledged entries are dropped, the rest are replayed in sequence order → then
//! dispatches, acks, settings, commands and heartbeats flow. Outbox entries are sent only once
//! durable and always in sequence order (the controller's cumulative ack depends on it); other
//! messages are best-effort and re-sent on the next session where it matters.

use crate::agent::{now_micros, Agent, VERSION};
use crate::identity;
use protocol::tunnel::{
    decode_frame, encode_frame, frame_len, AgentHello, AgentMessage, ControllerMessage,
    TUNNEL_VERSION,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Heartbeat period; also the period of the controller ping echo.
const HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("connection: {0}")]
    Connection(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

fn conn_err(e: impl std::fmt::Display) -> SessionError {
    SessionError::Connection(e.to_string())
}

/// Keeps a session up for as long as the agent runs.
pub async fn run(agent: Arc<Agent>, max_backoff: Duration, idle: Duration) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = std::time::Instant::now();
        match session(&agent, idle).await {
            Ok(()) => {}
            Err(e) => {
                warn!(error = %e, "tunnel session ended");
                agent
                    .link
                    .lock()
                    .map(|mut l| l.last_error = Some(e.to_string()))
                    .ok();
            }
        }
        agent.set_uplink(None);
        if let Ok(mut l) = agent.link.lock() {
            l.up = false;
            l.since = Some(crate::agent::now_secs());
        }
        agent.link_up.send_replace(false);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        let jitter = Duration::from_millis(u64::from(rand::random::<u8>()));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// Bytes of held jobs per `HeldJobs` frame: well under the frame limit, whatever the ids' length.
const HELD_JOBS_PER_FRAME_BYTES: usize = protocol::tunnel::MAX_FRAME / 2;

/// When the hello with every held job would not fit in one frame, moves the jobs out of it into
/// chunks that each fit (sent first, as `HeldJobs`). An agent holding many jobs — a long outage
/// with a big journal — must still be able to say hello: the controller reconciles against the
/// full list, and cannot be given a partial one.
fn split_summary(hello: &mut AgentHello) -> Vec<Vec<protocol::tunnel::HeldJob>> {
    if encode_frame(&AgentMessage::Hello(hello.clone())).is_ok() {
        return Vec::new();
    }
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut size = 0;
    for job in std::mem::take(&mut hello.journal.jobs) {
        let len = postcard::to_allocvec(&job).map_or(0, |v| v.len());
        if size + len > HELD_JOBS_PER_FRAME_BYTES && !chunk.is_empty() {
            chunks.push(std::mem::take(&mut chunk));
            size = 0;
        }
        size += len;
        chunk.push(job);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

async fn write(send: &mut quinn::SendStream, msg: &AgentMessage) -> Result<(), SessionError> {
    let frame = encode_frame(msg).map_err(|e| SessionError::Protocol(e.to_string()))?;
    send.write_all(&frame).await.map_err(conn_err)
}

async fn read(recv: &mut quinn::RecvStream) -> Result<Option<ControllerMessage>, SessionError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(conn_err(e)),
    }
    let len = frame_len(prefix).map_err(|e| SessionError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(conn_err)?;
    decode_frame(&body)
        .map(Some)
        .map_err(|e| SessionError::Protocol(e.to_string()))
}

async fn session(agent: &Arc<Agent>, idle: Duration) -> Result<(), SessionError> {
    let id = identity::load(&agent.data)?;
    let (addr, host) = identity::resolve(&id.info.controller).await?;
    let endpoint = identity::endpoint_for(addr)?;
    let conn = endpoint
        .connect_with(identity::tunnel_config(&id, idle)?, addr, &host)
        .map_err(conn_err)?
        .await
        .map_err(conn_err)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(conn_err)?;
    let hello = AgentHello {
        version: TUNNEL_VERSION,
        agent_id: id.info.agent_id.clone(),
        store_epoch: agent.epoch,
        software: format!("agent {VERSION}"),
        journal: agent.journal().summary(),
    };
    let mut hello = hello;
    for chunk in split_summary(&mut hello) {
        write(&mut send, &AgentMessage::HeldJobs(chunk)).await?;
    }
    write(&mut send, &AgentMessage::Hello(hello)).await?;
    // With mutual TLS over TLS 1.3 a refused certificate shows up here, on the first read.
    let controller = match read(&mut recv).await? {
        Some(ControllerMessage::Hello(h)) if h.version == TUNNEL_VERSION => h,
        Some(ControllerMessage::Hello(h)) => {
            return Err(SessionError::Protocol(format!(
                "controller speaks tunnel version {}, this agent {TUNNEL_VERSION}",
                h.version
            )))
        }
        Some(_) => {
            return Err(SessionError::Protocol(
                "controller did not say hello".into(),
            ))
        }
        None => {
            return Err(SessionError::Protocol(
                "controller closed the stream".into(),
            ))
        }
    };
    info!(controller = %controller.controller_id, applied_upto = controller.applied_upto, "tunnel up");
    agent.on_ack(controller.applied_upto);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<AgentMessage>();
    agent.set_uplink(Some(out_tx));
    if let Ok(mut l) = agent.link.lock() {
        l.up = true;
        l.since = Some(crate::agent::now_secs());
        l.last_error = None;
    }
    agent.link_up.send_replace(true);
    // Registers already attached are announced again: the controller's view starts fresh.
    for (hello, transport, _, state) in agent.attached() {
        write(
            &mut send,
            &AgentMessage::Attached(protocol::tunnel::Attached { hello, transport }),
        )
        .await?;
        if let Some(s) = state {
            write(&mut send, &AgentMessage::Status(Box::new(s))).await?;
        }
    }
    maybe_renew(agent).await;

    // Frames from the controller arrive through a reader task so that writing never waits on
    // reading.
    let (in_tx, mut in_rx) = mpsc::channel::<Result<ControllerMessage, SessionError>>(256);
    let reader = tokio::spawn(async move {
        loop {
            match read(&mut recv).await {
                Ok(Some(m)) => {
                    if in_tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = in_tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    let mut sent_upto = controller.applied_upto;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let result = 'session: loop {
        // Send every durable entry not yet sent, in order (the replay, then new reports).
        let batch = agent.journal().sendable(sent_upto);
        for entry in batch {
            sent_upto = entry.seq;
            if let Err(e) = write(&mut send, &AgentMessage::Outbox(entry)).await {
                break 'session Err(e);
            }
        }
        tokio::select! {
            _ = agent.outbox_ready.notified() => {}
            msg = out_rx.recv() => {
                let Some(msg) = msg else { break Ok(()) };
                if let Err(e) = write(&mut send, &msg).await { break Err(e) }
            }
            msg = in_rx.recv() => {
                match msg {
                    None => break Err(SessionError::Connection("controller closed the stream".into())),
                    Some(Err(e)) => break Err(e),
                    Some(Ok(m)) => handle(agent, m).await,
                }
            }
            _ = heartbeat.tick() => {
                let beat = AgentMessage::Heartbeat(agent.health());
                if let Err(e) = write(&mut send, &beat).await { break Err(e) }
                // A long session must not outlive the certificate; the check is two numbers.
                maybe_renew(agent).await;
            }
        }
    };
    finish(agent, reader, result)
}

fn finish(
    agent: &Agent,
    reader: tokio::task::JoinHandle<()>,
    result: Result<(), SessionError>,
) -> Result<(), SessionError> {
    reader.abort();
    agent.set_uplink(None);
    result
}

async fn handle(agent: &Arc<Agent>, msg: ControllerMessage) {
    match msg {
        ControllerMessage::Ack { upto } => agent.on_ack(upto),
        ControllerMessage::Dispatch(d) => {
            // Decided and queued here, before the next frame is read: a session that ends now
            // still has the job in the journal the next hello is built from.
            let step = agent.decide_dispatch(d);
            let agent = agent.clone();
            tokio::spawn(async move { agent.finish_dispatch(step).await });
        }
        ControllerMessage::Settings { kkt, settings } => {
            let agent = agent.clone();
            tokio::spawn(async move { agent.on_settings(kkt, settings).await });
        }
        ControllerMessage::Command { id, kkt, call } => {
            let agent = agent.clone();
            tokio::spawn(async move { agent.on_command(id, kkt, call).await });
        }
        ControllerMessage::Ping { sent_at_micros } => {
            agent.send_up(AgentMessage::Pong { sent_at_micros });
        }
        ControllerMessage::Pong { sent_at_micros } => {
            let rtt = now_micros().saturating_sub(sent_at_micros);
            if let Ok(mut l) = agent.link.lock() {
                l.rtt_micros = Some(rtt);
            }
        }
        ControllerMessage::Renewed(Ok(cert)) => renewed(agent, cert),
        ControllerMessage::Renewed(Err(reason)) => {
            warn!(%reason, "certificate renewal refused");
        }
        ControllerMessage::Hello(_) => warn!("unexpected second hello from the controller"),
    }
}

/// Renew when less than a third of the certificate's life is left (checked at each session).
async fn maybe_renew(agent: &Agent) {
    let info = match agent.identity.lock() {
        Ok(i) => i.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let info = &info;
    let now = crate::agent::now_secs();
    let path = agent.data.join("renewal.key.pem");
    let lifetime = info.not_after.saturating_sub(file_age_base(&agent.data));
    if info.not_after > now && info.not_after - now > lifetime / 3 {
        return;
    }
    // A renewal asked for recently is still on its way.
    let recent = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(600));
    if recent {
        return;
    }
    match identity::new_key_and_csr(&info.name) {
        Ok((key, csr_pem)) => {
            if std::fs::write(&path, key.serialize_pem()).is_ok() {
                info!(
                    not_after = info.not_after,
                    "certificate expires soon; renewing"
                );
                agent.send_up(AgentMessage::Renew { csr_pem });
            }
        }
        Err(e) => warn!(error = %e, "cannot make a renewal key"),
    }
}

/// When the current certificate was written (its issue time, near enough).
fn file_age_base(data: &std::path::Path) -> u64 {
    std::fs::metadata(data.join("agent.cert.pem"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn renewed(agent: &Agent, cert: protocol::tunnel::IssuedCertificate) {
    let key_path = agent.data.join("renewal.key.pem");
    let Ok(key_pem) = std::fs::read_to_string(&key_path) else {
        warn!("renewed certificate arrived but the renewal key is gone; will renew again");
        return;
    };
    let mut info = match agent.identity.lock() {
        Ok(i) => i.clone(),
        Err(p) => p.into_inner().clone(),
    };
    info.not_after = cert.not_after;
    let current_ca = identity::load(&agent.data).map(|i| identity::sha256(i.ca.as_ref()));
    match identity::store(&agent.data, &info, &key_pem, &cert, current_ca.ok()) {
        Ok(()) => {
            let _ = std::fs::remove_file(&key_path);
            if let Ok(mut i) = agent.identity.lock() {
                *i = info;
            }
            info!(
                not_after = cert.not_after,
                "certificate renewed; used from the next connection"
            );
            agent.renewed.notify_waiters();
        }
        Err(e) => warn!(error = %e, "renewed certificate not stored"),
    }
}
