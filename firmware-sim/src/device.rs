//! The async shell around [`Register`]: one WebSocket link to the agent and one OFD sender per
//! register, many registers per process.
//!
//! Each register runs two tasks. The link task connects to the agent, says hello, and executes
//! requests one at a time in arrival order (a KKT does one thing at a time); it reconnects with
//! capped exponential backoff. The OFD task sends the FN's documents to the OFD, oldest first, one
//! at a time, and applies each acknowledgement. Both share the register under a mutex held only for
//! the pure core's calls, never across I/O.
//!
//! Order of effects for a document-forming request: the core forms the document → the store
//! commits state + document durably → (fault: crash here) → the answer is sent → the OFD task is
//! woken. So an answer is never sent for a document that could be lost, and a crash between the
//! commit and the answer leaves exactly the situation the agent's recovery is built for.

use crate::drive::DriveConfig;
use crate::exchange::{self, container_for, sign8};
use crate::register::{archived_document, Register};
use crate::store::{Pending, Store, StoreError, ARCHIVE, META, REGISTERS};
use futures_util::{SinkExt, StreamExt};
use protocol::document::{Document, OfdAck};
use protocol::kkt::{
    Call, ErrorCode, Event, FfdVersion, KktError, KktMessage, OfdAckEvent, OfdEndpoint, Reply,
    Response, MAX_MESSAGE_BYTES,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, Notify};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

/// Seconds since the epoch on the host. Registers add their own offset (see `Register::clock`).
pub fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What happens when a "crash in the middle of a receipt" fault fires: the document is formed and
/// durable, the answer is never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CrashMode {
    /// The register drops its link and comes back after the reconnect backoff (a power cycle).
    Reboot,
    /// The whole simulator process aborts (for kill tests with real child processes).
    Abort,
}

/// Runtime fault knobs of one register (paper and cover live in the persisted state).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Faults {
    /// Service time of an operation that forms a document (printing and signing a receipt, a
    /// shift report). Status and archive queries answer at once, as a real register's do: a
    /// register's capacity is its documents per second, and the agent's status checks around a
    /// receipt must not count as receipts.
    pub latency_ms: u64,
    /// Fires on the next receipt or correction, then clears itself.
    pub crash_next_receipt: Option<CrashMode>,
    /// The OFD sender stays silent (the register's own network to the OFD is down).
    pub ofd_link_down: bool,
}

/// Options shared by every register of a process.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Agent WebSocket URL, e.g. `ws://127.0.0.1:7800/kkt`.
    pub connect: String,
    pub latency_ms: u64,
    /// OFD used by registers that have none configured yet.
    pub default_ofd: Option<OfdEndpoint>,
    pub capacity: Option<u32>,
    /// FFD version of every FN the fleet fits (tag 1209). Older drives refuse what only FFD 1.2
    /// can carry, such as the VAT rates of 2025-2026.
    pub ffd: FfdVersion,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
}

pub struct Device {
    register: Mutex<Register>,
    faults: Mutex<Faults>,
    connected: AtomicBool,
    /// Set by the control API to cut the link now. The generation catches a drop requested while
    /// a request is executing (when nobody waits on the notify).
    drop_link: Notify,
    drop_generation: AtomicU64,
    ofd_wake: Notify,
    events: broadcast::Sender<Event>,
    /// The FN's last document number once it is durable, for observers (tests, checkers) that
    /// wait for documents without polling.
    formed: tokio::sync::watch::Sender<u32>,
    pub requests_served: AtomicU64,
}

impl Device {
    fn new(register: Register, faults: Faults) -> Arc<Self> {
        let last_fd = register.drive.last_fd;
        Arc::new(Device {
            formed: tokio::sync::watch::Sender::new(last_fd),
            register: Mutex::new(register),
            faults: Mutex::new(faults),
            connected: AtomicBool::new(false),
            drop_link: Notify::new(),
            drop_generation: AtomicU64::new(0),
            ofd_wake: Notify::new(),
            events: broadcast::channel(64).0,
            requests_served: AtomicU64::new(0),
        })
    }

    /// The register's state. Poisoning means a panic inside the pure core, which the tests rule
    /// out; recover the data rather than take every other register down.
    pub fn register(&self) -> MutexGuard<'_, Register> {
        self.register.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn drop_link(&self) {
        self.drop_generation.fetch_add(1, Ordering::SeqCst);
        self.drop_link.notify_waiters();
    }

