//! The whole gateway for a test: Redis, webdis, the demo upstream and Envoy running the real
//! filter, configured from envoy.yaml and a plans.json, on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{free_port, scratch_dir, Service};
use crate::redis_server::RedisServer;

/// What fills envoy.yaml's placeholders.
pub struct EnvoyParams<'a> {
    pub admin_port: u16,
    pub gateway_port: u16,
    pub upstream_port: u16,
    pub webdis_port: u16,
    pub upstream_timeout: &'a str,
    pub filter_wasm: &'a Path,
    pub plans_json: &'a str,
}

/// Renders the envoy.yaml template; plans.json becomes the filter's configuration verbatim,
/// so limits live in one place only.
pub fn render_envoy_config(template: &str, p: &EnvoyParams) -> Result<String, String> {
    let plans: serde_json::Value =
        serde_json::from_str(p.plans_json).map_err(|e| format!("plans.json: {e}"))?;
    // A JSON string is a valid YAML double-quoted scalar.
    let plans = serde_json::Value::String(plans.to_string()).to_string();
    let rendered = template
        .replace("@ADMIN_PORT@", &p.admin_port.to_string())
        .replace("@GATEWAY_PORT@", &p.gateway_port.to_string())
        .replace("@UPSTREAM_PORT@", &p.upstream_port.to_string())
        .replace("@WEBDIS_PORT@", &p.webdis_port.to_string())
        .replace("@UPSTREAM_TIMEOUT@", p.upstream_timeout)
        .replace("@FILTER_WASM@", &p.filter_wasm.display().to_string())
        // A plans.json the filter refuses yields no metered routes: Envoy (or its `--mode
        // validate`) then fails on the filter's own message, naming the field.
        .replace(
            "@METERED_ROUTES@",
            &metered_routes(p.plans_json, p.upstream_timeout).unwrap_or_default(),
        )
        .replace("@PLANS_JSON@", &plans);
    match unfilled_placeholder(&rendered) {
        Some(name) => Err(format!("envoy.yaml: placeholder @{name}@ was not filled")),
        None => Ok(rendered),
    }
}

/// Envoy routes for the metered routes of plans.json, matching as the filter does: an exact
/// `path` with or without one trailing slash, a `prefix` on whole segments, the method without
/// case, the query string ignored. Everything else falls to the catch-all route, where the
/// filter is disabled.
pub fn metered_routes(plans_json: &str, timeout: &str) -> Result<String, String> {
    let config = plan_limits_core::config::Config::from_json(plans_json.as_bytes())
        .map_err(|e| e.to_string())?;
    let indent = "              ";
    let mut out = Vec::new();
    for route in &config.routes {
        let method = route
            .method
            .as_ref()
            .map(|m| {
                let m = serde_json::Value::String(m.clone());
                format!(", headers: [{{ name: \":method\", string_match: {{ exact: {m}, ignore_case: true }} }}]")
            })
            .unwrap_or_default();
        let trim = |p: &str| -> String {
            if p.len() > 1 {
                p.trim_end_matches('/').to_string()
            } else {
                p.to_string()
            }
        };
        let matchers: Vec<String> = match (&route.path, &route.prefix) {
            (Some(path), _) => {
                let exact = trim(path);
                let mut m = vec![format!(
                    "path: {}",
                    serde_json::Value::String(exact.clone())
                )];
                if exact != "/" {
                    m.push(format!(
                        "path: {}",
                        serde_json::Value::String(format!("{exact}/"))
                    ));
                }
                m
            }
            (None, Some(prefix)) => match trim(prefix).as_str() {
                "/" => vec!["prefix: \"/\"".to_string()],
                p => vec![format!(
                    "path_separated_prefix: {}",
                    serde_json::Value::String(p.to_string())
                )],
            },
            (None, None) => unreachable!("validated: a route has a path or a prefix"),
        };
        for matcher in matchers {
            out.push(format!(
                "{indent}- match: {{ {matcher}{method} }}\n{indent}  route: {{ cluster: product_upstream, timeout: {timeout} }}"
            ));
        }
    }
    Ok(out.join("\n"))
}

