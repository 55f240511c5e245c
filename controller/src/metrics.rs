//! Prometheus metrics, rendered by hand in the text exposition format: a handful of counters and
//! one histogram do not justify a metrics framework, and the gauges (queue depth, registers by
//! state, agents online) are read from their owners at scrape time rather than mirrored.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the dispatch-latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// Counters since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected_invalid: AtomicU64,
    rejected_overload: AtomicU64,
    completed: AtomicU64,
    confirmed: AtomicU64,
    failed: AtomicU64,
    callbacks_sent: AtomicU64,
    callbacks_failed: AtomicU64,
    dispatch_buckets: [AtomicU64; BUCKETS.len()],
    dispatch_count: AtomicU64,
    dispatch_sum_ms: AtomicU64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn accepted(&self) {
        inc(&self.accepted, 1)
    }
    pub fn duplicate(&self) {
        inc(&self.duplicates, 1)
    }
    pub fn rejected_invalid(&self) {
        inc(&self.rejected_invalid, 1)
    }
    pub fn rejected_overload(&self) {
        inc(&self.rejected_overload, 1)
    }
    pub fn completed(&self) {
        inc(&self.completed, 1)
    }
    pub fn confirmed(&self, n: usize) {
        inc(&self.confirmed, n as u64)
    }
    pub fn failed(&self) {
        inc(&self.failed, 1)
    }
    pub fn callback(&self, ok: bool) {
        inc(
            if ok {
                &self.callbacks_sent
            } else {
                &self.callbacks_failed
            },
            1,
        )
    }

    /// A job was dispatched `waited_ms` after it was accepted.
    pub fn dispatched(&self, waited_ms: u64) {
        let secs = waited_ms as f64 / 1000.0;
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                inc(&self.dispatch_buckets[i], 1);
            }
        }
        inc(&self.dispatch_count, 1);
        inc(&self.dispatch_sum_ms, waited_ms);
    }

    /// Renders the counters followed by `gauges` (already in exposition format).
    pub fn render(&self, gauges: &Gauges) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(out, "# HELP kkt_receipts_total Receipts by what happened to them since start.\n# TYPE kkt_receipts_total counter");
        for (status, c) in [
            ("NEW", &self.accepted),
            ("PROCESSED", &self.completed),
            ("CONFIRMED", &self.confirmed),
            ("KKT_ERROR", &self.failed),
        ] {
            let _ = writeln!(out, "kkt_receipts_total{{status=\"{status}\"}} {}", get(c));
        }
        let _ = writeln!(out, "# HELP kkt_receipts Receipts in each status now (all time, from the store).\n# TYPE kkt_receipts gauge");
        let r = &gauges.receipts;
        for (status, n) in [
            ("NEW", r.new),
            ("PROCESSED", r.processed),
            ("CONFIRMED", r.confirmed),
            ("KKT_ERROR", r.kkt_error),
        ] {
            let _ = writeln!(out, "kkt_receipts{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP kkt_api_refusals_total Receipts not accepted, by reason.\n# TYPE kkt_api_refusals_total counter");
        for (reason, c) in [
            ("duplicate_invoice", &self.duplicates),
            ("invalid", &self.rejected_invalid),
            ("overloaded", &self.rejected_overload),
        ] {
            let _ = writeln!(
                out,
                "kkt_api_refusals_total{{reason=\"{reason}\"}} {}",
                get(c)
            );
        }
        let _ = writeln!(out, "# HELP kkt_callbacks_total Callback POSTs by result.\n# TYPE kkt_callbacks_total counter");
        let _ = writeln!(
            out,
            "kkt_callbacks_total{{result=\"ok\"}} {}",
            get(&self.callbacks_sent)
        );
        let _ = writeln!(
            out,
            "kkt_callbacks_total{{result=\"failed\"}} {}",
            get(&self.callbacks_failed)
        );
        let _ = writeln!(out, "# HELP kkt_dispatch_latency_seconds From acceptance to the dispatch being recorded.\n# TYPE kkt_dispatch_latency_seconds histogram");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "kkt_dispatch_latency_seconds_bucket{{le=\"{le}\"}} {}",
                get(&self.dispatch_buckets[i])
            );
        }
        let count = get(&self.dispatch_count);
        let _ = writeln!(
            out,
            "kkt_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "kkt_dispatch_latency_seconds_sum {}",
            get(&self.dispatch_sum_ms) as f64 / 1000.0
        );
        let _ = writeln!(out, "kkt_dispatch_latency_seconds_count {count}");

        let _ = writeln!(out, "# HELP kkt_queue_depth Receipts waiting for a register, per INN.\n# TYPE kkt_queue_depth gauge");
        for (inn, n) in &gauges.queue_depth {
            let _ = writeln!(out, "kkt_queue_depth{{inn=\"{inn}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP kkt_jobs_in_flight Receipts given to a register and not yet reported.\n# TYPE kkt_jobs_in_flight gauge\nkkt_jobs_in_flight {}", gauges.in_flight);
        let _ = writeln!(
            out,
            "# HELP kkt_registers Online registers by pool state.\n# TYPE kkt_registers gauge"
        );
        for (state, n) in &gauges.registers {
            let _ = writeln!(out, "kkt_registers{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP kkt_register_unsent_documents Documents a register has not yet delivered to the OFD.\n# TYPE kkt_register_unsent_documents gauge");
        for (zn, n, _) in &gauges.unsent {
            let _ = writeln!(out, "kkt_register_unsent_documents{{zn=\"{zn}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP kkt_register_oldest_unsent_seconds Age of a register's oldest document not delivered to the OFD.\n# TYPE kkt_register_oldest_unsent_seconds gauge");
        for (zn, _, age) in &gauges.unsent {
            if let Some(age) = age {
                let _ = writeln!(
                    out,
                    "kkt_register_oldest_unsent_seconds{{zn=\"{zn}\"}} {age}"
                );
            }
        }
        let _ = writeln!(out, "# HELP kkt_agents_online Agents with a live tunnel.\n# TYPE kkt_agents_online gauge\nkkt_agents_online {}", gauges.agents_online);
        let _ = writeln!(out, "# HELP kkt_callbacks_pending Callbacks not yet taken by the shop's server.\n# TYPE kkt_callbacks_pending gauge\nkkt_callbacks_pending {}", gauges.callbacks_pending);
        out
    }
}

/// Values read at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    pub receipts: crate::store::ReceiptCounts,
    pub queue_depth: Vec<(String, usize)>,
    pub in_flight: usize,
    pub registers: Vec<(String, usize)>,
    /// (ZN, unsent count, oldest unsent age in seconds).
    pub unsent: Vec<(String, u32, Option<i64>)>,
    pub agents_online: usize,
    pub callbacks_pending: usize,
}
