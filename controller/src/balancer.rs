//! The balancer: which register takes which waiting receipt, and what each register needs
//! (a shift opened, a shift rotated, a status probe) to stay in the pool.
//!
//! Pure: no I/O, no clock. The shell ([`crate::dispatcher`]) feeds it what happened (receipts
//! queued, register states, job outcomes, command outcomes) with the current time, and carries out
//! the [`Action`]s that [`Balancer::poll`] returns. The balancer never decides a job's durable
//! state; the store's rules do ([`crate::rules`]). Its mistakes cost time, never a duplicate: a
//! dispatch to a register that cannot take it comes back as `NotFiscalized` or `Refused`.
//!
//! # Rules (DESIGN.md §4)
//! * A job goes only to a register online, registered for the job's INN, whose registration
//!   and FN allow the receipt ([`Requirements`]: taxation system; internet mode, which prints
//!   nothing and so needs the buyer's contact; FFD version), in fiscal mode (FN phase 3), with no
//!   FN block or end-of-life warning, FN headroom and validity above the configured margins,
//!   paper in, cover closed, an open shift that is not being rotated, and no fault reported by
//!   its last answer.
//! * Among those: fewest jobs in flight, then most FN headroom; at most `max_in_flight` each.
//! * A job that failed on a register prefers any other eligible register next time.
//! * Queues are FIFO per INN by the order given at acceptance; a job that came back keeps its
//!   place. Head-of-line blocking is bounded: a job no register can take now is skipped, and at
//!   most `scan_depth` jobs are looked at per INN per poll.
//! * A shift is opened when the register's INN has work (or right after a rotation); it is
//!   rotated (drain, close, open) `rotate_before` ahead of its 24 h limit by the register's own
//!   clock, and at the configured daily time.
//! * A register whose FN is near its end (warnings, validity, headroom) leaves the pool with a
//!   reason an operator can read; it comes back only when its status says otherwise (FN replaced).

use crate::rules::QueuePlace;
use protocol::kkt::{ErrorCode, FfdVersion, KktError, ShiftState};
use protocol::receipt::{Mismatch, Requirements, TaxationSystem};
use protocol::tunnel::{JobId, KktState};
use std::collections::{BTreeMap, HashMap};

/// How the balancer decides. Defaults are what a production pool uses; tests shrink them.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// Jobs in flight per register. DESIGN.md §3: keep it at 1–2 so a lost agent strands little.
    pub max_in_flight: usize,
    /// Start draining a shift this long before its 24 h limit (register clock).
    pub rotate_before_secs: i64,
    /// Rotate every shift once a day at this time of day (seconds after local midnight, Moscow).
    pub daily_close_at: Option<i64>,
    /// Leave the pool when fewer FN documents than this are left.
    pub fn_min_documents_left: u32,
    /// Leave the pool when the FN's validity ends within this many seconds.
    pub fn_min_valid_secs: i64,
    /// After a shift command, wait at most this long for a status that shows its effect before
    /// deciding again from the old one (the register is probed meanwhile).
    pub settle_ms: u64,
    /// Ask each register for its status at least this often (it moves the register clock we
    /// compute shift limits from, and brings back registers whose fault was fixed).
    pub probe_every_ms: u64,
    /// Ask a register that reported a fault this often.
    pub probe_faulty_every_ms: u64,
    /// A register whose command failed is left alone this long.
    pub command_backoff_ms: u64,
    /// A receipt that failed on this many registers ends in KKT_ERROR.
    pub max_attempts: u32,
    /// Jobs looked at per INN per poll.
    pub scan_depth: usize,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            max_in_flight: 2,
            rotate_before_secs: 30 * 60,
            daily_close_at: None,
            fn_min_documents_left: 100,
            fn_min_valid_secs: 3 * 86_400,
            settle_ms: 10_000,
            probe_every_ms: 60_000,
            probe_faulty_every_ms: 2_000,
            command_backoff_ms: 5_000,
            max_attempts: 10,
            scan_depth: 256,
        }
    }
}

/// A job waiting for a register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub job: JobId,
    /// What the register's registration and FN must allow ([`protocol::receipt::Receipt::requirements`]).
    pub needs: Requirements,
    /// The register the last attempt failed on.
    pub avoid: Option<String>,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Dispatch {
        job: JobId,
        kkt: String,
    },
    OpenShift {
        kkt: String,
    },
    CloseShift {
        kkt: String,
        why: Rotation,
    },
    /// Ask the register for its status (the agent reports it back).
    Probe {
        kkt: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The 24 h limit is near.
    Limit,
    /// The configured daily time passed.
    Daily,
    /// The shift is already over 24 h (the register refuses receipts).
    Expired,
}

/// A register command the balancer asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    OpenShift,
    CloseShift,
    Probe,
}

/// What a job's attempt on a register came to, as far as the balancer cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Proven not fiscalized, with the register's error.
    NotFiscalized(KktError),
    /// The agent would not take it (nothing journaled).
    Refused,
    /// Its agent reconnected without it, or the dispatch never left.
    Released,
}

/// What to do with a job that came back without a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Back to the queue (the shell reads its place from the store and calls `enqueue`).
    Requeue,
    /// Give up: the receipt itself is refused, or it failed on too many registers.
    Fail(String),
}

/// Why a register takes no receipts now; shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolState {
    Ready,
    /// Waiting for its first status.
    Unknown,
    NotFiscal,
    /// FN near or at its end: needs an FN replacement.
    FnRetired(String),
    DeviceFault(String),
    ShiftClosed,
    /// Draining before a shift rotation.
    Rotating,
    Busy(CommandKind),
}

#[derive(Debug, Clone)]
struct Register {
    agent: String,
    state: Option<KktState>,
    /// Register clock minus controller clock, ms, as of the last status.
    clock_offset_ms: i64,
    held: usize,
    busy: Option<CommandKind>,
    /// After a shift command: the shift state its fresh status must show, and until when we
    /// wait for that status before deciding from what we have.
    expect: Option<ShiftState>,
    settle_until: u64,
    backoff_until: u64,
    fault: Option<String>,
    rotating: Option<Rotation>,
    reopen: bool,
    last_probe: u64,
}

impl Register {
    fn expect_shift(&mut self, shift: ShiftState, until: u64, probe_now: bool) {
        if self.state.as_ref().is_some_and(|s| shift_is(s, shift)) {
            self.expect = None;
            self.settle_until = 0;
            return;
        }
        self.expect = Some(shift);
        self.settle_until = until;
        if probe_now {
            self.last_probe = 0;
        }
    }
}

/// Whether a command's outcome means the shift is now as it wanted: done, or refused with
/// `already` (the shift was in that state before).
fn closed_or(result: Result<(), &KktError>, already: ErrorCode) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => e.code == already,
    }
}

/// Whether a status shows the shift in `want`. Both readings must agree: the agent reads the
/// device status and the shift status with separate calls, so a command between them yields a
/// torn status, which proves nothing either way.
fn shift_is(s: &KktState, want: ShiftState) -> bool {
    s.device.shift == want && s.shift.state == want
}

/// A register as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterReport {
    pub zn: String,
    pub agent: String,
    pub inn: Option<String>,
    pub pool: PoolState,
    pub in_flight: usize,
    pub state: Option<KktState>,
    /// Register clock minus controller clock, ms.
    pub clock_offset_ms: i64,
}

