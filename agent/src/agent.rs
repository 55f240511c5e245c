//! The agent's async shell: it owns the journal, the attached registers and the tunnel session,
//! and runs one executor per register that applies the exactly-once rules of `journal`.
//!
//! Tasks: one per register link (`kkt_link`), one executor per attached register, one tunnel
//! session (`uplink`) at a time, the health server. They share [`Agent`]; every journal decision is
//! taken under the journal lock and its writes are queued under the same lock, so the disk sees
//! them in decision order; nothing is reported before its writes are durable.

use crate::identity::IdentityInfo;
use crate::journal::{DispatchDecision, JobPhase, Journal, JournalJob, Write};
use crate::store::{Pending, Store};
use protocol::kkt::{Call, ErrorCode, Event, GetFnDocument, Hello, KktError, OfdEndpoint, Reply};
use protocol::tunnel::{
    AgentMessage, Attached, Dispatch, Health, KktSettings, KktState, OutboxBody,
};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Longest a register may take to answer one call (registers with a slow printer take seconds).
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A request to a register: the call and where its answer goes. A dropped sender means the link
/// went down before the answer: the outcome is unknown.
pub type KktRequest = (Call, oneshot::Sender<Result<Reply, KktError>>);

struct Attachment {
    generation: u64,
    /// Tells the link's driver to drop the link (a register that stopped answering).
    close: Arc<Notify>,
    hello: Hello,
    transport: String,
    requests: mpsc::Sender<KktRequest>,
    wake: Arc<Notify>,
    since: u64,
    state: Option<KktState>,
}

/// A dispatch decided and queued, waiting to be answered.
pub enum DispatchStep {
    Accept {
        job: String,
        attempt: u32,
        kkt: String,
        pending: Option<Pending>,
    },
    Refuse {
        job: String,
        attempt: u32,
        reason: String,
    },
}

/// Why a register call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    NotAttached,
    /// The link went down with the request outstanding: the register may or may not have acted.
    LinkLost,
    Kkt(KktError),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    pub up: bool,
    pub controller: String,
    pub since: Option<u64>,
    pub rtt_micros: Option<u64>,
    pub last_error: Option<String>,
}

pub struct Agent {
    journal: Mutex<Journal>,
    store: Store,
    pub epoch: u64,
    kkts: Mutex<HashMap<String, Attachment>>,
    generations: AtomicU64,
    /// The current tunnel session's outgoing queue, if a session is up.
    uplink: Mutex<Option<mpsc::UnboundedSender<AgentMessage>>>,
    /// Woken when an outbox entry becomes durable (the session sends it).
    pub outbox_ready: Notify,
    /// Woken (all waiters) when a register attaches or detaches.
    pub kkts_changed: Notify,
    /// Highest outbox sequence number that is durable (for observers; the session uses the
    /// journal itself).
    pub durable_seq: tokio::sync::watch::Sender<u64>,
    /// Woken (all waiters) when a renewed certificate has been stored.
    pub renewed: Notify,
    /// Whether a tunnel session is up.
    pub link_up: tokio::sync::watch::Sender<bool>,
    pub link: Mutex<LinkStatus>,
    settings: Mutex<HashMap<String, KktSettings>>,
    pub identity: Mutex<IdentityInfo>,
    pub data: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic in a pure core the tests rule out; keep the data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    pub fn new(
        journal: Journal,
        store: Store,
        epoch: u64,
        identity: IdentityInfo,
        data: PathBuf,
    ) -> Arc<Agent> {
        let controller = identity.controller.clone();
        Arc::new(Agent {
            journal: Mutex::new(journal),
            store,
            epoch,
            kkts: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
            uplink: Mutex::new(None),
            outbox_ready: Notify::new(),
            kkts_changed: Notify::new(),
            durable_seq: tokio::sync::watch::Sender::new(0),
            link_up: tokio::sync::watch::Sender::new(false),
            renewed: Notify::new(),
            link: Mutex::new(LinkStatus {
                controller,
                ..LinkStatus::default()
            }),
            settings: Mutex::new(HashMap::new()),
            identity: Mutex::new(identity),
            data,
        })
    }

