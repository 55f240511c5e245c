//! The dispatcher: the async shell around the [`Balancer`]. It feeds the balancer what the
//! tunnel reports, carries out its actions (dispatches, shift commands, status probes) and writes
//! the outcomes that the balancer decides but the store must keep (a receipt given up).
//!
//! # Invariants
//! * The dispatcher never changes a job's durable state by itself except through the store's
//!   rules: `Tunnel::dispatch` (assignment before sending) and `Store::fail_job` (only a queued
//!   job). Whatever the in-memory view gets wrong, a job cannot be fiscalized twice.
//! * The in-memory queue is rebuilt from the store at start (`queue` table) and is otherwise fed
//!   by the API after each durable accept and by the tunnel's events when a job comes back. If
//!   the event stream lags, the view is rebuilt from the store and the tunnel.
//! * A job held by an agent that went away stays held ("in doubt"): it is not re-sent until the
//!   agent reconnects and reports it or proves it never got it.

use crate::balancer::{
    Action, Balancer, BalancerConfig, CommandKind, Outcome, RegisterReport, Verdict, Waiting,
};
use crate::metrics::Metrics;
use crate::rules::{Job, QueuePlace, SetbackKind};
use crate::store::{FleetStore, Store, StoreError};
use crate::tunnel::{DispatchError, Tunnel, TunnelEvent};
use crate::unix_ms;
use protocol::kkt::{Call, Operator};
use protocol::receipt::{Mismatch, Requirements};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};
use tracing::{info, warn};

/// How long a shift or status command may take before the balancer stops waiting for it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the balancer looks again without being woken (clock-driven rules: shift limits,
/// probes, backoffs).
const TICK: Duration = Duration::from_millis(500);

/// The dispatcher. Cheap to clone.
/// Generic over its store ([`FleetStore`]), like the tunnel it drives.
#[derive(Clone)]
pub struct Dispatcher<S: FleetStore = Store> {
    inner: Arc<Inner<S>>,
}

struct Inner<S: FleetStore> {
    balancer: Mutex<Balancer>,
    /// Receipts admitted per INN whose commit is not done yet (see [`Dispatcher::admit`]).
    admitted: Mutex<HashMap<String, usize>>,
    wake: Notify,
    tunnel: Tunnel<S>,
    store: S,
    metrics: Arc<Metrics>,
    stop: Notify,
}

/// The balancer's view of a job the store holds.
pub fn waiting_of(job: &Job) -> Option<(QueuePlace, Waiting)> {
    let place = job.waiting_in()?.clone();
    let avoid = job.last_error.as_ref().and_then(|e| match e.kind {
        // Released: the register never saw it; no reason to avoid it.
        SetbackKind::Released => None,
        _ => Some(e.kkt.clone()),
    });
    Some((
        place,
        Waiting {
            job: job.id.clone(),
            needs: job.work.params().receipt.requirements(),
            avoid,
        },
    ))
}

