//! Benchmark harness: prints figures next to their goal or physical limit, never asserts on time.
//!
//! `cargo build --release --workspace && cargo run --release --bin bench -- <scenario>`
//!
//! * `sim-footprint` — RSS of one `firmware-sim` process running N registers (goal ≤ 200 MB for
//!   1,000), each registered, with a shift open and a few receipts, connected to a WebSocket peer;
//! * `ofd` — documents acknowledged per second by the `firmware-sim ofd` process over loopback TCP
//!   (goal ≥ 5,000/s), next to redb's raw single-commit rate on the same disk (the limit one commit
//!   per document would impose).
//! * `ingest` — receipts accepted per second over HTTP (Ferma `kkt/cloud/receipt`), each answered
//!   only after its commit is durable, with C concurrent clients (goal ≥ 5,000/s with 64), next
//!   to redb's raw single-commit rate on the same disk;
//! * `balance` — end-to-end fiscalized receipts per second with N simulated registers of service
//!   time T, as a fraction of their capacity N/T (goal ≥ 0.95 for 200 × 200 ms);
//! * `edge` — the edge link with the real `agent` binary: its RSS with N registers (goal ≤ 20 MB
//!   for 8), the added round trip of a job, and a replay after a link cut (as `replay`);
//! * `replay` — results buffered by the real `agent` binary while its link to the controller is
//!   cut, replayed per second once it is back (goal ≥ 5,000/s), with every job checked for exactly
//!   one receipt in the FN archives and no controller anomaly;
//! * `footprint` — RSS of the real `agent` and `controller serve` processes with 1, 100 and 1,000
//!   registers of a `firmware-sim kkt` process attached (the agent's goal: ≤ 20 MB), and the sizes
//!   of the release binaries.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use firmware_sim::drive::{DriveConfig, FiscalDrive};
use firmware_sim::exchange::{container_for, read_message, sign8, write_message};
use firmware_sim::fixtures;
use futures_util::{SinkExt, StreamExt};
use protocol::document::OfdAck;
use protocol::kkt::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use system_tests::stack::{Stack, StackOptions};
use system_tests::{memory_kib, sibling_binary};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// RSS of one simulator process running N registers.
    SimFootprint {
        #[arg(long, default_value_t = 1000)]
        registers: usize,
        #[arg(long, default_value_t = 3)]
        receipts: u64,
    },
    /// The edge link: agent RSS with N registers, added round trip of a job, replay rate.
    Edge {
        #[arg(long, default_value_t = 8)]
        registers: usize,
        /// Sequential jobs timed for the round trip.
        #[arg(long, default_value_t = 500)]
        rtt_jobs: usize,
        /// Jobs whose results are buffered during a link cut and then replayed.
        #[arg(long, default_value_t = 4000)]
        replay_jobs: usize,
    },
    /// Buffered results replayed per second by the agent after a link outage.
    Replay {
        #[arg(long, default_value_t = 8)]
        registers: usize,
        /// Jobs accepted before the cut; their results are buffered, then replayed (more than
        /// one frame's worth exercises the split hello: `HeldJobs` frames before it).
        #[arg(long, default_value_t = 12_000)]
        jobs: usize,
    },
    /// Agent and controller RSS with N registers attached; release binary sizes.
    Footprint {
        /// Register counts, each measured on a fresh system.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 1000])]
        registers: Vec<usize>,
        /// Pause before each reading, so start-up and attach work settles.
        #[arg(long, default_value_t = 2000)]
        settle_ms: u64,
    },
    /// Durable receipts accepted per second over the Ferma HTTP API.
    Ingest {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 60_000)]
        receipts: usize,
    },
    /// End-to-end fiscalized receipts per second through the whole system.
    Balance {
        #[arg(long, default_value_t = 200)]
        registers: usize,
        /// Service time of every simulated register.
        #[arg(long, default_value_t = 200)]
        service_ms: u64,
        #[arg(long, default_value_t = 30_000)]
        receipts: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
    },
    /// Documents acknowledged per second by the simulated OFD.
    Ofd {
        /// Concurrent FNs (one TCP connection each, as real KKTs).
        #[arg(long, default_value_t = 100)]
        fns: usize,
        #[arg(long, default_value_t = 200)]
        docs_per_fn: usize,
    },
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn row(name: &str, value: f64, unit: &str, goal: &str, ratio: f64) {
    println!("{name:<44} {value:>12.1} {unit:<10} {goal:<16} {ratio:>6.2}");
}

/// A figure with no goal to compare against.
fn info(name: &str, value: f64, unit: &str) {
    println!("{name:<44} {value:>12.1} {unit:<10} {:<16} {:>6}", "-", "-");
}

