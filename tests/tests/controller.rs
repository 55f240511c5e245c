//! Issue 4 end to end: a shop's Ferma calls → controller (store, balancer, dispatcher) → agent →
//! simulated registers → simulated OFD, on 127.0.0.1 with OS-chosen ports and temporary
//! directories. The real `controller` binary where the test is about the binary (the demo, a
//! `kill -9` of `serve`, the operator CLI); everything in process otherwise, so the tests can reach
//! the registers' fault knobs and clocks. Waits are on events (tunnel events, register events)
//! under a global timeout; the only timed pauses are between polls of an external process.
//!
//! The checker behind every test is invariant 2 of DESIGN.md §3, read from the simulated FN
//! archives (not from the controller): each accepted receipt is in exactly one document of one
//! FN, and that document is the one the controller reports.
#![allow(clippy::unwrap_used)]

use controller::balancer::{BalancerConfig, PoolState};
use controller::tunnel::TunnelEvent;
use firmware_sim::device::{Fleet, FleetOptions};
use firmware_sim::fixtures::{self, DEMO_INN};
use firmware_sim::ofd::Ofd;
use protocol::ferma::{ReceiptStatus, StatusData};
use protocol::kkt::{ErrorCode, FiscalResult, ShiftState};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use system_tests::stack::{self, register_offline, wait_until, Ferma, Stack, StackOptions};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Everything a test waits for must happen within this (debug build, 2 cores, tests in parallel).
const LIMIT: Duration = Duration::from_secs(30);

// ---- shared checks ---------------------------------------------------------------------------

/// Posts `count` receipts from `clients` concurrent clients; returns the acknowledged ids in
/// invoice order. Any refusal fails the test.
async fn post_concurrently(shop: &Ferma, count: usize, clients: usize, tag: &str) -> Vec<String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (shop, next, tag) = (shop.clone(), next.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count {
                    return out;
                }
                let id = shop.create(&format!("{tag}-{n}")).await.unwrap();
                out.push((n, id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all.into_iter().map(|(_, id)| id).collect()
}

/// The controller's status of a receipt, from its store.
fn stored_status(stack: &Stack, id: &str) -> ReceiptStatus {
    stack.server.store().receipt(id).unwrap().unwrap().status()
}

fn fiscalized(status: ReceiptStatus) -> bool {
    matches!(status, ReceiptStatus::Processed | ReceiptStatus::Confirmed)
}

/// Waits until every receipt of `ids` is fiscalized (PROCESSED or CONFIRMED).
async fn all_fiscalized(stack: &Stack, ids: &[String]) {
    all_reach(stack, ids, "fiscalized", fiscalized).await
}

/// Waits until the OFD has acknowledged every receipt of `ids`.
async fn all_confirmed(stack: &Stack, ids: &[String]) {
    all_reach(stack, ids, "confirmed", |s| s == ReceiptStatus::Confirmed).await
}

async fn all_reach(
    stack: &Stack,
    ids: &[String],
    what: &str,
    reached: impl Fn(ReceiptStatus) -> bool,
) {
    let mut events = stack.events();
    let waited = wait_until(&mut events, LIMIT, &format!("every receipt {what}"), || {
        ids.iter()
            .all(|id| reached(stored_status(stack, id)))
            .then_some(())
    })
    .await;
    if let Err(e) = waited {
        let stuck: Vec<_> = ids
            .iter()
            .filter_map(|id| {
                let v = stack.server.store().receipt(id).unwrap()?;
                (!reached(v.status())).then(|| (id.clone(), v.status(), v.job))
            })
            .collect();
        panic!(
            "{e}: {} not {what}: {stuck:#?}\nregisters: {:#?}\nqueue {:?}, held {}",
            stuck.len(),
            stack.server.dispatcher.registers(),
            stack.server.dispatcher.depths(),
            stack.server.dispatcher.held(),
        );
    }
}

/// Invariant 2 from the FN archives: every receipt is in exactly one document, that document is
/// the result the controller holds and the Ferma status shows; no document carries a job id the
/// controller does not know. Returns each receipt's result.
async fn exactly_once(
    stack: &Stack,
    shop: &Ferma,
    ids: &[String],
) -> BTreeMap<String, FiscalResult> {
    let archived = stack.archived_receipts();
    let known: BTreeSet<&String> = ids.iter().collect();
    for job in archived.keys() {
        assert!(known.contains(job), "a document carries unknown job {job}");
    }
    let mut out = BTreeMap::new();
    for id in ids {
        let docs = archived.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            docs.len(),
            1,
            "receipt {id} is in {} documents: {docs:?}",
            docs.len()
        );
        let doc = &docs[0];
        let view = stack.server.store().receipt(id).unwrap().unwrap();
        let (_, held) = view.result().expect("the controller holds the result");
        assert_eq!(
            (&held.fn_number, held.fd_number, held.fpd),
            (&doc.fn_number, doc.fd_number, doc.fpd),
            "receipt {id}: the controller's result is not the archived document"
        );
        let status = shop.status(id).await.unwrap();
        assert!(fiscalized(status.status().unwrap()), "{id}: {status:?}");
        device_matches(&status, doc);
        out.insert(id.clone(), doc.clone());
    }
    assert!(stack.tunnel().anomalies().unwrap().is_empty());
    out
}

/// The Ferma `Device` block names exactly this document.
fn device_matches(status: &StatusData, doc: &FiscalResult) {
    let d = status.device.as_ref().expect("Device block");
    assert_eq!(d.fn_number, doc.fn_number);
    assert_eq!(d.fdn, doc.fd_number.to_string());
    assert_eq!(d.fpd, doc.fpd.to_string());
    assert_eq!(d.rnm, doc.rnm);
    assert_eq!(d.zn, doc.zn);
    assert_eq!(d.shift_number, doc.shift_number);
}

/// Counts `JobCompleted` events until `n` distinct jobs completed.
async fn completions(events: &mut tokio::sync::broadcast::Receiver<TunnelEvent>, n: usize) {
    let mut done = BTreeSet::new();
    tokio::time::timeout(LIMIT, async {
        while done.len() < n {
            if let Ok(TunnelEvent::JobCompleted { job, .. }) = events.recv().await {
                done.insert(job);
            }
        }
    })
    .await
    .expect("receipts completing");
}

// ---- in-process: failover, FN end, shift rotation --------------------------------------------

/// The register announces it (`statusChanged`), as the simulator's control API does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_paper_runs_out_mid_load() {
    paper_runs_out(true).await
}