impl<S: FleetStore> Dispatcher<S> {
    /// Loads the queue from the store and starts the loop.
    pub fn start(
        tunnel: Tunnel<S>,
        config: BalancerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Dispatcher<S>, StoreError> {
        let store = tunnel.store().clone();
        let mut balancer = Balancer::new(config);
        let events = tunnel.subscribe();
        load(&mut balancer, &store, &tunnel)?;
        let d = Dispatcher {
            inner: Arc::new(Inner {
                balancer: Mutex::new(balancer),
                admitted: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                tunnel,
                store,
                metrics,
                stop: Notify::new(),
            }),
        };
        info!(
            queued = d
                .inner
                .lock()
                .depths()
                .iter()
                .map(|(_, n)| n)
                .sum::<usize>(),
            "dispatcher started"
        );
        tokio::spawn(run(d.inner.clone(), events));
        Ok(d)
    }

    /// A receipt is durable and waits at `place`.
    pub fn enqueue(&self, place: QueuePlace, waiting: Waiting) {
        self.inner.lock().enqueue(place, waiting);
        self.inner.wake.notify_one();
    }

    /// Reserves a place in `inn`'s queue for a receipt about to be committed, or says how full
    /// the queue is. The queue limit counts receipts waiting *and* receipts admitted but not yet
    /// committed: checking the depth alone would let every request of one group commit through,
    /// which is exactly the burst the limit exists for. Hold the admission until the receipt is
    /// enqueued (or refused); dropping it releases the place.
    pub fn admit(&self, inn: &str, max: usize) -> Result<Admission<S>, usize> {
        // Lock order: admissions, then the balancer (an enqueue takes only the balancer, an
        // admission's release only the admissions), so the depth read and the reservation are
        // one step: no receipt can move from "admitted" to "waiting" between them unseen.
        let mut admitted = self
            .inner
            .admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let depth = self.inner.lock().depth(inn);
        let pending = admitted.entry(inn.to_owned()).or_default();
        if depth + *pending >= max {
            return Err(depth + *pending);
        }
        *pending += 1;
        Ok(Admission {
            inner: self.inner.clone(),
            inn: inn.to_owned(),
        })
    }

    /// Why no register of `inn` is registered to take a receipt with `needs` (see
    /// [`Balancer::unservable`]); the API refuses such a receipt rather than queue it forever.
    pub fn unservable(&self, inn: &str, needs: &Requirements) -> Option<Mismatch> {
        self.inner.lock().unservable(inn, needs)
    }

    pub fn depth(&self, inn: &str) -> usize {
        self.inner.lock().depth(inn)
    }

    pub fn depths(&self) -> Vec<(String, usize)> {
        self.inner.lock().depths()
    }

    pub fn registers(&self) -> Vec<RegisterReport> {
        self.inner.lock().registers(unix_ms())
    }

    pub fn held(&self) -> usize {
        self.inner.lock().held()
    }

    /// Stops the loop (in-flight commands finish on their own).
    pub fn stop(&self) {
        self.inner.stop.notify_one();
    }
}

/// A receipt's reserved place in its INN's queue; see [`Dispatcher::admit`].
pub struct Admission<S: FleetStore = Store> {
    inner: Arc<Inner<S>>,
    inn: String,
}

impl<S: FleetStore> Drop for Admission<S> {
    fn drop(&mut self) {
        let mut admitted = self
            .inner
            .admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = admitted.get_mut(&self.inn) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                admitted.remove(&self.inn);
            }
        }
    }
}

impl<S: FleetStore> Inner<S> {
    fn lock(&self) -> MutexGuard<'_, Balancer> {
        self.balancer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn load<S: FleetStore>(
    balancer: &mut Balancer,
    store: &S,
    tunnel: &Tunnel<S>,
) -> Result<(), StoreError> {
    for kkt in tunnel.online_kkts() {
        balancer.online(&kkt.zn, &kkt.agent);
        if let Some(state) = kkt.state {
            balancer.status(&kkt.zn, state, unix_ms());
        }
    }
    balancer.set_held(
        store
            .in_flight()?
            .into_iter()
            .map(|(_, job, kkt)| (job, kkt)),
    );
    for (_, job_id) in store.queued()? {
        if let Some(job) = store.job(&job_id)? {
            if let Some((place, w)) = waiting_of(&job) {
                balancer.enqueue(place, w);
            }
        }
    }
    Ok(())
}

async fn run<S: FleetStore>(inner: Arc<Inner<S>>, mut events: broadcast::Receiver<TunnelEvent>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => {
                match ev {
                    Ok(e) => on_event(&inner, e),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "dispatcher lagged behind the tunnel's events; rebuilding its view from the store");
                        resync(&inner);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                // Take everything already waiting before deciding once.
                loop {
                    match events.try_recv() {
                        Ok(e) => on_event(&inner, e),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => resync(&inner),
                        Err(_) => break,
                    }
                }
            }
            _ = inner.wake.notified() => {}
            _ = tick.tick() => {}
            _ = inner.stop.notified() => return,
        }
        let actions = inner.lock().poll(unix_ms());
        for action in actions {
            execute(&inner, action);
        }
    }
}

