//! The operator's tools: the `plan-limits` CLI (validate and replay plans.json), the
//! `make run` launcher and the benchmark runner.

pub mod bench;
pub mod plans_table;
#[cfg(feature = "replay")]
pub mod replay;