    pub fn wake_ofd(&self) {
        self.ofd_wake.notify_one();
    }

    /// Pushes an event to the agent if a link is up (a real KKT does not queue events: the agent
    /// asks for the state it missed after reconnecting).
    pub fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Watches the FN's last durable document number.
    pub fn formed(&self) -> tokio::sync::watch::Receiver<u32> {
        self.formed.subscribe()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Why a fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state directory {0}: {1}")]
    Dir(String, std::io::Error),
}

/// Every register of one simulator process.
pub struct Fleet {
    pub devices: BTreeMap<String, Arc<Device>>,
    pub store: Store,
    pub options: FleetOptions,
}

fn encode_register(r: &Register) -> Vec<u8> {
    postcard::to_allocvec(r).unwrap_or_default()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::fill(&mut b);
    b
}

impl Fleet {
    /// Opens the state directory and loads its registers, creating new ones up to `count`. A
    /// restarted simulator on the same directory is the same set of registers.
    pub fn open(state: &Path, count: usize, options: FleetOptions) -> Result<Fleet, FleetError> {
        std::fs::create_dir_all(state)
            .map_err(|e| FleetError::Dir(state.display().to_string(), e))?;
        let store = Store::open(&state.join("registers.redb"), |txn| {
            txn.open_table(REGISTERS)?;
            txn.open_table(ARCHIVE)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        let mut devices = BTreeMap::new();
        for (zn, bytes) in store.all(REGISTERS)? {
            let reg: Register = postcard::from_bytes(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("register {zn}: {e}")))?;
            devices.insert(zn, reg);
        }
        // ZNs of this directory continue from a base chosen once, so that two simulator processes
        // with their own directories do not collide.
        let base = match store.get(META, "zn_base")? {
            Some(b) => u64::from_le_bytes(b.try_into().unwrap_or_default()),
            None => {
                let base = (u64::from(u32::from_le_bytes(random_bytes())) % 9_000_000 + 1_000_000)
                    * 100_000;
                store.write_now(|txn| {
                    txn.open_table(META)?
                        .insert("zn_base", base.to_le_bytes().as_slice())?;
                    Ok(())
                })?;
                base
            }
        };
        let mut created = Vec::new();
        let mut next = devices.len() as u64;
        while devices.len() < count {
            let zn = format!("{:016}", base + next);
            next += 1;
            let mut reg = Register::new(zn.clone(), new_drive(&zn, 0, &options));
            reg.ofd = options.default_ofd.clone();
            created.push((zn.clone(), encode_register(&reg)));
            devices.insert(zn, reg);
        }
        if !created.is_empty() {
            store.write_now(|txn| {
                let mut t = txn.open_table(REGISTERS)?;
                for (zn, bytes) in &created {
                    t.insert(zn.as_str(), bytes.as_slice())?;
                }
                Ok(())
            })?;
        }
        let devices = devices
            .into_iter()
            .take(count.max(1))
            .map(|(zn, mut reg)| {
                if reg.ofd.is_none() {
                    reg.ofd = options.default_ofd.clone();
                }
                let faults = Faults {
                    latency_ms: options.latency_ms,
                    ..Faults::default()
                };
                (zn, Device::new(reg, faults))
            })
            .collect();
        Ok(Fleet {
            devices,
            store,
            options,
        })
    }

    /// Starts every register's link and OFD tasks.
    pub fn start(self: &Arc<Self>) {
        for device in self.devices.values() {
            tokio::spawn(link_loop(self.clone(), device.clone()));
            tokio::spawn(ofd_loop(self.clone(), device.clone()));
        }
        info!(
            registers = self.devices.len(),
            agent = %self.options.connect,
            "registers started"
        );
    }

    pub fn device(&self, zn: &str) -> Option<&Arc<Device>> {
        self.devices.get(zn)
    }

    /// Queues a register's state (and a formed document) for the next group commit. Call it while
    /// holding the register's lock: snapshots then reach the disk in the order they were taken, so
    /// an older snapshot (say, the OFD task's after an ack) can never overwrite a newer one (the
    /// link task's after forming a document).
    pub fn queue_state(&self, reg: &Register, document: Option<(String, u32, Vec<u8>)>) -> Pending {
        let zn = reg.zn.clone();
        let state = encode_register(reg);
        self.store.enqueue(move |txn| {
            txn.open_table(REGISTERS)?
                .insert(zn.as_str(), state.as_slice())?;
            if let Some((fn_number, fd, bytes)) = document {
                txn.open_table(ARCHIVE)?
                    .insert((fn_number.as_str(), fd), bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// Replaces the FN of a register (control API).
    pub async fn replace_fn(&self, zn: &str) -> Result<(), KktError> {
        let device = self
            .device(zn)
            .ok_or_else(|| KktError::new(ErrorCode::FN_NOT_FOUND, "no such register"))?;
        let pending = {
            let mut reg = device.register();
            let drive = new_drive(zn, reg.drives_replaced + 1, &self.options);
            reg.replace_fn(drive)?;
            self.queue_state(&reg, None)
        };
        pending
            .durable()
            .await
            .map_err(|e| KktError::new(ErrorCode::WRONG_FN_STATE, e.to_string()))
    }
}

/// A new drive for register `zn`. Its number carries the whole numeric part of the ZN (unique per
/// state directory and, through the random ZN base, across processes) and the drive's generation,
/// so no two simulated FNs share a number at an OFD.
fn new_drive(zn: &str, generation: u32, options: &FleetOptions) -> DriveConfig {
    let serial = zn.bytes().filter(u8::is_ascii_digit).fold(0u64, |a, b| {
        (a * 10 + u64::from(b - b'0')) % 1_000_000_000_000
    });
    let fn_number = format!("999{}{:012}", generation % 10, serial);
    let mut cfg = DriveConfig::new(fn_number, random_bytes());
    if let Some(c) = options.capacity {
        cfg.capacity = c;
    }
    cfg.ffd_version = options.ffd;
    cfg
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: a process runs thousands of registers and their messages are small.
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_MESSAGE_BYTES * 2)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

async fn link_loop(fleet: Arc<Fleet>, device: Arc<Device>) {
    let zn = device.register().zn.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        let connect = tokio_tungstenite::connect_async_with_config(
            fleet.options.connect.as_str(),
            Some(ws_config()),
            true,
        );
        match connect.await {
            Ok((ws, _)) => {
                backoff = Duration::from_millis(100);
                device.connected.store(true, Ordering::Relaxed);
                debug!(kkt = %zn, "link up");
                let end = session(&fleet, &device, ws).await;
                device.connected.store(false, Ordering::Relaxed);
                match end {
                    SessionEnd::Crash(CrashMode::Abort) => {
                        warn!(kkt = %zn, "crash fault: aborting the simulator process");
                        std::process::abort();
                    }
                    SessionEnd::Crash(CrashMode::Reboot) => {
                        info!(kkt = %zn, "crash fault: rebooting the register");
                    }
                    SessionEnd::Closed(reason) => debug!(kkt = %zn, %reason, "link down"),
                }
            }
            Err(e) => debug!(kkt = %zn, error = %e, "cannot reach the agent"),
        }
        // Jitter spreads thousands of registers reconnecting after an agent restart.
        let jitter = Duration::from_millis(u64::from(random_bytes::<1>()[0]));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(fleet.options.max_backoff);
    }
}

enum SessionEnd {
    Closed(String),
    Crash(CrashMode),
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn session(fleet: &Fleet, device: &Device, mut ws: Ws) -> SessionEnd {
    let hello = KktMessage::Hello(device.register().hello());
    if let Err(e) = ws.send(Message::text(hello.to_json())).await {
        return SessionEnd::Closed(e.to_string());
    }
    let mut events = device.subscribe();
    let generation = device.drop_generation.load(Ordering::SeqCst);
    loop {
        if device.drop_generation.load(Ordering::SeqCst) != generation {
            return SessionEnd::Closed("dropped by the fault knob".into());
        }
        tokio::select! {
            msg = ws.next() => {
                let text = match msg {
                    None => return SessionEnd::Closed("agent closed the link".into()),
                    Some(Err(e)) => return SessionEnd::Closed(e.to_string()),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => return SessionEnd::Closed("close frame".into()),
                    Some(Ok(_)) => continue,
                };
                let request = match KktMessage::from_json(text.as_str()) {
                    Ok(KktMessage::Request(r)) => r,
                    Ok(other) => {
                        debug!(?other, "ignoring a message that is not a request");
                        continue;
                    }
                    Err(e) => {
                        // Without an id there is nobody to answer; say so in the log and go on.
                        warn!(error = %e, "malformed request from the agent");
                        continue;
                    }
                };
                let answer = match execute(fleet, device, request.call).await {
                    Executed::Answer(outcome) => Response { id: request.id, outcome },
                    Executed::Crash(mode) => return SessionEnd::Crash(mode),
                };
                device.requests_served.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = ws.send(Message::text(KktMessage::Response(answer).to_json())).await {
                    return SessionEnd::Closed(e.to_string());
                }
            }
            ev = events.recv() => {
                if let Ok(ev) = ev {
                    if let Err(e) = ws.send(Message::text(KktMessage::Event(ev).to_json())).await {
                        return SessionEnd::Closed(e.to_string());
                    }
                }
            }
            _ = device.drop_link.notified() => {
                return SessionEnd::Closed("dropped by the fault knob".into());
            }
        }
    }
}

// Built once per request and moved straight into the response: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Executed {
    Answer(Result<Reply, KktError>),
    Crash(CrashMode),
}

async fn execute(fleet: &Fleet, device: &Device, call: Call) -> Executed {
    // The service time covers the whole operation, FN write included: the register answers
    // `latency_ms` after the request, or later if its own work took longer.
    let service = call
        .forms_document()
        .then(|| Duration::from_millis(device.faults().latency_ms))
        .filter(|d| !d.is_zero());
    let started = tokio::time::Instant::now();
    if let Call::GetFnDocument(q) = &call {
        return Executed::Answer(read_archive(fleet, device, q.fd_number));
    }
    let (outcome, zn, pending) = {
        let mut reg = device.register();
        let now = reg.clock(host_now());
        let outcome = reg.handle(&call, now);
        let changed = outcome.formed.is_some() || matches!(call, Call::SetOfd(_));
        let document = outcome.formed.as_ref().map(|f| {
            (
                f.result.fn_number.clone(),
                f.result.fd_number,
                f.bytes.clone(),
            )
        });
        let pending = changed.then(|| fleet.queue_state(&reg, document));
        (outcome, reg.zn.clone(), pending)
    };
    if let Some(pending) = pending {
        if let Err(e) = pending.durable().await {
            // The in-memory FN is now ahead of the disk. Answering would report a document that a
            // restart forgets; answering "error" would deny one that memory holds. Neither is
            // honest, so the simulator stops, as a KKT with a failed FN write does; on restart the
            // disk state is the truth and the agent's recovery asks the FN what it holds.
            tracing::error!(kkt = %zn, error = %e, "FN state could not be written; stopping");
            std::process::exit(70);
        }
        // A new document or a new OFD endpoint: the sender has work or a new place to send it.
        device.wake_ofd();
    }
    if let Some(service) = service {
        tokio::time::sleep_until(started + service).await;
    }
    if let Some(f) = &outcome.formed {
        debug!(kkt = %zn, fd = f.result.fd_number, doc = ?f.result.document_type, "document formed");
        device.formed.send_replace(f.result.fd_number);
        if matches!(call, Call::Receipt(_) | Call::Correction(_)) {
            if let Some(mode) = device.faults().crash_next_receipt.take() {
                return Executed::Crash(mode);
            }
        }
    }
    Executed::Answer(outcome.reply)
}

fn read_archive(fleet: &Fleet, device: &Device, fd: u32) -> Result<Reply, KktError> {
    let (fn_number, zn, last_fd, acked) = {
        let reg = device.register();
        let acked = reg
            .drive
            .unsent
            .front()
            .is_none_or(|(first, _)| fd < *first);
        (
            reg.drive.fn_number().to_owned(),
            reg.zn.clone(),
            reg.drive.last_fd,
            acked,
        )
    };
    let missing = || {
        KktError::new(
            ErrorCode::NO_SUCH_DOCUMENT,
            format!("fdNumber: the FN holds documents 1..={last_fd}"),
        )
    };
    if fd == 0 || fd > last_fd {
        return Err(missing());
    }
    let bytes = fleet
        .store
        .archive_document(&fn_number, fd)
        .map_err(|e| KktError::new(ErrorCode::WRONG_FN_STATE, e.to_string()))?
        .ok_or_else(missing)?;
    let mut doc = archived_document(&bytes, &zn, acked)?;
    if doc.result.shift_number == 0 {
        // Registration and closure reports carry no shift number; report the shift they fell in.
        doc.result.shift_number = device.register().drive.shift.number;
    }
    Ok(Reply::FnDocument(Box::new(doc)))
}

/// Sends documents to the OFD, oldest first, until none are owed; then waits to be woken.
async fn ofd_loop(fleet: Arc<Fleet>, device: Arc<Device>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (target, pending) = {
            let reg = device.register();
            (reg.ofd.clone(), reg.drive.next_unsent().is_some())
        };
        let down = device.faults().ofd_link_down;
        let Some(target) = target.filter(|_| pending && !down) else {
            // Woken when a document is formed, the OFD is set, or a fault is lifted.
            device.ofd_wake.notified().await;
            continue;
        };
        match send_owed(&fleet, &device, &target).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                let zn = device.register().zn.clone();
                debug!(kkt = %zn, ofd = %format!("{}:{}", target.host, target.port), error = %e, "OFD exchange failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = device.ofd_wake.notified() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Exchange(#[from] exchange::ExchangeError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("OFD closed the connection without answering")]
    NoAnswer,
    #[error("OFD answer: {0}")]
    BadAnswer(String),
    #[error("OFD rejected document {fd} with code {code}")]
    Rejected { fd: u32, code: u8 },
    #[error("archive: {0}")]
    Archive(String),
    #[error("timed out waiting for the OFD")]
    Timeout,
}

/// How long the register waits for the OFD's answer before it counts the exchange as failed.
const OFD_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

async fn send_owed(fleet: &Fleet, device: &Device, target: &OfdEndpoint) -> Result<(), SendError> {
    let addr = format!("{}:{}", target.host, target.port);
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
        .await
        .map_err(|_| SendError::Timeout)??;
    stream.set_nodelay(true)?;
    loop {
        if device.faults().ofd_link_down {
            return Ok(());
        }
        let (fn_number, fd, secret) = {
            let reg = device.register();
            match reg.drive.next_unsent() {
                None => return Ok(()),
                Some(fd) => (
                    reg.drive.fn_number().to_owned(),
                    fd,
                    reg.drive.config.secret,
                ),
            }
        };
        let bytes = fleet
            .store
            .archive_document(&fn_number, fd)
            .map_err(|e| SendError::Archive(e.to_string()))?
            .ok_or_else(|| SendError::Archive(format!("document {fd} is not in the archive")))?;
        let doc_type = Document::decode(&bytes)
            .map(|d| d.doc_type.tag())
            .map_err(|e| SendError::Archive(e.to_string()))?;
        let sign = sign8(&secret, &bytes);
        let container = container_for(&fn_number, fd, doc_type, bytes, sign);
        exchange::write_message(&mut stream, &container).await?;
        let answer = tokio::time::timeout(OFD_ANSWER_TIMEOUT, exchange::read_message(&mut stream))
            .await
            .map_err(|_| SendError::Timeout)??
            .ok_or(SendError::NoAnswer)?;
        let ack_doc = answer
            .1
            .parse_document()
            .map_err(|e| SendError::BadAnswer(e.to_string()))?;
        let ack =
            OfdAck::from_document(&ack_doc).map_err(|e| SendError::BadAnswer(e.to_string()))?;
        if ack.fn_number != fn_number || ack.fd_number != fd {
            return Err(SendError::BadAnswer(format!(
                "acknowledges FN {} FD {}, sent FN {fn_number} FD {fd}",
                ack.fn_number, ack.fd_number
            )));
        }
        if ack.result_code != 0 {
            return Err(SendError::Rejected {
                fd,
                code: ack.result_code,
            });
        }
        let unsent = {
            let mut reg = device.register();
            let now = reg.clock(host_now());
            if !reg.drive.ofd_ack(fd, now) {
                // The FN was replaced or the document acked meanwhile; nothing to apply.
                continue;
            }
            // Not awaited: a lost ack only makes the register resend (see store's "Durability").
            drop(fleet.queue_state(&reg, None));
            reg.drive.unsent.len() as u32
        };
        let _ = device.events.send(Event::OfdAck(OfdAckEvent {
            fn_number: fn_number.clone(),
            fd_number: fd,
            acked_at: ack.date_time,
            unsent_count: unsent,
        }));
    }
}
