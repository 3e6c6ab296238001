//! The filter in our wasmtime host, wired to a real Redis: for deterministic scenario tests and
//! for the `plan-limits-sim` replay tool. One call of `Harness::send` is a request's whole
//! life: headers in, Redis answers, the upstream's status, the end of the stream, and the
//! worker's settlements flushed to Redis.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plan_limits_services::process::{free_port, scratch_dir, Service};
use plan_limits_services::redis_server::RedisServer;

use crate::{Flow, HostError, LocalReply, Pairs, Plugin, Upstreams, Vm};

/// Which filter build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// The default build: Redis through webdis (`proxy_http_call`), as in stock Envoy.
    Webdis,
    /// `--features redis-hostcalls`: the Higress gateway's Redis host calls.
    RedisHostCalls,
}

impl Build {
    pub fn wasm(self) -> PathBuf {
        match self {
            Build::Webdis => plan_limits_services::filter_wasm(),
            Build::RedisHostCalls => {
                let path = std::env::var_os("PLAN_LIMITS_WASM_HOSTCALLS")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        plan_limits_services::repo_root().join("target/plan_limits_filter_redis_hostcalls.wasm")
                    });
                assert!(
                    path.exists(),
                    "{} does not exist: run `make build` first",
                    path.display()
                );
                path
            }
        }
    }
}

/// One request of a scenario.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub user: Option<String>,
    pub plan: Option<String>,
    pub content_length: Option<u64>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// What the upstream answers if the request gets there.
    pub upstream_status: u16,
}

impl Call {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            user: None,
            plan: None,
            content_length: None,
            headers: Vec::new(),
            upstream_status: 200,
        }
    }

    pub fn user(mut self, user: &str, plan: &str) -> Self {
        self.user = Some(user.into());
        self.plan = Some(plan.into());
        self
    }

    pub fn length(mut self, bytes: u64) -> Self {
        self.content_length = Some(bytes);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.as_bytes().to_vec()));
        self
    }

    pub fn upstream(mut self, status: u16) -> Self {
        self.upstream_status = status;
        self
    }

    fn pairs(&self, request_id: u64) -> Pairs {
        let mut pairs: Pairs = vec![
            (":method".into(), self.method.clone().into_bytes()),
            (":path".into(), self.path.clone().into_bytes()),
            (":authority".into(), b"gateway".to_vec()),
            (":scheme".into(), b"http".to_vec()),
            (
                "x-request-id".into(),
                format!("sim-{request_id}").into_bytes(),
            ),
        ];
        if let Some(user) = &self.user {
            pairs.push(("x-user-id".into(), user.clone().into_bytes()));
        }
        if let Some(plan) = &self.plan {
            pairs.push(("x-user-plan".into(), plan.clone().into_bytes()));
        }
        if let Some(n) = self.content_length {
            pairs.push(("content-length".into(), n.to_string().into_bytes()));
        }
        pairs.extend(
            self.headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        pairs
    }
}

/// What the client saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    /// The filter's own answer, when it gave one.
    pub reply: Option<LocalReply>,
    pub reached_upstream: bool,
}

pub struct Harness {
    pub plugin: Plugin,
    pub vms: Vec<Vm>,
    pub redis_url: String,
    /// Our Redis, unless one was given.
    pub redis: Option<RedisServer>,
    pub webdis: Option<Service>,
    pub dir: PathBuf,
    requests: u64,
}