impl RegisterReport {
    /// Age of the register's oldest document not yet delivered to the OFD, by its own clock.
    pub fn oldest_unsent_secs(&self, now_ms: u64) -> Option<i64> {
        let first = self.state.as_ref()?.ofd.first_unsent_date_time?;
        let reg_now = (now_ms as i64 + self.clock_offset_ms).div_euclid(1000);
        Some((reg_now - i64::from(first)).max(0))
    }
}

/// The balancer's state. See the module doc for its rules.
#[derive(Debug, Default)]
pub struct Balancer {
    config: BalancerConfig,
    queues: HashMap<String, BTreeMap<u64, Waiting>>,
    /// Job → (INN, order) for every waiting job, to find and remove it.
    waiting: HashMap<JobId, (String, u64)>,
    registers: BTreeMap<String, Register>,
    /// Job → register for every job given out and not yet back.
    held: HashMap<JobId, String>,
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Balancer {
        Balancer {
            config,
            ..Balancer::default()
        }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.config
    }

    // ---- inputs ----------------------------------------------------------------------------

    /// A job waits at `place`. Idempotent: a job already waiting or held is left where it is.
    pub fn enqueue(&mut self, place: QueuePlace, waiting: Waiting) {
        if self.waiting.contains_key(&waiting.job) || self.held.contains_key(&waiting.job) {
            return;
        }
        self.waiting
            .insert(waiting.job.clone(), (place.inn.clone(), place.order));
        self.queues
            .entry(place.inn)
            .or_default()
            .insert(place.order, waiting);
    }

    /// Forget a waiting job (it failed for good, or an operator took it).
    pub fn remove(&mut self, job: &str) {
        if let Some((inn, order)) = self.waiting.remove(job) {
            if let Some(q) = self.queues.get_mut(&inn) {
                q.remove(&order);
                if q.is_empty() {
                    self.queues.remove(&inn);
                }
            }
        }
    }

    /// Jobs waiting for `inn`'s registers.
    pub fn depth(&self, inn: &str) -> usize {
        self.queues.get(inn).map_or(0, BTreeMap::len)
    }

    pub fn depths(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self
            .queues
            .iter()
            .map(|(inn, q)| (inn.clone(), q.len()))
            .collect();
        v.sort();
        v
    }

    pub fn is_waiting(&self, job: &str) -> bool {
        self.waiting.contains_key(job)
    }

    /// A register is online behind `agent` (attach or reconnect).
    pub fn online(&mut self, zn: &str, agent: &str) {
        // Jobs it held before it went away still count against its in-flight limit.
        let held = self.held.values().filter(|k| *k == zn).count();
        let r = self
            .registers
            .entry(zn.to_owned())
            .or_insert_with(|| Register {
                agent: agent.to_owned(),
                state: None,
                clock_offset_ms: 0,
                held,
                busy: None,
                expect: None,
                settle_until: 0,
                backoff_until: 0,
                fault: None,
                rotating: None,
                reopen: false,
                last_probe: 0,
            });
        r.agent = agent.to_owned();
    }

    /// A register went offline. Its jobs stay held (in doubt) until its agent reports them.
    pub fn offline(&mut self, zn: &str) {
        self.registers.remove(zn);
    }

    /// A fresh status of a register, read at `now_ms`.
    pub fn status(&mut self, zn: &str, state: KktState, now_ms: u64) {
        if let Some(r) = self.registers.get_mut(zn) {
            r.clock_offset_ms = i64::from(state.device.date_time) * 1000 - now_ms as i64;
            // Only a status that shows what the last shift command did ends the wait for it: a
            // status read before the command took effect (or torn, see `shift_is`) does not.
            if r.expect.is_some_and(|e| shift_is(&state, e)) {
                r.expect = None;
                r.settle_until = 0;
            }
            r.state = Some(state);
            r.fault = None;
        }
    }

    /// Held jobs per register, from the store (startup and resynchronisation). `held` lists
    /// (job, register) for every job assigned or accepted.
    pub fn set_held(&mut self, held: impl IntoIterator<Item = (JobId, String)>) {
        self.held = held.into_iter().collect();
        for r in self.registers.values_mut() {
            r.held = 0;
        }
        for zn in self.held.values() {
            if let Some(r) = self.registers.get_mut(zn) {
                r.held += 1;
            }
        }
        let held: Vec<JobId> = self.held.keys().cloned().collect();
        for job in held {
            self.remove(&job);
        }
    }

    /// A job given out came back (or the dispatch failed). Returns what to do with it when it
    /// came back without a document; `attempts` is how many registers proved it not fiscalized
    /// (this one included).
    pub fn job_done(
        &mut self,
        job: &str,
        kkt: &str,
        outcome: &Outcome,
        attempts: u32,
        now_ms: u64,
    ) -> Option<Verdict> {
        self.release(job, kkt);
        let error = match outcome {
            Outcome::Completed => return None,
            Outcome::Released => return Some(Verdict::Requeue),
            Outcome::Refused => {
                // The agent would not journal it (journal full, register gone): give that
                // register a rest until a fresh status, or every poll would bounce a job off it.
                if let Some(r) = self.registers.get_mut(kkt) {
                    r.fault = Some("its agent refused a receipt".into());
                    r.last_probe = now_ms;
                }
                return Some(Verdict::Requeue);
            }
            Outcome::NotFiscalized(e) => e,
        };
        if let Some(r) = self.registers.get_mut(kkt) {
            match classify(error) {
                Blame::Receipt => {}
                Blame::Device(why) => {
                    r.fault = Some(why);
                    r.last_probe = now_ms;
                }
                Blame::Shift => {
                    r.rotating = Some(Rotation::Expired);
                }
                Blame::Transient(why) => {
                    r.fault = Some(why);
                    r.backoff_until = now_ms + self.config.command_backoff_ms;
                }
            }
        }
        if matches!(classify(error), Blame::Receipt) {
            return Some(Verdict::Fail(format!(
                "the register refused the receipt: {error}"
            )));
        }
        if attempts >= self.config.max_attempts {
            return Some(Verdict::Fail(format!(
                "not fiscalized after {attempts} attempts; last error: {error}"
            )));
        }
        Some(Verdict::Requeue)
    }

    /// A command the balancer asked for finished.
    pub fn command_done(
        &mut self,
        kkt: &str,
        kind: CommandKind,
        outcome: Result<(), &KktError>,
        now_ms: u64,
    ) {
        let Some(r) = self.registers.get_mut(kkt) else {
            return;
        };
        if r.busy == Some(kind) {
            r.busy = None;
        }
        let settle = now_ms + self.config.settle_ms;
        match (kind, outcome) {
            // Done, or already so (the status we decided from was stale): wait for a status
            // that shows it, asking for one at once when ours was stale.
            (CommandKind::CloseShift, result) if closed_or(result, ErrorCode::SHIFT_CLOSED) => {
                r.rotating = None;
                r.reopen = true;
                r.expect_shift(ShiftState::Closed, settle, result.is_err());
            }
            (CommandKind::OpenShift, result) if closed_or(result, ErrorCode::SHIFT_OPEN) => {
                r.reopen = false;
                r.expect_shift(ShiftState::Opened, settle, result.is_err());
            }
            (CommandKind::Probe, Ok(())) => {}
            (_, Err(e)) => {
                r.fault = Some(format!("{kind:?} failed: {e}"));
                r.backoff_until = now_ms + self.config.command_backoff_ms;
            }
            (_, Ok(())) => {}
        }
    }

