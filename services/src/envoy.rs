//! Envoy: its configuration, built here from plans.json as data (the one way it is built:
//! `make run`, the tests, the bench and `plan-limits render envoy` all take it from
//! `config`), the process, and what its admin endpoint reports.
//!
//! The repository's envoy.yaml is `config` for `make run` (`repository_params`), written by
//! `make envoy-yaml`; a test fails when it is stale. Why each part is there is said here,
//! next to the part, not in the generated file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plan_limits_core::{
    IdentitySource, PathPattern, Plans, HOLD_ROOT_ID, PLAN_ROOT_ID, REDIS_CLUSTER,
    REDIS_READS_CLUSTER,
};
use serde_json::{json, Value};

use crate::process::Service;

/// What Envoy's configuration is built with besides plans.json: the run's ports and paths.
pub struct EnvoyParams<'a> {
    pub admin_port: u16,
    pub gateway_port: u16,
    pub upstream_port: u16,
    pub webdis_port: u16,
    pub upstream_timeout: &'a str,
    pub plans_json: &'a str,
    /// The JSON Web Key Set Envoy verifies bearer tokens with (`jwt` identity). A relative
    /// path is from Envoy's working directory (`start` runs Envoy in the repository's root).
    pub jwks: &'a Path,
    /// Where Envoy watches the filters' discovered configurations (`write_filter_configs`);
    /// relative as `jwks`.
    pub ecds_dir: &'a Path,
    /// A Redis Cluster webdis reaches through Envoy's `redis_proxy` (stock Envoy's way to a
    /// cluster: webdis cannot talk to one), if Redis is one.
    pub redis_cluster_proxy: Option<RedisClusterProxy<'a>>,
}

/// Envoy's `redis_proxy` in front of a Redis Cluster: a listener webdis logs in to as the
/// filter's Redis user, and the cluster's masters (their slot map read with `CLUSTER SLOTS`,
/// `MOVED` followed).
pub struct RedisClusterProxy<'a> {
    /// The listener's port (loopback).
    pub port: u16,
    /// Masters to learn the slot map from.
    pub masters: &'a [u16],
    /// A file holding the filter's Redis password: what webdis logs in with, and what Envoy
    /// logs in to the masters with.
    pub password_file: &'a Path,
    /// Envoy's timeout per Redis command.
    pub op_timeout_ms: u64,
}

/// The upstream's timeout per request when none is given (`make run`'s).
pub const DEFAULT_UPSTREAM_TIMEOUT: &str = "15s";

/// Where `make run` keeps the dev key's JSON Web Key Set and the filters' discovered
/// configuration, from the repository's root (its `.gateway/` directory).
pub const MAKE_RUN_JWKS: &str = ".gateway/jwt/jwks.json";
pub const MAKE_RUN_ECDS_DIR: &str = ".gateway/envoy-ecds";

/// The repository's envoy.yaml: `make run`'s ports and `.gateway/` paths (relative to the
/// repository's root, where Envoy runs), with `plans_json`.
pub fn repository_params(plans_json: &str) -> EnvoyParams<'_> {
    let ports = crate::gateway::Ports::MAKE_RUN;
    EnvoyParams {
        admin_port: ports.admin,
        gateway_port: ports.gateway,
        upstream_port: ports.upstream,
        webdis_port: ports.webdis,
        upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
        plans_json,
        jwks: Path::new(MAKE_RUN_JWKS),
        ecds_dir: Path::new(MAKE_RUN_ECDS_DIR),
        redis_cluster_proxy: None,
    }
}

/// The repository's envoy.yaml, rendered from the repository's plans.json: what the committed
/// file must be (`make envoy-yaml` writes it).
pub fn repository_envoy_yaml() -> Result<String, String> {
    render(&repository_params(&crate::plans_json()))
}

/// `path` from the repository's root when it is under it (Envoy runs there), else as given:
/// so `make run`'s config names `.gateway/...` and is the repository's envoy.yaml.
pub fn from_repository_root(path: &Path) -> PathBuf {
    path.strip_prefix(crate::repo_root())
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| path.to_path_buf())
}

/// What the generated file says of itself (the reasons are in this module).
const HEADER: &str = "\
# Envoy's configuration for the plan-limits gateway, generated from plans.json by
# `plan-limits render envoy` (built in services/src/envoy.rs, which says why each part is
# there): do not edit it, edit plans.json or the builder. The repository's envoy.yaml is
# `make run`'s (its ports; paths from the repository's root): `make envoy-yaml` writes it
# again, and a test fails when it is stale.
";

/// Envoy's configuration as YAML: `config`, after a comment saying it is generated.
pub fn render(p: &EnvoyParams) -> Result<String, String> {
    Ok(format!("{HEADER}{}", to_yaml(&config(p)?)?))
}

