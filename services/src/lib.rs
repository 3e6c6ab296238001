//! The gateway's parts as child processes on loopback: a real `redis-server`, webdis, the
//! demo upstream and real Envoy running the filter `.wasm`, each started on free ports and
//! stopped (with all its children) when dropped. The launcher of `make run`, the tests and
//! the bench all start them through here.

pub mod browser;
pub mod envoy;
pub mod gateway;
pub mod http;
pub mod jwt;
pub mod process;
pub mod redis_cluster;
pub mod redis_exec;
pub mod redis_server;
pub mod upstream;
pub mod usage;
pub mod webdis;

use std::path::PathBuf;

/// The repository root (this crate's parent).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("services lives in the repository")
        .to_path_buf()
}

/// The filter `.wasm` under test: `PLAN_LIMITS_WASM`, else the one `make build` writes.
pub fn filter_wasm() -> PathBuf {
    let path = std::env::var_os("PLAN_LIMITS_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/plan_limits_filter.wasm"));
    assert!(
        path.exists(),
        "{} does not exist: run `make build` first (or set PLAN_LIMITS_WASM)",
        path.display()
    );
    path
}

/// The repository's plans.json.
pub fn plans_json() -> String {
    std::fs::read_to_string(repo_root().join("plans.json")).expect("plans.json")
}
