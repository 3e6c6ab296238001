//! The whole gateway on loopback: Redis, webdis, the demo upstream and Envoy running the real
//! filter, its config built by `envoy::config` from a plans.json; and `Gateway`, what every
//! runner of requests offers (this one, and the wasmtime harness), so a scenario is written
//! once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use plan_limits_core::BillingPeriod;

use crate::envoy::{self, EnvoyOptions, EnvoyParams};
use crate::http::{Request, Response};
use crate::jwt::DevKey;
use crate::process::{free_port, scratch_dir, Service};
use crate::redis_cluster::RedisCluster;
use crate::redis_server::RedisServer;
use crate::upstream::DemoUpstream;
use crate::webdis::Webdis;

/// Anything that answers requests as the gateway does, counting in a Redis.
pub trait Gateway {
    /// Sends `request` and returns what the client saw.
    fn send(&mut self, request: &Request) -> Response;
    /// A connection to the Redis it counts in.
    fn redis(&self) -> redis::Connection;
    /// A filter counter: `denied`, `fail_open`, ... (`plan_limits.<name>`).
    fn metric(&self, name: &str) -> u64;
    /// Its clock: the real one for Envoy, the test's for the harness.
    fn now(&self) -> DateTime<Utc>;

    /// The billing period it counts in now (`2026-11`).
    fn period(&self) -> String {
        BillingPeriod::calendar_month(self.now()).id
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
    /// Say what is being started (for `make run`).
    pub verbose: bool,
    /// Where the token signing key is kept; the tests' key when `None`.
    pub jwt_dir: Option<PathBuf>,
    /// The demo upstream reads paths as a lenient web framework does.
    pub lenient_upstream: bool,
    /// The filter module Envoy runs; `crate::filter_wasm()` when `None`.
    pub wasm: Option<PathBuf>,
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
    /// `make run`'s: the repository's envoy.yaml is rendered for them.
    pub const MAKE_RUN: Ports = Ports {
        gateway: 10000,
        admin: 9901,
        upstream: 18080,
        webdis: 17379,
        redis: 16379,
    };

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
            upstream_timeout: envoy::DEFAULT_UPSTREAM_TIMEOUT.into(),
            ports: None,
            dir: None,
            base_id: None,
            persistent_redis: false,
            verbose: false,
            jwt_dir: None,
            lenient_upstream: false,
            wasm: None,
        }
    }
}

/// The files a gateway's Envoy config names besides itself, in `dir` as `EnvoyGateway` keeps
/// them (`make run`'s `.gateway/`): the dev key's JSON Web Key Set in `jwt/` (the key made if
/// there is none, as `make run` makes it) and the filters' discovered configuration in
/// `envoy-ecds/` (from `plans_json` and `wasm`, written only if absent: a gateway running
/// from them may be reading them, and `make reload` swaps them). Envoy accepts a config only
/// once they exist, in `--mode validate` too (which does not read the discovered ones).
pub fn prepare_files(dir: &Path, plans_json: &str, wasm: &Path) -> Result<(), String> {
    DevKey::load_or_create(&dir.join("jwt"));
    let ecds_dir = dir.join("envoy-ecds");
    let present = envoy::DISCOVERED_FILTERS
        .iter()
        .all(|name| ecds_dir.join(format!("{name}.json")).exists());
    if present {
        return Ok(());
    }
    envoy::write_filter_configs(&ecds_dir, plans_json, wasm)
}

/// The gateway through real Envoy. Stopped in reverse order of start when dropped: Envoy
/// first (fields drop in declaration order).
pub struct EnvoyGateway {
    pub envoy: Option<Service>,
    pub upstream: DemoUpstream,
    pub webdis: Webdis,
    pub redis: RedisServer,
    pub dir: PathBuf,
    pub gateway_port: u16,
    pub admin_port: u16,
    pub options: GatewayOptions,
    /// The key whose tokens this gateway accepts.
    pub jwt: Arc<DevKey>,
}

