//! Plan limits at the edge, without I/O.
//!
//! Every decision of the filter lives here, in plain Rust with no host calls, unit-tested
//! natively; the proxy-wasm shell (`plan-limits-filter`) only moves data between Envoy and
//! this crate.

pub mod config;
pub mod denials;
pub mod keys;
pub mod period;
pub mod redis;
pub mod request;
pub mod responses;
pub mod routes;
pub mod settlements;
