//! One agent connection: identify, hello and reconcile, then three tasks — a reader (frames in),
//! a writer (frames out, several per write), and an applier that commits the agent's reports in
//! batches and acknowledges each batch once it is durable.
//!
//! Backpressure: the reader hands reports to the applier through a bounded channel; when commits
//! fall behind, the reader stops reading and QUIC flow control slows the agent down. The writer's
//! queue is bounded too, so a stalled agent slows `dispatch` instead of growing memory.

use super::frame::{read_frame, ReadFrameError};
use super::{AgentLink, Inner, OnlineKkt, TunnelEvent};
use crate::ca::fingerprint;
use crate::store::{AgentLookup, Effect, FleetStore, Report};
use crate::unix_ms;
use protocol::tunnel::{
    encode_frame, AgentHello, AgentMessage, ControllerHello, ControllerMessage, FrameError,
    IssuedCertificate, ALPN_ENROLL, ALPN_TUNNEL, TUNNEL_VERSION,
};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// Most jobs an agent may announce as held: ten times the agent's default journal limit, far
/// above anything a real journal holds, and a bound on what a misbehaving peer can make us keep.
const MAX_HELD_JOBS: usize = 1_000_000;

/// Application close codes (the reason text says more).
pub mod close_code {
    use quinn::VarInt;
    pub const DONE: VarInt = VarInt::from_u32(0);
    pub const PROTOCOL: VarInt = VarInt::from_u32(1);
    pub const UNAUTHORIZED: VarInt = VarInt::from_u32(2);
    pub const SUPERSEDED: VarInt = VarInt::from_u32(3);
    pub const INTERNAL: VarInt = VarInt::from_u32(4);
    pub const SHUTDOWN: VarInt = VarInt::from_u32(5);
}

/// Reports waiting for the applier; when full, the reader waits (see module docs).
const REPORT_QUEUE: usize = 8192;
/// Reports applied in one transaction at most.
const MAX_REPORTS_PER_COMMIT: usize = 2048;
/// Frames waiting to be written to one agent.
const OUT_QUEUE: usize = 1024;
/// The writer coalesces queued frames up to this many bytes per write.
const WRITE_COALESCE: usize = 64 * 1024;

pub(super) async fn accept_loop<S: FleetStore>(inner: Arc<Inner<S>>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // A client certificate our CA did not sign (or an expired one) ends here.
                    warn!(%remote, error = %e, "agent handshake failed");
                    inner.emit(TunnelEvent::ConnectionRejected {
                        agent: None,
                        remote,
                        reason: format!("handshake failed: {e}"),
                    });
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            match alpn.as_deref() {
                Some(p) if p == ALPN_TUNNEL => serve_tunnel(inner, conn).await,
                Some(p) if p == ALPN_ENROLL => super::enroll::serve(inner, conn).await,
                _ => reject(&inner, &conn, None, close_code::PROTOCOL, "unknown ALPN"),
            }
        });
    }
}

/// Closes a connection that broke the rules, with a logged reason.
pub(super) fn reject<S: FleetStore>(
    inner: &Inner<S>,
    conn: &Connection,
    agent: Option<&str>,
    code: VarInt,
    reason: &str,
) {
    let remote = conn.remote_address();
    warn!(agent = agent.unwrap_or("-"), %remote, reason, "closing agent connection");
    conn.close(code, reason.as_bytes());
    inner.emit(TunnelEvent::ConnectionRejected {
        agent: agent.map(str::to_owned),
        remote,
        reason: reason.to_owned(),
    });
}

fn peer_fingerprint(conn: &Connection) -> Option<[u8; 32]> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|c| fingerprint(c))
}

