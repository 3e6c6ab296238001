//! The worker's counters, defined with the host once per root context (Envoy shares them by
//! name across workers and shows them as `wasmcustom.plan_limits.*`).
//!
//! Counters and gauges are added to the host at the worker's tick (`flush` every
//! `flush_interval_ms`), one host call per metric changed, not one per request: a request's
//! outcome counters were two of an unlimited request's dozen host calls.

use std::cell::RefCell;
use std::collections::HashMap;

use plan_limits_core::{LabeledMetric, Metric, MetricKind};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

pub struct MetricIds {
    /// The host's id of each of `Metric::ALL`, in order; `None` if the host refused it.
    ids: Vec<(Metric, Option<u32>)>,
    /// Labeled metrics, defined the first time each label set is seen (a few hundred at most:
    /// actions x plans x outcomes; never per user).
    labeled: RefCell<HashMap<String, Option<u32>>>,
    /// Counter and gauge changes not yet added to the host, by the host's id.
    pending: RefCell<Vec<(u32, i64)>>,
}

impl MetricIds {
    pub fn define() -> Self {
        let ids = Metric::ALL
            .iter()
            .map(|&m| {
                (
                    m,
                    hostcalls::define_metric(MetricType::Counter, m.name()).ok(),
                )
            })
            .collect();
        Self {
            ids,
            labeled: RefCell::new(HashMap::new()),
            pending: RefCell::new(Vec::new()),
        }
    }

    /// Adds the changes since the last flush to the host.
    pub fn flush(&self) {
        for (id, delta) in self.pending.borrow_mut().drain(..) {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }

    fn add(&self, id: u32, delta: i64) {
        let mut pending = self.pending.borrow_mut();
        match pending.iter_mut().find(|(pending, _)| *pending == id) {
            Some((_, sum)) => *sum = sum.saturating_add(delta),
            None => pending.push((id, delta)),
        }
    }

    /// Adds to a labeled counter or gauge, or records a histogram's observation.
    pub fn record(&self, metric: &LabeledMetric, value: i64) {
        let mut labeled = self.labeled.borrow_mut();
        let known = labeled.get(&metric.name).copied();
        let id = known.unwrap_or_else(|| {
            let kind = match metric.kind {
                MetricKind::Counter => MetricType::Counter,
                MetricKind::Gauge => MetricType::Gauge,
                MetricKind::Histogram => MetricType::Histogram,
            };
            let id = hostcalls::define_metric(kind, &metric.name).ok();
            labeled.insert(metric.name.clone(), id);
            id
        });
        let Some(id) = id else { return };
        match metric.kind {
            // (An observation, not a sum: recorded as it is made.)
            MetricKind::Histogram => {
                let _ = hostcalls::record_metric(id, u64::try_from(value).unwrap_or(0));
            }
            MetricKind::Counter | MetricKind::Gauge => self.add(id, value),
        }
    }

    pub fn increment(&self, metric: Metric, by: u64) {
        if by == 0 {
            return;
        }
        let id = self
            .ids
            .iter()
            .find(|(m, _)| *m == metric)
            .and_then(|(_, id)| *id);
        if let Some(id) = id {
            self.add(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }
}

impl Drop for MetricIds {
    /// A root context replaced by a new configuration, or the last stream of one, goes with
    /// what it counted since its last tick added.
    fn drop(&mut self) {
        self.flush();
    }
}