fn header() {
    println!(
        "{:<44} {:>12} {:<10} {:<16} {:>6}",
        "figure", "value", "unit", "goal/limit", "ratio"
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run(Cli::parse()).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.scenario {
        Scenario::SimFootprint {
            registers,
            receipts,
        } => sim_footprint(registers, receipts).await,
        Scenario::Ofd { fns, docs_per_fn } => ofd(fns, docs_per_fn).await,
        Scenario::Ingest { clients, receipts } => ingest(clients, receipts).await,
        Scenario::Balance {
            registers,
            service_ms,
            receipts,
            clients,
        } => balance(registers, service_ms, receipts, clients).await,
        Scenario::Edge {
            registers,
            rtt_jobs,
            replay_jobs,
        } => edge(registers, rtt_jobs, replay_jobs).await,
        Scenario::Replay { registers, jobs } => replay(registers, jobs).await,
        Scenario::Footprint {
            registers,
            settle_ms,
        } => footprint(registers, settle_ms).await,
    }
}

fn registration(zn: &str) -> anyhow::Result<RegistrationParams> {
    // Nothing listens on port 1: documents stay in the FN's unsent queue (worst case for RAM).
    let ofd = fixtures::ofd_endpoint(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
    Ok(fixtures::registration(zn, fixtures::DEMO_INN, ofd)?)
}

/// Drives one register: hello, register, open shift, receipts; then keeps the link open.
async fn drive_register(
    ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    receipts: u64,
    done: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let (mut tx, mut rx) = ws.split();
    let hello = match rx.next().await {
        Some(Ok(Message::Text(t))) => match KktMessage::from_json(t.as_str())? {
            KktMessage::Hello(h) => h,
            other => bail!("expected hello, got {other:?}"),
        },
        other => bail!("expected hello, got {other:?}"),
    };
    let mut calls = vec![
        Call::Register(registration(&hello.zn)?),
        Call::OpenShift(Operator::default()),
    ];
    calls.extend((0..receipts).map(|n| Call::Receipt(fixtures::receipt(n, None))));
    for (id, call) in calls.into_iter().enumerate() {
        let msg = KktMessage::Request(Request {
            id: id as u64,
            call,
        });
        tx.send(Message::text(msg.to_json())).await?;
        loop {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => match KktMessage::from_json(t.as_str())? {
                    KktMessage::Response(r) => {
                        if let Err(e) = r.outcome {
                            bail!("register {} refused: {e}", hello.zn);
                        }
                        break;
                    }
                    _ => continue,
                },
                other => bail!("link ended: {other:?}"),
            }
        }
    }
    done.add_permits(1);
    // Hold the connection open until the process ends.
    while rx.next().await.is_some() {}
    Ok(())
}

async fn sim_footprint(registers: usize, receipts: u64) -> anyhow::Result<()> {
    let sim = sibling_binary("firmware-sim").map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/kkt", listener.local_addr()?);
    let state = tempfile::tempdir()?;
    let started = Instant::now();
    let child = Command::new(sim)
        .args(["kkt", "--connect", &url, "--count", &registers.to_string()])
        .arg("--state")
        .arg(state.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting firmware-sim")?;
    let pid = child.id();
    let _child = Killed(child);
    let done = Arc::new(tokio::sync::Semaphore::new(0));
    for _ in 0..registers {
        let (tcp, _) = listener.accept().await?;
        let ws = tokio_tungstenite::accept_async(tcp).await?;
        let done = done.clone();
        tokio::spawn(async move {
            if let Err(e) = drive_register(ws, receipts, done).await {
                eprintln!("{e:#}");
            }
        });
    }
    let connected = started.elapsed();
    let _all = done
        .acquire_many(registers as u32)
        .await
        .context("registers finished")?;
    let worked = started.elapsed();
    // Let the OFD senders settle into their backoff before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, hwm) = memory_kib(pid).context("reading /proc")?;
    header();
    let mb = |kib: u64| kib as f64 / 1024.0;
    let goal = 200.0 * registers as f64 / 1000.0;
    row(
        &format!("firmware-sim RSS, {registers} registers"),
        mb(rss),
        "MiB",
        &format!("<= {goal:.0} MiB"),
        mb(rss) / goal,
    );
    row(
        "firmware-sim peak RSS (VmHWM)",
        mb(hwm),
        "MiB",
        &format!("<= {goal:.0} MiB"),
        mb(hwm) / goal,
    );
    row(
        "RSS per register",
        rss as f64 / registers as f64,
        "KiB",
        "<= 200 KiB",
        rss as f64 / registers as f64 / 200.0,
    );
    info("all registers connected", connected.as_secs_f64(), "s");
    info(
        &format!("register+shift+{receipts} receipts on all"),
        worked.as_secs_f64(),
        "s",
    );
    Ok(())
}

/// Raw durable commits/s of redb on this disk: one small insert per commit.
fn redb_single_commit_rate(dir: &std::path::Path, n: u32) -> anyhow::Result<f64> {
    const T: redb::TableDefinition<u32, &[u8]> = redb::TableDefinition::new("t");
    let db = redb::Database::create(dir.join("raw.redb"))?;
    let start = Instant::now();
    for i in 0..n {
        let txn = db.begin_write()?;
        txn.open_table(T)?.insert(i, [0u8; 300].as_slice())?;
        txn.commit()?;
    }
    Ok(f64::from(n) / start.elapsed().as_secs_f64())
}

async fn ofd(fns: usize, docs_per_fn: usize) -> anyhow::Result<()> {
    let sim = sibling_binary("firmware-sim").map_err(anyhow::Error::msg)?;
    let data = tempfile::tempdir()?;
    let mut child = Command::new(sim)
        .args(["ofd", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--data")
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting firmware-sim ofd")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let _child = Killed(child);
    let addr = line
        .split_whitespace()
        .nth(3)
        .context("ofd prints its address")?
        .to_owned();

    // Documents formed by real fiscal drives (pure core), prepared before the clock starts.
    let now = u32::try_from(firmware_sim::device::host_now()).unwrap_or(u32::MAX);
    let mut batches = Vec::new();
    for i in 0..fns {
        let fn_number = format!("99990789{:08}", i);
        let zn = format!("{:016}", i + 1);
        let mut d = FiscalDrive::new(DriveConfig::new(fn_number.clone(), [i as u8; 32]));
        let mut docs = vec![d.register(now, &zn, &registration(&zn)?)?.bytes];
        docs.push(d.open_shift(now, &Operator::default())?.bytes);
        let mut n = 0;
        while docs.len() < docs_per_fn {
            docs.push(d.receipt(now, &fixtures::receipt(n, None))?.bytes);
            n += 1;
        }
        batches.push((fn_number, docs));
    }
    let total = (fns * docs_per_fn) as f64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (fn_number, docs) in batches {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await?;
            s.set_nodelay(true)?;
            let mut latencies = Vec::with_capacity(docs.len());
            for (i, doc) in docs.into_iter().enumerate() {
                let fd = i as u32 + 1;
                let sign = sign8(&[0; 32], &doc);
                let t = Instant::now();
                write_message(&mut s, &container_for(&fn_number, fd, 3, doc, sign)).await?;
                let (_, answer) = read_message(&mut s).await?.context("answer")?;
                let ack = OfdAck::from_document(&answer.parse_document()?)?;
                if ack.result_code != 0 || ack.fd_number != fd {
                    bail!("FN {fn_number} FD {fd}: result {}", ack.result_code);
                }
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let raw_dir = tempfile::tempdir()?;
    let raw = redb_single_commit_rate(raw_dir.path(), 300)?;
    header();
    row(
        &format!("OFD acknowledged documents/s ({fns} FNs)"),
        total / elapsed,
        "docs/s",
        ">= 5000/s",
        total / elapsed / 5000.0,
    );
    info("  ack latency p50", pct(0.5).as_secs_f64() * 1e3, "ms");
    info("  ack latency p99", pct(0.99).as_secs_f64() * 1e3, "ms");
    row(
        "redb durable single commits/s (same disk)",
        raw,
        "commits/s",
        "limit w/o batch",
        (total / elapsed) / raw,
    );
    println!("(last ratio: OFD rate over the one-commit-per-document ceiling; group commit is what lifts it)");
    Ok(())
}

#[derive(Default)]
struct ReplayCounts {
    accepted: std::collections::HashSet<String>,
    completed: std::collections::HashSet<String>,
    disconnected: u32,
    /// When the counting task saw the agent's last connection and the last replay result: both
    /// ends of the replay are timed by the same receiver, so its own delay cancels out.
    connected_at: Option<Instant>,
    last_completed_at: Option<Instant>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// How long the registers of a bench may take to attach (and, in `footprint`, to report).
const ATTACH_LIMIT: Duration = Duration::from_secs(90);

/// The edge link as `edge` and `replay` measure it: the controller's tunnel and the simulated
/// registers in this process, the real `agent` binary as a child process that dials the tunnel
/// through a loopback relay the bench can cut.
struct EdgeRig {
    sys: system_tests::system::System,
    relay: system_tests::relay::Relay,
    agent: system_tests::system::AgentProcess,
    fleet: Arc<firmware_sim::device::Fleet>,
    /// ZNs of the registers, in the order they attached.
    kkts: Vec<String>,
}

/// Starts an [`EdgeRig`] with `registers` registers attached, registered and their shifts open.
async fn edge_rig(registers: usize) -> anyhow::Result<EdgeRig> {
    use controller::tunnel::TunnelEvent;
    use system_tests::relay::Relay;
    use system_tests::system::{AgentProcess, System};

    let mut sys = System::start().await?;
    let data = sys.dir.path().join("agent");
    sys.enroll(&data).await?;
    let relay = Relay::start(sys.tunnel.local_addr()).await?;
    let id_path = data.join("identity.json");
    let mut id: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&id_path)?)?;
    id["controller"] = relay.addr.to_string().into();
    std::fs::write(&id_path, id.to_string())?;
    let agent = AgentProcess::spawn(&data, None, &[])?;
    let fleet =
        system_tests::system::registers(agent.kkt_addr, registers, &sys.dir.path().join("sim"), 0)?;
    let mut kkts = Vec::new();
    let attached = tokio::time::timeout(ATTACH_LIMIT, async {
        while kkts.len() < registers {
            if let TunnelEvent::KktAttached { kkt, .. } = sys
                .wait(|e| matches!(e, TunnelEvent::KktAttached { .. }))
                .await
            {
                if !kkts.contains(&kkt) {
                    kkts.push(kkt);
                }
            }
        }
    })
    .await;
    if attached.is_err() {
        bail!(
            "{} of {registers} registers attached within {ATTACH_LIMIT:?}",
            kkts.len()
        );
    }
    for k in &kkts {
        sys.prepare(k).await?;
    }
    Ok(EdgeRig {
        sys,
        relay,
        agent,
        fleet,
        kkts,
    })
}

/// Service time of the registers while the replay's jobs are dispatched: long enough that few
/// of them complete before the cut (8 registers finish 16 a second), so most results are buffered.
const REPLAY_HOLD_MS: u64 = 500;

/// How long each step of a replay may take before the bench gives up and says where it stuck.
const REPLAY_LIMIT: Duration = Duration::from_secs(120);

/// What [`replay_after_cut`] measured.
struct Replayed {
    jobs: usize,
    /// Results that reached the controller only after the link came back (the others completed
    /// before the cut).
    results: usize,
    /// The agent's outbox entries waiting when the link came back: the results and the job-state
    /// reports around them.
    entries: u64,
    /// From the agent's reconnection to the last result applied by the controller.
    elapsed: Duration,
    /// The controller's anomalies (a job fiscalized twice, a result for an unknown job, ...).
    anomalies: usize,
    /// Receipts in the FN archives beyond one per job.
    duplicates: usize,
    /// Jobs with no receipt in any FN archive.
    missing: usize,
}

/// Buffered results replayed after a link outage. `jobs` receipts are accepted by the agent while
/// the registers are slowed to [`REPLAY_HOLD_MS`] a receipt, the link is cut, the registers
/// finish every receipt while it is down (the agent journals each result), then the link is
/// restored and the time until the controller has applied every buffered result is measured.
/// Afterwards every job must have exactly one receipt in the FN archives and the controller no
/// anomaly.
async fn replay_after_cut(rig: &EdgeRig, jobs: usize) -> anyhow::Result<Replayed> {
    use controller::tunnel::TunnelEvent;
    use protocol::tunnel::Work;

    let EdgeRig {
        sys,
        relay,
        agent,
        fleet,
        kkts,
    } = rig;
    // Events are counted by their own task so that none are lost to a lagging receiver.
    let counts = Arc::new(std::sync::Mutex::new(ReplayCounts::default()));
    let changed = Arc::new(tokio::sync::Notify::new());
    let counter = {
        let mut rx = sys.tunnel.subscribe();
        let (counts, changed) = (counts.clone(), changed.clone());
        tokio::spawn(async move {
            loop {
                let e = match rx.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        eprintln!("event receiver lagged by {n}");
                        continue;
                    }
                    Err(_) => return,
                };
                if let Ok(mut c) = counts.lock() {
                    match e {
                        TunnelEvent::JobAccepted { job, .. } if job.starts_with("replay-") => {
                            c.accepted.insert(job);
                        }
                        TunnelEvent::JobCompleted { job, .. } if job.starts_with("replay-") => {
                            c.completed.insert(job);
                            c.last_completed_at = Some(Instant::now());
                        }
                        TunnelEvent::AgentConnected { .. } => c.connected_at = Some(Instant::now()),
                        TunnelEvent::AgentDisconnected { .. } => c.disconnected += 1,
                        _ => continue,
                    }
                }
                changed.notify_waiters();
            }
        })
    };
    let health = agent.health_addr.to_string();
    let wait_until = |what: &'static str, pred: Box<dyn Fn(&ReplayCounts) -> bool + Send>| {
        let (counts, changed, health) = (counts.clone(), changed.clone(), health.clone());
        async move {
            let wait = async {
                loop {
                    let n = changed.notified();
                    tokio::pin!(n);
                    n.as_mut().enable();
                    if counts.lock().map(|c| pred(&c)).unwrap_or(false) {
                        return;
                    }
                    n.await;
                }
            };
            if tokio::time::timeout(REPLAY_LIMIT, wait).await.is_ok() {
                return Ok(());
            }
            let (accepted, completed) = counts
                .lock()
                .map(|c| (c.accepted.len(), c.completed.len()))
                .unwrap_or_default();
            let link = match agent::health::fetch(&health).await {
                Ok(h) => format!(
                    "link up: {}, last error: {:?}",
                    h.link.up, h.link.last_error
                ),
                Err(e) => e,
            };
            bail!(
                "timed out after {REPLAY_LIMIT:?} waiting for {what}: {accepted} jobs accepted, \
                 {completed} results applied; the agent says {link}"
            )
        }
    };
    // Each job forms one document: its register's FN reaches `last + share`.
    let mut formed = Vec::new();
    for k in kkts {
        let d = fleet.device(k).context("device")?;
        d.faults().latency_ms = REPLAY_HOLD_MS;
        let f = d.formed();
        let last = *f.borrow();
        formed.push((f, last));
    }
    for n in 0..jobs {
        let kkt = &kkts[n % kkts.len()];
        sys.tunnel
            .dispatch(
                &format!("replay-{n}"),
                kkt,
                Work::Receipt(fixtures::receipt(n as u64, None)),
            )
            .await?;
    }
    wait_until(
        "every job accepted",
        Box::new(move |c| c.accepted.len() >= jobs),
    )
    .await?;
    relay.cut();
    eprintln!("{jobs} jobs accepted; link cut");
    wait_until("the cut noticed", Box::new(|c| c.disconnected >= 1)).await?;
    for k in kkts {
        fleet.device(k).context("device")?.faults().latency_ms = 0;
    }
    // Every register finishes its share while the link is down.
    let before_cut = counts.lock().map(|c| c.completed.len()).unwrap_or(0);
    let deadline = Instant::now() + REPLAY_LIMIT;
    for (i, (mut f, last)) in formed.into_iter().enumerate() {
        let share = (0..jobs).filter(|n| n % kkts.len() == i).count() as u32;
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, f.wait_for(|fd| *fd >= last + share))
            .await
            .with_context(|| format!("register {} did not finish its receipts", kkts[i]))??;
    }
    // The agent journals the last results right after the register answers.
    let entries = loop {
        let h = agent::health::fetch(&health)
            .await
            .map_err(anyhow::Error::msg)?;
        if h.journal_depth as usize >= jobs - before_cut {
            break h.outbox_depth;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent journaled {} of {} results",
                h.journal_depth,
                jobs - before_cut
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("{entries} outbox entries buffered; restoring the link");
    let applied_before = counts.lock().map(|c| c.completed.len()).unwrap_or(0);
    relay.restore();
    wait_until(
        "every result applied",
        Box::new(move |c| c.completed.len() >= jobs),
    )
    .await?;
    counter.abort();
    let elapsed = {
        let c = counts
            .lock()
            .map_err(|_| anyhow::anyhow!("event counter panicked"))?;
        match (c.connected_at, c.last_completed_at) {
            (Some(from), Some(to)) => to.saturating_duration_since(from),
            _ => bail!("the agent's reconnection was not seen"),
        }
    };
    let anomalies = sys.tunnel.anomalies()?.len();
    let archived = system_tests::stack::archived_receipts(fleet);
    let (mut duplicates, mut missing) = (0, 0);
    for n in 0..jobs {
        match archived.get(&format!("replay-{n}")).map_or(0, Vec::len) {
            0 => missing += 1,
            k => duplicates += k - 1,
        }
    }
    Ok(Replayed {
        jobs,
        results: jobs - applied_before,
        entries,
        elapsed,
        anomalies,
        duplicates,
        missing,
    })
}

/// A count that must be zero; the ratio column says whether it is.
fn must_be_zero(name: &str, value: usize, unit: &str) {
    let verdict = if value == 0 { "ok" } else { "FAIL" };
    println!(
        "{name:<44} {:>12} {unit:<10} {:<16} {verdict:>6}",
        value, "= 0"
    );
}

/// The rows of a [`replay_after_cut`] measurement; fails after printing them if a job was
/// fiscalized twice or lost.
fn replay_rows(r: &Replayed) -> anyhow::Result<()> {
    let secs = r.elapsed.as_secs_f64();
    let rate = r.results as f64 / secs;
    info(
        "results buffered during the cut",
        r.results as f64,
        "results",
    );
    info(
        "jobs completed before the cut (not counted)",
        (r.jobs - r.results) as f64,
        "results",
    );
    info(
        "outbox entries buffered during the cut",
        r.entries as f64,
        "entries",
    );
    info("replay time (reconnect → last result)", secs * 1e3, "ms");
    row(
        "replay after reconnect, results",
        rate,
        "results/s",
        ">= 5000/s",
        rate / 5000.0,
    );
    info(
        "replay after reconnect, outbox entries",
        r.entries as f64 / secs,
        "entries/s",
    );
    must_be_zero(
        "duplicate fiscalizations (FN archives)",
        r.duplicates,
        "receipts",
    );
    must_be_zero("jobs without a receipt (FN archives)", r.missing, "jobs");
    must_be_zero("controller anomalies", r.anomalies, "");
    if r.duplicates + r.missing + r.anomalies > 0 {
        bail!("the replay broke exactly-once; see the table");
    }
    Ok(())
}

async fn replay(registers: usize, jobs: usize) -> anyhow::Result<()> {
    if registers == 0 || jobs == 0 {
        bail!("--registers and --jobs must be at least 1");
    }
    let rig = edge_rig(registers).await?;
    eprintln!("{registers} registers attached and registered; replaying {jobs} jobs");
    let replayed = replay_after_cut(&rig, jobs).await?;
    header();
    info("registers", registers as f64, "registers");
    replay_rows(&replayed)
}

async fn edge(registers: usize, rtt_jobs: usize, replay_jobs: usize) -> anyhow::Result<()> {
    use controller::tunnel::TunnelEvent;
    use protocol::tunnel::Work;

    if registers == 0 || replay_jobs == 0 {
        bail!("--registers and --replay-jobs must be at least 1");
    }
    let mut rig = edge_rig(registers).await?;
    eprintln!("{registers} registers attached and registered; measuring");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, _) = memory_kib(rig.agent.child.id()).context("agent memory")?;

    // Round trip of one job at a time: dispatch → agent → register → result applied.
    let mut rtts = Vec::with_capacity(rtt_jobs);
    // Where the time goes: dispatch recorded and sent; accepted (journaled) by the agent.
    let mut stages: [Vec<Duration>; 2] = Default::default();
    let (sys, kkts) = (&mut rig.sys, &rig.kkts);
    for n in 0..rtt_jobs {
        let job = format!("rtt-{n}");
        let kkt = &kkts[n % kkts.len()];
        let t = Instant::now();
        sys.tunnel
            .dispatch(&job, kkt, Work::Receipt(fixtures::receipt(n as u64, None)))
            .await?;
        stages[0].push(t.elapsed());
        sys.wait(|e| matches!(e, TunnelEvent::JobAccepted { job: j, .. } if *j == job))
            .await;
        stages[1].push(t.elapsed());
        sys.wait(|e| matches!(e, TunnelEvent::JobCompleted { job: j, .. } if *j == job))
            .await;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    for st in stages.iter_mut() {
        st.sort();
    }

    eprintln!("round trips measured");
    // The register's own time for the same receipt, driven directly over its WebSocket.
    let own = register_own_time(rtt_jobs.min(300)).await?;

    let replayed = replay_after_cut(&rig, replay_jobs).await?;

    header();
    row(
        &format!("agent RSS, idle, {registers} registers"),
        rss as f64 / 1024.0,
        "MiB",
        "<= 20 MiB",
        rss as f64 / 1024.0 / 20.0,
    );
    let p50 = percentile(&rtts, 0.5).as_secs_f64() * 1e3;
    let p99 = percentile(&rtts, 0.99).as_secs_f64() * 1e3;
    let own50 = percentile(&own, 0.5).as_secs_f64() * 1e3;
    let own99 = percentile(&own, 0.99).as_secs_f64() * 1e3;
    info(
        "job round trip p50 (controller→agent→register→back)",
        p50,
        "ms",
    );
    info("job round trip p99", p99, "ms");
    info(
        "  of which: dispatch recorded and sent, p50",
        percentile(&stages[0], 0.5).as_secs_f64() * 1e3,
        "ms",
    );
    info(
        "  accepted by the agent (journaled), p50",
        percentile(&stages[1], 0.5).as_secs_f64() * 1e3,
        "ms",
    );
    info("register's own time p50 (direct WebSocket)", own50, "ms");
    info("register's own time p99", own99, "ms");
    row(
        "added by the edge link, p50",
        p50 - own50,
        "ms",
        "<= 1 ms",
        (p50 - own50) / 1.0,
    );
    info("added by the edge link, p99", p99 - own99, "ms");
    replay_rows(&replayed)
}

/// A receipt's round trip over a direct WebSocket to one simulated register: the time the
/// register itself takes (parsing, FN, durable state), which the edge link adds to.
async fn register_own_time(n: usize) -> anyhow::Result<Vec<Duration>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let dir = tempfile::tempdir()?;
    let _fleet = system_tests::system::registers(listener.local_addr()?, 1, dir.path(), 0)?;
    let (tcp, _) = listener.accept().await?;
    let ws = tokio_tungstenite::accept_async(tcp).await?;
    let (mut tx, mut rx) = ws.split();
    let zn = match rx.next().await {
        Some(Ok(Message::Text(t))) => match KktMessage::from_json(t.as_str())? {
            KktMessage::Hello(h) => h.zn,
            _ => bail!("no hello"),
        },
        _ => bail!("no hello"),
    };
    let ofd = fixtures::ofd_endpoint(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
    let mut calls = vec![
        Call::Register(fixtures::registration(&zn, fixtures::DEMO_INN, ofd)?),
        Call::OpenShift(Operator::default()),
    ];
    calls.extend(
        (0..n as u64).map(|i| Call::Receipt(fixtures::receipt(i, Some(format!("own-{i}"))))),
    );
    let mut times = Vec::new();
    for (id, call) in calls.into_iter().enumerate() {
        let timed = matches!(call, Call::Receipt(_));
        let t = Instant::now();
        tx.send(Message::text(
            KktMessage::Request(Request {
                id: id as u64,
                call,
            })
            .to_json(),
        ))
        .await?;
        loop {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => {
                    if let KktMessage::Response(_) = KktMessage::from_json(t.as_str())? {
                        break;
                    }
                }
                other => bail!("link ended: {other:?}"),
            }
        }
        if timed {
            times.push(t.elapsed());
        }
    }
    times.sort();
    Ok(times)
}

/// Posts `receipts` receipts from `clients` concurrent clients; returns each acknowledgement's
/// latency and the ids, and fails on any refusal.
async fn post_receipts(
    base: &str,
    token: &str,
    clients: usize,
    receipts: usize,
    tag: &str,
) -> anyhow::Result<(Vec<Duration>, Vec<String>)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, next) = (http.clone(), next.clone());
        let url = format!("{base}/api/kkt/cloud/receipt?AuthToken={token}");
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= receipts {
                    return Ok::<_, anyhow::Error>(out);
                }
                let started = Instant::now();
                let resp = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(system_tests::stack::receipt_request(&format!("{tag}-{n}")).to_string())
                    .send()
                    .await?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await?;
                let Some(id) = body["Data"]["ReceiptId"].as_str() else {
                    bail!("receipt {n} refused ({status}): {body}");
                };
                out.push((started.elapsed(), id.to_owned()));
            }
        }));
    }
    let mut latencies = Vec::with_capacity(receipts);
    let mut ids = Vec::with_capacity(receipts);
    for t in tasks {
        for (l, id) in t.await?? {
            latencies.push(l);
            ids.push(id);
        }
    }
    Ok((latencies, ids))
}