impl EnvoyGateway {
    pub fn start(options: GatewayOptions) -> Self {
        let verbose = options.verbose;
        let say = move |what: &str| {
            if verbose {
                println!("{what}");
            }
        };
        let dir = options
            .dir
            .clone()
            .unwrap_or_else(|| scratch_dir("gateway"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let ports = options.ports.unwrap_or_else(Ports::free);
        say(&format!("starting Redis on 127.0.0.1:{}", ports.redis));
        let redis = RedisServer::start_with(&dir, ports.redis, options.persistent_redis);
        say(&format!("starting webdis on 127.0.0.1:{}", ports.webdis));
        let webdis = Webdis::start(
            &dir,
            "127.0.0.1",
            redis.port,
            redis.filter_password(),
            Some(ports.webdis),
        );
        say(&format!(
            "starting the demo upstream on 127.0.0.1:{}",
            ports.upstream
        ));
        let upstream = DemoUpstream::start(&dir, Some(ports.upstream), options.lenient_upstream);
        let jwt = match &options.jwt_dir {
            Some(jwt_dir) => Arc::new(DevKey::load_or_create(jwt_dir)),
            None => DevKey::for_tests(),
        };
        let mut gateway = Self {
            envoy: None,
            upstream,
            webdis,
            redis,
            dir,
            gateway_port: ports.gateway,
            admin_port: ports.admin,
            options,
            jwt,
        };
        say(&format!(
            "starting Envoy on 127.0.0.1:{} (admin {}) with {}",
            ports.gateway,
            ports.admin,
            gateway.wasm().display()
        ));
        if verbose {
            let plans_json = &gateway.options.plans_json;
            let config = gateway.envoy_config("envoy", ports.gateway, ports.admin, plans_json);
            say(
                &if config.as_deref().is_ok_and(envoy::is_repository_envoy_yaml) {
                    "Envoy's config: the repository's envoy.yaml".to_string()
                } else {
                    format!(
                        "Envoy's config: {} (other ports or another plans.json than the \
                     repository's envoy.yaml was written for: `make envoy-yaml` writes it)",
                        gateway.dir.join("envoy.yaml").display()
                    )
                },
            );
        }
        let hot_restart = gateway.options.base_id.map(|id| (id, 0));
        let envoy = gateway
            .spawn_envoy("envoy", ports.gateway, ports.admin, hot_restart)
            .unwrap_or_else(|e| panic!("{e}"));
        gateway.envoy = Some(envoy);
        gateway
    }

    /// Renders envoy.yaml for this gateway (its upstream and webdis) with `plans_json`; the
    /// Envoy named `name` discovers its filters' configuration in `ecds_dir(name)`.
    pub fn envoy_config(
        &self,
        name: &str,
        gateway_port: u16,
        admin_port: u16,
        plans_json: &str,
    ) -> Result<String, String> {
        // Paths under the repository from its root, where Envoy runs: `make run`'s config is
        // then the repository's envoy.yaml (`envoy::start` runs that file).
        envoy::render(&EnvoyParams {
            admin_port,
            gateway_port,
            upstream_port: self.upstream.port,
            webdis_port: self.webdis.port,
            upstream_timeout: &self.options.upstream_timeout,
            plans_json,
            jwks: &envoy::from_repository_root(&self.jwt.jwks_path()),
            ecds_dir: &envoy::from_repository_root(&self.ecds_dir(name)),
            redis_cluster_proxy: None,
        })
    }

    /// Where the Envoy named `name` watches its filters' configuration.
    pub fn ecds_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ecds"))
    }

    /// Swaps `plans_json` (and the current filter .wasm) into the running Envoy named `name`,
    /// without restarting it (what `plan-limits reload` does). Envoy itself refuses a config
    /// the filter refuses, keeping the last good one.
    pub fn reload(&self, name: &str, plans_json: &str) -> Result<(), String> {
        envoy::write_filter_configs(&self.ecds_dir(name), plans_json, &self.wasm())
    }

    /// The filter module this gateway's Envoys run.
    pub fn wasm(&self) -> PathBuf {
        self.options.wasm.clone().unwrap_or_else(crate::filter_wasm)
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
        let config = self.envoy_config(name, gateway_port, admin_port, plans_json)?;
        // (A hot restart's later epoch takes over the files of the Envoy it replaces.)
        self.reload(name, plans_json)?;
        Ok(envoy::start(EnvoyOptions {
            name,
            dir: &self.dir,
            config: &config,
            concurrency: self.options.concurrency,
            hot_restart,
            port: gateway_port,
        }))
    }

    pub fn envoy(&mut self) -> &mut Service {
        self.envoy
            .as_mut()
            .unwrap_or_else(|| panic!("the gateway's Envoy was not started"))
    }

    /// A counter of Envoy's own admin `/stats` (`http.gateway.downstream_rq_5xx`, ...).
    pub fn envoy_stat(&self, name: &str) -> u64 {
        envoy::admin_stat(self.admin_port, name)
    }

    /// Every process the gateway runs (each service and what it forked).
    pub fn processes(&self) -> Vec<u32> {
        let mut all = Vec::new();
        for service in [
            self.envoy.as_ref(),
            Some(&self.upstream.service),
            Some(&self.webdis.service),
            Some(self.redis.service()),
        ]
        .into_iter()
        .flatten()
        {
            all.extend(service.processes());
        }
        all
    }
}

impl Gateway for EnvoyGateway {
    fn send(&mut self, request: &Request) -> Response {
        request.send(self.gateway_port)
    }

