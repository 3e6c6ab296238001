//! The worker's counters, defined with the host once per root context (Envoy shares them by
//! name across workers and shows them as `wasmcustom.plan_limits.*`).

use plan_limits_core::metrics::Metric;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

pub struct MetricIds {
    /// The host's id of each of `Metric::ALL`, in order; `None` if the host refused it.
    ids: Vec<(Metric, Option<u32>)>,
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
        Self { ids }
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