async fn ingest(clients: usize, receipts: usize) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        registers: 0,
        api: controller::api::ApiConfig {
            max_queue: receipts + clients * 4 + 1,
            ..Default::default()
        },
        ..StackOptions::default()
    })
    .await?;
    // The raw rate on the same disk (the stack's data directory), before the load.
    let raw = redb_single_commit_rate(stack.dir.path(), 500)?;
    let server = &stack.server;
    let token = stack.shop().await?.token;
    let base = stack.base_url();
    // Warm the connections and the allocator; not counted.
    post_receipts(&base, &token, clients, clients * 4, "warm").await?;
    let started = Instant::now();
    let (mut latencies, ids) = post_receipts(&base, &token, clients, receipts, "bench").await?;
    let elapsed = started.elapsed();
    latencies.sort();
    let rate = receipts as f64 / elapsed.as_secs_f64();
    // Every acknowledged receipt must be in the store: the figure counts durable receipts only.
    let mut missing = 0;
    for id in &ids {
        if server.store().receipt(id)?.is_none() {
            missing += 1;
        }
    }
    if missing > 0 {
        bail!("{missing} acknowledged receipts are not in the store");
    }
    header();
    row(
        &format!("durable receipts accepted/s, {clients} clients"),
        rate,
        "receipts/s",
        ">= 5000",
        rate / 5000.0,
    );
    info("redb durable single commits/s, same disk", raw, "commits/s");
    row(
        "receipts per fsync-bound commit (rate / raw)",
        rate / raw,
        "x",
        "> 1 (batching)",
        rate / raw,
    );
    info(
        "acknowledgement latency p50",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        "ms",
    );
    info(
        "acknowledgement latency p99",
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        "ms",
    );
    info(
        "receipts posted (all found in the store)",
        ids.len() as f64,
        "receipts",
    );
    Ok(())
}

