//! The filter in our wasmtime host, wired to a real Redis: for deterministic scenario tests
//! and for `plan-limits replay`. One `send` is a request's whole life: headers in, its Redis
//! calls answered, the upstream's status, the end of the stream, and the worker's settlements
//! flushed to Redis. It speaks the same `Request`/`Response` as real Envoy (`Gateway`).

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use plan_limits_core::{Identity, IdentitySource, Plans};
use plan_limits_services::gateway::Gateway;
use plan_limits_services::http::{
    Body, Request, Response, DEMO_FREED_BYTES, DEMO_REMOVED_MEMBERS, DEMO_STATUS, UPSTREAM_MARK,
};
use plan_limits_services::jwt::DevKey;
use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_services::redis_cluster::RedisCluster;
use plan_limits_services::redis_server::RedisServer;
use plan_limits_services::webdis::Webdis;

use plan_limits_wasm_host::abi::serialize_pairs;
use plan_limits_wasm_host::{Flow, HostError, Pairs, Plugin, Upstreams, Vm};

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
                        plan_limits_services::repo_root()
                            .join("target/plan_limits_filter_redis_hostcalls.wasm")
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

pub struct Harness {
    pub plugin: Plugin,
    pub vms: Vec<Vm>,
    pub redis_url: String,
    /// Our Redis, unless one was given.
    pub redis: Option<RedisServer>,
    pub webdis: Option<Webdis>,
    pub dir: PathBuf,
    /// Who is calling, as plans.json has Envoy establish it (the harness plays `jwt_authn`).
    identity: Identity,
    jwt: Arc<DevKey>,
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
        // `redis_url`: what the harness reads with; `filter_url`: what the filter reaches
        // Redis as (its own user, which may only call the library's functions).
        let (redis, redis_url, filter_url) = match redis_url {
            Some(url) => (None, url.clone(), url),
            None => {
                let server = RedisServer::start_on(&dir, free_port());
                let (url, filter_url) = (server.url(), server.filter_url());
                (Some(server), url, filter_url)
            }
        };
        let cluster = envoy_cluster(plans_json);
        let mut upstreams = Upstreams::default();
        let mut webdis = None;
        match build {
            Build::Webdis => {
                let (host, redis_port, password) = host_port(&filter_url);
                let started = Webdis::start(&dir, &host, redis_port, password.as_deref(), None);
                let address = format!("127.0.0.1:{}", started.port);
                if let Some(reads) = read_cluster(plans_json) {
                    upstreams.http.insert(reads, address.clone());
                }
                upstreams.http.insert(cluster, address);
                webdis = Some(started);
            }
            Build::RedisHostCalls => {
                if let Some(reads) = read_cluster(plans_json) {
                    upstreams.redis.insert(reads, filter_url.clone());
                }
                upstreams.redis.insert(cluster, filter_url);
            }
        }
        Self::with_upstreams(
            build, plans_json, vms, upstreams, dir, redis, redis_url, webdis,
        )
    }

    /// The Redis host-call build on a Redis Cluster (`redis.cluster_mode` in `plans_json`),
    /// reached as the filter's user; the harness reads through master 0 (`connection`), a
    /// test reads the whole cluster through `RedisCluster::connection`. webdis cannot reach
    /// a cluster: the webdis build goes through Envoy's `redis_proxy` (`EnvoyGateway`).
    pub fn try_start_on_cluster(
        build: Build,
        plans_json: &str,
        vms: usize,
        redis: &RedisCluster,
    ) -> Result<Self, HostError> {
        assert_eq!(
            build,
            Build::RedisHostCalls,
            "webdis cannot talk to a Redis Cluster: use the host-call build"
        );
        let mut upstreams = Upstreams::default();
        if let Some(reads) = read_cluster(plans_json) {
            upstreams.redis_cluster.insert(reads, redis.filter_urls());
        }
        upstreams
            .redis_cluster
            .insert(envoy_cluster(plans_json), redis.filter_urls());
        let dir = scratch_dir("harness-cluster");
        Self::with_upstreams(
            build,
            plans_json,
            vms,
            upstreams,
            dir,
            None,
            redis.node_url(0),
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn with_upstreams(
        build: Build,
        plans_json: &str,
        vms: usize,
        upstreams: Upstreams,
        dir: PathBuf,
        redis: Option<RedisServer>,
        redis_url: String,
        webdis: Option<Webdis>,
    ) -> Result<Self, HostError> {
        let mut plugin = Plugin::load(&build.wasm(), plans_json.as_bytes(), upstreams)?;
        // As envoy.yaml renders it: the hold filter (the same module) right after the filter.
        plugin.with_second_filter(plan_limits_core::HOLD_ROOT_ID);
        let vms = (0..vms)
            .map(|_| plugin.start_vm())
            .collect::<Result<Vec<_>, _>>()?;
        let identity = Plans::from_json(plans_json.as_bytes())
            .map(|plans| plans.identity.clone())
            .unwrap_or_default();
        Ok(Self {
            plugin,
            vms,
            redis_url,
            redis,
            webdis,
            dir,
            identity,
            jwt: DevKey::for_tests(),
            requests: 0,
        })
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.redis_url.as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.redis_url))
    }

    /// Sets the host clock (RFC 3339).
    pub fn set_time(&self, rfc3339: &str) {
        let t = chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap_or_else(|e| panic!("{rfc3339}: {e}"));
        let nanos = t.timestamp_nanos_opt().unwrap_or(0);
        self.plugin
            .clock()
            .set_nanos(u64::try_from(nanos).unwrap_or(0));
    }

    /// Starts `request` on VM `vm` (its headers go in, after the identity filters Envoy runs
    /// before ours); returns its stream id.
    pub fn begin(&mut self, vm: usize, request: &Request) -> Result<u32, HostError> {
        self.requests += 1;
        let mut pairs = pairs(request, self.requests);
        let claims = self.authenticate(&mut pairs);
        let vm = &mut self.vms[vm];
        let id = vm.new_stream()?;
        for (path, value) in claims {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            match value {
                Some(value) => vm.set_property(id, &path, value),
                None => vm.set_unencodable_property(id, &path),
            }
        }
        vm.request_headers(id, pairs, !request.has_body())?;
        Ok(id)
    }

    /// Sends request `id`'s body on `vm` in 1 MiB pieces, as far as Envoy would: while the
    /// filter lets the request go on or has it held (a paused head stops the body in Envoy's
    /// buffer), and for `Expect: 100-continue` only once the upstream would say go on.
    pub fn send_body(&mut self, vm: usize, id: u32, request: &Request) -> Result<(), HostError> {
        const PIECE: u64 = 1 << 20;
        let v = &mut self.vms[vm];
        let started = v.flow(id);
        let goes = match request.body {
            Body::ExpectContinue(_) => started == Flow::Continue,
            _ => matches!(started, Flow::Continue | Flow::Held),
        };
        if !goes || !request.has_body() {
            return Ok(());
        }
        let mut left = request.body.size();
        let mut offset = 0usize;
        while left > 0 && !matches!(v.flow(id), Flow::Responded(_)) {
            let n = left.min(PIECE);
            let piece = match &request.body {
                Body::Bytes(b) => b[offset..offset + n as usize].to_vec(),
                _ => vec![0; n as usize],
            };
            offset += n as usize;
            left -= n;
            v.request_body(id, piece, left == 0)?;
        }
        Ok(())
    }

    /// What Envoy's identity filters do before ours (`jwt` identity): client copies of the
    /// identity headers removed; a valid bearer token's payload put in the dynamic metadata
    /// and the token not forwarded. Each property is what Envoy hands the filter for its path
    /// (`envoy_encoding`): the payload whole, and each claim; `None` where Envoy cannot.
    fn authenticate(&self, pairs: &mut Pairs) -> Vec<(Vec<String>, Option<Vec<u8>>)> {
        let identity = &self.identity;
        if identity.source != IdentitySource::Jwt {
            return Vec::new();
        }
        let removed = identity.verified_headers();
        pairs.retain(|(name, _)| !removed.iter().any(|r| name.eq_ignore_ascii_case(r)));
        let token = pairs.iter().find_map(|(name, value)| {
            let value = std::str::from_utf8(value).ok()?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.strip_prefix("Bearer "))
                .flatten()
                .map(String::from)
        });
        let Some(payload) = token.and_then(|t| self.jwt.verify(&identity.jwt, &t)) else {
            return Vec::new();
        };
        pairs.retain(|(name, _)| !name.eq_ignore_ascii_case("authorization"));
        let Some(claims) = payload.as_object() else {
            return Vec::new();
        };
        let jwt = &identity.jwt;
        let whole = (
            jwt.payload_path().map(String::from).to_vec(),
            envoy_encoding(&payload),
        );
        let each = claims.iter().map(|(claim, value)| {
            let path = jwt.path(claim).map(String::from).to_vec();
            (path, envoy_encoding(value))
        });
        std::iter::once(whole).chain(each).collect()
    }

    /// Finishes a request begun on `vm`: the upstream answers `upstream_status` (if the
    /// request got there), the stream ends, and the worker's settlements reach Redis.
    pub fn finish(
        &mut self,
        vm: usize,
        id: u32,
        upstream_status: u16,
    ) -> Result<Response, HostError> {
        let v = &mut self.vms[vm];
        let response = match v.flow(id) {
            Flow::Responded(reply) => Response {
                status: reply.status as u16,
                headers: reply
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect(),
                body: reply.body,
            },
            Flow::Continue => {
                let forwarded = v.request_headers_of(id);
                let body_bytes = v.upstream_body_bytes(id);
                let mut answer = upstream_answer(upstream_status, &forwarded, body_bytes);
                let upstream_headers = answer
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect();
                v.response_headers(id, upstream_status, upstream_headers)?;
                // A success held until Redis counts it (read-your-writes) goes on when it has.
                for _ in 0..64 {
                    if !v.response_paused(id) {
                        break;
                    }
                    v.tick()?;
                    v.deliver_calls()?;
                }
                // The upstream's headers as the filter left them.
                answer.headers = v
                    .response_headers_of(id)
                    .into_iter()
                    .filter(|(name, _)| !name.starts_with(':'))
                    .map(|(name, value)| (name, String::from_utf8_lossy(&value).into()))
                    .collect();
                answer
            }
            Flow::Paused => panic!("request {id} is still paused with no call pending"),
            Flow::Held => panic!("request {id} is held with its body in and no answer"),
        };
        v.end_stream(id)?;
        self.flush(vm)?;
        Ok(response)
    }

    /// A request's whole life on VM `vm`.
    pub fn send_on(&mut self, vm: usize, request: &Request) -> Result<Response, HostError> {
        let id = self.begin(vm, request)?;
        self.settle_calls(vm, id)?;
        self.send_body(vm, id, request)?;
        self.finish(vm, id, upstream_status(request))
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

impl Gateway for Harness {
    /// Round-robin over the VMs, like Envoy's workers.
    fn send(&mut self, request: &Request) -> Response {
        let vm = usize::try_from(self.requests).unwrap_or(0) % self.vms.len();
        self.send_on(vm, request)
            .unwrap_or_else(|e| panic!("{} {}: {e}", request.method, request.path))
    }

    fn redis(&self) -> redis::Connection {
        self.connection()
    }

    fn metric(&self, name: &str) -> u64 {
        self.plugin.metric(&format!("plan_limits.{name}"))
    }

    fn now(&self) -> DateTime<Utc> {
        plan_limits_wasm_host::state::nanos_to_datetime(self.plugin.clock().nanos())
    }
}

/// The request as the filter's host call sees it: pseudo-headers, a request id as Envoy adds
/// one, names in lower case.
fn pairs(request: &Request, n: u64) -> Pairs {
    let mut pairs: Pairs = vec![
        (":method".into(), request.method.clone().into_bytes()),
        (":path".into(), request.path.clone().into_bytes()),
        (":authority".into(), b"gateway".to_vec()),
        (":scheme".into(), b"http".to_vec()),
    ];
    let has = |name: &str| {
        request
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    if !has("x-request-id") {
        pairs.push(("x-request-id".into(), format!("sim-{n}").into_bytes()));
    }
    if let (Some(n), false) = (request.content_length(), has("content-length")) {
        pairs.push(("content-length".into(), n.to_string().into_bytes()));
    }
    match request.body {
        Body::Chunked(_) => pairs.push(("transfer-encoding".into(), b"chunked".to_vec())),
        Body::ExpectContinue(_) => pairs.push(("expect".into(), b"100-continue".to_vec())),
        _ => {}
    }
    pairs.extend(
        request
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
    );
    pairs
}

/// What the demo upstream would answer: `x-demo-status`, else 200.
fn upstream_status(request: &Request) -> u16 {
    request
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(DEMO_STATUS))
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(200)
}

/// What the demo upstream answers, echoing the identity headers it received and counting the
/// body bytes it read, as it does (and saying what a delete freed or a removal took off, when told to).
fn upstream_answer(status: u16, forwarded: &Pairs, body_bytes: u64) -> Response {
    let header = |name: &str| {
        forwarded
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let identity = serde_json::json!({
        "x-user-id": header("x-user-id"),
        "x-user-plan": header("x-user-plan"),
        "x-org-id": header("x-org-id"),
        "x-user-features": header("x-user-features"),
    });
    let mut headers = vec![(UPSTREAM_MARK.into(), "demo".into())];
    for (told, says) in [
        (DEMO_FREED_BYTES, "x-freed-bytes"),
        (DEMO_REMOVED_MEMBERS, "x-removed-members"),
    ] {
        if let Some(value) = header(told).filter(|_| (200..300).contains(&status)) {
            headers.push((says.into(), value));
        }
    }
    Response {
        status,
        headers,
        body: serde_json::json!({
            "upstream": "demo",
            "status": status,
            "identity": identity,
            "body_bytes": body_bytes,
        })
        .to_string()
        .into_bytes(),
    }
}

/// The Envoy cluster plans.json names for Redis calls.
fn envoy_cluster(plans_json: &str) -> String {
    redis_cluster_named(plans_json, "cluster")
        .unwrap_or_else(|| plan_limits_core::REDIS_CLUSTER.into())
}

/// The cluster the usage reads go to, if plans.json gives them their own.
fn read_cluster(plans_json: &str) -> Option<String> {
    redis_cluster_named(plans_json, "read_cluster")
}

fn redis_cluster_named(plans_json: &str, field: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(plans_json)
        .ok()
        .and_then(|v| v["redis"][field].as_str().map(String::from))
}

/// Host, port and password of a `redis://[user:password@]host:port/` URL.
fn host_port(redis_url: &str) -> (String, u16, Option<String>) {
    let rest = redis_url.trim_start_matches("redis://");
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((credentials, rest)) => (Some(credentials), rest),
        None => (None, rest),
    };
    let password = credentials
        .and_then(|c| c.split_once(':'))
        .map(|(_, password)| password.to_string())
        .filter(|p| !p.is_empty());
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(6379)),
        None => (authority.to_string(), 6379),
    };
    (host, port, password)
}

/// A JSON value as Envoy hands a property of that type to a filter (`jwt_authn` stores the
/// payload as a protobuf Struct): a string as its bytes, a number as f64 little-endian, a
/// boolean as one byte, an object as proxy-wasm pairs of its keys and encoded values, an array
/// as pairs of its encoded items and empty values. `None` for a null, or anything holding one:
/// Envoy fails to encode it.
fn envoy_encoding(value: &serde_json::Value) -> Option<Vec<u8>> {
    use serde_json::Value;
    let pairs = |items: Vec<(Vec<u8>, Vec<u8>)>| serialize_pairs(&items);
    Some(match value {
        Value::Null => return None,
        Value::String(s) => s.clone().into_bytes(),
        Value::Number(n) => n.as_f64()?.to_le_bytes().to_vec(),
        Value::Bool(b) => vec![u8::from(*b)],
        Value::Array(items) => pairs(
            items
                .iter()
                .map(|item| Some((envoy_encoding(item)?, Vec::new())))
                .collect::<Option<_>>()?,
        ),
        Value::Object(fields) => pairs(
            fields
                .iter()
                .map(|(k, v)| Some((k.clone().into_bytes(), envoy_encoding(v)?)))
                .collect::<Option<_>>()?,
        ),
    })
}
