//! The operator's tools: the `plan-limits` CLI (validate, diff and replay plans.json, print its
//! schema, read and change what users may do, render the deployment, pack the module as an
//! OCI image), the `make run` launcher and the benchmark runner.

pub mod audit;
pub mod bench;
pub mod diff;
pub mod oci;
pub mod operator;
pub mod plans_table;
pub mod reload;
pub mod render;
#[cfg(feature = "replay")]
pub mod replay;
pub mod run_record;
pub mod schema;