/// The register says nothing: the controller learns it from the first refused receipt, which
/// goes back to the queue and on to another register.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_paper_runs_out_silently_mid_load() {
    paper_runs_out(false).await
}

async fn paper_runs_out(announce: bool) {
    let started = Instant::now();
    let stack = Stack::start(StackOptions {
        registers: 3,
        latency_ms: 10,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let shop = stack.shop().await.unwrap();
    let mut events = stack.events();
    let mut watch = stack.events();
    let posting = {
        let shop = shop.clone();
        tokio::spawn(async move { post_concurrently(&shop, 60, 4, "paper").await })
    };

    // About ten in, the first register runs out of paper.
    completions(&mut events, 10).await;
    let victim = stack.zns[0].clone();
    let fleet = stack.fleet_of(&victim).unwrap().clone();
    let fd_at_fault = stack::set_paper(&fleet, &victim, false, announce)
        .await
        .unwrap();

    let ids = posting.await.unwrap();
    assert_eq!(ids.len(), 60);
    all_fiscalized(&stack, &ids).await;
    let results = exactly_once(&stack, &shop, &ids).await;
    all_confirmed(&stack, &ids).await;

    // Nothing landed on the paper-out register after the fault, and the others took the rest.
    let after: Vec<_> = results
        .values()
        .filter(|r| r.zn == victim && r.fd_number > fd_at_fault)
        .collect();
    assert!(
        after.is_empty(),
        "receipts on the paper-out register: {after:?}"
    );
    let before = results.values().filter(|r| r.zn == victim).count();
    assert!(before > 0, "the victim took receipts before the fault");
    for zn in &stack.zns[1..] {
        assert!(results.values().any(|r| &r.zn == zn), "{zn} took none");
    }
    // Each receipt the victim refused went elsewhere; the balancer stopped sending soon after.
    let mut refused = 0;
    while let Ok(e) = watch.try_recv() {
        if let TunnelEvent::JobNotFiscalized { kkt, error, .. } = e {
            assert_eq!(kkt, victim);
            assert_eq!(error.code, ErrorCode::NO_PAPER);
            refused += 1;
        }
    }
    assert!(
        refused <= 4,
        "{refused} dispatches refused for want of paper"
    );

    // Operators see why it is out of the pool.
    let report = stack.register_report(&victim).unwrap();
    assert!(
        matches!(&report.pool, PoolState::DeviceFault(why) if why.contains("paper")),
        "{:?}",
        report.pool
    );
    let kkts = stack.admin_get("/admin/kkts").await.unwrap();
    let row = kkts
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["zn"] == victim.as_str())
        .unwrap();
    assert!(
        row["pool"].as_str().unwrap().starts_with("device fault"),
        "{row}"
    );
    if !announce {
        assert!(refused >= 1, "the fault was found by a refused receipt");
    }
    println!(
        "paper out (announced: {announce}): {before} receipts on the victim before the fault, \
         {refused} refused after; {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_fn_fills_mid_load() {
    let started = Instant::now();
    // Retire only on the FN's own block or warnings, so the small FN really fills under load and
    // its last dispatches come back NotFiscalized (archive full) and go to the others.
    let mut stack = Stack::start(StackOptions {
        registers: 2,
        latency_ms: 10,
        balancer: BalancerConfig {
            fn_min_documents_left: 0,
            ..BalancerConfig::default()
        },
        ..StackOptions::default()
    })
    .await
    .unwrap();
    // Capacity 10: registration and shift opening take two, two are kept for closing, so the
    // FN forms six receipts and refuses the seventh.
    let small = stack
        .add_registers(1, 10, Some(10))
        .await
        .unwrap()
        .remove(0);
    let shop = stack.shop().await.unwrap();
    let mut watch = stack.events();

    let ids = post_concurrently(&shop, 40, 4, "fill").await;
    all_fiscalized(&stack, &ids).await;
    let results = exactly_once(&stack, &shop, &ids).await;
    all_confirmed(&stack, &ids).await;

    let on_small = results.values().filter(|r| r.zn == small).count();
    assert_eq!(on_small, 6, "the small FN holds six receipts");
    let last_fd = stack.device(&small).unwrap().register().drive.last_fd;
    assert_eq!(
        last_fd, 8,
        "the FN is full (two documents kept for closing)"
    );
    let mut full = 0;
    while let Ok(e) = watch.try_recv() {
        if let TunnelEvent::JobNotFiscalized { kkt, error, .. } = e {
            assert_eq!(kkt, small, "only the full FN refused: {error}");
            assert_eq!(error.code, ErrorCode::FN_ARCHIVE_FULL);
            full += 1;
        }
    }
    assert!(
        full >= 1,
        "a dispatch to the full FN came back and was requeued"
    );

    let mut events = stack.events();
    let why = wait_until(&mut events, LIMIT, "the full FN retired", || {
        match stack.register_report(&small)?.pool {
            PoolState::FnRetired(why) => Some(why),
            _ => None,
        }
    })
    .await
    .unwrap();
    let kkts = stack.admin_get("/admin/kkts").await.unwrap();
    let row = kkts
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["zn"] == small.as_str())
        .unwrap();
    assert!(
        row["pool"].as_str().unwrap().starts_with("fn retired"),
        "{row}"
    );
    println!(
        "FN full: {on_small} receipts on it, {full} refused and requeued ({why}); {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_rotates_before_24h_with_a_moved_clock() {
    let started = Instant::now();
    let stack = Stack::start(StackOptions {
        registers: 1,
        latency_ms: 20,
        balancer: BalancerConfig {
            // See the moved clock soon after it moved.
            probe_every_ms: 200,
            ..BalancerConfig::default()
        },
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let zn = stack.zns[0].clone();
    let fleet = stack.fleet_of(&zn).unwrap().clone();
    let shop = stack.shop().await.unwrap();
    let mut watch = stack.events();
    let first_shift = stack.device(&zn).unwrap().register().drive.shift.number;

    // Work in flight when the clock jumps to 15 minutes before the shift's 24 h limit: the
    // balancer must let it finish, close the shift and open a new one.
    let mut events = stack.events();
    let before = {
        let shop = shop.clone();
        tokio::spawn(async move { post_concurrently(&shop, 6, 2, "early").await })
    };
    completions(&mut events, 2).await;
    stack::move_clock(&fleet, &zn, 23 * 3600 + 45 * 60)
        .await
        .unwrap();
    let before = before.await.unwrap();

    let tunnel = stack.tunnel();
    let new_shift = wait_until(&mut events, LIMIT, "the shift rotated", || {
        let s = tunnel.online_kkt(&zn)?.state?;
        (s.shift.number > first_shift && s.device.shift == ShiftState::Opened)
            .then_some(s.shift.number)
    })
    .await
    .unwrap();
    assert_eq!(new_shift, first_shift + 1);
    all_fiscalized(&stack, &before).await;

    // A receipt after the rotation is fiscalized in the new shift.
    let after = shop.create("after-rotation").await.unwrap();
    let all: Vec<String> = before.iter().cloned().chain([after.clone()]).collect();
    all_fiscalized(&stack, &all).await;
    let results = exactly_once(&stack, &shop, &all).await;
    assert_eq!(results[&after].shift_number, new_shift);
    for id in &before {
        let s = results[id].shift_number;
        assert!(s == first_shift || s == new_shift, "{id} in shift {s}");
    }
    // The close report lies between the old shift's receipts and the new shift's.
    let (close_fd, open_fd) = {
        let reg = stack.device(&zn).unwrap().register();
        let docs = fleet
            .store
            .archive_range(reg.drive.fn_number(), 1, reg.drive.last_fd)
            .unwrap();
        let kind = |want: protocol::document::DocumentType| {
            docs.iter()
                .filter_map(|(fd, b)| {
                    let d = protocol::document::Document::decode(b).ok()?;
                    (d.doc_type == want).then_some(*fd)
                })
                .collect::<Vec<u32>>()
        };
        let closes = kind(protocol::document::DocumentType::ShiftClose);
        let opens = kind(protocol::document::DocumentType::ShiftOpen);
        assert_eq!(closes.len(), 1, "one shift closed");
        assert_eq!(opens.len(), 2, "two shifts opened");
        (closes[0], opens[1])
    };
    for r in results.values() {
        if r.shift_number == first_shift {
            assert!(r.fd_number < close_fd);
        } else {
            assert!(r.fd_number > open_fd);
        }
    }
    // Drained first: no receipt ever reached a closed or expired shift.
    while let Ok(e) = watch.try_recv() {
        assert!(
            !matches!(e, TunnelEvent::JobNotFiscalized { .. }),
            "a receipt was refused around the rotation: {e:?}"
        );
    }
    // The OFD took documents dated 23 h 45 min ahead: every receipt gets confirmed.
    all_confirmed(&stack, &all).await;
    println!(
        "shift {first_shift} → {new_shift}, {} receipts; {:?}",
        all.len(),
        started.elapsed()
    );
}

/// A register that announces a fault (`statusChanged`, what the simulator's control API sends for
/// paper, cover and FN knobs) still answers its agent at once. (The agent once refreshed the
/// status inline in the loop that reads the register's answers, and the link hung until the
/// 120 s call timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_event_does_not_stall_the_register() {
    let stack = Stack::start(StackOptions {
        registers: 1,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let zn = stack.zns[0].clone();
    let fleet = stack.fleet_of(&zn).unwrap().clone();
    stack::set_paper(&fleet, &zn, false, true).await.unwrap();
    let answer = stack
        .tunnel()
        .command(
            &zn,
            protocol::kkt::Call::GetDeviceStatus,
            Duration::from_secs(10),
        )
        .await;
    match answer {
        Ok(protocol::kkt::Reply::DeviceStatus(s)) => assert!(!s.paper_present),
        other => panic!("the register did not answer after its status event: {other:?}"),
    }
}

/// DESIGN.md §4, "whose registration allows the receipt": a receipt without a buyer contact
/// goes only to a register that prints, a 22 % VAT receipt only to an FFD 1.2 FN, and a receipt
/// no register of the INN could take is refused at the door, naming the field, instead of
/// waiting NEW forever. Checked from the FN archives: each receipt is in exactly one document, on
/// a register whose registration allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_go_only_where_the_registration_allows() {
    let mut stack = Stack::start(StackOptions {
        registers: 1,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let internet = stack.zns[0].clone();
    let shop = stack.shop().await.unwrap();
    let body = |invoice: &str, contact: bool, vat: &str| {
        let mut v = stack::receipt_request(invoice);
        v["Request"]["CustomerReceipt"]["Items"][0]["Vat"] = json!(vat);
        if !contact {
            v["Request"]["CustomerReceipt"]
                .as_object_mut()
                .unwrap()
                .remove("Email");
        }
        v
    };
    let create = |v: Value| {
        let shop = shop.clone();
        async move {
            shop.call("/api/kkt/cloud/receipt", &v)
                .await
                .map(|d| d["ReceiptId"].as_str().unwrap().to_owned())
                .map_err(|e| e.downcast::<stack::FermaFailure>().unwrap())
        }
    };

    // Only an internet-mode register: a receipt to be printed has nowhere to go.
    let e = create(body("paper-0", false, "Vat20")).await.unwrap_err();
    assert_eq!(e.code, Some(1010), "{e}");
    assert!(
        e.message.starts_with("Request.CustomerReceipt.Email: ")
            && e.message.contains(DEMO_INN)
            && e.message.contains("Email or Phone"),
        "{e}"
    );
    assert_eq!(stack.server.dispatcher.depth(DEMO_INN), 0, "nothing queued");

    // A counter register that prints, with an FFD 1.05 drive.
    let printing = stack
        .add_registers_like(
            1,
            stack::RegisterKind {
                internet: false,
                ffd: protocol::kkt::FfdVersion::V1_05,
                ..stack::RegisterKind::default()
            },
        )
        .await
        .unwrap()
        .remove(0);
    // Neither register can take an unaddressed 22 % receipt: each refuses for its own reason.
    let e = create(body("both-0", false, "Vat22")).await.unwrap_err();
    assert_eq!(e.code, Some(1010), "{e}");
    assert!(
        e.message.starts_with("Request.CustomerReceipt.Email: ")
            || e.message
                .starts_with("Request.CustomerReceipt.Items[0].Vat: "),
        "{e}"
    );

    let mut expected = BTreeMap::new();
    for n in 0..6 {
        let paper = create(body(&format!("paper-{}", n + 1), false, "Vat20"))
            .await
            .unwrap();
        expected.insert(paper, Some(printing.clone()));
        let vat22 = create(body(&format!("vat22-{n}"), true, "Vat22"))
            .await
            .unwrap();
        expected.insert(vat22, Some(internet.clone()));
        let any = create(body(&format!("any-{n}"), true, "Vat20"))
            .await
            .unwrap();
        expected.insert(any, None);
    }
    let ids: Vec<String> = expected.keys().cloned().collect();
    all_confirmed(&stack, &ids).await;
    let results = exactly_once(&stack, &shop, &ids).await;
    // What /metrics reads as the current statuses; the refused receipts were never stored.
    assert_eq!(
        controller::store::Ledger::receipt_counts(stack.server.store()).unwrap(),
        controller::store::ReceiptCounts {
            confirmed: ids.len(),
            ..Default::default()
        }
    );
    for (id, register) in &expected {
        if let Some(zn) = register {
            assert_eq!(
                &results[id].zn, zn,
                "receipt {id} went to the wrong register"
            );
        }
    }
}

// ---- the real binary -------------------------------------------------------------------------

fn controller_binary() -> std::path::PathBuf {
    system_tests::sibling_binary("controller").unwrap()
}

/// A child process killed when the test ends, however it ends.
fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads stdout lines until one satisfies `last`; returns them all.
async fn read_until(
    lines: &mut Lines<BufReader<ChildStdout>>,
    log: &Path,
    mut last: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = last(&line);
            out.push(line);
            if done {
                return true;
            }
        }
        false
    };
    let ok = tokio::time::timeout(LIMIT, read).await == Ok(true);
    assert!(
        ok,
        "the process did not print what was expected; stdout {out:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    out
}

/// SIGTERM, then wait for a clean exit.
async fn terminate(child: &mut Child) {
    let pid = child.id().unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

fn after_prefix(lines: &[String], prefix: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {lines:?}"))
        .trim()
        .to_owned()
}

struct Demo {
    child: Child,
    /// The shell lines it printed: TOKEN=..., RECEIPT=..., and the status `curl`.
    shell: Vec<String>,
    base: String,
}

async fn start_demo(data: &Path, log: &Path) -> Demo {
    let mut child = spawn(
        Command::new(controller_binary())
            .arg("demo")
            .arg("--data")
            .arg(data)
            .args(["--http", "127.0.0.1:0"]),
        log,
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let out = read_until(&mut lines, log, |l| l.starts_with("Ctrl-C stops")).await;
    let shell: Vec<String> = out
        .iter()
        .filter(|l| l.starts_with("TOKEN=") || l.starts_with("RECEIPT=") || l.starts_with("curl "))
        .cloned()
        .collect();
    assert_eq!(shell.len(), 3, "three shell lines in {out:?}");
    let base = format!("http://{}", after_prefix(&out, "http listening on "));
    Demo { child, shell, base }
}

async fn bash(script: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("the shell line finished")
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the printed status line (with TOKEN and RECEIPT as the first two lines left them) until
/// the receipt is CONFIRMED.
async fn demo_status_until_confirmed(line: &str, token: &str, receipt: &str) -> Value {
    let poll = async {
        loop {
            let out = bash(line, &[("TOKEN", token), ("RECEIPT", receipt)]).await;
            let answer: Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("status answer {out:?}: {e}"));
            assert_eq!(answer["Status"], "Success", "{answer}");
            if answer["Data"]["StatusName"] == "CONFIRMED" {
                return answer;
            }
            // An external process: nothing to wait on but its next answer.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(LIMIT, poll)
        .await
        .expect("the demo receipt confirmed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_curl_reaches_confirmed() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let log = dir.path().join("demo.log");
    let mut demo = start_demo(&data, &log).await;

    // The first two lines exactly as printed, in one shell so TOKEN carries over.
    let script = format!(
        "{}\n{}\nprintf 'TOKEN=%s\\n' \"$TOKEN\"",
        demo.shell[0], demo.shell[1]
    );
    let out = bash(&script, &[]).await;
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    let receipt = after_prefix(&lines, "ReceiptId ");
    let token = after_prefix(&lines, "TOKEN=");
    assert_eq!(receipt.len(), 36, "a ReceiptId: {out:?}");
    let answer = demo_status_until_confirmed(&demo.shell[2], &token, &receipt).await;
    let device = answer["Data"]["Device"].clone();
    assert_eq!(answer["Data"]["ReceiptId"], receipt.as_str());

    // The registry by receipt time lists it with the register that fiscalized it.
    let shop = Ferma::with_token(&demo.base, &token);
    let now = protocol::ferma::local_from_unix(controller::unix_ms() as i64 / 1000);
    let items = shop
        .list2(json!({
            "StartDateLocal": protocol::ferma::format_local(now - 3600),
            "EndDateLocal": protocol::ferma::format_local(now + 3600),
        }))
        .await
        .unwrap();
    let item = items
        .iter()
        .find(|i| i.receipt_id == receipt)
        .unwrap_or_else(|| panic!("{receipt} not in list2: {items:?}"));
    assert_eq!(item.status_name, "CONFIRMED");
    let holder = &item.receipt["cashboxInfoHolder"];
    for (ours, theirs) in [("FN", "FN"), ("FDN", "FDN"), ("FPD", "FPD"), ("RNM", "RNM")] {
        assert_eq!(holder[ours], device[theirs], "cashboxInfoHolder {holder}");
    }
    assert_eq!(holder["totalSum"], json!(301.0));
    terminate(&mut demo.child).await;

    // Started again on the same data it is the same system: the receipt is still CONFIRMED
    // (the session too survived), with the same register.
    let mut demo = start_demo(&data, &log).await;
    let again = demo_status_until_confirmed(&demo.shell[2], &token, &receipt).await;
    assert_eq!(again["Data"]["Device"], device);
    terminate(&mut demo.child).await;

    // The Device block is the document in the simulated register's FN archive.
    let fleet = Fleet::open(
        &data.join("registers"),
        4,
        FleetOptions {
            connect: "ws://127.0.0.1:9/kkt".into(),
            latency_ms: 0,
            default_ofd: None,
            capacity: None,
            ffd: protocol::kkt::FfdVersion::V1_2,
            max_backoff: Duration::from_secs(1),
        },
    )
    .unwrap();
    let archived = stack::archived_receipts(&fleet);
    let docs = &archived[&receipt];
    assert_eq!(docs.len(), 1, "exactly one document: {docs:?}");
    let doc = &docs[0];
    assert_eq!(device["FN"], doc.fn_number.as_str());
    assert_eq!(device["FDN"], doc.fd_number.to_string().as_str());
    assert_eq!(device["FPD"], doc.fpd.to_string().as_str());
    assert_eq!(device["RNM"], doc.rnm.as_str());
    assert_eq!(device["ZN"], doc.zn.as_str());
    assert_eq!(archived.len(), 1, "no other receipt was fiscalized");
    println!(
        "demo: {receipt} confirmed and resumed; {:?}",
        started.elapsed()
    );
}

/// `controller serve` on `data` with OS-chosen ports; returns (child, http, quic).
async fn serve(data: &Path, log: &Path) -> (Child, String, String) {
    let mut child = spawn(
        Command::new(controller_binary())
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"]),
        log,
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let out = read_until(&mut lines, log, |l| l.starts_with("http listening on ")).await;
    let http = after_prefix(&out, "http listening on ");
    let quic = after_prefix(&out, "quic listening on ");
    (child, http, quic)
}

async fn cli(args: &[&str], data: &Path, http: &str) -> String {
    let out = Command::new(controller_binary())
        .args(args)
        .arg("--data")
        .arg(data)
        .args(["--http", http])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "controller {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_loses_nothing_acknowledged() {
    let started = Instant::now();
    system_tests::system::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("controller");
    let log = dir.path().join("controller.log");
    let (mut child, http, _) = serve(&data, &log).await;

    // The operator's CLI makes the shop's account.
    let out = cli(
        &[
            "account",
            "create",
            "--login",
            "shop",
            "--password",
            "shop-password",
            "--inn",
            DEMO_INN,
        ],
        &data,
        &http,
    )
    .await;
    assert!(out.contains("created: login shop, INN 3245001416"), "{out}");
    let base = format!("http://{http}");
    let shop = Ferma::login(&base, "shop", "shop-password").await.unwrap();

    // 50 receipts from 10 clients; no register yet, so they wait. The controller is killed
    // (SIGKILL) while the last of them are still in flight.
    let acked = Arc::new(std::sync::Mutex::new(BTreeMap::<usize, String>::new()));
    let grew = Arc::new(tokio::sync::Notify::new());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (shop, acked, grew, next) = (shop.clone(), acked.clone(), grew.clone(), next.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= 50 {
                    return;
                }
                // A refused or cut request is simply not acknowledged.
                if let Ok(id) = shop.create(&format!("restart-{n}")).await {
                    acked.lock().unwrap().insert(n, id);
                    grew.notify_one();
                }
            }
        }));
    }
    tokio::time::timeout(LIMIT, async {
        while acked.lock().unwrap().len() < 35 {
            grew.notified().await;
        }
    })
    .await
    .unwrap();
    child.kill().await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let acked: BTreeMap<usize, String> = acked.lock().unwrap().clone();
    println!("{} of 50 acknowledged before kill -9", acked.len());

    // Restarted on the same data: every acknowledged receipt is there, waiting.
    let (mut child, http, quic) = serve(&data, &log).await;
    let base = format!("http://{http}");
    let shop = Ferma::login(&base, "shop", "shop-password").await.unwrap();
    for id in acked.values() {
        let s = shop.status(id).await.unwrap();
        assert_eq!(s.status_name, "NEW", "{id}: {s:?}");
    }
    // The shop retries what was not acknowledged, with the same InvoiceId: one receipt each,
    // whether or not the first attempt made it to disk.
    let mut ids = acked.clone();
    let mut already_stored = 0;
    for n in 0..50 {
        if ids.contains_key(&n) {
            continue;
        }
        let id = match shop.create(&format!("restart-{n}")).await {
            Ok(id) => id,
            Err(e) => {
                already_stored += 1;
                let f = e
                    .downcast_ref::<stack::FermaFailure>()
                    .expect("a Ferma answer");
                // 1019: the InvoiceId exists; the message names the first receipt --between--.
                assert_eq!(f.code, Some(1019), "{f}");
                f.message
                    .split("--")
                    .nth(1)
                    .unwrap_or_else(|| panic!("no id in {f}"))
                    .to_owned()
            }
        };
        ids.insert(n, id);
    }
    println!(
        "{} resent after the restart, {already_stored} of them had reached the disk unacknowledged",
        50 - acked.len()
    );
    let ids: Vec<String> = ids.into_values().collect();
    let listed = shop.list(json!({})).await.unwrap();
    assert_eq!(listed.len(), 50, "one receipt per InvoiceId");

    // Registers arrive: an agent enrolled with a token from the CLI, two registers already
    // registered at the tax service (shift closed; the controller opens it).
    let out = cli(&["agent-token", "create"], &data, &http).await;
    let token = out.lines().last().unwrap().trim().to_owned();
    let agent_dir = dir.path().join("agent");
    agent::identity::enroll(&quic, &token, &agent_dir, "restart-shelf")
        .await
        .unwrap();
    let agent = stack::start_agent(&agent_dir).await.unwrap();
    let ofd = Ofd::open(&dir.path().join("ofd")).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ofd_endpoint = fixtures::ofd_endpoint(l.local_addr().unwrap());
    tokio::spawn(ofd.clone().serve_tcp(l));
    let fleet = Arc::new(
        Fleet::open(
            &dir.path().join("registers"),
            2,
            FleetOptions {
                connect: format!("ws://{}/kkt", agent.kkt_addr),
                latency_ms: 5,
                default_ofd: Some(ofd_endpoint.clone()),
                capacity: None,
                ffd: protocol::kkt::FfdVersion::V1_2,
                max_backoff: Duration::from_millis(200),
            },
        )
        .unwrap(),
    );
    for zn in fleet.devices.keys() {
        register_offline(&fleet, zn, DEMO_INN, ofd_endpoint.clone())
            .await
            .unwrap();
    }
    // Register events (documents acknowledged by the OFD) wake the polls of the controller.
    let (wake_tx, mut wake) = tokio::sync::mpsc::unbounded_channel();
    for device in fleet.devices.values() {
        let mut ev = device.subscribe();
        let tx = wake_tx.clone();
        tokio::spawn(async move {
            while ev.recv().await.is_ok() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    fleet.start();

    let mut last = Vec::new();
    let waited = tokio::time::timeout(LIMIT, async {
        loop {
            last = shop.list(json!({})).await.unwrap();
            if last.len() == 50 && last.iter().all(|i| i.status_name == "CONFIRMED") {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), wake.recv()).await;
        }
    })
    .await;
    if waited.is_err() {
        let mut by_status = BTreeMap::<&str, usize>::new();
        for i in &last {
            *by_status.entry(i.status_name.as_str()).or_default() += 1;
        }
        let unconfirmed: Vec<_> = last
            .iter()
            .filter(|i| i.status_name != "CONFIRMED")
            .map(|i| {
                (
                    &i.receipt_id,
                    &i.status_name,
                    &i.receipt["cashboxInfoHolder"],
                )
            })
            .collect();
        panic!(
            "not every receipt confirmed within {LIMIT:?}: {by_status:?} {unconfirmed:?}; registers: {:?}; log:\n{}",
            fleet
                .devices
                .values()
                .map(|d| {
                    let r = d.register();
                    (r.zn.clone(), r.drive.last_fd, r.drive.shift.open, r.drive.unsent.len())
                })
                .collect::<Vec<_>>(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let confirmed = last;
    let archived = stack::archived_receipts(&fleet);
    assert_eq!(archived.len(), 50, "no unknown job in the archives");
    for id in &ids {
        let docs = archived.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(docs.len(), 1, "{id}: {docs:?}");
        let status = shop.status(id).await.unwrap();
        device_matches(&status, &docs[0]);
    }
    assert!(confirmed
        .iter()
        .all(|i| !i.receipt["cashboxInfoHolder"].is_null()));
    terminate(&mut child).await;
    println!(
        "restart: 50 receipts confirmed once each; {:?}",
        started.elapsed()
    );
}
