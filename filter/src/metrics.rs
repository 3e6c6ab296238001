//! Counters exposed by Envoy as `wasmcustom.plan_limits.*` on the admin `/stats` endpoint.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        /// Metric ids, defined once per VM (Envoy shares them by name across workers).
        #[derive(Debug, Clone, Copy)]
        pub struct Metrics { $(pub $field: u32,)* }

        impl Metrics {
            pub fn define() -> Self {
                Self { $($field: define(concat!("plan_limits.", stringify!($field))),)* }
            }
        }
    };
}

counters!(
    allowed,
    denied,
    rejected,
    fail_open,
    fail_closed,
    redis_errors,
    counted,
    released,
    commits_unmatched,
    settle_errors,
    settlements_dropped,
);

fn define(name: &str) -> u32 {
    hostcalls::define_metric(MetricType::Counter, name).unwrap_or(u32::MAX)
}

pub fn bump(metric: u32, by: u64) {
    if metric != u32::MAX && by > 0 {
        let _ = hostcalls::increment_metric(metric, by as i64);
    }
}