    pub fn journal(&self) -> MutexGuard<'_, Journal> {
        lock(&self.journal)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Commits writes and waits until they are durable. A journal that cannot write is fatal: the
    /// agent must not report what it could not keep, so it stops and the supervisor restarts it
    /// on the durable state.
    async fn durable(&self, pending: Pending) {
        if let Err(e) = pending.durable().await {
            tracing::error!(error = %e, "journal write failed; stopping the agent");
            std::process::exit(70);
        }
    }

    /// Sends a message on the current session; when the link is down it is dropped: everything
    /// that must survive is in the outbox or is re-sent on reconnect (attachments, status).
    pub fn send_up(&self, msg: AgentMessage) {
        if let Some(tx) = lock(&self.uplink).as_ref() {
            let _ = tx.send(msg);
        }
    }

    pub fn set_uplink(&self, tx: Option<mpsc::UnboundedSender<AgentMessage>>) {
        *lock(&self.uplink) = tx;
    }

    // ---- registers ------------------------------------------------------------------------

    /// A register said hello. Returns its generation and the notify that wakes its executor.
    pub fn attach(
        self: &Arc<Self>,
        hello: Hello,
        transport: String,
        requests: mpsc::Sender<KktRequest>,
        close: Arc<Notify>,
    ) -> u64 {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let zn = hello.zn.clone();
        let wake = Arc::new(Notify::new());
        let replaced = lock(&self.kkts).insert(
            zn.clone(),
            Attachment {
                generation,
                close,
                hello: hello.clone(),
                transport: transport.clone(),
                requests,
                wake: wake.clone(),
                since: now_secs(),
                state: None,
            },
        );
        if let Some(old) = replaced {
            // The same register on a new link: the old link and its executor must go.
            old.close.notify_one();
            old.wake.notify_one();
        }
        info!(kkt = %zn, fn_number = %hello.fn_number, %transport, "register attached");
        self.kkts_changed.notify_waiters();
        self.send_up(AgentMessage::Attached(Attached { hello, transport }));
        let agent = self.clone();
        tokio::spawn(async move {
            agent.apply_settings(&zn).await;
            agent.refresh_status(&zn).await;
            crate::executor::run(agent, zn, generation, wake).await;
        });
        generation
    }

    pub fn detach(&self, zn: &str, generation: u64) {
        let mut kkts = lock(&self.kkts);
        if kkts.get(zn).is_some_and(|a| a.generation == generation) {
            kkts.remove(zn);
            drop(kkts);
            info!(kkt = %zn, "register detached");
            self.kkts_changed.notify_waiters();
            self.send_up(AgentMessage::Detached { kkt: zn.to_owned() });
        }
    }

    pub fn is_attached(&self, zn: &str, generation: u64) -> bool {
        lock(&self.kkts)
            .get(zn)
            .is_some_and(|a| a.generation == generation)
    }

    pub fn attached(&self) -> Vec<(Hello, String, u64, Option<KktState>)> {
        lock(&self.kkts)
            .values()
            .map(|a| {
                (
                    a.hello.clone(),
                    a.transport.clone(),
                    a.since,
                    a.state.clone(),
                )
            })
            .collect()
    }

    fn wake(&self, zn: &str) {
        if let Some(a) = lock(&self.kkts).get(zn) {
            a.wake.notify_one();
        }
    }

    /// Sends one call to a register's current link and waits for its answer.
    pub async fn call(&self, zn: &str, call: Call) -> Result<Reply, CallError> {
        let generation = lock(&self.kkts)
            .get(zn)
            .map(|a| a.generation)
            .ok_or(CallError::NotAttached)?;
        self.call_on(zn, generation, call).await
    }

