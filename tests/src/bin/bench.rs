//! Benchmark harness: prints figures next to their goal or physical limit, never asserts on time.
//!
//! `cargo build --release --workspace && cargo run --release --bin bench -- <scenario>`
//!
//! * `sim-footprint` — RSS of one `firmware-sim` process running N registers (goal ≤ 200 MB for
//!   1,000), each registered, with a shift open and a few receipts, connected to a WebSocket peer;
//! * `ofd` — documents acknowledged per second by the `firmware-sim ofd` process over loopback TCP
//!   (goal ≥ 5,000/s), next to redb's raw single-commit rate on the same disk (the limit one commit
//!   per document would impose).

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