/// A configuration as YAML, its keys in one fixed order whatever serde_json keeps (`name` and
/// `@type` first, where a reader looks for them; then alphabetical), so the same config is
/// always the same text.
pub fn to_yaml(config: &Value) -> Result<String, String> {
    fn ordered(value: &Value) -> serde_norway::Value {
        match value {
            Value::Object(map) => {
                let rank = |k: &str| match k {
                    "name" => 0,
                    "@type" => 1,
                    _ => 2,
                };
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort_by(|a, b| (rank(a), *a).cmp(&(rank(b), *b)));
                let mut out = serde_norway::Mapping::new();
                for key in keys {
                    out.insert(key.as_str().into(), ordered(&map[key]));
                }
                serde_norway::Value::Mapping(out)
            }
            Value::Array(items) => {
                serde_norway::Value::Sequence(items.iter().map(ordered).collect())
            }
            other => serde_norway::to_value(other).unwrap_or(serde_norway::Value::Null),
        }
    }
    serde_norway::to_string(&ordered(config)).map_err(|e| format!("envoy.yaml: {e}"))
}

/// Envoy's whole configuration (its bootstrap) for `p`: Envoy's unmetered routes, identity
/// filters and request timeout from plans.json (what changes in them needs a restart); the
/// filters' own configuration (plans.json itself, the .wasm) is discovered from files in
/// `p.ecds_dir` (`write_filter_configs`), swapped in without a restart (`make reload`).
pub fn config(p: &EnvoyParams) -> Result<Value, String> {
    serde_json::from_str::<Value>(p.plans_json).map_err(|e| format!("plans.json: {e}"))?;
    // A plans.json the filter refuses yields no unmetered routes and no identity filters; the
    // filter refuses it itself, naming the field.
    let compiled = Plans::from_json(p.plans_json.as_bytes()).ok();
    let mut routes = compiled
        .as_ref()
        .map(|plans| unmetered_routes(plans, p.upstream_timeout))
        .unwrap_or_default();
    // Every other path goes through the filter, so that no spelling of a metered route
    // (case, `;parameters`, trailing dots, ...) gets past it.
    routes.push(json!({
        "match": {"prefix": "/"},
        "route": {"cluster": "product_upstream", "timeout": p.upstream_timeout},
    }));
    // Who is calling, ahead of the plan filter: rendered from plans.json's `identity`.
    let mut http_filters = compiled
        .as_ref()
        .map(|plans| identity_filters(plans, p.jwks))
        .unwrap_or_default();
    http_filters.extend(discovered_filters(p.ecds_dir));
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    // The whole request, body included: long enough for the largest upload a plan allows on
    // the slowest link taken (plans.json's `gateway`); reservations of requests in flight are
    // extended meanwhile.
    let request_timeout = compiled
        .as_ref()
        .map(|plans| format!("{}s", plans.request_timeout_ms.div_ceil(1000)))
        .unwrap_or_else(|| "300s".into());

    let mut listeners = vec![json!({
        "name": "gateway",
        "address": socket_address(p.gateway_port),
        // What Envoy buffers per client connection before it stops reading from it.
        "per_connection_buffer_limit_bytes": 32768,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": http_connection_manager(routes, http_filters, &request_timeout),
        }]}],
    })];
    let mut clusters = vec![
        json!({
            "name": "product_upstream",
            "type": "STATIC",
            "connect_timeout": "1s",
            "per_connection_buffer_limit_bytes": 32768,
            "load_assignment": load_assignment("product_upstream", &[p.upstream_port]),
        }),
        reads_cluster(p.webdis_port),
        webdis_cluster(p.webdis_port),
    ];
    // On a Redis Cluster (plans.json's redis.cluster_mode), webdis reaches it through Envoy's
    // redis_proxy on a listener of its own, which routes each EVALSHA by its first key to the
    // master of its slot.
    if let Some(proxy) = &p.redis_cluster_proxy {
        let (listener, cluster) = redis_cluster_proxy(proxy);
        listeners.push(listener);
        clusters.push(cluster);
    }

    Ok(json!({
        // ECDS (Extension Config Discovery from watched files, no control plane) needs the
        // node's id and cluster.
        "node": {"id": "plan-limits-gateway", "cluster": "plan-limits"},
        "stats_config": stats_config(),
        "admin": {"address": socket_address(p.admin_port)},
        "overload_manager": overload_manager(),
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }))
}

/// `127.0.0.1:port`: everything the gateway runs is on loopback.
fn socket_address(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// A cluster's endpoints: `ports` on loopback.
fn load_assignment(cluster: &str, ports: &[u16]) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|port| json!({"endpoint": {"address": socket_address(*port)}}))
        .collect();
    json!({"cluster_name": cluster, "endpoints": [{"lb_endpoints": endpoints}]})
}

