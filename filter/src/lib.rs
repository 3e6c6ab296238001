#![cfg(target_arch = "wasm32")]
//! The proxy-wasm shell of plan-limits: contexts that move data between the host (Envoy, or
//! Higress) and `plan_limits_core::Worker`, where every decision is made. It exists
//! only in the wasm32 build.
//!
//! - `root`: one per worker thread: owns the worker, applies plans.json, ticks, stops;
//! - `http`: one per request: hands the worker its headers, body, status and end;
//! - `hold`: the hold filter (a second root id): stops a refused request before the upstream
//!   while the plan filter reads its body;
//! - `host`: what the worker asks of the host (`Io`), carried out with host calls;
//! - `transport`: how a Redis command travels (webdis, or Higress's Redis host calls);
//! - `metrics`: the worker's counters, defined with the host.

mod hold;
mod host;
mod http;
mod metrics;
mod root;
mod transport;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        // One module, two filters: the plan filter, and the hold filter that follows it.
        let root_id = proxy_wasm::hostcalls::get_property(vec!["plugin_root_id"]).ok().flatten();
        if root_id.as_deref() == Some(hold::ROOT_ID.as_bytes()) {
            Box::new(hold::HoldRoot)
        } else {
            Box::new(root::PlanLimitsRoot::new(id))
        }
    });
}}
