//! The names Envoy's configuration and the filter must agree on, in one place: the filters'
//! root ids (which root context a filter instance gets) and the Envoy clusters the filter
//! calls Redis through by default. The filter, the Envoy config builder
//! (`plan-limits-services`' `envoy`), the Kubernetes manifests (`plan-limits render`) and the
//! wasmtime host all name them from here.

/// The plan filter's root id (and its filter's name in envoy.yaml, and its VM's id).
pub const PLAN_ROOT_ID: &str = "plan_limits";

/// The hold filter's root id: the same module, a second filter right after the plan filter,
/// in its VM (filter/src/hold.rs).
pub const HOLD_ROOT_ID: &str = "plan_limits_hold";

/// The Envoy cluster the filter calls Redis (webdis) through when plans.json's
/// `redis.cluster` does not name another.
pub const REDIS_CLUSTER: &str = "plan_limits_redis";

/// The cluster envoy.yaml gives the read side's calls (plans.json's `redis.read_cluster`
/// names it; without one the reads go with the rest on `REDIS_CLUSTER`).
pub const REDIS_READS_CLUSTER: &str = "plan_limits_redis_reads";