/// The filter's labeled metrics carry their labels in their names, Istio's way
/// (`action=.=upload;.;plan=.=free;.;outcome=.=allowed;.;plan_limits_requests`): these tags
/// turn them into labels, so /stats/prometheus shows `plan_limits_requests{action="upload",...}`.
/// Labels name actions, plans, outcomes and Redis calls, never a user.
fn stats_config() -> Value {
    let tags: Vec<Value> = plan_limits_core::METRIC_LABELS
        .iter()
        .map(|label| json!({"tag_name": label, "regex": format!("({label}=\\.=(.*?);\\.;)")}))
        .collect();
    json!({
        "stats_tags": tags,
        // Redis round trips in microseconds: from a tenth of a millisecond to a second.
        "histogram_bucket_settings": [{
            "match": {"suffix": "plan_limits_redis_round_trip_us"},
            "buckets": [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000],
        }],
    })
}

/// Edge limits, after Envoy's "Configuring Envoy as an edge proxy": past 90 % of a 1 GiB heap
/// Envoy frees what it can, past 95 % it closes connections after their request, past 98 % it
/// answers 503 to new requests; at most 10,000 client connections in all.
fn overload_manager() -> Value {
    let heap = |value: f64| json!([{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": value}}]);
    json!({
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.fixed_heap",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": 1_073_741_824u64,
                },
            },
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 10000,
                },
            },
        ],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap", "triggers": heap(0.90)},
            {"name": "envoy.overload_actions.disable_http_keepalive", "triggers": heap(0.95)},
            {"name": "envoy.overload_actions.stop_accepting_requests", "triggers": heap(0.98)},
        ],
    })
}

/// The gateway's HTTP connection manager: edge limits, the product's routes and the filters.
fn http_connection_manager(
    routes: Vec<Value>,
    http_filters: Vec<Value>,
    request_timeout: &str,
) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        // An edge proxy: trust the peer address, and no caller is "internal" (there is no
        // internal_address_config: on 1.40 that makes no address internal, while an empty one
        // would make private ranges and loopback internal), so no client sets its own
        // x-request-id or the x-envoy-* headers Envoy obeys (timeouts, retries).
        "use_remote_address": true,
        // And before anything reads them: no client's x-envoy-* header, and no method
        // override (a framework behind Envoy could take POST for the DELETE it names, or a GET
        // Envoy does not meter for the POST it does), reaches a filter, the router or an
        // upstream.
        "early_header_mutation_extensions": [{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": [
                    {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}},
                    {"remove_on_match": {"key_matcher": {"safe_regex": {"regex": "x-(http-)?method(-override)?"}}}},
                ],
            },
        }],
        // Edge limits: headers must arrive within 10 s, at most 60 KB and 100 of them, none
        // with an underscore (a proxy behind may read it as a dash: a header spelt past a
        // check); a stream idle 5 minutes and a connection idle an hour are closed; a stopping
        // Envoy lets requests in flight finish for 15 s; HTTP/2 clients get at most 100
        // streams and a 64 KB window per stream.
        "request_headers_timeout": "10s",
        "max_request_headers_kb": 60,
        "stream_idle_timeout": "300s",
        "drain_timeout": "15s",
        "common_http_protocol_options": {
            "idle_timeout": "3600s",
            "max_headers_count": 100,
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1_048_576,
        },
        // Match routes on the path the upstream will see: /api//upload is /api/upload.
        "normalize_path": true,
        "merge_slashes": true,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "request_timeout": request_timeout,
        // A client that asks before sending its body (Expect: 100-continue) is answered by
        // the filter (413, 429, ...) before it sends a byte of it; the upstream sends the 100.
        "proxy_100_continue": true,
        "route_config": {
            "name": "product",
            "virtual_hosts": [{"name": "product", "domains": ["*"], "routes": routes}],
        },
        "http_filters": http_filters,
    })
}

/// The plan filter and its hold filter, their configuration discovered from a file each in
/// `ecds_dir` (a discovery response holding the Wasm filter config: vm_config, and plans.json
/// for the plan filter), replaced by write-and-rename. A refused config leaves the last good
/// one serving.
///
/// The hold filter is the same module in the same VM (identical vm_config), under another
/// root id. It stops, before the upstream, a request the filter refused while its client was
/// still writing the body; the filter reads and discards the body and then answers, so
/// clients that write a whole body before reading get the answer instead of a reset. It must
/// directly follow the plan filter.
fn discovered_filters(ecds_dir: &Path) -> Vec<Value> {
    DISCOVERED_FILTERS
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "config_discovery": {
                    "config_source": {"path_config_source": {
                        "path": ecds_dir.join(format!("{name}.json")).display().to_string(),
                        "watched_directory": {"path": ecds_dir.display().to_string()},
                    }},
                    "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"],
                },
            })
        })
        .collect()
}