    /// Sends one call on the link of one attachment. An executor calls only through its own
    /// attachment: after the register reattached, an old executor's calls fail instead of reaching
    /// the new link, so two executors can never both send to one register.
    pub async fn call_on(&self, zn: &str, generation: u64, call: Call) -> Result<Reply, CallError> {
        let (tx, close) = lock(&self.kkts)
            .get(zn)
            .filter(|a| a.generation == generation)
            .map(|a| (a.requests.clone(), a.close.clone()))
            .ok_or(CallError::NotAttached)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send((call, reply_tx))
            .await
            .map_err(|_| CallError::LinkLost)?;
        match tokio::time::timeout(CALL_TIMEOUT, reply_rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(e))) => Err(CallError::Kkt(e)),
            Ok(Err(_)) => Err(CallError::LinkLost),
            Err(_) => {
                // A register that stops answering on an open link would hold its jobs forever:
                // drop the link, so that it reconnects and recovery settles what was in flight.
                warn!(kkt = %zn, "register did not answer in time; dropping its link");
                close.notify_one();
                Err(CallError::LinkLost)
            }
        }
    }

    /// Reads the register's full state and reports it.
    pub async fn refresh_status(&self, zn: &str) {
        let (
            Ok(Reply::DeviceStatus(device)),
            Ok(Reply::FnInfo(fn_info)),
            Ok(Reply::ShiftStatus(shift)),
            Ok(Reply::OfdExchange(ofd)),
        ) = (
            self.call(zn, Call::GetDeviceStatus).await,
            self.call(zn, Call::GetFnInfo).await,
            self.call(zn, Call::GetShiftStatus).await,
            self.call(zn, Call::OfdExchangeStatus).await,
        )
        else {
            debug!(kkt = %zn, "status refresh incomplete");
            return;
        };
        let state = KktState {
            kkt: zn.to_owned(),
            device,
            fn_info,
            shift,
            ofd,
        };
        if let Some(a) = lock(&self.kkts).get_mut(zn) {
            a.state = Some(state.clone());
        }
        self.send_up(AgentMessage::Status(Box::new(state)));
    }

    /// Forwards the settings the controller pushed for this register.
    async fn apply_settings(&self, zn: &str) {
        let settings = lock(&self.settings).get(zn).cloned();
        if let Some(KktSettings { ofd: Some(ofd) }) = settings {
            self.set_ofd(zn, ofd).await;
        }
    }

    async fn set_ofd(&self, zn: &str, ofd: OfdEndpoint) {
        if let Err(e) = self.call(zn, Call::SetOfd(ofd)).await {
            warn!(kkt = %zn, error = ?e, "register did not take the OFD setting");
        }
    }

    /// A register pushed an event: journal it, then report it.
    /// A register event. Called inline by the loop that reads the register's link, so it must
    /// not wait there: the entry is journaled (its sequence number fixed, in the order events
    /// arrive) and its write queued here, and the rest — waiting for the commit, and for a status
    /// change a status refresh whose answers that same loop must read — runs in a task.
    pub fn on_kkt_event(self: &Arc<Self>, zn: &str, event: Event) {
        let refresh = matches!(event, Event::StatusChanged(_));
        let body = OutboxBody::Event {
            kkt: zn.to_owned(),
            event,
        };
        let (seq, pending) = {
            let mut j = self.journal();
            let (entry, writes) = j.event(body, now_secs());
            (entry.seq, self.store.enqueue(writes))
        };
        let (me, zn) = (self.clone(), zn.to_owned());
        tokio::spawn(async move {
            me.durable(pending).await;
            me.outbox_durable(seq);
            if refresh {
                me.refresh_status(&zn).await;
            }
        });
    }

    fn outbox_durable(&self, seq: u64) {
        self.journal().mark_durable(seq);
        self.durable_seq.send_if_modified(|s| {
            let grew = seq > *s;
            *s = (*s).max(seq);
            grew
        });
        self.outbox_ready.notify_one();
    }

    // ---- jobs -----------------------------------------------------------------------------

    /// Decides on a dispatch and queues its journal write, without waiting: the tunnel session
    /// calls this inline, so a dispatch is in the journal before the session can end and a later
    /// hello be built without it. [`Agent::finish_dispatch`] then waits for durability and
    /// answers.
    pub fn decide_dispatch(&self, d: Dispatch) -> DispatchStep {
        let attached = lock(&self.kkts).contains_key(&d.kkt);
        let mut j = self.journal();
        if !attached && j.job(&d.job).is_none() {
            return DispatchStep::Refuse {
                job: d.job,
                attempt: d.attempt,
                reason: format!("register {} is not attached to this agent", d.kkt),
            };
        }
        let (job, attempt, kkt) = (d.job.clone(), d.attempt, d.kkt.clone());
        match j.dispatch(d, now_secs()) {
            DispatchDecision::Accept(writes) => DispatchStep::Accept {
                job,
                attempt,
                kkt,
                pending: Some(self.store.enqueue(writes)),
            },
            DispatchDecision::AlreadyHeld => DispatchStep::Accept {
                job,
                attempt,
                kkt,
                pending: None,
            },
            DispatchDecision::Refuse(reason) => DispatchStep::Refuse {
                job,
                attempt,
                reason,
            },
        }
    }

    pub async fn finish_dispatch(&self, step: DispatchStep) {
        match step {
            DispatchStep::Accept {
                job,
                attempt,
                kkt,
                pending,
            } => {
                if let Some(p) = pending {
                    self.durable(p).await;
                }
                debug!(%job, %kkt, attempt, "job accepted");
                self.send_up(AgentMessage::Accepted { job, attempt });
                self.wake(&kkt);
            }
            DispatchStep::Refuse {
                job,
                attempt,
                reason,
            } => {
                warn!(%job, %reason, "job refused");
                self.send_up(AgentMessage::Refused {
                    job,
                    attempt,
                    reason,
                });
            }
        }
    }

    /// Journals a dispatch (durably) and answers it.
    pub async fn on_dispatch(&self, d: Dispatch) {
        let step = self.decide_dispatch(d);
        self.finish_dispatch(step).await;
    }

    pub fn next_job(&self, zn: &str) -> Option<JournalJob> {
        self.journal().next_for(zn).cloned()
    }

    /// The accepted job that would run on `zn` after `current`.
    pub fn next_accepted(&self, zn: &str, current: &str) -> Option<JournalJob> {
        self.journal().next_accepted_for(zn, current).cloned()
    }

    /// Applies a journal transition and waits until it is durable. `false` when the transition
    /// did not apply (the job was not in the expected phase): the caller must not act on it.
    pub async fn transition(&self, f: impl FnOnce(&mut Journal) -> Vec<Write>) -> bool {
        let pending = {
            let mut j = self.journal();
            let writes = f(&mut j);
            if writes.is_empty() {
                return false;
            }
            self.store.enqueue(writes)
        };
        self.durable(pending).await;
        true
    }

    /// Reports a job's outcome: outbox entry durable first, then sent.
    pub async fn report(&self, job: &str, outcome: Result<protocol::kkt::FiscalResult, KktError>) {
        if let Some((seq, pending)) = self.queue_report(job, outcome) {
            self.durable(pending).await;
            self.outbox_durable(seq);
        }
    }

    /// Journals a job's outcome as an outbox entry and queues its write; the entry's sequence
    /// number and the write's completion. None when the job is not in a phase to report.
    fn queue_report(
        &self,
        job: &str,
        outcome: Result<protocol::kkt::FiscalResult, KktError>,
    ) -> Option<(u64, Pending)> {
        let mut j = self.journal();
        let now = now_secs();
        let r = match outcome {
            Ok(result) => j.complete(job, result, now),
            Err(error) => j.not_fiscalized(job, error, now),
        };
        r.map(|(entry, writes)| (entry.seq, self.store.enqueue(writes)))
    }

    /// Like [`Agent::report`], but returns as soon as the outbox entry is queued for its commit;
    /// a task marks it sendable once durable. The executor uses it so that a register's next
    /// receipt does not wait for this commit. The entry is never sent before it is durable; if
    /// the agent dies first, the job is still `Executing` on disk and recovery finds its document
    /// in the archive by the job id. (The next job may already be `Executing` on disk before this
    /// entry is: its `fd_before` is this job's, so its recovery reads this document too, sees
    /// another job id, and keeps looking.)
    pub fn report_queued(
        self: &Arc<Self>,
        job: &str,
        outcome: Result<protocol::kkt::FiscalResult, KktError>,
    ) {
        let made = self.queue_report(job, outcome);
        if let Some((seq, pending)) = made {
            let me = self.clone();
            tokio::spawn(async move {
                me.durable(pending).await;
                // A watermark: marking a later entry first is fine, its commit implies this one.
                me.outbox_durable(seq);
            });
        }
    }

    /// The controller acknowledged everything up to `upto`.
    pub fn on_ack(&self, upto: u64) {
        let mut j = self.journal();
        let writes = j.ack(upto);
        if !writes.is_empty() {
            // Not awaited: a lost delete only causes a replay the controller deduplicates.
            drop(self.store.enqueue(writes));
        }
    }

    pub async fn on_settings(&self, kkt: String, settings: KktSettings) {
        lock(&self.settings).insert(kkt.clone(), settings.clone());
        if let Some(ofd) = settings.ofd {
            if lock(&self.kkts).contains_key(&kkt) {
                self.set_ofd(&kkt, ofd).await;
            }
        }
    }

    pub async fn on_command(&self, id: u64, kkt: String, call: Call) {
        let forms_document = call.forms_document();
        let call_kind = if matches!(call, Call::GetDeviceStatus) {
            CallKind::Status
        } else {
            CallKind::Other
        };
        let outcome = match self.call(&kkt, call).await {
            Ok(r) => Ok(r),
            Err(CallError::Kkt(e)) => Err(e),
            Err(CallError::NotAttached) => Err(KktError::new(
                ErrorCode::NO_CONNECTION,
                format!("register {kkt} is not attached to this agent"),
            )),
            Err(CallError::LinkLost) => Err(KktError::new(
                ErrorCode::NO_CONNECTION,
                "the register's link went down before it answered; read its status",
            )),
        };
        // A status query is also how the controller asks for a fresh `Status` report.
        let refresh = (forms_document || matches!(call_kind, CallKind::Status)) && outcome.is_ok();
        self.send_up(AgentMessage::CommandResult {
            id,
            kkt: kkt.clone(),
            outcome,
        });
        // A shift or registration changed: the controller (and the health page) should see it.
        if refresh {
            self.refresh_status(&kkt).await;
        }
    }

    pub fn health(&self) -> Health {
        let now = now_secs();
        // Lock order: never hold the journal while taking the registers (on_dispatch does the
        // reverse order in sequence, never nested).
        let kkts = lock(&self.kkts).len() as u32;
        let rtt_micros = lock(&self.link).rtt_micros;
        let j = self.journal();
        Health {
            sent_at_micros: now_micros(),
            rtt_micros,
            journal_depth: j.depth() as u64,
            outbox_depth: j.outbox_depth() as u64,
            oldest_unacked_secs: j.oldest_unacked(now),
            kkts,
            version: VERSION.to_owned(),
            alarm: j.alarm(),
        }
    }

    /// The phase of a journaled job (tests and the health page).
    pub fn job_phase(&self, job: &str) -> Option<JobPhase> {
        self.journal().job(job).map(|j| j.phase.clone())
    }

    pub fn fd_request(fd_number: u32) -> Call {
        Call::GetFnDocument(GetFnDocument { fd_number })
    }
}

enum CallKind {
    Status,
    Other,
}