    /// A command could not reach the register (offline, timeout).
    pub fn command_lost(&mut self, kkt: &str, kind: CommandKind, now_ms: u64) {
        if let Some(r) = self.registers.get_mut(kkt) {
            if r.busy == Some(kind) {
                r.busy = None;
            }
            r.backoff_until = now_ms + self.config.command_backoff_ms;
        }
    }

    // ---- decisions -------------------------------------------------------------------------

    /// What to do now. Dispatches returned here are counted as held at once; the shell reports
    /// each one's fate through [`Balancer::job_done`] (or [`Balancer::dispatch_failed`]).
    pub fn poll(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let zns: Vec<String> = self.registers.keys().cloned().collect();
        for zn in &zns {
            if let Some(a) = self.automation(zn, now_ms) {
                actions.push(a);
            }
        }
        let inns: Vec<String> = self.queues.keys().cloned().collect();
        for inn in inns {
            self.dispatch_inn(&inn, now_ms, &mut actions);
        }
        actions
    }

    /// A dispatch returned by `poll` did not happen (nothing recorded, or the store put the job
    /// back): the job waits again at `place`.
    pub fn dispatch_failed(&mut self, job: &str, kkt: &str, back: Option<(QueuePlace, Waiting)>) {
        self.release(job, kkt);
        if let Some((place, w)) = back {
            self.enqueue(place, w);
        }
    }

    /// Forgets that `kkt` holds `job`; only if it is `kkt` that holds it (a stale report about
    /// an earlier holder must not free a slot of the current one).
    fn release(&mut self, job: &str, kkt: &str) {
        if self.held.get(job).is_some_and(|k| k == kkt) {
            self.held.remove(job);
            if let Some(r) = self.registers.get_mut(kkt) {
                r.held = r.held.saturating_sub(1);
            }
        }
    }

    fn automation(&mut self, zn: &str, now_ms: u64) -> Option<Action> {
        let cfg = self.config.clone();
        let has_work = {
            let r = self.registers.get(zn)?;
            r.state
                .as_ref()
                .and_then(|s| s.fn_info.registration.as_ref())
                .is_some_and(|reg| self.depth(&reg.user_inn) > 0)
        };
        let r = self.registers.get_mut(zn)?;
        if r.busy.is_some() || now_ms < r.backoff_until {
            return None;
        }
        let torn = r
            .state
            .as_ref()
            .is_some_and(|s| s.device.shift != s.shift.state);
        let waiting = r.expect.is_some() && now_ms < r.settle_until;
        if !waiting {
            r.expect = None;
        }
        // Registers we know little about right now are asked more often.
        let probe_every = if r.fault.is_some() || r.state.is_none() || waiting || torn {
            cfg.probe_faulty_every_ms
        } else {
            cfg.probe_every_ms
        };
        if now_ms.saturating_sub(r.last_probe) >= probe_every {
            r.last_probe = now_ms;
            r.busy = Some(CommandKind::Probe);
            return Some(Action::Probe { kkt: zn.to_owned() });
        }
        if waiting || torn {
            return None;
        }
        let state = r.state.as_ref()?;
        if !usable(state) || fn_retired(state, &cfg, reg_now(r, now_ms)).is_some() {
            return None;
        }
        let now_secs = reg_now(r, now_ms);
        match state.device.shift {
            ShiftState::Opened => {
                if r.rotating.is_none() {
                    r.rotating = rotation_due(state, &cfg, now_secs);
                }
                if let Some(why) = r.rotating {
                    if r.held == 0 {
                        r.busy = Some(CommandKind::CloseShift);
                        return Some(Action::CloseShift {
                            kkt: zn.to_owned(),
                            why,
                        });
                    }
                }
                None
            }
            ShiftState::Expired => {
                r.rotating = Some(Rotation::Expired);
                if r.held == 0 {
                    r.busy = Some(CommandKind::CloseShift);
                    return Some(Action::CloseShift {
                        kkt: zn.to_owned(),
                        why: Rotation::Expired,
                    });
                }
                None
            }
            ShiftState::Closed => {
                r.rotating = None;
                if (has_work || r.reopen) && r.fault.is_none() {
                    r.busy = Some(CommandKind::OpenShift);
                    return Some(Action::OpenShift { kkt: zn.to_owned() });
                }
                None
            }
        }
    }

    fn dispatch_inn(&mut self, inn: &str, now_ms: u64, actions: &mut Vec<Action>) {
        let cfg = self.config.clone();
        // Ready registers of this INN with their load, whatever each job needs.
        let mut cands: Vec<Candidate> = self
            .registers
            .iter()
            .filter_map(|(zn, r)| {
                let s = r.state.as_ref()?;
                let reg = s.fn_info.registration.as_ref()?;
                if reg.user_inn != inn || pool_state(r, &cfg, now_ms) != PoolState::Ready {
                    return None;
                }
                Some(Candidate {
                    zn: zn.clone(),
                    held: r.held,
                    headroom: s
                        .fn_info
                        .documents_capacity
                        .saturating_sub(s.fn_info.documents_used),
                    taxation: reg.taxation_systems.clone(),
                    internet: reg.internet,
                    ffd: s.fn_info.ffd_version,
                })
            })
            .collect();
        if cands.is_empty() {
            return;
        }
        let Some(queue) = self.queues.get(inn) else {
            return;
        };
        let mut chosen: Vec<(u64, JobId, String)> = Vec::new();
        for (order, w) in queue.iter().take(cfg.scan_depth) {
            let fits = |c: &Candidate| w.needs.check(&c.taxation, c.internet, c.ffd).is_ok();
            let others = cands
                .iter()
                .any(|c| fits(c) && Some(&c.zn) != w.avoid.as_ref());
            let best = cands
                .iter_mut()
                .filter(|c| fits(c) && c.held < cfg.max_in_flight)
                .filter(|c| !others || Some(&c.zn) != w.avoid.as_ref())
                .min_by(|a, b| {
                    a.held
                        .cmp(&b.held)
                        .then(b.headroom.cmp(&a.headroom))
                        .then(a.zn.cmp(&b.zn))
                });
            if let Some(c) = best {
                c.held += 1;
                chosen.push((*order, w.job.clone(), c.zn.clone()));
            }
            if cands.iter().all(|c| c.held >= cfg.max_in_flight) {
                break;
            }
        }
        for (order, job, zn) in chosen {
            if let Some(q) = self.queues.get_mut(inn) {
                q.remove(&order);
            }
            self.waiting.remove(&job);
            self.held.insert(job.clone(), zn.clone());
            if let Some(r) = self.registers.get_mut(&zn) {
                r.held += 1;
            }
            actions.push(Action::Dispatch { job, kkt: zn });
        }
        if self.queues.get(inn).is_some_and(BTreeMap::is_empty) {
            self.queues.remove(inn);
        }
    }

    /// Why no register of `inn` could ever take a receipt with `needs`, judged by what the
    /// registrations and FNs allow (not by paper, shifts or load, which pass). `None` when one
    /// could, or when no register of the INN is known yet: a register may still be attached.
    pub fn unservable(&self, inn: &str, needs: &Requirements) -> Option<Mismatch> {
        let mut first = None;
        for s in self.registers.values().filter_map(|r| r.state.as_ref()) {
            let Some(reg) = s
                .fn_info
                .registration
                .as_ref()
                .filter(|g| g.user_inn == inn)
            else {
                continue;
            };
            match needs.check(&reg.taxation_systems, reg.internet, s.fn_info.ffd_version) {
                Ok(()) => return None,
                Err(m) => {
                    first.get_or_insert(m);
                }
            }
        }
        first
    }