/// The read side's calls (the usage endpoints) to the same webdis, with their own
/// connections and bounds: a flood of reads fails here, never ahead of a reservation in
/// `webdis_cluster`.
fn reads_cluster(webdis_port: u16) -> Value {
    json!({
        "name": REDIS_READS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 16,
            "max_pending_requests": 32,
            "max_requests": 64,
            "max_retries": 0,
        }]},
        "load_assignment": load_assignment(REDIS_READS_CLUSTER, &[webdis_port]),
    })
}

/// Redis, through webdis (stock Envoy has no Redis host calls for wasm filters): the
/// `REDIS_CLUSTER` cluster. When webdis stalls (its Redis does), three timeouts in a row eject
/// it for a second: requests then follow their failure mode at once instead of each waiting
/// out its timeout. Answers of webdis's own (503 while Redis is down) eject nothing, so
/// enforcement resumes as soon as Redis is back. Calls beyond the breakers' bounds fail at
/// once. `plan-limits render` gives the platforms these same bounds.
pub fn webdis_cluster(webdis_port: u16) -> Value {
    json!({
        "name": REDIS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 64,
            "max_pending_requests": 256,
            "max_requests": 1024,
            "max_retries": 0,
        }]},
        "outlier_detection": {
            "consecutive_5xx": 1_000_000,
            "enforcing_consecutive_5xx": 0,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "enforcing_success_rate": 0,
            "interval": "1s",
            "base_ejection_time": "1s",
            "max_ejection_time": "2s",
            "max_ejection_percent": 100,
        },
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "load_assignment": load_assignment(REDIS_CLUSTER, &[webdis_port]),
    })
}

/// The gateway's HTTP filters in `config` (identity filters, the two discovered filters, the
/// router), for those who swap some (the bench's reference cases).
pub fn http_filters_mut(config: &mut Value) -> Option<&mut Vec<Value>> {
    config
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
        )
        .and_then(Value::as_array_mut)
}

/// The filters whose configuration Envoy discovers from files: the plan filter (with
/// plans.json) and its hold filter, one file each, named for the filter.
pub const DISCOVERED_FILTERS: [&str; 2] = [PLAN_ROOT_ID, HOLD_ROOT_ID];

/// The Wasm filter config of `name` (one of `DISCOVERED_FILTERS`): both name the same code
/// and VM (`vm_id`, `code`), so they share one VM per worker; only the plan filter carries
/// plans.json.
fn wasm_filter(name: &str, plans: &Value, wasm: &Path) -> Value {
    let mut config = json!({
        "name": name,
        "root_id": name,
        "vm_config": {
            "vm_id": PLAN_ROOT_ID,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": wasm.display().to_string()}},
        },
    });
    if name == PLAN_ROOT_ID {
        config["configuration"] = json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": plans.to_string(),
        });
    }
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": config,
    })
}

fn parse_plans(plans_json: &str) -> Result<Value, String> {
    serde_json::from_str(plans_json).map_err(|e| format!("plans.json: {e}"))
}

/// The discovery responses Envoy reads for the two filters: each a `TypedExtensionConfig`
/// named like its filter, versioned by a hash of what it holds. `wasm` is the module's path,
/// which Envoy reads once per name (`write_filter_configs` names a copy by its hash).
pub fn filter_configs(plans_json: &str, wasm: &Path) -> Result<Vec<(String, String)>, String> {
    let plans = parse_plans(plans_json)?;
    let mut out = Vec::new();
    for name in DISCOVERED_FILTERS {
        let typed = wasm_filter(name, &plans, wasm);
        let response = json!({
            "version_info": short_hash(typed.to_string().as_bytes()),
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": name,
                "typed_config": typed,
            }],
        });
        let text = serde_json::to_string_pretty(&response).map_err(|e| e.to_string())?;
        out.push((format!("{name}.json"), text));
    }
    Ok(out)
}

/// A minimal Envoy config (JSON) holding the two filters as they would be discovered, for
/// `envoy --mode validate`, which runs the module's `on_configure` on plans.json: the very
/// .wasm that will load it accepts it or says why (ECDS files are not read in validate mode).
pub fn validation_config(plans_json: &str, wasm: &Path) -> Result<String, String> {
    let plans = parse_plans(plans_json)?;
    let mut filters: Vec<Value> = DISCOVERED_FILTERS
        .iter()
        .map(|name| json!({"name": name, "typed_config": wasm_filter(name, &plans, wasm)}))
        .collect();
    filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    let config = json!({
        "static_resources": {"listeners": [{
            "name": "validate",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "validate",
                    "route_config": {"name": "validate"},
                    "http_filters": filters,
                },
            }]}],
        }]},
    });
    serde_json::to_string_pretty(&config).map_err(|e| e.to_string())
}