fn unfilled_placeholder(text: &str) -> Option<&str> {
    text.split('@')
        .skip(1)
        .step_by(1)
        .find(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
}

/// webdis in front of Redis, allowing nothing but EVALSHA and EVAL (the filter's two scripts).
pub fn webdis_config(redis_port: u16, http_port: u16, log: &Path) -> String {
    webdis_config_for("127.0.0.1", redis_port, http_port, log)
}

pub fn webdis_config_for(redis_host: &str, redis_port: u16, http_port: u16, log: &Path) -> String {
    serde_json::json!({
        "redis_host": redis_host,
        "redis_port": redis_port,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "threads": 2,
        "pool_size": 8,
        "daemonize": false,
        "database": 0,
        "acl": [{"disabled": ["*"]}, {"enabled": ["EVAL", "EVALSHA"]}],
        "verbosity": 1,
        "logfile": log.display().to_string(),
    })
    .to_string()
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

#[derive(Clone)]
pub struct GatewayOptions {
    pub plans_json: String,
    pub concurrency: u32,
    pub upstream_timeout: String,
    /// Fixed ports (for `make run`); free ones when `None`.
    pub ports: Option<Ports>,
    /// Where configs and logs go; a fresh temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Start Envoy with this `--base-id` (epoch 0) so a hot restart can follow.
    pub base_id: Option<u32>,
    /// Redis keeps an append-only file, so it can be restarted without losing counters.
    pub persistent_redis: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub gateway: u16,
    pub admin: u16,
    pub upstream: u16,
    pub webdis: u16,
    pub redis: u16,
}

impl Ports {
    fn free() -> Self {
        Self {
            gateway: free_port(),
            admin: free_port(),
            upstream: free_port(),
            webdis: free_port(),
            redis: free_port(),
        }
    }
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            plans_json: crate::plans_json(),
            concurrency: 2,
            upstream_timeout: "15s".into(),
            ports: None,
            dir: None,
            base_id: None,
            persistent_redis: false,
        }
    }
}

pub struct Gateway {
    pub dir: PathBuf,
    pub redis: RedisServer,
    pub gateway_port: u16,
    pub admin_port: u16,
    pub upstream_port: u16,
    pub webdis_port: u16,
    // Stopped in reverse order of start: Envoy first.
    pub envoy: Option<Service>,
    pub webdis: Service,
    pub upstream: Service,
    pub options: GatewayOptions,
}

impl Gateway {
    pub fn start(options: GatewayOptions) -> Self {
        let dir = options
            .dir
            .clone()
            .unwrap_or_else(|| scratch_dir("gateway"));
        std::fs::create_dir_all(&dir).expect("gateway dir");
        let ports = options.ports.unwrap_or_else(Ports::free);
        let redis = RedisServer::start_with(&dir, ports.redis, options.persistent_redis);

        let webdis_port = ports.webdis;
        let webdis_json = dir.join("webdis.json");
        std::fs::write(
            &webdis_json,
            webdis_config(redis.port, webdis_port, &dir.join("webdis-internal.log")),
        )
        .unwrap();
        let mut command = Command::new("webdis");
        command.arg(&webdis_json);
        let mut webdis = Service::spawn("webdis", command, &dir.join("webdis.log"));
        webdis.wait_for_port(webdis_port, Duration::from_secs(10));

        let upstream_port = ports.upstream;
        let mut command = Command::new("python3");
        command
            .arg(crate::repo_root().join("demo/upstream.py"))
            .arg(upstream_port.to_string());
        let mut upstream = Service::spawn("demo upstream", command, &dir.join("upstream.log"));
        upstream.wait_for_port(upstream_port, Duration::from_secs(10));

        let mut gateway = Self {
            dir,
            redis,
            gateway_port: ports.gateway,
            admin_port: ports.admin,
            upstream_port: ports.upstream,
            webdis_port,
            envoy: None,
            webdis,
            upstream,
            options,
        };
        let hot_restart = gateway.options.base_id.map(|id| (id, 0));
        let envoy = gateway
            .spawn_envoy("envoy", ports.gateway, ports.admin, hot_restart)
            .unwrap_or_else(|e| panic!("{e}"));
        gateway.envoy = Some(envoy);
        gateway
    }

