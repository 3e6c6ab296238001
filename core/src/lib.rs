//! Plan limits at the edge, without I/O.
//!
//! Every decision of the filter lives here, in plain Rust with no host calls, unit-tested
//! natively; the proxy-wasm shell (`plan-limits-filter`) only moves data between Envoy and
//! `Worker`, which owns a worker's requests and settlements. The modules are private; what the
//! shell, the tools and the suites use is re-exported below by name (the Redis library's
//! calls and codecs as `functions`, `webdis` and `resp`):
//!
//! - `names`: the root ids and cluster names Envoy's config and the filter share;
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
//! - `worker`: the events in / actions out state machine the shell drives (a folder: the
//!   state and the dispatch, then one file per family of events);
//! - `responses`: every answer the filter gives itself; `metrics`: its counters;
//! - `admin`: the operator's writes (plan, grants, resets), each recorded as an event;
//! - `redis`: commands and replies as data, the Lua scripts, the webdis and RESP codecs;
//! - `testing` (tests, and the `testing` feature): fixtures and the host in memory.

mod admin;
mod admission;
mod cluster;
mod config;
mod denials;
mod entitlements;
mod keys;
mod metadata;
mod metrics;
mod names;
mod outage;
mod period;
mod plans;
mod redis;
mod reports;
mod request;
mod responses;
mod routes;
mod settlement;
mod settlement_queue;
mod spike;
mod upstream;
mod worker;

pub use admin::{transaction as admin_transaction, AdminOp};
pub use admission::{Claims, RequestHead};
pub use cluster::{
    all_events_streams, key_slot, slot_events_stream, slot_tag, SLOTS as CLUSTER_SLOTS,
};
pub use config::{
    Config, ConfigError, Gauge, Identity, IdentitySource, Invoke, JwtClaims, Limit, RedisSettings,
    Unmetered,
};
pub use keys::{
    applied_batches, encoded_user, entitlement_key, user_key_parts, UsageKeys, UserKeys,
};
pub use metrics::{LabeledMetric, Metric, MetricKind, LABELS as METRIC_LABELS};
pub use names::{HOLD_ROOT_ID, PLAN_ROOT_ID, REDIS_CLUSTER, REDIS_READS_CLUSTER};
pub use period::{date as utc_date, from_unix_nanos, BillingPeriod};
pub use plans::{FeatureAccess, Plan, Plans, Terms};
pub use redis::{functions, resp, webdis, RedisCommand, RedisReply, TransportError};
pub use reports::{history_query, usage_query, Report, ReportKind};
pub use responses::LocalResponse;
pub use routes::PathPattern;
pub use settlement::{SettleMode, Settlement};
pub use settlement_queue::{Group, SettlementQueue};
pub use worker::{
    BodyFlow, Flow, Io, LogLevel, ResponseFlow, StreamId, Token, Worker, HEARTBEAT_MS,
};

/// Fixtures and the host in memory, for the core's tests and its benchmark.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