/// Runs `envoy --mode validate` on `validation_config`: `Err` with Envoy's message (the
/// filter's names the JSON path) if the module refuses plans.json.
pub fn validate_with_envoy(plans_json: &str, wasm: &Path, dir: &Path) -> Result<(), String> {
    let path = dir.join("validate-filters.json");
    std::fs::write(&path, validation_config(plans_json, wasm)?)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let output = Command::new(envoy_bin())
        .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
        .arg(&path)
        .output()
        .map_err(|e| format!("{}: {e}", envoy_bin().display()))?;
    let _ = std::fs::remove_file(&path);
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    // The filter's own line says what is wrong; else Envoy's last words.
    let reason = text
        .lines()
        .find(|l| l.contains("configuration refused"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("envoy --mode validate failed");
    Err(reason.trim().to_string())
}

/// Writes the filters' configurations into `ecds_dir` for Envoy to pick up, each by
/// write-and-rename (Envoy never reads half a file). The module is copied in first under a
/// name carrying its hash, so a new .wasm is a new name (Envoy reads a local module once per
/// name) and the old one stays for the VMs still running it.
pub fn write_filter_configs(ecds_dir: &Path, plans_json: &str, wasm: &Path) -> Result<(), String> {
    std::fs::create_dir_all(ecds_dir).map_err(|e| format!("{}: {e}", ecds_dir.display()))?;
    // Envoy resolves the module's path from its own working directory: name it absolutely.
    let ecds_dir = &ecds_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", ecds_dir.display()))?;
    let code = std::fs::read(wasm).map_err(|e| format!("{}: {e}", wasm.display()))?;
    let copy = ecds_dir.join(format!("plan_limits_filter-{}.wasm", short_hash(&code)));
    if !copy.exists() {
        write_and_rename(&copy, &code)?;
    }
    for (file, text) in filter_configs(plans_json, &copy)? {
        write_and_rename(&ecds_dir.join(file), text.as_bytes())?;
    }
    Ok(())
}

fn write_and_rename(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The first 12 hex digits of the SHA-256 of `bytes`.
fn short_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Envoy routes for the paths plans.json lists as unmetered, with the filter disabled on
/// them (Envoy skips both filters there): an exact path with or without one trailing slash, a
/// prefix on whole segments, the method without case. (Envoy matches these as spelt; the
/// filter, which sees every other spelling, passes the same paths whatever their spelling.)
pub fn unmetered_routes(plans: &Plans, timeout: &str) -> Vec<Value> {
    let disabled = json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "disabled": true,
    });
    let mut out = Vec::new();
    for route in plans.unmetered() {
        let matchers: Vec<(&str, String)> = match &route.path {
            PathPattern::Exact(path) if path == "/" => vec![("path", path.clone())],
            PathPattern::Exact(path) => vec![("path", path.clone()), ("path", format!("{path}/"))],
            PathPattern::Prefix(prefix) if prefix == "/" => vec![("prefix", "/".into())],
            PathPattern::Prefix(prefix) => vec![("path_separated_prefix", prefix.clone())],
        };
        for (kind, path) in matchers {
            let mut matcher = json!({ kind: path });
            if let Some(method) = &route.method {
                matcher["headers"] = json!([{
                    "name": ":method",
                    "string_match": {"exact": method, "ignore_case": true},
                }]);
            }
            out.push(json!({
                "match": matcher,
                "route": {"cluster": "product_upstream", "timeout": timeout},
                "typed_per_filter_config": {PLAN_ROOT_ID: disabled, HOLD_ROOT_ID: disabled},
            }));
        }
    }
    out
}

/// The filters ahead of plan-limits that establish who is calling. For `jwt`: client copies
/// of the identity headers are removed (the filter sets them for the upstream, verified), then
/// `jwt_authn` verifies a bearer token and puts its payload in the request's metadata; a
/// request without a valid token still reaches the filter, which answers 401 on metered
/// routes. For `trusted_headers`: nothing (an authenticator in front sets them).
pub fn identity_filters(plans: &Plans, jwks: &Path) -> Vec<Value> {
    let identity = &plans.identity;
    if identity.source != IdentitySource::Jwt {
        return Vec::new();
    }
    let jwt = &identity.jwt;
    let removes: Vec<Value> = identity
        .verified_headers()
        .iter()
        .map(|h| json!({"remove": h}))
        .collect();
    vec![
        json!({
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": removes},
            },
        }),
        json!({
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {PLAN_ROOT_ID: {
                    "issuer": jwt.issuer,
                    "audiences": [jwt.audience],
                    "local_jwks": {"filename": jwks.display().to_string()},
                    "forward": false,
                    "payload_in_metadata": jwt.payload_key,
                    // Verified tokens are kept per worker (Envoy's cache checks expiry on each
                    // use): a client sends one token for many requests, so most need no
                    // signature check. (Its effect alone is not measured.)
                    "jwt_cache_config": {"jwt_cache_size": 1000},
                }},
                "rules": [{
                    "match": {"prefix": "/"},
                    "requires": {"requires_any": {"requirements": [
                        {"provider_name": PLAN_ROOT_ID},
                        {"allow_missing_or_failed": {}},
                    ]}},
                }],
            },
        }),
    ]
}

