//! Envoy: its configuration rendered from `envoy.yaml` and plans.json, the process, and what
//! its admin endpoint reports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plan_limits_core::{IdentitySource, PathPattern, Plans};

use crate::process::Service;

/// What fills envoy.yaml's placeholders.
pub struct EnvoyParams<'a> {
    pub admin_port: u16,
    pub gateway_port: u16,
    pub upstream_port: u16,
    pub webdis_port: u16,
    pub upstream_timeout: &'a str,
    pub plans_json: &'a str,
    /// The JSON Web Key Set Envoy verifies bearer tokens with (`jwt` identity).
    pub jwks: &'a Path,
    /// Where Envoy watches the filters' discovered configurations (`write_filter_configs`).
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

/// The repository's envoy.yaml template.
pub fn template() -> String {
    let path = crate::repo_root().join("envoy.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Renders the envoy.yaml `template`: Envoy's unmetered routes, identity filters and request
/// timeout from plans.json; the filters' own configuration is discovered from `ecds_dir`
/// (`write_filter_configs`).
pub fn render(template: &str, p: &EnvoyParams) -> Result<String, String> {
    serde_json::from_str::<serde_json::Value>(p.plans_json)
        .map_err(|e| format!("plans.json: {e}"))?;
    // A plans.json the filter refuses yields no unmetered routes; the filter refuses it
    // itself, naming the field.
    let compiled = Plans::from_json(p.plans_json.as_bytes()).ok();
    let routes = compiled
        .as_ref()
        .map(|plans| unmetered_routes(plans, p.upstream_timeout))
        .unwrap_or_default();
    let identity = compiled
        .as_ref()
        .map(|plans| identity_filters(plans, p.jwks))
        .unwrap_or_default();
    let request_timeout = compiled
        .as_ref()
        .map(|plans| format!("{}s", plans.request_timeout_ms.div_ceil(1000)))
        .unwrap_or_else(|| "300s".into());
    let (cluster_listener, cluster) = p
        .redis_cluster_proxy
        .as_ref()
        .map(redis_cluster_proxy)
        .unwrap_or_default();
    let rendered = template
        .replace("@ADMIN_PORT@", &p.admin_port.to_string())
        .replace("@GATEWAY_PORT@", &p.gateway_port.to_string())
        .replace("@UPSTREAM_PORT@", &p.upstream_port.to_string())
        .replace("@WEBDIS_PORT@", &p.webdis_port.to_string())
        .replace("@UPSTREAM_TIMEOUT@", p.upstream_timeout)
        .replace("@UNMETERED_ROUTES@", &routes)
        .replace("@IDENTITY_FILTERS@", &identity)
        .replace("@REQUEST_TIMEOUT@", &request_timeout)
        .replace("@REDIS_CLUSTER_LISTENER@", &cluster_listener)
        .replace("@REDIS_CLUSTER@", &cluster)
        .replace("@ECDS_DIR@", &p.ecds_dir.display().to_string());
    match unfilled_placeholder(&rendered) {
        Some(name) => Err(format!("envoy.yaml: placeholder @{name}@ was not filled")),
        None => Ok(rendered),
    }
}

/// The filters whose configuration Envoy discovers from files: the plan filter (with
/// plans.json) and its hold filter, one file each, named for the filter.
pub const DISCOVERED_FILTERS: [&str; 2] = ["plan_limits", "plan_limits_hold"];

/// The Wasm filter config of `name` (one of `DISCOVERED_FILTERS`): both name the same code
/// and VM (`vm_id`, `code`), so they share one VM per worker; only the plan filter carries
/// plans.json.
fn wasm_filter(name: &str, plans: &serde_json::Value, wasm: &Path) -> serde_json::Value {
    let mut config = serde_json::json!({
        "name": name,
        "root_id": name,
        "vm_config": {
            "vm_id": "plan_limits",
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": wasm.display().to_string()}},
        },
    });
    if name == "plan_limits" {
        config["configuration"] = serde_json::json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": plans.to_string(),
        });
    }
    serde_json::json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": config,
    })
}