async fn serve_tunnel<S: FleetStore>(inner: Arc<Inner<S>>, conn: Connection) {
    // Identify: a verified certificate (rustls checked the chain and validity) that we issued to
    // an enrolled, not revoked agent.
    let Some(fp) = peer_fingerprint(&conn) else {
        reject(
            &inner,
            &conn,
            None,
            close_code::UNAUTHORIZED,
            "no client certificate: enroll the agent first (`agent enroll --token ...`)",
        );
        return;
    };
    let record = match inner.store.agent_by_certificate(&fp) {
        Ok(Ok(r)) => r,
        Ok(Err(AgentLookup::Unknown)) => {
            reject(
                &inner,
                &conn,
                None,
                close_code::UNAUTHORIZED,
                &AgentLookup::Unknown.to_string(),
            );
            return;
        }
        Ok(Err(AgentLookup::Revoked(id))) => {
            let reason = AgentLookup::Revoked(id.clone()).to_string();
            reject(&inner, &conn, Some(&id), close_code::UNAUTHORIZED, &reason);
            return;
        }
        Err(e) => {
            error!(error = %e, "store read failed while identifying an agent");
            reject(
                &inner,
                &conn,
                None,
                close_code::INTERNAL,
                "controller store unavailable; retry later",
            );
            return;
        }
    };
    let agent = record.id.clone();

    let timeout = inner.config.hello_timeout;
    let opened = tokio::time::timeout(timeout, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // A summary too big for one frame comes first, in `HeldJobs` frames; the hello ends it.
        let mut held = Vec::new();
        let hello: AgentMessage = loop {
            match read_frame(&mut recv, &mut buf).await {
                Ok(AgentMessage::HeldJobs(jobs)) => {
                    if held.len() + jobs.len() > MAX_HELD_JOBS {
                        return Err(format!(
                            "more than {MAX_HELD_JOBS} held jobs announced before the hello"
                        ));
                    }
                    held.extend(jobs);
                }
                Ok(h) => break h,
                // A hello from another protocol version may not decode as ours; name the
                // version when it can be read, so the log says "update the agent" rather than
                // "garbage".
                Err(ReadFrameError::Frame(FrameError::Decode(e))) => {
                    return Err(match peek_hello_version(&buf) {
                        Some(v) if v != TUNNEL_VERSION => FrameError::Version(v).to_string(),
                        _ => FrameError::Decode(e).to_string(),
                    })
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        let hello = match hello {
            AgentMessage::Hello(mut h) => {
                h.journal.jobs.extend(held);
                AgentMessage::Hello(h)
            }
            other => other,
        };
        Ok::<_, String>((send, recv, hello))
    })
    .await;
    let (send, recv, hello) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            reject(
                &inner,
                &conn,
                Some(&agent),
                close_code::PROTOCOL,
                &format!("no hello: {e}"),
            );
            return;
        }
        Err(_) => {
            reject(
                &inner,
                &conn,
                Some(&agent),
                close_code::PROTOCOL,
                "no hello in time",
            );
            return;
        }
    };
    let hello = match hello {
        AgentMessage::Hello(h) if h.version != TUNNEL_VERSION => {
            let reason = protocol::tunnel::FrameError::Version(h.version).to_string();
            reject(&inner, &conn, Some(&agent), close_code::PROTOCOL, &reason);
            return;
        }
        AgentMessage::Hello(h) if h.agent_id != agent => {
            reject(
                &inner,
                &conn,
                Some(&agent),
                close_code::UNAUTHORIZED,
                &format!(
                    "hello names agent {:?} but the certificate is {agent}'s",
                    h.agent_id
                ),
            );
            return;
        }
        AgentMessage::Hello(h) => h,
        _ => {
            reject(
                &inner,
                &conn,
                Some(&agent),
                close_code::PROTOCOL,
                "first frame must be a hello",
            );
            return;
        }
    };

    let conn_id = inner
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Supersede an older connection of this agent before reconciling (see the invariants).
    let (old, gone) = {
        let mut live = inner.live();
        let old = live.agents.remove(&agent);
        let mut gone: Vec<String> = Vec::new();
        if let Some(old) = &old {
            gone = live
                .kkts
                .iter()
                .filter(|(_, k)| k.conn_id == old.conn_id)
                .map(|(zn, _)| zn.clone())
                .collect();
            for zn in &gone {
                live.kkts.remove(zn);
            }
        }
        (old, gone)
    };
    // Subscribers must hear that these registers are gone: the dispatcher would otherwise keep
    // them in its pool until the new connection attaches them again, and every dispatch to one
    // would fail ("not online") and be retried at once.
    for kkt in gone {
        inner.emit(TunnelEvent::KktDetached {
            agent: agent.clone(),
            kkt,
        });
    }
    if let Some(old) = old {
        info!(agent, "new connection supersedes the previous one");
        old.conn.close(
            close_code::SUPERSEDED,
            b"superseded by a new connection of the same agent",
        );
    }

    let outcome = match reconcile(&inner, &agent, &hello).await {
        Ok(o) => o,
        Err(e) => {
            error!(agent, error = %e, "hello could not be recorded");
            reject(
                &inner,
                &conn,
                Some(&agent),
                close_code::INTERNAL,
                "controller store unavailable; retry later",
            );
            return;
        }
    };

    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    // The hello goes first: the channel is empty and nobody else has it yet.
    let _ = tx.try_send(ControllerMessage::Hello(ControllerHello {
        version: TUNNEL_VERSION,
        controller_id: inner.controller_id.clone(),
        applied_upto: outcome,
    }));
    let writer = tokio::spawn(write_loop(send, rx));
    {
        let mut live = inner.live();
        live.agents.insert(
            agent.clone(),
            AgentLink {
                conn_id,
                name: record.name.clone(),
                software: hello.software.clone(),
                remote: conn.remote_address(),
                connected_at_ms: unix_ms(),
                tx: tx.clone(),
                conn: conn.clone(),
                health: None,
                rtt: None,
                waiters: Default::default(),
            },
        );
    }
    info!(agent, name = record.name, remote = %conn.remote_address(), applied_upto = outcome, "agent connected");
    inner.emit(TunnelEvent::AgentConnected {
        agent: agent.clone(),
    });

    let (reports_tx, reports_rx) = mpsc::channel(REPORT_QUEUE);
    let applier = tokio::spawn(apply_loop(
        inner.clone(),
        agent.clone(),
        conn_id,
        conn.clone(),
        reports_rx,
        tx.clone(),
    ));
    let pinger = tokio::spawn(ping_loop(inner.clone(), tx.clone()));

    let reason = read_loop(&inner, &agent, conn_id, &conn, recv, reports_tx, &tx).await;
    pinger.abort();
    drop(tx);
    // Let the applier commit what was read; its acks may no longer reach the agent, which then
    // resends and is deduplicated.
    let _ = applier.await;
    writer.abort();
    disconnect(&inner, &agent, conn_id, &reason);
}