/// The `redis_proxy` listener and the `envoy.clusters.redis` cluster behind it. Envoy 1.40's
/// `redis_proxy` forwards `EVAL`/`EVALSHA` (routed by their first key) but not `FCALL`: the
/// filter calls its functions as scripts there (`redis.invoke: evalsha`).
fn redis_cluster_proxy(proxy: &RedisClusterProxy) -> (Value, Value) {
    let password = json!({"filename": proxy.password_file.display().to_string()});
    let listener = json!({
        "name": "plan_limits_redis_cluster_proxy",
        "address": socket_address(proxy.port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.redis_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
                "stat_prefix": "plan_limits_redis_cluster",
                "settings": {
                    "op_timeout": format!("{}s", proxy.op_timeout_ms as f64 / 1000.0),
                    "enable_redirection": true,
                },
                "prefix_routes": {"catch_all_route": {"cluster": "plan_limits_redis_cluster"}},
                "downstream_auth_passwords": [password],
            },
        }]}],
    });
    let cluster = json!({
        "name": "plan_limits_redis_cluster",
        "connect_timeout": "0.25s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.redis",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.redis.v3.RedisClusterConfig",
                "cluster_refresh_rate": "5s",
                "cluster_refresh_timeout": "1s",
                "redirect_refresh_interval": "1s",
                "redirect_refresh_threshold": 1,
            },
        },
        "typed_extension_protocol_options": {
            "envoy.filters.network.redis_proxy": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProtocolOptions",
                "auth_password": password,
            },
        },
        "load_assignment": load_assignment("plan_limits_redis_cluster", proxy.masters),
    });
    (listener, cluster)
}

/// The Envoy binary: `ENVOY_BIN`, else the repository's `.venv` (made by `make deps`), else PATH.
pub fn envoy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return bin.into();
    }
    let venv = crate::repo_root().join(".venv/bin/envoy");
    if venv.exists() {
        venv
    } else {
        "envoy".into()
    }
}

/// How to start one Envoy.
pub struct EnvoyOptions<'a> {
    /// Names its config and log files in `dir`.
    pub name: &'a str,
    pub dir: &'a Path,
    pub config: &'a str,
    pub concurrency: u32,
    /// `(base id, epoch)`: start as a hot restart of another Envoy (epoch 0 starts the first).
    pub hot_restart: Option<(u32, u32)>,
    /// Wait until this port listens (not for a hot restart's later epochs).
    pub port: u16,
}

/// Whether `config` is the repository's envoy.yaml as committed (`start` then runs that file).
pub fn is_repository_envoy_yaml(config: &str) -> bool {
    std::fs::read_to_string(crate::repo_root().join("envoy.yaml")).is_ok_and(|text| text == config)
}

/// Starts Envoy with `options.config` (YAML, `render`'s).
pub fn start(options: EnvoyOptions) -> Service {
    let EnvoyOptions {
        name,
        dir,
        config,
        concurrency,
        hot_restart,
        port,
    } = options;
    // The repository's envoy.yaml when the config is it (`make run`'s at its default ports),
    // so that the committed file is the one that runs; else a file of this Envoy's own.
    let yaml = if is_repository_envoy_yaml(config) {
        crate::repo_root().join("envoy.yaml")
    } else {
        let own = dir.join(format!("{name}.yaml"));
        std::fs::write(&own, config).unwrap_or_else(|e| panic!("{}: {e}", own.display()));
        own
    };
    let mut command = Command::new(envoy_bin());
    // Relative paths in a config (the repository's names `.gateway/...`) are from the
    // repository's root.
    command
        .current_dir(crate::repo_root())
        .arg("-c")
        .arg(&yaml)
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--log-level", "warn", "--component-log-level", "wasm:info"]);
    match hot_restart {
        Some((base_id, epoch)) => {
            command.args([
                "--base-id",
                &base_id.to_string(),
                "--restart-epoch",
                &epoch.to_string(),
            ]);
        }
        None => {
            command.arg("--use-dynamic-base-id");
        }
    }
    let mut envoy = Service::spawn(name, command, &dir.join(format!("{name}.log")));
    if hot_restart.is_none_or(|(_, epoch)| epoch == 0) {
        envoy.wait_for_port(port, Duration::from_secs(30));
    }
    envoy
}