fn parse_plans(plans_json: &str) -> Result<serde_json::Value, String> {
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
        let response = serde_json::json!({
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
    let mut filters: Vec<serde_json::Value> = DISCOVERED_FILTERS
        .iter()
        .map(|name| serde_json::json!({"name": name, "typed_config": wasm_filter(name, &plans, wasm)}))
        .collect();
    filters.push(serde_json::json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    let config = serde_json::json!({
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
/// them: an exact path with or without one trailing slash, a prefix on whole segments, the
/// method without case. (Envoy matches these as spelt; the filter, which sees every other
/// spelling, passes the same paths whatever their spelling.)
pub fn unmetered_routes(plans: &Plans, timeout: &str) -> String {
    let indent = "              ";
    let quoted = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = Vec::new();
    for route in plans.unmetered() {
        let method = route
            .method
            .as_deref()
            .map(|m| {
                format!(
                    ", headers: [{{ name: \":method\", string_match: {{ exact: {}, ignore_case: true }} }}]",
                    quoted(m)
                )
            })
            .unwrap_or_default();
        let matchers = match &route.path {
            PathPattern::Exact(path) if path == "/" => vec![format!("path: {}", quoted(path))],
            PathPattern::Exact(path) => vec![
                format!("path: {}", quoted(path)),
                format!("path: {}", quoted(&format!("{path}/"))),
            ],
            PathPattern::Prefix(prefix) if prefix == "/" => vec!["prefix: \"/\"".to_string()],
            PathPattern::Prefix(prefix) => {
                vec![format!("path_separated_prefix: {}", quoted(prefix))]
            }
        };
        for matcher in matchers {
            out.push(format!(
                "{indent}- match: {{ {matcher}{method} }}\n\
                 {indent}  route: {{ cluster: product_upstream, timeout: {timeout} }}\n\
                 {indent}  typed_per_filter_config:\n\
                 {indent}    plan_limits:\n\
                 {indent}      \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n\
                 {indent}      disabled: true\n\
                 {indent}    plan_limits_hold:\n\
                 {indent}      \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n\
                 {indent}      disabled: true"
            ));
        }
    }
    out.join("\n")
}

/// The filters ahead of plan-limits that establish who is calling. For `jwt`: client copies
/// of the identity headers are removed (the filter sets them for the upstream, verified), then
/// `jwt_authn` verifies a bearer token and puts its payload in the request's metadata; a
/// request without a valid token still reaches the filter, which answers 401 on metered
/// routes. For `trusted_headers`: nothing (an authenticator in front sets them).
pub fn identity_filters(plans: &Plans, jwks: &Path) -> String {
    let identity = &plans.identity;
    if identity.source != IdentitySource::Jwt {
        return String::new();
    }
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let jwt = &identity.jwt;
    format!(
        r#"          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
{removes}
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                plan_limits:
                  issuer: {issuer}
                  audiences: [{audience}]
                  local_jwks: {{ filename: {jwks} }}
                  forward: false
                  payload_in_metadata: {payload}
                  # Verified tokens are kept per worker (Envoy's cache checks expiry on each
                  # use): a client sends one token for many requests, so most need no
                  # signature check. (Its effect alone is not measured.)
                  jwt_cache_config: {{ jwt_cache_size: 1000 }}
              rules:
              - match: {{ prefix: "/" }}
                requires:
                  requires_any:
                    requirements:
                    - provider_name: plan_limits
                    - allow_missing_or_failed: {{}}"#,
        removes = identity
            .verified_headers()
            .iter()
            .map(|h| format!("                - remove: {}", q(h)))
            .collect::<Vec<_>>()
            .join("\n"),
        issuer = q(&jwt.issuer),
        audience = q(&jwt.audience),
        jwks = q(&jwks.display().to_string()),
        payload = q(&jwt.payload_key),
    )
}

/// The `redis_proxy` listener and the `envoy.clusters.redis` cluster behind it. Envoy 1.40's
/// `redis_proxy` forwards `EVAL`/`EVALSHA` (routed by their first key) but not `FCALL`: the
/// filter calls its functions as scripts there (`redis.invoke: evalsha`).
fn redis_cluster_proxy(proxy: &RedisClusterProxy) -> (String, String) {
    let password = serde_json::Value::String(proxy.password_file.display().to_string());
    let timeout = format!("{}s", proxy.op_timeout_ms as f64 / 1000.0);
    let listener = format!(
        r#"  - name: plan_limits_redis_cluster_proxy
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.redis_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy
          stat_prefix: plan_limits_redis_cluster
          settings:
            op_timeout: {timeout}
            enable_redirection: true
          prefix_routes:
            catch_all_route: {{ cluster: plan_limits_redis_cluster }}
          downstream_auth_passwords: [{{ filename: {password} }}]"#,
        port = proxy.port,
    );
    let endpoints: Vec<String> = proxy
        .masters
        .iter()
        .map(|port| {
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
            )
        })
        .collect();
    let cluster = format!(
        r#"  - name: plan_limits_redis_cluster
    connect_timeout: 0.25s
    lb_policy: CLUSTER_PROVIDED
    cluster_type:
      name: envoy.clusters.redis
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.clusters.redis.v3.RedisClusterConfig
        cluster_refresh_rate: 5s
        cluster_refresh_timeout: 1s
        redirect_refresh_interval: 1s
        redirect_refresh_threshold: 1
    typed_extension_protocol_options:
      envoy.filters.network.redis_proxy:
        "@type": type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProtocolOptions
        auth_password: {{ filename: {password} }}
    load_assignment:
      cluster_name: plan_limits_redis_cluster
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        endpoints = endpoints.join("\n"),
    );
    (listener, cluster)
}

fn unfilled_placeholder(text: &str) -> Option<&str> {
    text.split('@')
        .skip(1)
        .find(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
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

/// Starts Envoy with `options.config`.
pub fn start(options: EnvoyOptions) -> Service {
    let EnvoyOptions {
        name,
        dir,
        config,
        concurrency,
        hot_restart,
        port,
    } = options;
    let yaml = dir.join(format!("{name}.yaml"));
    std::fs::write(&yaml, config).unwrap_or_else(|e| panic!("{}: {e}", yaml.display()));
    let mut command = Command::new(envoy_bin());
    command
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
pub fn metric_at(admin_port: u16, name: &str) -> u64 {
    admin_stat(admin_port, &format!("wasmcustom.plan_limits.{name}"))
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

    #[test]
    fn unmetered_paths_are_rendered_with_the_filter_disabled() {
        let mut json: serde_json::Value = serde_json::from_str(&crate::plans_json()).unwrap();
        json["unmetered"] = serde_json::json!([
            {"method": "GET", "path": "/api/upload/"},
            {"prefix": "/static/"},
            {"method": "HEAD", "prefix": "/"},
        ]);
        json["routes"] =
            serde_json::json!([{"method": "POST", "path": "/api/upload", "action": "upload"}]);
        let plans = Plans::from_json(json.to_string().as_bytes()).unwrap();
        let routes = unmetered_routes(&plans, "15s");
        let lines: Vec<&str> = routes
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("- match"))
            .collect();
        assert_eq!(
            lines,
            [
                r#"- match: { path: "/api/upload", headers: [{ name: ":method", string_match: { exact: "GET", ignore_case: true } }] }"#,
                r#"- match: { path: "/api/upload/", headers: [{ name: ":method", string_match: { exact: "GET", ignore_case: true } }] }"#,
                r#"- match: { path_separated_prefix: "/static" }"#,
                r#"- match: { prefix: "/", headers: [{ name: ":method", string_match: { exact: "HEAD", ignore_case: true } }] }"#,
            ]
        );
        // Both filters (the plan filter and its hold filter) on each.
        assert_eq!(routes.matches("plan_limits:\n").count(), 4);
        assert_eq!(routes.matches("plan_limits_hold:\n").count(), 4);
        assert_eq!(routes.matches("disabled: true").count(), 8);
    }

    #[test]
    fn envoy_extracts_every_label_the_filter_names() {
        let template = template();
        for label in plan_limits_core::METRIC_LABELS {
            assert!(
                template.contains(&format!("tag_name: {label}, regex: \"({label}=")),
                "{label}"
            );
        }
    }

    #[test]
    fn both_filters_name_the_same_vm_and_only_the_plan_filter_carries_plans() {
        let configs = filter_configs(r#"{"a":1}"#, Path::new("/m.wasm")).unwrap();
        let parsed: Vec<serde_json::Value> = configs
            .iter()
            .map(|(_, text)| serde_json::from_str(text).unwrap())
            .collect();
        let config = |i: usize| &parsed[i]["resources"][0]["typed_config"]["config"];
        assert_eq!(config(0)["vm_config"], config(1)["vm_config"]);
        assert_eq!(config(0)["configuration"]["value"], r#"{"a":1}"#);
        assert!(config(1).get("configuration").is_none());
        assert_eq!(parsed[0]["resources"][0]["name"], "plan_limits");
        // Another plans.json, another version.
        let other = filter_configs(r#"{"a":2}"#, Path::new("/m.wasm")).unwrap();
        assert_ne!(configs[0], other[0]);
        assert_eq!(configs[1], other[1], "the hold filter's is unchanged");
    }

    #[test]
    fn every_placeholder_must_be_filled() {
        let params = EnvoyParams {
            admin_port: 1,
            gateway_port: 2,
            upstream_port: 3,
            webdis_port: 4,
            upstream_timeout: "1s",
            plans_json: "{}",
            jwks: Path::new("/jwks.json"),
            ecds_dir: Path::new("/ecds"),
            redis_cluster_proxy: None,
        };
        assert!(render(&template(), &params).is_ok());
        let err = render("a: @NOT_THERE@", &params).unwrap_err();
        assert!(err.contains("@NOT_THERE@"), "{err}");
    }
}