/// The version in a first frame that does not decode, if it is laid out as a hello: postcard
/// writes the variant index (0 for `Hello`) and then the version as a varint.
fn peek_hello_version(body: &[u8]) -> Option<u16> {
    let (&variant, rest) = body.split_first()?;
    if variant != 0 {
        return None;
    }
    let mut value: u32 = 0;
    for (i, &b) in rest.iter().take(3).enumerate() {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u16::try_from(value).ok();
        }
    }
    None
}

/// Records the hello and releases jobs the agent does not hold; returns `applied_upto`.
async fn reconcile<S: FleetStore>(
    inner: &Inner<S>,
    agent: &str,
    hello: &AgentHello,
) -> Result<u64, crate::store::StoreError> {
    let held: HashSet<String> = hello.journal.jobs.iter().map(|j| j.job.clone()).collect();
    let outcome = inner
        .store
        .agent_hello(
            agent,
            hello.store_epoch,
            hello.journal.last_seq,
            held.clone(),
            unix_ms(),
        )
        .await?;
    if let Some(w) = &outcome.warning {
        warn!(agent, store_epoch = hello.store_epoch, "{w}");
    }
    let known: HashSet<&str> = outcome.held.iter().map(|(j, _)| j.as_str()).collect();
    for j in &hello.journal.jobs {
        if !known.contains(j.job.as_str()) {
            debug!(
                agent,
                job = j.job,
                kkt = j.kkt,
                "agent holds a job not assigned to it here (already reported, or reassigned)"
            );
        }
    }
    let mut live = inner.live();
    for (job, kkt, attempt) in &outcome.released {
        live.remove_in_flight(kkt, job);
        info!(
            agent,
            job, kkt, attempt, "job released: the agent reconnected without it"
        );
    }
    drop(live);
    for (job, kkt, _) in outcome.released {
        inner.emit(TunnelEvent::JobReleased {
            job,
            agent: agent.to_owned(),
            kkt,
        });
    }
    Ok(outcome.applied_upto)
}