    // ---- views -----------------------------------------------------------------------------

    pub fn registers(&self, now_ms: u64) -> Vec<RegisterReport> {
        self.registers
            .iter()
            .map(|(zn, r)| RegisterReport {
                zn: zn.clone(),
                agent: r.agent.clone(),
                inn: r
                    .state
                    .as_ref()
                    .and_then(|s| s.fn_info.registration.as_ref())
                    .map(|reg| reg.user_inn.clone()),
                pool: pool_state(r, &self.config, now_ms),
                in_flight: r.held,
                state: r.state.clone(),
                clock_offset_ms: r.clock_offset_ms,
            })
            .collect()
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// A ready register as one dispatch round sees it.
struct Candidate {
    zn: String,
    /// Jobs in flight, counting those chosen in this round.
    held: usize,
    /// FN documents left.
    headroom: u32,
    taxation: Vec<TaxationSystem>,
    internet: bool,
    ffd: FfdVersion,
}

/// Moscow time, in which a shop's "daily close at 03:00" is meant (UTC+3, no daylight saving).
const MOSCOW_OFFSET_SECS: i64 = 3 * 3600;

/// The register's clock now, Unix seconds.
fn reg_now(r: &Register, now_ms: u64) -> i64 {
    (now_ms as i64 + r.clock_offset_ms).div_euclid(1000)
}

fn usable(s: &KktState) -> bool {
    s.device.fiscal && s.fn_info.phase == 3 && s.fn_info.registration.is_some()
}

/// Why the FN keeps this register out of the pool, if it does.
fn fn_retired(s: &KktState, cfg: &BalancerConfig, now_secs: i64) -> Option<String> {
    let f = &s.fn_info;
    if let Some(code) = f.block {
        return Some(format!(
            "the FN is blocked (FN code {code:#04x}); replace the FN"
        ));
    }
    if s.device.blocked || f.warnings.critical_error {
        return Some("the FN reports a critical error; replace the FN".into());
    }
    if f.warnings.need_replacement {
        return Some("the FN asks for replacement (3 days of validity left)".into());
    }
    if f.warnings.memory_overflow {
        return Some("the FN archive is 90 % full; replace the FN".into());
    }
    let left = f.documents_capacity.saturating_sub(f.documents_used);
    if left < cfg.fn_min_documents_left {
        return Some(format!(
            "the FN has room for {left} more documents (margin {}); replace the FN",
            cfg.fn_min_documents_left
        ));
    }
    let valid_left = i64::from(f.valid_until) - now_secs;
    if valid_left < cfg.fn_min_valid_secs {
        return Some(format!(
            "the FN's validity ends in {} h (margin {} h); replace the FN",
            valid_left.max(0) / 3600,
            cfg.fn_min_valid_secs / 3600
        ));
    }
    None
}

fn rotation_due(s: &KktState, cfg: &BalancerConfig, now_secs: i64) -> Option<Rotation> {
    if let Some(expires) = s.shift.expires_at {
        if now_secs >= i64::from(expires) - cfg.rotate_before_secs {
            return Some(Rotation::Limit);
        }
    }
    if let (Some(at), Some(opened)) = (cfg.daily_close_at, s.shift.opened_at) {
        let local = now_secs + MOSCOW_OFFSET_SECS;
        let last = local - (local - at).rem_euclid(86_400);
        let opened_local = i64::from(opened) + MOSCOW_OFFSET_SECS;
        if opened_local < last {
            return Some(Rotation::Daily);
        }
    }
    None
}

fn pool_state(r: &Register, cfg: &BalancerConfig, now_ms: u64) -> PoolState {
    let Some(s) = r.state.as_ref() else {
        return PoolState::Unknown;
    };
    if !usable(s) {
        return PoolState::NotFiscal;
    }
    if let Some(why) = fn_retired(s, cfg, reg_now(r, now_ms)) {
        return PoolState::FnRetired(why);
    }
    if let Some(f) = &r.fault {
        return PoolState::DeviceFault(f.clone());
    }
    if !s.device.paper_present {
        return PoolState::DeviceFault("out of paper".into());
    }
    if s.device.cover_open {
        return PoolState::DeviceFault("cover open".into());
    }
    if let Some(kind) = r.busy {
        if kind != CommandKind::Probe {
            return PoolState::Busy(kind);
        }
    }
    if r.expect.is_some() && now_ms < r.settle_until {
        return PoolState::Busy(CommandKind::Probe);
    }
    if !shift_is(s, ShiftState::Opened) {
        return PoolState::ShiftClosed;
    }
    if r.rotating.is_some() || rotation_due(s, cfg, reg_now(r, now_ms)).is_some() {
        return PoolState::Rotating;
    }
    PoolState::Ready
}

enum Blame {
    /// The receipt itself is wrong: another register would refuse it too.
    Receipt,
    /// The register cannot take receipts until its state changes.
    Device(String),
    /// The shift must be rotated.
    Shift,
    /// Try again later.
    Transient(String),
}

fn classify(e: &KktError) -> Blame {
    match e.code {
        ErrorCode::INVALID_PARAMETER => Blame::Receipt,
        ErrorCode::NO_PAPER => Blame::Device("out of paper".into()),
        ErrorCode::COVER_OPEN => Blame::Device("cover open".into()),
        ErrorCode::SHIFT_EXPIRED | ErrorCode::SHIFT_CLOSED => Blame::Shift,
        ErrorCode::FN_EXPIRED
        | ErrorCode::FN_ARCHIVE_FULL
        | ErrorCode::CRYPTO_EXHAUSTED
        | ErrorCode::STORAGE_EXHAUSTED
        | ErrorCode::UNSENT_DOCUMENTS
        | ErrorCode::OFD_WAIT_EXHAUSTED
        | ErrorCode::WRONG_FN_STATE
        | ErrorCode::FN_NOT_FOUND
        | ErrorCode::ARCHIVE_CLOSED
        | ErrorCode::REGISTRATION_NEEDED => Blame::Device(format!("the FN refused: {e}")),
        _ => Blame::Transient(format!("the register answered: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use protocol::kkt::{
        DeviceStatus, FfdVersion, FnInfo, FnWarnings, OfdEndpoint, OfdExchangeStatus,
        RegistrationSummary, ShiftStatus,
    };

    const INN: &str = "3245001416";
    const OTHER_INN: &str = "7704211201";
    /// Controller time of the tests, ms (2026-12-04T12:00:00Z).
    const NOW: u64 = 1_796_385_600_000;
    const NOW_S: u32 = (NOW / 1000) as u32;

    fn state(zn: &str, inn: &str) -> KktState {
        KktState {
            kkt: zn.into(),
            device: DeviceStatus {
                date_time: NOW_S,
                shift: ShiftState::Opened,
                blocked: false,
                cover_open: false,
                paper_present: true,
                fiscal: true,
                fn_present: true,
                model: "Эфир Pro ФС".into(),
                zn: zn.into(),
                firmware: "1".into(),
            },
            fn_info: FnInfo {
                fn_number: format!("999{zn}"),
                phase: 3,
                last_fd_number: 10,
                registrations_done: 1,
                registrations_left: 11,
                valid_until: NOW_S + 300 * 86_400,
                ffd_version: FfdVersion::V1_2,
                warnings: FnWarnings::default(),
                block: None,
                documents_used: 10,
                documents_capacity: 250_000,
                registration: Some(RegistrationSummary {
                    rnm: "0000000001000000".into(),
                    user_inn: inn.into(),
                    user_name: "ООО".into(),
                    taxation_systems: vec![TaxationSystem::Common],
                    internet: true,
                    ofd: OfdEndpoint {
                        name: "ofd".into(),
                        inn: "7704211201".into(),
                        host: "127.0.0.1".into(),
                        port: 1,
                    },
                }),
            },
            shift: ShiftStatus {
                state: ShiftState::Opened,
                number: 1,
                opened_at: Some(NOW_S - 3600),
                expires_at: Some(NOW_S - 3600 + 86_400),
                receipts: 0,
                documents: 1,
            },
            ofd: OfdExchangeStatus {
                unsent_count: 0,
                first_unsent_fd: None,
                first_unsent_date_time: None,
                last_ack_at: None,
                ofd: None,
            },
        }
    }

    fn place(order: u64) -> QueuePlace {
        QueuePlace {
            inn: INN.into(),
            order,
        }
    }

    /// A receipt under the common system with the buyer's e-mail, any FFD.
    fn needs() -> Requirements {
        Requirements {
            taxation: TaxationSystem::Common,
            needs_paper: false,
            ffd: None,
        }
    }

    fn job(id: &str) -> Waiting {
        Waiting {
            job: id.into(),
            needs: needs(),
            avoid: None,
        }
    }

    /// A balancer with `registers` ready registers "k1".. of INN, and no probe due.
    fn with(registers: &[(&str, KktState)]) -> Balancer {
        let mut b = Balancer::new(BalancerConfig {
            probe_every_ms: 3_600_000,
            probe_faulty_every_ms: 3_600_000,
            ..BalancerConfig::default()
        });
        for (zn, s) in registers {
            b.online(zn, "agent-1");
            b.status(zn, s.clone(), NOW);
            b.registers.get_mut(*zn).unwrap().last_probe = NOW;
        }
        b
    }

    fn dispatches(actions: &[Action]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch { job, kkt } => Some((job.clone(), kkt.clone())),
                _ => None,
            })
            .collect()
    }

    fn fail_with(code: ErrorCode) -> Outcome {
        Outcome::NotFiscalized(KktError::new(code, "test"))
    }

    #[test]
    fn only_eligible_registers_get_receipts() {
        let mut wrong_inn = state("a", OTHER_INN);
        wrong_inn.kkt = "a".into();
        let mut not_fiscal = state("b", INN);
        not_fiscal.device.fiscal = false;
        let mut no_paper = state("c", INN);
        no_paper.device.paper_present = false;
        let mut cover = state("d", INN);
        cover.device.cover_open = true;
        let mut closed = state("e", INN);
        closed.device.shift = ShiftState::Closed;
        closed.shift.state = ShiftState::Closed;
        let mut warned = state("f", INN);
        warned.fn_info.warnings.need_replacement = true;
        let mut full = state("g", INN);
        full.fn_info.documents_used = full.fn_info.documents_capacity - 50;
        let mut expiring = state("h", INN);
        expiring.fn_info.valid_until = NOW_S + 86_400;
        let mut blocked = state("i", INN);
        blocked.fn_info.block = Some(0x06);
        let mut wrong_tax = state("j", INN);
        wrong_tax
            .fn_info
            .registration
            .as_mut()
            .unwrap()
            .taxation_systems = vec![TaxationSystem::Patent];
        let mut rotating = state("k", INN);
        rotating.shift.expires_at = Some(NOW_S + 600);
        let regs: Vec<(&str, KktState)> = vec![
            ("a", wrong_inn),
            ("b", not_fiscal),
            ("c", no_paper),
            ("d", cover),
            ("e", closed),
            ("f", warned),
            ("g", full),
            ("h", expiring),
            ("i", blocked),
            ("j", wrong_tax),
            ("k", rotating),
        ];
        let mut b = with(&regs);
        b.enqueue(place(1), job("r1"));
        let actions = b.poll(NOW);
        assert!(dispatches(&actions).is_empty(), "{actions:?}");
        assert_eq!(b.depth(INN), 1);
        let pools: Vec<(String, PoolState)> = b
            .registers(NOW)
            .into_iter()
            .map(|r| (r.zn, r.pool))
            .collect();
        assert!(matches!(pools[2].1, PoolState::DeviceFault(_)));
        assert!(matches!(pools[5].1, PoolState::FnRetired(_)));
        assert!(matches!(pools[6].1, PoolState::FnRetired(_)));
        assert!(matches!(pools[7].1, PoolState::FnRetired(_)));
        assert!(matches!(pools[8].1, PoolState::FnRetired(_)));
        // Nothing in flight on k: the rotation starts at once.
        assert_eq!(pools[10].1, PoolState::Busy(CommandKind::CloseShift));
        assert!(actions.contains(&Action::CloseShift {
            kkt: "k".into(),
            why: Rotation::Limit
        }));
        // e's INN has work: its shift is opened.
        assert!(actions.contains(&Action::OpenShift { kkt: "e".into() }));

        b.online("z", "agent-1");
        b.status("z", state("z", INN), NOW);
        assert_eq!(
            dispatches(&b.poll(NOW)),
            vec![("r1".to_string(), "z".to_string())]
        );
        assert_eq!(b.depth(INN), 0);
        assert_eq!(b.held(), 1);
    }

    /// Internet mode and FFD route receipts like the taxation system does: a receipt without a
    /// buyer contact only to a register that prints, a 22 % VAT receipt only to an FFD 1.2 FN; a
    /// receipt that fits no register waits without blocking the ones behind it.
    #[test]
    fn registration_flags_and_ffd_route_each_receipt() {
        let printing_old = {
            let mut s = state("p", INN);
            s.fn_info.registration.as_mut().unwrap().internet = false;
            s.fn_info.ffd_version = FfdVersion::V1_05;
            s
        };
        let internet_new = state("i", INN);
        let mut b = with(&[("p", printing_old), ("i", internet_new)]);
        let paper = Requirements {
            needs_paper: true,
            ..needs()
        };
        let vat22 = Requirements {
            ffd: Some((FfdVersion::V1_2, "items[0].vat".into())),
            ..needs()
        };
        let both = Requirements {
            needs_paper: true,
            ffd: Some((FfdVersion::V1_2, "items[0].vat".into())),
            ..needs()
        };
        for (order, (id, needs)) in [
            ("both", both.clone()),
            ("paper-1", paper.clone()),
            ("vat22-1", vat22.clone()),
            ("paper-2", paper.clone()),
            ("vat22-2", vat22.clone()),
        ]
        .into_iter()
        .enumerate()
        {
            b.enqueue(
                place(order as u64),
                Waiting {
                    job: id.into(),
                    needs,
                    avoid: None,
                },
            );
        }
        let mut d = dispatches(&b.poll(NOW));
        d.sort();
        assert_eq!(
            d,
            vec![
                ("paper-1".to_string(), "p".to_string()),
                ("paper-2".to_string(), "p".to_string()),
                ("vat22-1".to_string(), "i".to_string()),
                ("vat22-2".to_string(), "i".to_string()),
            ]
        );
        assert_eq!(b.depth(INN), 1, "the receipt no register can take waits");

        // The API asks before queueing: one register that fits is enough.
        assert_eq!(b.unservable(INN, &paper), None);
        assert_eq!(b.unservable(INN, &vat22), None);
        // Registers are looked at in ZN order: "i" (internet mode) answers first.
        assert_eq!(
            b.unservable(INN, &both).as_ref().map(Mismatch::field),
            Some("email")
        );
        assert_eq!(
            b.unservable(OTHER_INN, &both),
            None,
            "no register known yet"
        );
        let patent = Requirements {
            taxation: TaxationSystem::Patent,
            ..needs()
        };
        assert!(matches!(
            b.unservable(INN, &patent),
            Some(Mismatch::Taxation { .. })
        ));
    }

    #[test]
    fn fewest_in_flight_first_then_headroom_and_at_most_max_in_flight() {
        let mut roomy = state("b", INN);
        roomy.fn_info.documents_used = 5;
        let mut b = with(&[("a", state("a", INN)), ("b", roomy)]);
        for i in 0..6 {
            b.enqueue(place(i), job(&format!("r{i}")));
        }
        let d = dispatches(&b.poll(NOW));
        // b has more headroom so it goes first; then they alternate; two each, FIFO order.
        assert_eq!(
            d,
            vec![
                ("r0".to_string(), "b".to_string()),
                ("r1".to_string(), "a".to_string()),
                ("r2".to_string(), "b".to_string()),
                ("r3".to_string(), "a".to_string()),
            ]
        );
        assert_eq!(b.depth(INN), 2);
        assert!(dispatches(&b.poll(NOW)).is_empty());
        assert_eq!(b.job_done("r1", "a", &Outcome::Completed, 1, NOW), None);
        assert_eq!(
            dispatches(&b.poll(NOW)),
            vec![("r4".to_string(), "a".to_string())]
        );
    }

    #[test]
    fn a_job_that_came_back_keeps_its_place_and_avoids_the_register_that_failed() {
        let mut b = with(&[("a", state("a", INN)), ("b", state("b", INN))]);
        b.config.max_in_flight = 1;
        b.enqueue(place(1), job("r1"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r1".into(), "a".into())]);
        b.enqueue(place(2), job("r2"));
        b.enqueue(place(3), job("r3"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r2".into(), "b".into())]);
        // r1 fails on a for a transient reason; it comes back ahead of r3 and avoids a.
        let v = b.job_done("r1", "a", &fail_with(ErrorCode::NO_CONNECTION), 1, NOW);
        assert_eq!(v, Some(Verdict::Requeue));
        b.enqueue(
            place(1),
            Waiting {
                avoid: Some("a".into()),
                ..job("r1")
            },
        );
        // a is in backoff after the transient fault, b is full: nothing moves.
        assert!(dispatches(&b.poll(NOW)).is_empty());
        b.job_done("r2", "b", &Outcome::Completed, 1, NOW);
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r1".into(), "b".into())]);
        // With only the avoided register able to take a job, it still gets it.
        let mut only_a = with(&[("a", state("a", INN))]);
        only_a.enqueue(
            place(1),
            Waiting {
                avoid: Some("a".into()),
                ..job("x")
            },
        );
        assert_eq!(
            dispatches(&only_a.poll(NOW)),
            vec![("x".into(), "a".into())]
        );
    }

    #[test]
    fn paper_out_takes_the_register_out_until_a_fresh_status_says_otherwise() {
        let mut b = with(&[("a", state("a", INN)), ("b", state("b", INN))]);
        b.enqueue(place(1), job("r1"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r1".into(), "a".into())]);
        let v = b.job_done("r1", "a", &fail_with(ErrorCode::NO_PAPER), 1, NOW);
        assert_eq!(v, Some(Verdict::Requeue));
        b.enqueue(place(1), job("r1"));
        b.enqueue(place(2), job("r2"));
        b.enqueue(place(3), job("r3"));
        let d = dispatches(&b.poll(NOW));
        assert!(d.iter().all(|(_, k)| k == "b"), "{d:?}");
        assert!(matches!(
            b.registers(NOW)[0].pool,
            PoolState::DeviceFault(_)
        ));
        // A fresh status with paper in brings it back.
        b.status("a", state("a", INN), NOW + 10);
        assert_eq!(
            dispatches(&b.poll(NOW + 10)),
            vec![("r3".into(), "a".into())]
        );
    }

    #[test]
    fn fn_errors_retire_the_register_and_receipt_errors_fail_the_receipt() {
        let mut b = with(&[("a", state("a", INN)), ("b", state("b", INN))]);
        b.enqueue(place(1), job("r1"));
        b.poll(NOW);
        let v = b.job_done("r1", "a", &fail_with(ErrorCode::FN_ARCHIVE_FULL), 1, NOW);
        assert_eq!(v, Some(Verdict::Requeue));
        assert!(matches!(
            b.registers(NOW)[0].pool,
            PoolState::DeviceFault(_)
        ));
        let mut full = state("a", INN);
        full.fn_info.block = Some(0x06);
        b.status("a", full, NOW);
        assert!(matches!(b.registers(NOW)[0].pool, PoolState::FnRetired(_)));

        b.enqueue(place(2), job("r2"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r2".into(), "b".into())]);
        match b.job_done("r2", "b", &fail_with(ErrorCode::INVALID_PARAMETER), 1, NOW) {
            Some(Verdict::Fail(why)) => assert!(why.contains("refused the receipt"), "{why}"),
            other => panic!("{other:?}"),
        }
        b.enqueue(place(3), job("r3"));
        b.poll(NOW);
        let max = b.config.max_attempts;
        match b.job_done("r3", "b", &Outcome::Refused, max, NOW) {
            Some(Verdict::Requeue) => {}
            other => panic!("a refusal is not the receipt's fault: {other:?}"),
        }
        b.enqueue(place(3), job("r3"));
        b.poll(NOW);
        match b.job_done("r3", "b", &fail_with(ErrorCode::NO_CONNECTION), max, NOW) {
            Some(Verdict::Fail(why)) => assert!(why.contains("attempts"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shift_rotates_by_the_registers_clock_after_draining() {
        // The register's clock is 23 h 40 min ahead of the controller: its shift (opened at
        // its own NOW-1h) runs out in 20 min by its clock.
        let mut s = state("a", INN);
        let ahead = 23 * 3600 + 40 * 60;
        s.device.date_time += ahead;
        s.shift.opened_at = Some(NOW_S + ahead - 23 * 3600 - 40 * 60);
        s.shift.expires_at = Some(s.shift.opened_at.unwrap() + 86_400);
        s.device.date_time = s.shift.expires_at.unwrap() - 20 * 60;
        let mut b = with(&[("a", s.clone())]);
        b.set_held(vec![("busy".to_string(), "a".to_string())]);
        b.enqueue(place(1), job("r1"));
        let actions = b.poll(NOW);
        assert!(
            actions.is_empty(),
            "draining: no new job, no close yet: {actions:?}"
        );
        assert_eq!(b.registers(NOW)[0].pool, PoolState::Rotating);
        b.job_done("busy", "a", &Outcome::Completed, 1, NOW);
        let actions = b.poll(NOW);
        assert_eq!(
            actions,
            vec![Action::CloseShift {
                kkt: "a".into(),
                why: Rotation::Limit
            }]
        );
        assert!(b.poll(NOW).is_empty(), "one command at a time");
        b.command_done("a", CommandKind::CloseShift, Ok(()), NOW);
        assert!(b.poll(NOW).is_empty(), "waits for the fresh status");
        s.device.shift = ShiftState::Closed;
        s.shift.state = ShiftState::Closed;
        b.status("a", s.clone(), NOW + 1);
        assert_eq!(b.poll(NOW + 1), vec![Action::OpenShift { kkt: "a".into() }]);
        b.command_done("a", CommandKind::OpenShift, Ok(()), NOW + 2);
        s.device.shift = ShiftState::Opened;
        s.shift = ShiftStatus {
            state: ShiftState::Opened,
            number: 2,
            opened_at: Some(s.device.date_time),
            expires_at: Some(s.device.date_time + 86_400),
            receipts: 0,
            documents: 1,
        };
        b.status("a", s, NOW + 3);
        assert_eq!(
            dispatches(&b.poll(NOW + 3)),
            vec![("r1".into(), "a".into())]
        );
    }

    #[test]
    fn an_expired_shift_or_a_shift_error_is_closed_and_reopened() {
        let mut s = state("a", INN);
        s.device.shift = ShiftState::Expired;
        s.shift.state = ShiftState::Expired;
        let mut b = with(&[("a", s)]);
        assert_eq!(
            b.poll(NOW),
            vec![Action::CloseShift {
                kkt: "a".into(),
                why: Rotation::Expired
            }]
        );
        let mut b = with(&[("a", state("a", INN))]);
        b.enqueue(place(1), job("r1"));
        b.poll(NOW);
        b.job_done("r1", "a", &fail_with(ErrorCode::SHIFT_EXPIRED), 1, NOW);
        assert_eq!(
            b.poll(NOW),
            vec![Action::CloseShift {
                kkt: "a".into(),
                why: Rotation::Expired
            }]
        );
    }

    #[test]
    fn daily_close_rotates_a_shift_opened_before_the_daily_time() {
        // 03:00 Moscow = 00:00 UTC. The shift was opened at 11:00 UTC yesterday... no: at
        // NOW-13h = 23:00 UTC the day before, i.e. before today's 00:00 UTC.
        let mut s = state("a", INN);
        s.shift.opened_at = Some(NOW_S - 13 * 3600);
        s.shift.expires_at = Some(NOW_S - 13 * 3600 + 86_400);
        let mut b = with(&[("a", s.clone())]);
        b.config.daily_close_at = Some(3 * 3600);
        assert_eq!(
            b.poll(NOW),
            vec![Action::CloseShift {
                kkt: "a".into(),
                why: Rotation::Daily
            }]
        );
        // Opened after today's 03:00 Moscow: nothing to do.
        s.shift.opened_at = Some(NOW_S - 3600);
        let mut b = with(&[("a", s)]);
        b.config.daily_close_at = Some(3 * 3600);
        assert!(b.poll(NOW).is_empty());
    }

    #[test]
    fn a_closed_shift_is_opened_only_when_its_inn_has_work() {
        let mut s = state("a", INN);
        s.device.shift = ShiftState::Closed;
        s.shift.state = ShiftState::Closed;
        let mut b = with(&[("a", s)]);
        assert!(b.poll(NOW).is_empty());
        let mut other = place(1);
        other.inn = OTHER_INN.into();
        b.enqueue(other, job("x"));
        assert!(b.poll(NOW).is_empty(), "work of another INN");
        b.enqueue(place(2), job("r1"));
        assert_eq!(b.poll(NOW), vec![Action::OpenShift { kkt: "a".into() }]);
        // A refusal because it is already open only means our status was stale: ask for a
        // fresh one at once, and take receipts as soon as it shows the shift open.
        b.command_done(
            "a",
            CommandKind::OpenShift,
            Err(&KktError::new(ErrorCode::SHIFT_OPEN, "open")),
            NOW,
        );
        assert_eq!(
            b.registers(NOW)[0].pool,
            PoolState::Busy(CommandKind::Probe),
            "settling until a fresh status"
        );
        assert_eq!(b.poll(NOW), vec![Action::Probe { kkt: "a".into() }]);
        b.command_done("a", CommandKind::Probe, Ok(()), NOW + 1);
        b.status("a", state("a", INN), NOW + 2);
        assert_eq!(
            dispatches(&b.poll(NOW + 2)),
            vec![("r1".into(), "a".into())]
        );
    }

    /// A status whose two shift readings disagree (the agent reads them with separate calls; a
    /// command ran between them) is neither open nor closed: no command, no receipts, a probe.
    #[test]
    fn a_torn_status_is_probed_not_acted_on() {
        let mut torn = state("a", INN);
        torn.device.shift = ShiftState::Closed;
        let mut b = with(&[("a", torn)]);
        b.config.probe_faulty_every_ms = 100;
        b.enqueue(place(1), job("r1"));
        assert!(b.poll(NOW).is_empty());
        assert_eq!(b.registers(NOW)[0].pool, PoolState::ShiftClosed);
        assert_eq!(b.poll(NOW + 100), vec![Action::Probe { kkt: "a".into() }]);
        b.command_done("a", CommandKind::Probe, Ok(()), NOW + 101);
        b.status("a", state("a", INN), NOW + 102);
        assert_eq!(
            dispatches(&b.poll(NOW + 102)),
            vec![("r1".into(), "a".into())]
        );
    }

    /// The fresh status can reach the controller before the command's own answer; it must not
    /// be ignored (the register would sit out the whole settle time).
    #[test]
    fn a_status_ahead_of_the_command_answer_counts() {
        let mut s = state("a", INN);
        s.device.shift = ShiftState::Closed;
        s.shift.state = ShiftState::Closed;
        let mut b = with(&[("a", s)]);
        b.enqueue(place(1), job("r1"));
        assert_eq!(b.poll(NOW), vec![Action::OpenShift { kkt: "a".into() }]);
        b.status("a", state("a", INN), NOW + 5);
        b.command_done("a", CommandKind::OpenShift, Ok(()), NOW + 6);
        assert_eq!(
            dispatches(&b.poll(NOW + 10)),
            vec![("r1".into(), "a".into())]
        );
    }

    #[test]
    fn registers_are_probed_and_faulty_ones_more_often() {
        let mut b = Balancer::new(BalancerConfig {
            probe_every_ms: 60_000,
            probe_faulty_every_ms: 2_000,
            ..BalancerConfig::default()
        });
        b.online("a", "agent-1");
        assert_eq!(b.poll(NOW), vec![Action::Probe { kkt: "a".into() }]);
        assert!(b.poll(NOW + 5_000).is_empty(), "busy with the probe");
        b.command_done("a", CommandKind::Probe, Ok(()), NOW + 10);
        b.status("a", state("a", INN), NOW + 20);
        assert!(b.poll(NOW + 30_000).is_empty());
        assert_eq!(
            b.poll(NOW + 60_000),
            vec![Action::Probe { kkt: "a".into() }]
        );
        b.command_done("a", CommandKind::Probe, Ok(()), NOW + 60_010);
        b.enqueue(place(1), job("r1"));
        b.poll(NOW + 60_020);
        b.job_done("r1", "a", &fail_with(ErrorCode::NO_PAPER), 1, NOW + 60_030);
        assert!(b.poll(NOW + 61_000).is_empty());
        assert_eq!(
            b.poll(NOW + 62_100),
            vec![Action::Probe { kkt: "a".into() }]
        );
        // A command that never reached the register frees it after a backoff.
        b.command_lost("a", CommandKind::Probe, NOW + 62_200);
        assert!(b.poll(NOW + 63_000).is_empty());
    }

    #[test]
    fn offline_registers_get_nothing_and_their_jobs_stay_held() {
        let mut b = with(&[("a", state("a", INN)), ("b", state("b", INN))]);
        b.enqueue(place(1), job("r1"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r1".into(), "a".into())]);
        b.offline("a");
        b.enqueue(place(2), job("r2"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r2".into(), "b".into())]);
        assert_eq!(b.held(), 2, "r1 is in doubt, not forgotten");
        // A held job is not queued again by a stray enqueue.
        b.enqueue(place(1), job("r1"));
        assert_eq!(b.depth(INN), 0);
        // Back online, it still holds r1: with a limit of one, nothing more for it.
        b.config.max_in_flight = 1;
        b.online("a", "agent-1");
        b.status("a", state("a", INN), NOW);
        assert_eq!(b.registers(NOW)[0].in_flight, 1);
        b.enqueue(place(3), job("r3"));
        assert!(dispatches(&b.poll(NOW)).is_empty());
        b.job_done("r1", "a", &Outcome::Released, 1, NOW);
        b.enqueue(place(1), job("r1"));
        assert_eq!(b.depth(INN), 2);
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r1".into(), "a".into())]);
    }

    #[test]
    fn a_failed_dispatch_puts_the_job_back_in_its_place() {
        let mut b = with(&[("a", state("a", INN))]);
        b.enqueue(place(5), job("r5"));
        b.poll(NOW);
        b.enqueue(place(6), job("r6"));
        b.dispatch_failed("r5", "a", Some((place(5), job("r5"))));
        assert_eq!(b.held(), 0);
        let d = dispatches(&b.poll(NOW));
        assert_eq!(d[0], ("r5".into(), "a".into()));
    }

    #[test]
    fn an_agent_refusal_rests_the_register_until_a_fresh_status() {
        let mut b = with(&[("a", state("a", INN)), ("b", state("b", INN))]);
        b.enqueue(place(1), job("r1"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r1".into(), "a".into())]);
        assert_eq!(
            b.job_done("r1", "a", &Outcome::Refused, 0, NOW),
            Some(Verdict::Requeue)
        );
        b.enqueue(place(1), job("r1"));
        b.enqueue(place(2), job("r2"));
        let d = dispatches(&b.poll(NOW));
        assert!(d.iter().all(|(_, k)| k == "b"), "{d:?}");
        b.status("a", state("a", INN), NOW + 1);
        b.job_done("r1", "b", &Outcome::Completed, 0, NOW + 1);
        b.enqueue(place(3), job("r3"));
        assert_eq!(
            dispatches(&b.poll(NOW + 1)),
            vec![("r3".into(), "a".into())]
        );
    }

    #[test]
    fn a_stale_report_does_not_free_another_registers_slot() {
        let mut b = with(&[("a", state("a", INN)), ("b", state("b", INN))]);
        b.config.max_in_flight = 1;
        b.enqueue(place(1), job("r1"));
        assert_eq!(dispatches(&b.poll(NOW)), vec![("r1".into(), "a".into())]);
        // A report that names b for r1 (stale, or a failed duplicate dispatch) changes nothing.
        b.dispatch_failed("r1", "b", None);
        b.job_done("r1", "b", &Outcome::Released, 0, NOW);
        assert_eq!(b.held(), 1);
        assert_eq!(b.registers(NOW)[0].in_flight, 1);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashSet;

        #[derive(Debug, Clone)]
        enum Op {
            Enqueue,
            Poll,
            Done(usize, u8),
            Paper(usize, bool),
            Offline(usize),
            Online(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => Just(Op::Enqueue),
                3 => Just(Op::Poll),
                3 => (0usize..64, 0u8..5).prop_map(|(i, o)| Op::Done(i, o)),
                1 => (0usize..3, any::<bool>()).prop_map(|(r, p)| Op::Paper(r, p)),
                1 => (0usize..3).prop_map(Op::Offline),
                1 => (0usize..3).prop_map(Op::Online),
            ]
        }

        proptest! {
            /// Against a model of who holds what: a job is never given out while held, never
            /// both waiting and held, no register exceeds its in-flight limit, and only
            /// eligible registers (online, paper in) get work.
            #[test]
            fn the_balancer_never_double_books(ops in proptest::collection::vec(op(), 1..200)) {
                let zns = ["a", "b", "c"];
                let mut b = with(&[("a", state("a", INN)), ("b", state("b", INN)), ("c", state("c", INN))]);
                let mut next = 0u64;
                let mut held: Vec<(String, String)> = Vec::new();
                let mut waiting: HashSet<String> = HashSet::new();
                let mut online: HashSet<&str> = zns.iter().copied().collect();
                let mut paper: HashSet<&str> = zns.iter().copied().collect();
                let mut t = NOW;
                for op in ops {
                    t += 1;
                    match op {
                        Op::Enqueue => {
                            next += 1;
                            let id = format!("r{next}");
                            b.enqueue(place(next), job(&id));
                            waiting.insert(id);
                        }
                        Op::Poll => {
                            for (job_id, kkt) in dispatches(&b.poll(t)) {
                                prop_assert!(waiting.remove(&job_id), "{job_id} was not waiting");
                                prop_assert!(!held.iter().any(|(j, _)| *j == job_id));
                                prop_assert!(online.contains(kkt.as_str()));
                                prop_assert!(paper.contains(kkt.as_str()), "{kkt} has no paper");
                                held.push((job_id, kkt));
                            }
                        }
                        Op::Done(i, o) => {
                            if held.is_empty() { continue; }
                            let (job_id, kkt) = held.remove(i % held.len());
                            let outcome = match o {
                                0 => Outcome::Completed,
                                1 => Outcome::Refused,
                                2 => Outcome::Released,
                                3 => fail_with(ErrorCode::NO_PAPER),
                                _ => fail_with(ErrorCode::NO_CONNECTION),
                            };
                            let v = b.job_done(&job_id, &kkt, &outcome, 1, t);
                            if v == Some(Verdict::Requeue) {
                                let order: u64 = job_id[1..].parse().unwrap();
                                b.enqueue(place(order), job(&job_id));
                                waiting.insert(job_id);
                            }
                        }
                        Op::Paper(r, present) => {
                            let zn = zns[r];
                            let mut s = state(zn, INN);
                            s.device.paper_present = present;
                            if present { paper.insert(zn); } else { paper.remove(zn); }
                            b.status(zn, s, t);
                        }
                        Op::Offline(r) => {
                            b.offline(zns[r]);
                            online.remove(zns[r]);
                        }
                        Op::Online(r) => {
                            let zn = zns[r];
                            if online.insert(zn) {
                                b.online(zn, "agent-1");
                                let mut s = state(zn, INN);
                                s.device.paper_present = paper.contains(zn);
                                b.status(zn, s, t);
                                b.registers.get_mut(zn).unwrap().last_probe = t;
                                let mine = held.iter().filter(|(_, k)| k == zn).count();
                                b.registers.get_mut(zn).unwrap().held = mine;
                            }
                        }
                    }
                    for r in b.registers(t) {
                        prop_assert!(r.in_flight <= b.config.max_in_flight, "{} holds {}", r.zn, r.in_flight);
                    }
                    prop_assert_eq!(b.depth(INN), waiting.len());
                    prop_assert_eq!(b.held(), held.len());
                }
            }
        }
    }
}