fn resync<S: FleetStore>(inner: &Arc<Inner<S>>) {
    let mut fresh = Balancer::new(inner.lock().config().clone());
    match load(&mut fresh, &inner.store, &inner.tunnel) {
        Ok(()) => *inner.lock() = fresh,
        Err(e) => warn!(error = %e, "cannot rebuild the dispatcher's view; keeping the old one"),
    }
}

/// The register's state as the tunnel last applied it (the event only names the register).
fn fresh_state<S: FleetStore>(inner: &Inner<S>, kkt: &str) -> Option<protocol::tunnel::KktState> {
    inner.tunnel.online_kkt(kkt).and_then(|k| k.state)
}

fn on_event<S: FleetStore>(inner: &Arc<Inner<S>>, event: TunnelEvent) {
    let now = unix_ms();
    match event {
        TunnelEvent::KktAttached { agent, kkt } => {
            let mut b = inner.lock();
            b.online(&kkt, &agent);
            if let Some(state) = fresh_state(inner, &kkt) {
                b.status(&kkt, state, now);
            }
        }
        TunnelEvent::KktStatus { kkt, .. } => {
            if let Some(state) = fresh_state(inner, &kkt) {
                inner.lock().status(&kkt, state, now);
            }
        }
        TunnelEvent::KktEvent { kkt, event, .. } => {
            if matches!(*event, protocol::kkt::Event::StatusChanged(_)) {
                if let Some(state) = fresh_state(inner, &kkt) {
                    inner.lock().status(&kkt, state, now);
                }
            }
        }
        TunnelEvent::KktDetached { kkt, .. } => inner.lock().offline(&kkt),
        TunnelEvent::AgentDisconnected { agent, .. } => {
            let mut b = inner.lock();
            let gone: Vec<String> = b
                .registers(now)
                .into_iter()
                .filter(|r| r.agent == agent)
                .map(|r| r.zn)
                .collect();
            for zn in gone {
                b.offline(&zn);
            }
        }
        TunnelEvent::JobCompleted { job, kkt, .. } => {
            inner.metrics.completed();
            inner
                .lock()
                .job_done(&job, &kkt, &Outcome::Completed, 0, now);
        }
        TunnelEvent::JobNotFiscalized {
            job, kkt, error, ..
        } => came_back(inner, &job, &kkt, Outcome::NotFiscalized(error), now),
        TunnelEvent::JobRefused { job, kkt, .. } => {
            came_back(inner, &job, &kkt, Outcome::Refused, now)
        }
        TunnelEvent::JobReleased { job, kkt, .. } => {
            came_back(inner, &job, &kkt, Outcome::Released, now)
        }
        TunnelEvent::ReceiptsConfirmed { jobs } => inner.metrics.confirmed(jobs.len()),
        _ => {}
    }
}

/// A job came back without a document: queue it again or give it up, as the balancer says.
fn came_back<S: FleetStore>(
    inner: &Arc<Inner<S>>,
    job: &str,
    kkt: &str,
    outcome: Outcome,
    now: u64,
) {
    let record = match inner.store.job(job) {
        Ok(Some(j)) => j,
        Ok(None) => return,
        Err(e) => {
            warn!(job, error = %e, "cannot read a job that came back; resynchronising");
            resync(inner);
            return;
        }
    };
    let verdict = inner
        .lock()
        .job_done(job, kkt, &outcome, record.failures, now);
    match verdict {
        Some(Verdict::Requeue) => {
            if let Some((place, w)) = waiting_of(&record) {
                inner.lock().enqueue(place, w);
            }
        }
        Some(Verdict::Fail(reason)) => {
            inner.lock().remove(job);
            let (inner, job) = (inner.clone(), job.to_owned());
            tokio::spawn(async move {
                match inner.store.fail_job(&job, reason.clone(), unix_ms()).await {
                    Ok(true) => {
                        inner.metrics.failed();
                        warn!(job, reason, "receipt given up: KKT_ERROR");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // Still queued in the store: keep it in the queue rather than lose it
                        // from view until a restart.
                        warn!(job, error = %e, "cannot record a receipt as failed; it stays queued");
                        if let Ok(Some(j)) = inner.store.job(&job) {
                            if let Some((place, w)) = waiting_of(&j) {
                                inner.lock().enqueue(place, w);
                            }
                        }
                    }
                }
            });
        }
        None => {}
    }
}