/// Reads frames until the connection ends; returns why it ended.
async fn read_loop<S: FleetStore>(
    inner: &Inner<S>,
    agent: &str,
    conn_id: u64,
    conn: &Connection,
    mut recv: RecvStream,
    reports: mpsc::Sender<Report>,
    out: &mpsc::Sender<ControllerMessage>,
) -> String {
    let mut buf = Vec::new();
    loop {
        let msg: AgentMessage = match read_frame(&mut recv, &mut buf).await {
            Ok(m) => m,
            Err(ReadFrameError::Finished) => {
                conn.close(close_code::DONE, b"stream finished");
                return "agent finished its stream".into();
            }
            Err(ReadFrameError::Lost(e)) => return format!("connection lost: {e}"),
            Err(e @ (ReadFrameError::Frame(_) | ReadFrameError::Truncated)) => {
                let reason = e.to_string();
                reject(inner, conn, Some(agent), close_code::PROTOCOL, &reason);
                return reason;
            }
        };
        let report = match msg {
            AgentMessage::Hello(_) | AgentMessage::HeldJobs(_) => {
                let reason = "a second hello (or its held jobs) on the same connection";
                reject(inner, conn, Some(agent), close_code::PROTOCOL, reason);
                return reason.into();
            }
            AgentMessage::Attached(a) => claim(inner, agent, conn_id, a, &reports),
            AgentMessage::Detached { kkt } => {
                let mut live = inner.live();
                if live
                    .pending_claims
                    .get(&kkt)
                    .is_some_and(|c| c.conn_id == conn_id)
                {
                    live.pending_claims.remove(&kkt);
                }
                Some(Report::Detached { kkt })
            }
            AgentMessage::Status(s) => Some(Report::Status(s)),
            AgentMessage::Accepted { job, attempt } => Some(Report::Accepted { job, attempt }),
            AgentMessage::Refused {
                job,
                attempt,
                reason,
            } => Some(Report::Refused {
                job,
                attempt,
                reason,
            }),
            AgentMessage::Outbox(entry) => Some(Report::Outbox(entry)),
            AgentMessage::CommandResult { id, kkt, outcome } => {
                let waiter = inner
                    .live()
                    .agents
                    .get_mut(agent)
                    .filter(|l| l.conn_id == conn_id)
                    .and_then(|l| l.waiters.remove(&id));
                match waiter {
                    Some(w) => {
                        let _ = w.send(outcome);
                    }
                    None => debug!(
                        agent,
                        kkt, id, "command result nobody waits for (timed out)"
                    ),
                }
                None
            }
            AgentMessage::Heartbeat(health) => {
                let sent_at_micros = health.sent_at_micros;
                if let Some(alarm) = &health.alarm {
                    warn!(agent, alarm, "agent raised an alarm");
                }
                if let Some(l) = inner
                    .live()
                    .agents
                    .get_mut(agent)
                    .filter(|l| l.conn_id == conn_id)
                {
                    l.health = Some(health);
                }
                let _ = out.try_send(ControllerMessage::Pong { sent_at_micros });
                None
            }
            AgentMessage::Pong { sent_at_micros } => {
                let rtt =
                    std::time::Duration::from_micros(inner.micros().saturating_sub(sent_at_micros));
                if let Some(l) = inner
                    .live()
                    .agents
                    .get_mut(agent)
                    .filter(|l| l.conn_id == conn_id)
                {
                    l.rtt = Some(rtt);
                }
                None
            }
            AgentMessage::Renew { csr_pem } => {
                let answer = renew(inner, agent, &csr_pem).await;
                if out.send(ControllerMessage::Renewed(answer)).await.is_err() {
                    return "connection closed".into();
                }
                None
            }
        };
        if let Some(report) = report {
            if reports.send(report).await.is_err() {
                return "the report applier stopped".into();
            }
        }
    }
}

async fn renew<S: FleetStore>(
    inner: &Inner<S>,
    agent: &str,
    csr_pem: &str,
) -> Result<IssuedCertificate, String> {
    let issued = inner
        .ca
        .issue_agent(agent, csr_pem, inner.config.agent_cert_validity)
        .map_err(|e| e.to_string())?;
    inner
        .store
        .add_certificate(agent, issued.fingerprint, issued.not_after)
        .await
        .map_err(|e| {
            error!(agent, error = %e, "renewed certificate could not be recorded");
            "the controller could not record the certificate; retry later".to_owned()
        })?;
    info!(
        agent,
        not_after = issued.not_after,
        "agent certificate renewed"
    );
    Ok(IssuedCertificate {
        cert_pem: issued.cert_pem,
        ca_pem: inner.ca.cert_pem().to_owned(),
        not_after: issued.not_after,
    })
}