async fn balance(
    registers: usize,
    service_ms: u64,
    receipts: usize,
    clients: usize,
) -> anyhow::Result<()> {
    let s = Stack::start(StackOptions {
        registers,
        latency_ms: service_ms,
        api: controller::api::ApiConfig {
            max_queue: receipts + 1,
            ..Default::default()
        },
        ..StackOptions::default()
    })
    .await?;
    let token = s.shop().await?.token;
    let base = s.base_url();
    let mut events = s.server.tunnel.subscribe();
    let capacity = registers as f64 * 1000.0 / service_ms as f64;
    let posted = tokio::spawn({
        let (base, token) = (base.clone(), token.clone());
        async move { post_receipts(&base, &token, clients, receipts, "bal").await }
    });
    let mut done: Vec<Instant> = Vec::with_capacity(receipts);
    let mut confirmed = 0usize;
    let deadline =
        Instant::now() + Duration::from_secs(30 + (receipts as f64 / capacity * 3.0) as u64);
    while done.len() < receipts || confirmed < receipts {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(controller::tunnel::TunnelEvent::JobCompleted { .. })) => {
                done.push(Instant::now())
            }
            Ok(Ok(controller::tunnel::TunnelEvent::ReceiptsConfirmed { jobs })) => {
                confirmed += jobs.len()
            }
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                bail!("the bench lagged {n} events behind; results would be wrong")
            }
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!(
                "timed out: {} of {receipts} fiscalized, {confirmed} confirmed",
                done.len()
            ),
        }
    }
    let (_, ids) = posted.await??;
    // Throughput over the middle 80 % (start-up and tail excluded).
    let lo = receipts / 10;
    let hi = receipts - receipts / 10;
    let window = done[hi - 1].duration_since(done[lo]).as_secs_f64();
    let rate = (hi - lo - 1) as f64 / window;
    let whole = done[receipts - 1].duration_since(done[0]).as_secs_f64();
    // Added latency, per receipt: from the moment its register could start it (its dispatch
    // was recorded and the register's previous receipt was back) to its result being applied,
    // minus the register's service time. Queueing in the controller is not counted: that is
    // the load, not the system's overhead.
    let mut per_kkt: std::collections::HashMap<String, Vec<(u64, u64)>> =
        std::collections::HashMap::new();
    for id in &ids {
        let job = s.server.store().job(id)?.context("job missing")?;
        let assigned = job
            .history
            .iter()
            .rev()
            .find(|h| h.state == "assigned")
            .map(|h| h.at);
        if let (Some(a), controller::rules::JobState::Completed { kkt, .. }) =
            (assigned, &job.state)
        {
            per_kkt
                .entry(kkt.clone())
                .or_default()
                .push((a, job.updated_at));
        }
    }
    let on: std::collections::HashMap<String, usize> =
        per_kkt.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    let mut added: Vec<Duration> = Vec::with_capacity(ids.len());
    for jobs in per_kkt.values_mut() {
        jobs.sort_by_key(|&(_, done)| done);
        let mut free_at = 0u64;
        for &(assigned, done) in jobs.iter() {
            let start = assigned.max(free_at);
            added.push(Duration::from_millis(
                done.saturating_sub(start).saturating_sub(service_ms),
            ));
            free_at = done;
        }
    }
    added.sort();
    let used = on.len();
    let (min_on, max_on) = (
        on.values().copied().min().unwrap_or(0),
        on.values().copied().max().unwrap_or(0),
    );
    header();
    row(
        &format!("fiscalized receipts/s, {registers} regs x {service_ms} ms"),
        rate,
        "receipts/s",
        &format!("{capacity:.0} (N/T)"),
        rate / capacity,
    );
    info(
        "same, first to last receipt",
        (receipts - 1) as f64 / whole,
        "receipts/s",
    );
    info(
        "added latency p50 (register free→result − T)",
        percentile(&added, 0.5).as_secs_f64() * 1000.0,
        "ms",
    );
    info(
        "added latency p99",
        percentile(&added, 0.99).as_secs_f64() * 1000.0,
        "ms",
    );
    info("registers used", used as f64, "registers");
    info("receipts per register min", min_on as f64, "receipts");
    info("receipts per register max", max_on as f64, "receipts");
    info(
        "receipts confirmed by the OFD",
        confirmed as f64,
        "receipts",
    );
    info(
        "OFD documents stored",
        s.ofd.stats().accepted as f64,
        "documents",
    );
    Ok(())
}