impl Harness {
    /// The filter with `plans_json`, `vms` VMs (workers), a Redis of its own.
    pub fn start(build: Build, plans_json: &str, vms: usize) -> Self {
        Self::try_start(build, plans_json, vms, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As `start`, on the Redis at `redis_url` when given.
    pub fn try_start(
        build: Build,
        plans_json: &str,
        vms: usize,
        redis_url: Option<String>,
    ) -> Result<Self, HostError> {
        let dir = scratch_dir("harness");
        let (redis, redis_url) = match redis_url {
            Some(url) => (None, url),
            None => {
                let server = RedisServer::start_on(&dir, free_port());
                let url = server.url();
                (Some(server), url)
            }
        };
        let cluster = serde_json::from_str::<serde_json::Value>(plans_json)
            .ok()
            .and_then(|v| v["redis"]["cluster"].as_str().map(String::from))
            .unwrap_or_else(|| "plan_limits_redis".into());
        let mut upstreams = Upstreams::default();
        let mut webdis = None;
        match build {
            Build::Webdis => {
                let port = free_port();
                let (host, redis_port) = host_port(&redis_url);
                let config = dir.join("webdis.json");
                std::fs::write(
                    &config,
                    plan_limits_services::gateway::webdis_config_for(
                        &host,
                        redis_port,
                        port,
                        &dir.join("webdis-internal.log"),
                    ),
                )
                .expect("webdis config");
                let mut command = Command::new("webdis");
                command.arg(&config);
                let mut service = Service::spawn("webdis", command, &dir.join("webdis.log"));
                service.wait_for_port(port, Duration::from_secs(10));
                webdis = Some(service);
                upstreams.http.insert(cluster, format!("127.0.0.1:{port}"));
            }
            Build::RedisHostCalls => {
                upstreams.redis.insert(cluster, redis_url.clone());
            }
        }
        let mut plugin = Plugin::load(&build.wasm(), plans_json.as_bytes(), upstreams)?;
        let vms = (0..vms)
            .map(|_| plugin.start_vm())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            plugin,
            vms,
            redis_url,
            redis,
            webdis,
            dir,
            requests: 0,
        })
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.redis_url.as_str())
            .and_then(|c| c.get_connection())
            .expect("connect to redis")
    }

    /// Sets the host clock (RFC 3339).
    pub fn set_time(&self, rfc3339: &str) {
        let t = chrono::DateTime::parse_from_rfc3339(rfc3339).expect("an RFC 3339 time");
        self.plugin
            .clock()
            .set_nanos(t.timestamp_nanos_opt().expect("a time after 1970") as u64);
    }

    /// Starts a request on VM `vm` and lets its Redis calls run until it is decided.
    pub fn begin(&mut self, vm: usize, call: &Call) -> Result<u32, HostError> {
        self.requests += 1;
        let vm = &mut self.vms[vm];
        let id = vm.new_stream()?;
        vm.request_headers(id, call.pairs(self.requests), call.content_length.is_none())?;
        Ok(id)
    }

    /// Finishes a request begun on `vm`: the upstream answers (if it got there), the stream
    /// ends, and the worker's settlements reach Redis.
    pub fn finish(
        &mut self,
        vm: usize,
        id: u32,
        upstream_status: u16,
    ) -> Result<Outcome, HostError> {
        let v = &mut self.vms[vm];
        let outcome = match v.flow(id) {
            Flow::Responded(reply) => Outcome {
                status: reply.status as u16,
                reply: Some(reply),
                reached_upstream: false,
            },
            Flow::Continue => {
                v.response_headers(id, upstream_status, Vec::new())?;
                Outcome {
                    status: upstream_status,
                    reply: None,
                    reached_upstream: true,
                }
            }
            Flow::Paused => panic!("request {id} is still paused with no call pending"),
        };
        v.end_stream(id)?;
        self.flush(vm)?;
        Ok(outcome)
    }

    /// A request's whole life on VM `vm`.
    pub fn send(&mut self, vm: usize, call: &Call) -> Result<Outcome, HostError> {
        let id = self.begin(vm, call)?;
        self.settle_calls(vm, id)?;
        self.finish(vm, id, call.upstream_status)
    }

    /// Delivers calls until request `id` is no longer waiting.
    pub fn settle_calls(&mut self, vm: usize, id: u32) -> Result<(), HostError> {
        let v = &mut self.vms[vm];
        for _ in 0..16 {
            if v.flow(id) != Flow::Paused || v.pending_calls() == 0 {
                break;
            }
            v.deliver_calls()?;
        }
        Ok(())
    }

    /// Ticks VM `vm` and delivers its calls until it has nothing more to send.
    pub fn flush(&mut self, vm: usize) -> Result<(), HostError> {
        let v = &mut self.vms[vm];
        for _ in 0..64 {
            v.tick()?;
            if v.pending_calls() == 0 {
                break;
            }
            v.deliver_calls()?;
        }
        Ok(())
    }
}

fn host_port(redis_url: &str) -> (String, u16) {
    let rest = redis_url.trim_start_matches("redis://");
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(6379)),
        None => (authority.to_string(), 6379),
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