/// A filter counter from the Envoy whose admin listens on `admin_port`
/// (`wasmcustom.plan_limits.<name>`).
/// A counter of the filter's, once it stands still: each worker adds what it counted at its
/// tick (every `flush_interval_ms`, 5 ms by default, later on a busy machine), so it is read
/// until two reads a few ticks apart agree (for at most two seconds).
pub fn metric_at(admin_port: u16, name: &str) -> u64 {
    let name = format!("wasmcustom.plan_limits.{name}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut last = admin_stat(admin_port, &name);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(30));
        let now = admin_stat(admin_port, &name);
        if now == last || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// A counter from Envoy's admin `/stats` by its full name (0 when absent).
pub fn admin_stat(admin_port: u16, name: &str) -> u64 {
    let stats = crate::http::get(admin_port, &format!("/stats?filter={name}")).body_text();
    let key = format!("{name}: ");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(plans_json: &str) -> EnvoyParams<'_> {
        EnvoyParams {
            admin_port: 1,
            gateway_port: 2,
            upstream_port: 3,
            webdis_port: 4,
            upstream_timeout: "15s",
            plans_json,
            jwks: Path::new("/jwks.json"),
            ecds_dir: Path::new("/ecds"),
            redis_cluster_proxy: None,
        }
    }

    fn routes_of(config: &Value) -> &Vec<Value> {
        config.pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes")
            .and_then(Value::as_array)
            .unwrap()
    }

    #[test]
    fn unmetered_paths_are_rendered_with_the_filter_disabled() {
        let mut json: Value = serde_json::from_str(&crate::plans_json()).unwrap();
        json["unmetered"] = json!([
            {"method": "GET", "path": "/api/upload/"},
            {"prefix": "/static/"},
            {"method": "HEAD", "prefix": "/"},
        ]);
        json["routes"] = json!([{"method": "POST", "path": "/api/upload", "action": "upload"}]);
        let config = config(&params(&json.to_string())).unwrap();
        let routes = routes_of(&config);
        let get =
            json!([{"name": ":method", "string_match": {"exact": "GET", "ignore_case": true}}]);
        let head =
            json!([{"name": ":method", "string_match": {"exact": "HEAD", "ignore_case": true}}]);
        let matches: Vec<&Value> = routes.iter().map(|r| &r["match"]).collect();
        assert_eq!(
            matches,
            [
                &json!({"path": "/api/upload", "headers": get}),
                &json!({"path": "/api/upload/", "headers": get}),
                &json!({"path_separated_prefix": "/static"}),
                &json!({"prefix": "/", "headers": head}),
                // And every other path through the filter, last.
                &json!({"prefix": "/"}),
            ]
        );
        // Both filters (the plan filter and its hold filter) disabled on each unmetered one.
        for route in &routes[..4] {
            for filter in DISCOVERED_FILTERS {
                assert_eq!(route["typed_per_filter_config"][filter]["disabled"], true);
            }
            assert_eq!(route["route"]["timeout"], "15s");
        }
        assert!(routes[4].get("typed_per_filter_config").is_none());
    }

    #[test]
    fn envoy_extracts_every_label_the_filter_names() {
        let config = config(&params(&crate::plans_json())).unwrap();
        for label in plan_limits_core::METRIC_LABELS {
            let tags = config["stats_config"]["stats_tags"].as_array().unwrap();
            assert!(
                tags.iter()
                    .any(|t| t["tag_name"] == label
                        && t["regex"] == format!("({label}=\\.=(.*?);\\.;)")),
                "{label}"
            );
        }
    }

    #[test]
    fn the_filters_follow_identity_and_precede_the_router() {
        let config = config(&params(&crate::plans_json())).unwrap();
        let mut config = config;
        let names: Vec<String> = http_filters_mut(&mut config)
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "envoy.filters.http.header_mutation",
                "envoy.filters.http.jwt_authn",
                PLAN_ROOT_ID,
                HOLD_ROOT_ID,
                "envoy.filters.http.router",
            ]
        );
        let filters = http_filters_mut(&mut config).unwrap();
        let source = &filters[2]["config_discovery"]["config_source"]["path_config_source"];
        assert_eq!(source["path"], "/ecds/plan_limits.json");
        assert_eq!(source["watched_directory"]["path"], "/ecds");
        assert_eq!(
            filters[1]["typed_config"]["providers"][PLAN_ROOT_ID]["local_jwks"]["filename"],
            "/jwks.json"
        );
    }

    #[test]
    fn the_webdis_cluster_is_the_one_the_filter_calls_by_default() {
        let config = config(&params(&crate::plans_json())).unwrap();
        let clusters = config["static_resources"]["clusters"].as_array().unwrap();
        let names: Vec<&str> = clusters
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["product_upstream", REDIS_READS_CLUSTER, REDIS_CLUSTER]
        );
        assert_eq!(clusters[2], webdis_cluster(4));
        assert_eq!(
            plan_limits_core::RedisSettings::default().cluster,
            REDIS_CLUSTER
        );
    }

    #[test]
    fn on_a_redis_cluster_envoy_proxies_it_on_a_listener_of_its_own() {
        let plans = crate::plans_json();
        let mut p = params(&plans);
        p.redis_cluster_proxy = Some(RedisClusterProxy {
            port: 5,
            masters: &[6, 7, 8],
            password_file: Path::new("/password"),
            op_timeout_ms: 250,
        });
        let config = config(&p).unwrap();
        let listener = &config["static_resources"]["listeners"][1];
        assert_eq!(listener["address"]["socket_address"]["port_value"], 5);
        let proxy = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(proxy["settings"]["op_timeout"], "0.25s");
        let cluster = &config["static_resources"]["clusters"][3];
        assert_eq!(cluster["name"], "plan_limits_redis_cluster");
        let endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap();
        assert_eq!(endpoints.len(), 3);
    }

    #[test]
    fn the_yaml_is_the_config_with_a_header_saying_it_is_generated() {
        let plans = crate::plans_json();
        let p = params(&plans);
        let yaml = render(&p).unwrap();
        assert!(yaml.starts_with("# Envoy's configuration"), "{yaml}");
        assert!(yaml.contains("make envoy-yaml"));
        let parsed: Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(parsed, config(&p).unwrap());
        // The same config, the same text; names first where a reader looks for them.
        assert_eq!(yaml, render(&p).unwrap());
        assert!(yaml.contains("- name: gateway\n"), "{yaml}");
        assert!(render(&params("{")).unwrap_err().contains("plans.json"));
    }

    #[test]
    fn both_filters_name_the_same_vm_and_only_the_plan_filter_carries_plans() {
        let configs = filter_configs(r#"{"a":1}"#, Path::new("/m.wasm")).unwrap();
        let parsed: Vec<Value> = configs
            .iter()
            .map(|(_, text)| serde_json::from_str(text).unwrap())
            .collect();
        let config = |i: usize| &parsed[i]["resources"][0]["typed_config"]["config"];
        assert_eq!(config(0)["vm_config"], config(1)["vm_config"]);
        assert_eq!(config(0)["configuration"]["value"], r#"{"a":1}"#);
        assert!(config(1).get("configuration").is_none());
        assert_eq!(parsed[0]["resources"][0]["name"], "plan_limits");
        assert_eq!(config(1)["root_id"], "plan_limits_hold");
        // Another plans.json, another version.
        let other = filter_configs(r#"{"a":2}"#, Path::new("/m.wasm")).unwrap();
        assert_ne!(configs[0], other[0]);
        assert_eq!(configs[1], other[1], "the hold filter's is unchanged");
    }

    /// `make run` keeps its files in the repository's `.gateway/` (the launcher, `EnvoyGateway`
    /// and `gateway::prepare_files`): named from the root, they are the repository's envoy.yaml's.
    #[test]
    fn make_runs_files_are_named_from_the_repository_root() {
        let gateway = crate::repo_root().join(".gateway");
        assert_eq!(
            from_repository_root(&gateway.join("jwt/jwks.json")),
            Path::new(MAKE_RUN_JWKS)
        );
        assert_eq!(
            from_repository_root(&gateway.join("envoy-ecds")),
            Path::new(MAKE_RUN_ECDS_DIR)
        );
        assert_eq!(
            from_repository_root(Path::new("/tmp/x")),
            Path::new("/tmp/x")
        );
    }

    #[test]
    fn the_repository_envoy_yaml_is_what_the_builder_renders_from_plans_json() {
        let rendered = repository_envoy_yaml().unwrap();
        let committed =
            std::fs::read_to_string(crate::repo_root().join("envoy.yaml")).unwrap_or_default();
        if let Some((n, (r, c))) = rendered
            .lines()
            .zip(committed.lines())
            .enumerate()
            .find(|(_, (r, c))| r != c)
        {
            panic!("{ENVOY_YAML_STALE}\nfirst difference, line {}:\n  committed: {c}\n  rendered:  {r}", n + 1);
        }
        assert!(rendered == committed, "{ENVOY_YAML_STALE}");
    }

    const ENVOY_YAML_STALE: &str = "envoy.yaml is not what the builder renders from plans.json: \
         run `make envoy-yaml` (or `cargo run -p plan-limits-tools --bin plan-limits -- render \
         envoy > envoy.yaml`) and commit it";
}