    /// Renders envoy.yaml for this gateway (its upstream and webdis) with `plans_json`.
    pub fn envoy_config(
        &self,
        gateway_port: u16,
        admin_port: u16,
        plans_json: &str,
    ) -> Result<String, String> {
        let template = std::fs::read_to_string(crate::repo_root().join("envoy.yaml")).unwrap();
        render_envoy_config(
            &template,
            &EnvoyParams {
                admin_port,
                gateway_port,
                upstream_port: self.upstream_port,
                webdis_port: self.webdis_port,
                upstream_timeout: &self.options.upstream_timeout,
                filter_wasm: &crate::filter_wasm(),
                plans_json,
            },
        )
    }

    /// Starts an Envoy of this gateway (another process sharing the same Redis, or the
    /// first). `hot_restart` = `(base id, epoch)` starts it as a hot restart of another.
    pub fn spawn_envoy(
        &self,
        name: &str,
        gateway_port: u16,
        admin_port: u16,
        hot_restart: Option<(u32, u32)>,
    ) -> Result<Service, String> {
        self.spawn_envoy_with(
            name,
            gateway_port,
            admin_port,
            &self.options.plans_json,
            hot_restart,
        )
    }

    pub fn spawn_envoy_with(
        &self,
        name: &str,
        gateway_port: u16,
        admin_port: u16,
        plans_json: &str,
        hot_restart: Option<(u32, u32)>,
    ) -> Result<Service, String> {
        let envoy_yaml = self.dir.join(format!("{name}.yaml"));
        std::fs::write(
            &envoy_yaml,
            self.envoy_config(gateway_port, admin_port, plans_json)?,
        )
        .unwrap();
        let mut command = Command::new(envoy_bin());
        command
            .arg("-c")
            .arg(&envoy_yaml)
            .args(["--concurrency", &self.options.concurrency.to_string()])
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
        let mut envoy = Service::spawn(name, command, &self.dir.join(format!("{name}.log")));
        if hot_restart.is_none_or(|(_, epoch)| epoch == 0) {
            envoy.wait_for_port(gateway_port, Duration::from_secs(30));
        }
        Ok(envoy)
    }

    pub fn envoy(&mut self) -> &mut Service {
        self.envoy.as_mut().expect("envoy started")
    }

    /// The filter's counters from Envoy's admin `/stats` (`plan_limits.<name>`).
    pub fn metric(&self, name: &str) -> u64 {
        metric_at(self.admin_port, name)
    }

    /// 2xx answers the demo upstream gave for `path`.
    pub fn upstream_successes(&self, path: &str) -> u64 {
        let stats = crate::http::get(self.upstream_port, "/__demo/stats").json();
        stats["successes"][path].as_u64().unwrap_or(0)
    }

    /// A counter of Envoy's own admin `/stats` (`http.gateway.downstream_rq_5xx`, ...).
    pub fn envoy_stat(&self, name: &str) -> u64 {
        admin_stat(self.admin_port, name)
    }

    /// Every 2xx the demo upstream gave, per path.
    pub fn upstream_success_map(&self) -> serde_json::Value {
        crate::http::get(self.upstream_port, "/__demo/stats").json()["successes"].clone()
    }

    /// Requests (attempts, retries included) the demo upstream saw.
    pub fn upstream_attempts(&self) -> u64 {
        crate::http::get(self.upstream_port, "/__demo/stats").json()["attempts"]
            .as_u64()
            .unwrap_or(0)
    }
}

/// A filter counter from the Envoy whose admin listens on `admin_port`.
pub fn metric_at(admin_port: u16, name: &str) -> u64 {
    admin_stat(admin_port, &format!("wasmcustom.plan_limits.{name}"))
}

/// A counter from Envoy's admin `/stats` by its full name (0 when absent).
fn admin_stat(admin_port: u16, name: &str) -> u64 {
    let stats = crate::http::get(admin_port, &format!("/stats?filter={name}")).body_text();
    let key = format!("{name}: ");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