/// An agent says a register is wired to it. Taken at once unless another agent's live connection
/// holds the register; then it waits in [`super::Live::pending_claims`] (see there for why).
fn claim<S: FleetStore>(
    inner: &Inner<S>,
    agent: &str,
    conn_id: u64,
    attached: protocol::tunnel::Attached,
    reports: &mpsc::Sender<Report>,
) -> Option<Report> {
    let zn = attached.hello.zn.clone();
    let mut live = inner.live();
    let holder = live
        .kkts
        .get(&zn)
        .filter(|k| k.agent != agent)
        .map(|k| k.agent.clone());
    match holder {
        None => Some(Report::Attached(attached)),
        Some(holder) => {
            warn!(
                agent,
                kkt = zn,
                holder,
                "register claimed while another agent holds it; the claim waits until that agent \
                 lets it go (if the register was re-cabled, unplug it there or stop that agent)"
            );
            live.pending_claims.insert(
                zn.clone(),
                super::PendingClaim {
                    agent: agent.to_owned(),
                    conn_id,
                    attached,
                    reports: reports.clone(),
                },
            );
            drop(live);
            inner.emit(TunnelEvent::KktClaimWaiting {
                agent: agent.to_owned(),
                kkt: zn,
                holder,
            });
            None
        }
    }
}

/// Commits the agent's reports in batches (one transaction each) and acknowledges each batch's
/// outbox position after it is durable.
async fn apply_loop<S: FleetStore>(
    inner: Arc<Inner<S>>,
    agent: String,
    conn_id: u64,
    conn: Connection,
    mut rx: mpsc::Receiver<Report>,
    out: mpsc::Sender<ControllerMessage>,
) {
    let mut batch = Vec::new();
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, MAX_REPORTS_PER_COMMIT).await == 0 {
            return;
        }
        let reports = std::mem::take(&mut batch);
        let applied = match inner.store.apply_reports(&agent, reports, unix_ms()).await {
            Ok(a) => a,
            Err(e) => {
                // Nothing of this batch is acknowledged; the agent resends after reconnecting.
                error!(agent, error = %e, "agent reports could not be committed; dropping the link");
                reject(
                    &inner,
                    &conn,
                    Some(&agent),
                    close_code::INTERNAL,
                    "controller store failed; reconnect later",
                );
                return;
            }
        };
        if applied.ack_owed {
            let _ = out
                .send(ControllerMessage::Ack {
                    upto: applied.applied_upto,
                })
                .await;
        }
        publish(&inner, &agent, conn_id, applied.effects);
        if applied.ack_owed {
            inner.emit(TunnelEvent::OutboxApplied {
                agent: agent.clone(),
                upto: applied.applied_upto,
            });
        }
    }
}

/// Updates the in-memory view from committed effects and tells subscribers.
fn publish<S: FleetStore>(inner: &Inner<S>, agent: &str, conn_id: u64, effects: Vec<Effect>) {
    let mut events = Vec::with_capacity(effects.len());
    {
        let mut live = inner.live();
        let current = live.agents.get(agent).is_some_and(|l| l.conn_id == conn_id);
        for effect in effects {
            match effect {
                Effect::JobAccepted { job, kkt, attempt } => {
                    info!(agent, job, kkt, attempt, "job accepted");
                    events.push(TunnelEvent::JobAccepted {
                        job,
                        agent: agent.to_owned(),
                        kkt,
                        attempt,
                    });
                }
                Effect::JobRefused {
                    job,
                    kkt,
                    attempt,
                    reason,
                } => {
                    warn!(
                        agent,
                        job,
                        kkt,
                        attempt,
                        reason,
                        "agent refused the dispatch; job back in the queue"
                    );
                    live.remove_in_flight(&kkt, &job);
                    events.push(TunnelEvent::JobRefused {
                        job,
                        agent: agent.to_owned(),
                        kkt,
                        attempt,
                        reason,
                    });
                }
                Effect::JobCompleted {
                    job,
                    kkt,
                    result,
                    held_by,
                    ..
                } => {
                    if let Some((_, held_kkt)) = &held_by {
                        live.remove_in_flight(held_kkt, &job);
                    }
                    events.push(TunnelEvent::JobCompleted {
                        job,
                        agent: agent.to_owned(),
                        kkt,
                        result,
                    });
                }
                Effect::JobNotFiscalized {
                    job, kkt, error, ..
                } => {
                    live.remove_in_flight(&kkt, &job);
                    events.push(TunnelEvent::JobNotFiscalized {
                        job,
                        agent: agent.to_owned(),
                        kkt,
                        error,
                    });
                }
                Effect::AnomalyRecorded { id, job } => {
                    events.push(TunnelEvent::AnomalyRecorded { id, job })
                }
                Effect::KktAttached(attached) => {
                    let zn = attached.hello.zn.clone();
                    if current {
                        let state = live.kkts.remove(&zn).and_then(|k| k.state);
                        live.kkts.insert(
                            zn.clone(),
                            OnlineKkt {
                                agent: agent.to_owned(),
                                conn_id,
                                attached: *attached,
                                state,
                                since_ms: unix_ms(),
                            },
                        );
                    }
                    info!(agent, kkt = zn, "register attached");
                    events.push(TunnelEvent::KktAttached {
                        agent: agent.to_owned(),
                        kkt: zn,
                    });
                }
                Effect::KktDetached { kkt } => {
                    if live.kkts.get(&kkt).is_some_and(|k| k.conn_id == conn_id) {
                        live.kkts.remove(&kkt);
                        live.release_claims(std::slice::from_ref(&kkt));
                    }
                    info!(agent, kkt, "register detached");
                    events.push(TunnelEvent::KktDetached {
                        agent: agent.to_owned(),
                        kkt,
                    });
                }
                Effect::KktStatus(state) => {
                    let kkt = state.kkt.clone();
                    if let Some(k) = live.kkts.get_mut(&kkt).filter(|k| k.conn_id == conn_id) {
                        k.state = Some(*state);
                    }
                    events.push(TunnelEvent::KktStatus {
                        agent: agent.to_owned(),
                        kkt,
                    });
                }
                Effect::KktEvent { kkt, event } => {
                    if let protocol::kkt::Event::StatusChanged(device) = event.as_ref() {
                        if let Some(state) = live
                            .kkts
                            .get_mut(&kkt)
                            .filter(|k| k.conn_id == conn_id)
                            .and_then(|k| k.state.as_mut())
                        {
                            state.device = device.clone();
                        }
                    }
                    events.push(TunnelEvent::KktEvent {
                        agent: agent.to_owned(),
                        kkt,
                        event,
                    });
                }
                Effect::ReceiptsConfirmed(jobs) => {
                    events.push(TunnelEvent::ReceiptsConfirmed { jobs });
                }
            }
        }
    }
    for e in events {
        inner.emit(e);
    }
}

