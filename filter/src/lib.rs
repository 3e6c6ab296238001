#![cfg(target_arch = "wasm32")]
//! The proxy-wasm shell of plan-limits: contexts that move data between the host (Envoy, or
//! Higress) and `plan-limits-core`. It exists only in the wasm32 build.
//!
//! - `root`: parses plans.json in `on_configure`, sends settlement batches on each tick;
//! - `http`: one per request, runs the core's request pipeline;
//! - `transport`: how a Redis command travels (webdis, or the Redis host calls);
//! - `metrics`: the counters Envoy exposes on its admin `/stats`.

mod http;
mod metrics;
mod root;
mod transport;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::PlanLimitsRoot::new()) });
}}

/// The host's clock, as the core wants it.
fn now() -> chrono::DateTime<chrono::Utc> {
    let nanos = proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    plan_limits_core::period::from_unix_nanos(nanos)
}
