//! The worker's counters, defined with the host once per root context (Envoy shares them by
//! name across workers and shows them as `wasmcustom.plan_limits.*`).

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
        let _ = match metric.kind {
            MetricKind::Histogram => {
                hostcalls::record_metric(id, u64::try_from(value).unwrap_or(0))
            }
            MetricKind::Counter | MetricKind::Gauge => hostcalls::increment_metric(id, value),
        };
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
            let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }
}
