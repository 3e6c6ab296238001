//! Plan limits at the edge, without I/O.
//!
//! Every decision of the filter lives here, in plain Rust with no host calls, unit-tested
//! natively; the proxy-wasm shell (`plan-limits-filter`) only moves data between Envoy and
//! `worker::Worker`, which owns a worker's requests and settlements:
//!
//! - `config`: plans.json as written (serde, errors name the JSON path);
//! - `plans`: plans.json checked and compiled once (routes, actions, plans, terms);
//! - `routes`, `period`, `keys`: matching, billing periods, Redis key names;
//! - `cluster`: Redis Cluster hash slots, and the event stream of each slot;
//! - `admission`: a request's head read once (identity, plan, feature, size, kind);
//! - `metadata`: what a usage event records of the request and its answer;
//! - `request`: a metered request's life (reservation, response, end);
//! - `settlement`: commits, counts and releases; `settlement_queue`: a worker's, in batches;
//! - `denials`: refusals remembered briefly per worker; `spike`: each user's request rate;
//! - `reports`: the read side (the caller's usage and history, answered from Redis);
//! - `worker`: the events in / actions out state machine the shell drives;
//! - `responses`: every answer the filter gives itself; `metrics`: its counters;
//! - `admin`: the operator's writes (plan, grants, resets), each recorded as an event;
//! - `redis`: commands and replies as data, the Lua scripts, the webdis and RESP codecs.

pub mod admin;
pub mod admission;
pub mod cluster;
pub mod config;
pub mod denials;
pub mod entitlements;
pub mod keys;
pub mod metadata;
pub mod metrics;
pub mod outage;
pub mod period;
pub mod plans;
pub mod redis;
pub mod reports;
pub mod request;
pub mod responses;
pub mod routes;
pub mod settlement;
pub mod settlement_queue;
pub mod spike;
pub mod upstream;
pub mod worker;

/// Fixtures and the host in memory, for the core's tests and its benchmark.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