/// A `controller serve` child process on loopback ports, killed when dropped.
struct ControllerProcess {
    child: Killed,
    data: std::path::PathBuf,
    http: std::net::SocketAddr,
    quic: std::net::SocketAddr,
}

impl ControllerProcess {
    fn spawn(data: &std::path::Path) -> anyhow::Result<ControllerProcess> {
        let bin = sibling_binary("controller").map_err(anyhow::Error::msg)?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting controller serve")?;
        let out = child.stdout.take().context("controller stdout")?;
        let child = Killed(child);
        let mut lines = BufReader::new(out).lines();
        let mut addr = |prefix: &str| -> anyhow::Result<std::net::SocketAddr> {
            let line = lines
                .next()
                .context("the controller exited before listening")??;
            let addr = line
                .strip_prefix(prefix)
                .with_context(|| format!("unexpected line from the controller: {line:?}"))?;
            Ok(addr.parse()?)
        };
        let quic = addr("quic listening on ")?;
        let http = addr("http listening on ")?;
        Ok(ControllerProcess {
            child,
            data: data.to_path_buf(),
            http,
            quic,
        })
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// A one-time enrollment token from `controller agent-token create`, as an operator gets it.
    fn agent_token(&self) -> anyhow::Result<String> {
        let out = Command::new(sibling_binary("controller").map_err(anyhow::Error::msg)?)
            .args(["agent-token", "create", "--data"])
            .arg(&self.data)
            .args(["--http", &self.http.to_string()])
            .output()
            .context("controller agent-token create")?;
        if !out.status.success() {
            bail!(
                "controller agent-token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .last()
            .context("no token printed")?
            .trim()
            .to_owned())
    }

    /// Registers the controller knows with their state reported (its `GET /admin/kkts`).
    async fn reported_registers(&self) -> anyhow::Result<usize> {
        let kkts = system_tests::stack::admin_get(
            &format!("http://{}", self.http),
            &self.data,
            "/admin/kkts",
        )
        .await?;
        let list = kkts.as_array().context("/admin/kkts is not a list")?;
        Ok(list
            .iter()
            .filter(|k| {
                k["agent"].is_string()
                    && !k["pool"]
                        .as_str()
                        .unwrap_or("unknown")
                        .starts_with("unknown")
            })
            .count())
    }
}

/// Resident and peak memory of `pid`, in MiB.
fn memory_mib(pid: u32, what: &str) -> anyhow::Result<(f64, f64)> {
    let (rss, hwm) = memory_kib(pid).with_context(|| format!("reading /proc for the {what}"))?;
    Ok((rss as f64 / 1024.0, hwm as f64 / 1024.0))
}

/// What `footprint` measured for one count of registers.
struct Footprint {
    registers: usize,
    /// From the simulator's start until the agent and the controller both saw every register.
    attach: Duration,
    /// RSS and peak (VmHWM) in MiB, all registers attached.
    agent: (f64, f64),
    controller: (f64, f64),
    /// RSS in MiB with the tunnel up and no register yet.
    agent_idle: f64,
    controller_idle: f64,
}

/// A fresh system of real binaries: `controller serve`, an `agent` enrolled with a token from
/// `controller agent-token create`, and `firmware-sim kkt --count registers` connected to the
/// agent; memory is read once the controller has every register's state and the agent lists them
/// all, after a short settle.
async fn footprint_of(registers: usize, settle: Duration) -> anyhow::Result<Footprint> {
    use system_tests::system::{agent_command, AgentProcess};

    let dir = tempfile::tempdir()?;
    let controller = ControllerProcess::spawn(&dir.path().join("controller"))?;
    let token = controller.agent_token()?;
    let agent_dir = dir.path().join("agent");
    let enrolled = agent_command()?
        .args(["enroll", "--controller", &controller.quic.to_string()])
        .args(["--token", &token, "--name", "bench-footprint", "--data"])
        .arg(&agent_dir)
        .output()
        .context("agent enroll")?;
    if !enrolled.status.success() {
        bail!(
            "agent enroll failed: {}",
            String::from_utf8_lossy(&enrolled.stderr)
        );
    }
    let agent = AgentProcess::spawn(&agent_dir, None, &[])?;
    let health = agent.health_addr.to_string();
    let deadline = Instant::now() + ATTACH_LIMIT;
    loop {
        let h = agent::health::fetch(&health)
            .await
            .map_err(anyhow::Error::msg)?;
        if h.link.up {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent's tunnel did not come up: {:?}",
                h.link.last_error
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(settle).await;
    let (agent_idle, _) = memory_mib(agent.child.id(), "agent")?;
    let (controller_idle, _) = memory_mib(controller.pid(), "controller")?;

    let started = Instant::now();
    let sim = Command::new(sibling_binary("firmware-sim").map_err(anyhow::Error::msg)?)
        .args(["kkt", "--connect", &format!("ws://{}/kkt", agent.kkt_addr)])
        .args([
            "--count",
            &registers.to_string(),
            "--max-backoff-ms",
            "1000",
        ])
        .arg("--state")
        .arg(dir.path().join("sim"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting firmware-sim kkt")?;
    let mut sim = Killed(sim);
    let deadline = started + ATTACH_LIMIT;
    let (mut seen_agent, mut seen_controller) = (0, 0);
    while seen_agent < registers || seen_controller < registers {
        if Instant::now() > deadline {
            bail!(
                "{registers} registers: after {ATTACH_LIMIT:?} the agent lists {seen_agent} and \
                 the controller has the state of {seen_controller}"
            );
        }
        if let Some(status) = sim.0.try_wait()? {
            bail!("firmware-sim exited ({status})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        seen_agent = agent::health::fetch(&health)
            .await
            .map_err(anyhow::Error::msg)?
            .kkts
            .len();
        seen_controller = controller.reported_registers().await?;
    }
    let attach = started.elapsed();
    tokio::time::sleep(settle).await;
    let result = Footprint {
        registers,
        attach,
        agent: memory_mib(agent.child.id(), "agent")?,
        controller: memory_mib(controller.pid(), "controller")?,
        agent_idle,
        controller_idle,
    };
    drop(sim);
    Ok(result)
}

async fn footprint(counts: Vec<usize>, settle_ms: u64) -> anyhow::Result<()> {
    if counts.is_empty() || counts.contains(&0) {
        bail!("--registers: give counts of at least 1, e.g. 1,100,1000");
    }
    // reqwest (the admin API) needs rustls' provider installed.
    system_tests::system::install_crypto();
    let settle = Duration::from_millis(settle_ms);
    let mut measured = Vec::new();
    for &n in &counts {
        eprintln!("footprint: {n} registers");
        measured.push(footprint_of(n, settle).await?);
    }
    header();
    let first = &measured[0];
    info("agent RSS, tunnel up, no register", first.agent_idle, "MiB");
    info(
        "controller RSS, agent connected, no register",
        first.controller_idle,
        "MiB",
    );
    for m in &measured {
        let n = m.registers;
        let regs = if n == 1 { "register" } else { "registers" };
        row(
            &format!("agent RSS, {n} {regs} attached"),
            m.agent.0,
            "MiB",
            "<= 20 MiB",
            m.agent.0 / 20.0,
        );
        info("  agent peak RSS (VmHWM)", m.agent.1, "MiB");
        info(
            &format!("controller RSS, {n} {regs} attached"),
            m.controller.0,
            "MiB",
        );
        info("  controller peak RSS (VmHWM)", m.controller.1, "MiB");
        info(
            &format!("  all {n} seen by agent and controller"),
            m.attach.as_secs_f64(),
            "s",
        );
    }
    if let (Some(lo), Some(hi)) = (measured.first(), measured.last()) {
        if hi.registers > lo.registers {
            let per = |a: f64, b: f64| (b - a) * 1024.0 / (hi.registers - lo.registers) as f64;
            info(
                &format!("agent RSS per register ({}→{})", lo.registers, hi.registers),
                per(lo.agent.0, hi.agent.0),
                "KiB",
            );
            info(
                &format!(
                    "controller RSS per register ({}→{})",
                    lo.registers, hi.registers
                ),
                per(lo.controller.0, hi.controller.0),
                "KiB",
            );
        }
    }
    for name in ["controller", "agent", "firmware-sim"] {
        let path = sibling_binary(name).map_err(anyhow::Error::msg)?;
        let size = std::fs::metadata(&path)?.len() as f64 / (1024.0 * 1024.0);
        info(&format!("release binary size: {name}"), size, "MiB");
    }
    Ok(())
}
