//! The operator's tools: `plan-limits` (validate and replay plans.json), the `make run`
//! launcher and the benchmark runner.

pub mod bench;
#[cfg(feature = "replay")]
pub mod replay;