async fn ping_loop<S: FleetStore>(inner: Arc<Inner<S>>, out: mpsc::Sender<ControllerMessage>) {
    let mut tick = tokio::time::interval(inner.config.ping_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let msg = ControllerMessage::Ping {
            sent_at_micros: inner.micros(),
        };
        if out.send(msg).await.is_err() {
            return;
        }
    }
}

/// Writes queued frames, several per write when they pile up.
async fn write_loop(mut send: SendStream, mut rx: mpsc::Receiver<ControllerMessage>) {
    let mut buf = Vec::with_capacity(WRITE_COALESCE);
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match encode_frame(&msg) {
                Ok(bytes) => buf.extend_from_slice(&bytes),
                // Dispatches are checked before they are recorded; nothing else is this large.
                Err(e) => {
                    error!(error = %e, "a controller message does not fit in a frame; dropped")
                }
            }
            if buf.len() < WRITE_COALESCE {
                next = rx.try_recv().ok();
            }
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Forgets a connection's live state (only if it is still the agent's current one).
fn disconnect<S: FleetStore>(inner: &Inner<S>, agent: &str, conn_id: u64, reason: &str) {
    let mut detached = Vec::new();
    let was_current = {
        let mut live = inner.live();
        let current = live.agents.get(agent).is_some_and(|l| l.conn_id == conn_id);
        if current {
            // Dropping the link drops its command waiters: their callers see `Disconnected`.
            live.agents.remove(agent);
        }
        live.kkts.retain(|zn, k| {
            if k.conn_id == conn_id {
                detached.push(zn.clone());
                false
            } else {
                true
            }
        });
        live.pending_claims.retain(|_, c| c.conn_id != conn_id);
        live.release_claims(&detached);
        current
    };
    info!(agent, reason, "agent disconnected");
    for kkt in detached {
        inner.emit(TunnelEvent::KktDetached {
            agent: agent.to_owned(),
            kkt,
        });
    }
    if was_current {
        inner.emit(TunnelEvent::AgentDisconnected {
            agent: agent.to_owned(),
            reason: reason.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::peek_hello_version;

    #[test]
    fn versions_are_read_from_undecodable_hellos() {
        assert_eq!(peek_hello_version(&[0, 99, 0xff]), Some(99));
        assert_eq!(peek_hello_version(&[0, 0x80 | 0x2c, 0x02]), Some(300));
        assert_eq!(peek_hello_version(&[3, 1]), None);
        assert_eq!(peek_hello_version(&[]), None);
        assert_eq!(peek_hello_version(&[0, 0xff, 0xff, 0xff]), None);
    }
}
