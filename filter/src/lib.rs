//! Plan limits at the edge.
//!
//! The decision logic is plain Rust with no host calls (the "core": everything but `proxy`),
//! unit-tested natively. `proxy` is the thin proxy-wasm shell that moves data between Envoy
//! and the core; it exists only in the wasm32 build.

pub mod config;
pub mod denials;
pub mod keys;
pub mod period;
pub mod redis;
pub mod request;
pub mod responses;
pub mod routes;
pub mod settlements;

#[cfg(target_arch = "wasm32")]
mod proxy;