fn execute<S: FleetStore>(inner: &Arc<Inner<S>>, action: Action) {
    match action {
        Action::Dispatch { job, kkt } => {
            let inner = inner.clone();
            tokio::spawn(async move { dispatch(&inner, job, kkt).await });
        }
        Action::OpenShift { kkt } => command(inner, kkt, CommandKind::OpenShift),
        Action::CloseShift { kkt, why } => {
            info!(
                kkt,
                ?why,
                "rotating the shift: the register is drained, closing"
            );
            command(inner, kkt, CommandKind::CloseShift)
        }
        Action::Probe { kkt } => command(inner, kkt, CommandKind::Probe),
    }
}

async fn dispatch<S: FleetStore>(inner: &Arc<Inner<S>>, job: String, kkt: String) {
    let record = match inner.store.job(&job) {
        Ok(Some(j)) => j,
        Ok(None) => {
            warn!(job, "queued job vanished from the store");
            inner.lock().dispatch_failed(&job, &kkt, None);
            return;
        }
        Err(e) => {
            warn!(job, error = %e, "cannot read a queued job");
            resync(inner);
            return;
        }
    };
    let waiting = waiting_of(&record);
    match inner.tunnel.dispatch(&job, &kkt, record.work.clone()).await {
        Ok(_) => {
            inner
                .metrics
                .dispatched(unix_ms().saturating_sub(record.created_at));
        }
        Err(e) => {
            let back = match &e {
                // Nothing was recorded, or the store put it back: it waits again.
                DispatchError::KktOffline(_) | DispatchError::AgentGone { .. } => true,
                DispatchError::Store(_) => {
                    resync(inner);
                    false
                }
                _ => false,
            };
            warn!(job, kkt, error = %e, "dispatch did not happen");
            // The tunnel is the authority on who is online. A register it does not have leaves
            // the pool until it attaches again (its KktAttached comes after this check, see
            // `Tunnel` events), or the job would go straight back to it in a busy loop.
            if matches!(e, DispatchError::KktOffline(_)) && inner.tunnel.online_kkt(&kkt).is_none()
            {
                inner.lock().offline(&kkt);
            }
            let again = if back {
                inner
                    .store
                    .job(&job)
                    .ok()
                    .flatten()
                    .as_ref()
                    .and_then(waiting_of)
                    .or(waiting)
            } else {
                None
            };
            inner.lock().dispatch_failed(&job, &kkt, again);
            if let DispatchError::TooLarge(_) = e {
                let _ = inner.store.fail_job(&job, e.to_string(), unix_ms()).await;
            }
            inner.wake.notify_one();
        }
    }
}

fn command<S: FleetStore>(inner: &Arc<Inner<S>>, kkt: String, kind: CommandKind) {
    let inner = inner.clone();
    tokio::spawn(async move {
        let call = match kind {
            CommandKind::OpenShift => Call::OpenShift(Operator::default()),
            CommandKind::CloseShift => Call::CloseShift(Operator::default()),
            CommandKind::Probe => Call::GetDeviceStatus,
        };
        let result = inner.tunnel.command(&kkt, call, COMMAND_TIMEOUT).await;
        let now = unix_ms();
        match result {
            Ok(_) => {
                if kind != CommandKind::Probe {
                    info!(kkt, ?kind, "shift command done");
                }
                inner.lock().command_done(&kkt, kind, Ok(()), now);
            }
            Err(crate::tunnel::CommandError::Kkt(e)) => {
                warn!(kkt, ?kind, error = %e, "register refused a command");
                inner.lock().command_done(&kkt, kind, Err(&e), now);
            }
            Err(e) => {
                warn!(kkt, ?kind, error = %e, "command did not reach the register");
                inner.lock().command_lost(&kkt, kind, now);
            }
        }
        inner.wake.notify_one();
    });
}