    fn redis(&self) -> redis::Connection {
        self.redis.connection()
    }

    fn metric(&self, name: &str) -> u64 {
        envoy::metric_at(self.admin_port, name)
    }

    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The gateway through real Envoy on a Redis Cluster of three masters. webdis cannot talk to a
/// cluster, so it logs in to Envoy's `redis_proxy` (a listener of the same Envoy), which routes
/// each command by its first key to the master of its slot; `redis_proxy` does not forward
/// `FCALL`, so `options.plans_json` must call the functions as scripts (`redis.invoke:
/// evalsha`) and split batches by slot (`redis.cluster_mode`). Stopped in reverse order of
/// start: Envoy first.
pub struct EnvoyClusterGateway {
    pub envoy: Service,
    pub webdis: Webdis,
    pub upstream: DemoUpstream,
    pub cluster: RedisCluster,
    pub dir: PathBuf,
    pub gateway_port: u16,
    pub admin_port: u16,
    /// Envoy's `redis_proxy` listener, which webdis logs in to.
    pub redis_proxy_port: u16,
}

impl EnvoyClusterGateway {
    pub fn start(options: GatewayOptions) -> Self {
        let dir = options
            .dir
            .clone()
            .unwrap_or_else(|| scratch_dir("cluster-gateway"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let cluster = RedisCluster::start(&dir, 3, options.persistent_redis);
        let upstream = DemoUpstream::start(&dir, None, options.lenient_upstream);
        let (gateway_port, admin_port) = (free_port(), free_port());
        let (webdis_port, redis_proxy_port) = (free_port(), free_port());
        let password_file = dir.join("redis-cluster-filter.password");
        std::fs::write(&password_file, cluster.filter_password())
            .unwrap_or_else(|e| panic!("{}: {e}", password_file.display()));
        let masters: Vec<u16> = cluster.masters.iter().map(|m| m.port).collect();
        let jwt = match &options.jwt_dir {
            Some(jwt_dir) => Arc::new(DevKey::load_or_create(jwt_dir)),
            None => DevKey::for_tests(),
        };
        let ecds_dir = dir.join("envoy-ecds");
        let timeout_ms = plan_limits_core::Plans::from_json(options.plans_json.as_bytes())
            .map(|plans| plans.redis.timeout_ms)
            .unwrap_or(250);
        let config = envoy::render(&EnvoyParams {
            admin_port,
            gateway_port,
            upstream_port: upstream.port,
            webdis_port,
            upstream_timeout: &options.upstream_timeout,
            plans_json: &options.plans_json,
            jwks: &jwt.jwks_path(),
            ecds_dir: &ecds_dir,
            redis_cluster_proxy: Some(envoy::RedisClusterProxy {
                port: redis_proxy_port,
                masters: &masters,
                password_file: &password_file,
                op_timeout_ms: timeout_ms,
            }),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        envoy::write_filter_configs(&ecds_dir, &options.plans_json, &crate::filter_wasm())
            .unwrap_or_else(|e| panic!("{e}"));
        let envoy = envoy::start(EnvoyOptions {
            name: "envoy",
            dir: &dir,
            config: &config,
            concurrency: options.concurrency,
            hot_restart: None,
            port: gateway_port,
        });
        // After Envoy: webdis logs in to its redis_proxy listener as it starts.
        let webdis = Webdis::start_with_commands(
            &dir,
            "127.0.0.1",
            redis_proxy_port,
            Some(cluster.filter_password()),
            Some(webdis_port),
            &["EVALSHA"],
        );
        Self {
            envoy,
            webdis,
            upstream,
            cluster,
            dir,
            gateway_port,
            admin_port,
            redis_proxy_port,
        }
    }

    /// A counter of Envoy's own admin `/stats` (`plan_limits_redis_cluster.command.evalsha.total`).
    pub fn envoy_stat(&self, name: &str) -> u64 {
        envoy::admin_stat(self.admin_port, name)
    }

    /// A connection to Envoy's `redis_proxy` listener, logged in as the filter's Redis user
    /// (as webdis is).
    pub fn redis_proxy_connection(&self) -> redis::Connection {
        let url = format!(
            "redis://:{}@127.0.0.1:{}/",
            self.cluster.filter_password(),
            self.redis_proxy_port
        );
        redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("redis_proxy on {}: {e}", self.redis_proxy_port))
    }

    /// Every process the gateway runs.
    pub fn processes(&self) -> Vec<u32> {
        let mut all = self.cluster.processes();
        for service in [&self.envoy, &self.upstream.service, &self.webdis.service] {
            all.extend(service.processes());
        }
        all
    }
}

impl Gateway for EnvoyClusterGateway {
    fn send(&mut self, request: &Request) -> Response {
        request.send(self.gateway_port)
    }

    /// Master 0 alone: read the whole cluster with `cluster.connection()`.
    fn redis(&self) -> redis::Connection {
        self.cluster.node_connection(0)
    }

    fn metric(&self, name: &str) -> u64 {
        envoy::metric_at(self.admin_port, name)
    }

    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Crashes, for the fault tests: a part of the gateway killed with SIGKILL (nothing drained,
/// nothing flushed) and started again on the same port, as a supervisor would.
impl EnvoyGateway {
    /// Kills Envoy, waits `down`, and starts a new one named `name` (its config, ECDS files
    /// and log are `<name>*` in the scratch dir, beside the dead one's) on the same gateway and
    /// admin ports.
    pub fn kill_and_restart_envoy(
        &mut self,
        name: &str,
        down: std::time::Duration,
    ) -> Result<(), String> {
        if let Some(mut envoy) = self.envoy.take() {
            envoy.stop();
        }
        std::thread::sleep(down);
        let envoy = self.spawn_envoy(name, self.gateway_port, self.admin_port, None)?;
        self.envoy = Some(envoy);
        Ok(())
    }

    /// Kills Redis, waits `down`, and starts it again on its port (from its append-only file
    /// when the gateway was started with `persistent_redis`).
    pub fn kill_and_restart_redis(&mut self, down: std::time::Duration) {
        let port = self.redis.port;
        self.redis.stop();
        std::thread::sleep(down);
        self.redis = RedisServer::start_with(&self.dir, port, self.options.persistent_redis);
    }

    /// Kills webdis, waits `down`, and starts it again on its port in front of the same Redis.
    pub fn kill_and_restart_webdis(&mut self, down: std::time::Duration) {
        let port = self.webdis.port;
        self.webdis.stop();
        std::thread::sleep(down);
        self.webdis = Webdis::start(
            &self.dir,
            "127.0.0.1",
            self.redis.port,
            self.redis.filter_password(),
            Some(port),
        );
    }
}
