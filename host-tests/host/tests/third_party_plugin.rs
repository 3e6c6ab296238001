//! Someone else's plugin in our host: gpustack-rate-limit 1.0.1, a Higress plugin built with Go's
//! wasm-go SDK (Apache-2.0), shipped in the PyPI wheel gpustack-higress-plugins 0.5.1 and
//! fetched by `make deps`. It needs the WASI surface Go's wasip1 runtime imports and Higress's
//! Redis host calls with a username, a password, a database and a timeout. Each test drives
//! requests through it against a real Redis and checks its limit and the keys it writes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_services::redis_server::{RedisOptions, RedisServer};
use plan_limits_wasm_host::{Flow, LocalReply, Plugin, Upstreams, Vm};
use serde_json::json;

/// What wasm-go's `FQDNCluster{FQDN: "redis.dns", Port: 6379}` names the Redis cluster.
const CLUSTER: &str = "outbound|6379||redis.dns";
const PER_MINUTE: usize = 3;

/// `GPUSTACK_RATE_LIMIT_WASM`, else where `make deps` puts it; never skipped when missing.
fn plugin_wasm() -> PathBuf {
    let path = std::env::var_os("GPUSTACK_RATE_LIMIT_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            plan_limits_services::repo_root().join(".deps/gpustack-rate-limit-1.0.1.wasm")
        });
    assert!(
        path.exists(),
        "{} does not exist: run `make deps` (it fetches gpustack-higress-plugins 0.5.1 from \
         PyPI and extracts gpustack-rate-limit 1.0.1 into .deps/), or point \
         GPUSTACK_RATE_LIMIT_WASM at the plugin",
        path.display()
    );
    path
}

/// The plugin's config: 3 requests a minute per `x-user`, counted in Redis.
fn config(redis: serde_json::Value) -> Vec<u8> {
    let mut redis_config = json!({"service_name": "redis.dns", "service_port": 6379});
    redis_config
        .as_object_mut()
        .unwrap()
        .extend(redis.as_object().unwrap().clone());
    json!({
        "rule_name": "conformance",
        "limit_combinations": [{
            "name": "per-user",
            "match": [{"source": "header", "name": "x-user", "value": "*"}],
            "query_limits": {"per_minute": PER_MINUTE},
        }],
        "redis": redis_config,
    })
    .to_string()
    .into_bytes()
}

fn key(user: &str) -> String {
    format!("conformance|per-user|header:x-user={user}|q:60s")
}

struct Gateway {
    plugin: Plugin,
    vm: Vm,
}

impl Gateway {
    /// The plugin with `redis` settings, its Redis cluster at `address` (no credentials: the
    /// plugin brings them through `proxy_redis_init`).
    fn start(address: &str, redis: serde_json::Value) -> Self {
        let upstreams = Upstreams {
            redis: [(CLUSTER.to_string(), address.to_string())].into(),
            ..Upstreams::default()
        };
        let mut plugin = Plugin::load(&plugin_wasm(), &config(redis), upstreams)
            .unwrap_or_else(|e| panic!("{e}"));
        let vm = plugin.start_vm().unwrap_or_else(|e| panic!("{e}"));
        Self { plugin, vm }
    }

    /// One chat completion as `user`: its answer (`None` when it reached the upstream).
    fn request(&mut self, user: &str) -> Option<LocalReply> {
        let vm = &mut self.vm;
        let id = vm.new_stream().unwrap();
        let headers = vec![
            (":method".to_string(), b"POST".to_vec()),
            (":path".to_string(), b"/v1/chat/completions".to_vec()),
            (":authority".to_string(), b"gateway".to_vec()),
            ("x-user".to_string(), user.as_bytes().to_vec()),
        ];
        let mut flow = vm.request_headers(id, headers, false).unwrap();
        // The SDK retries a call after NOAUTH, so deliver until none is left.
        for _ in 0..4 {
            if vm.pending_calls() == 0 {
                break;
            }
            vm.deliver_calls().unwrap();
            flow = vm.flow(id);
        }
        assert_eq!(
            vm.pending_calls(),
            0,
            "calls left: {:#?}",
            self.plugin.logs()
        );
        let reply = match flow {
            Flow::Continue => {
                vm.response_headers(id, 200, vec![]).unwrap();
                None
            }
            Flow::Responded(reply) => Some(reply),
            Flow::Paused | Flow::Held => {
                panic!("request left paused; log: {:#?}", self.plugin.logs())
            }
        };
        vm.end_stream(id).unwrap();
        reply
    }

    /// `PER_MINUTE` requests pass, the next one is refused with the plugin's 429.
    fn assert_limit_enforced(&mut self, user: &str) {
        for i in 0..PER_MINUTE {
            let reply = self.request(user);
            assert!(
                reply.is_none(),
                "request {i} of {user} refused: {reply:?}; log: {:#?}",
                self.plugin.logs()
            );
        }
        let reply = self
            .request(user)
            .unwrap_or_else(|| panic!("over the limit yet passed; log: {:#?}", self.logs()));
        assert_eq!(reply.status, 429);
        assert_eq!(reply.details, "gpustack-rate-limit.rejected");
        assert_eq!(
            reply.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(
            reply.json(),
            json!({"error": {
                "message": "Too many requests",
                "type": "rate_limit_exceeded",
                "code": 429,
            }})
        );
    }

    fn logs(&self) -> Vec<String> {
        self.plugin.logs().into_iter().map(|l| l.message).collect()
    }
}

/// The keys and members the plugin's Lua script wrote for `user`, read in database `db`.
fn assert_counted(conn: &mut redis::Connection, db: i64, user: &str, requests: usize) {
    redis::cmd("SELECT").arg(db).query::<()>(conn).unwrap();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(key(user))
        .arg(0)
        .arg(-1)
        .query(conn)
        .unwrap();
    assert_eq!(
        members.len(),
        requests,
        "members of {} in db {db}",
        key(user)
    );
    assert!(members.iter().all(|m| m.ends_with("|1")), "{members:?}");
    let ttl: i64 = redis::cmd("TTL").arg(key(user)).query(conn).unwrap();
    assert!((1..=120).contains(&ttl), "TTL {ttl}: twice the 60 s window");
}

fn client_list(conn: &mut redis::Connection) -> String {
    redis::cmd("CLIENT").arg("LIST").query(conn).unwrap()
}

#[test]
fn loads_with_the_wasi_calls_go_imports() {
    let redis = RedisServer::start_with_options(
        &scratch_dir("third-party"),
        free_port(),
        RedisOptions::default(),
    );
    let gateway = Gateway::start(&redis.url(), json!({}));
    let imports = gateway.plugin.imports();
    for name in [
        "sched_yield",
        "poll_oneoff",
        "fd_close",
        "fd_read",
        "fd_seek",
        "fd_fdstat_get",
        "fd_fdstat_set_flags",
        "path_open",
        "path_filestat_get",
        "fd_prestat_get",
        "fd_prestat_dir_name",
    ] {
        let import = format!("wasi_snapshot_preview1.{name}");
        assert!(imports.contains(&import), "{import} not imported any more");
    }
    assert!(imports.iter().any(|i| i == "env.proxy_redis_init"));
    let logs = gateway.logs();
    assert!(
        !logs.iter().any(|l| l.contains("local (per-instance)")),
        "the plugin must use Redis: {logs:#?}"
    );
}

#[test]
fn enforces_its_limit_on_redis_without_a_password() {
    let redis = RedisServer::start_with_options(
        &scratch_dir("third-party"),
        free_port(),
        RedisOptions::default(),
    );
    let mut gateway = Gateway::start(&redis.url(), json!({}));
    gateway.assert_limit_enforced("alice");
    assert!(gateway.request("bob").is_none(), "one bucket per user");
    let mut conn = redis.connection();
    assert_counted(&mut conn, 0, "alice", PER_MINUTE);
    assert_counted(&mut conn, 0, "bob", 1);
}

#[test]
fn authenticates_with_the_password_only() {
    let options = RedisOptions {
        password: Some("s3cret pass".into()),
        ..RedisOptions::default()
    };
    let redis = RedisServer::start_with_options(&scratch_dir("third-party"), free_port(), options);
    let mut gateway = Gateway::start(&redis.address_url(), json!({"password": "s3cret pass"}));
    gateway.assert_limit_enforced("alice");
    assert_counted(&mut redis.connection(), 0, "alice", PER_MINUTE);
}

#[test]
fn authenticates_as_an_acl_user() {
    let options = RedisOptions {
        password: Some("admin".into()),
        ..RedisOptions::default()
    };
    let redis = RedisServer::start_with_options(&scratch_dir("third-party"), free_port(), options);
    let mut admin = redis.connection();
    // This user may touch the plugin's keys only.
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "limiter",
            "on",
            ">limiter-pw",
            "~conformance|*",
            "+@all",
        ])
        .query::<()>(&mut admin)
        .unwrap();
    let mut gateway = Gateway::start(
        &redis.address_url(),
        json!({"username": "limiter", "password": "limiter-pw"}),
    );
    gateway.assert_limit_enforced("alice");
    assert_counted(&mut admin, 0, "alice", PER_MINUTE);
    let clients = client_list(&mut admin);
    assert!(
        clients.lines().any(|l| l.contains(" user=limiter ")),
        "{clients}"
    );
}

#[test]
fn a_wrong_password_leaves_the_plugin_failing_open() {
    let options = RedisOptions {
        password: Some("right".into()),
        ..RedisOptions::default()
    };
    let redis = RedisServer::start_with_options(&scratch_dir("third-party"), free_port(), options);
    let mut gateway = Gateway::start(&redis.address_url(), json!({"password": "wrong"}));
    for _ in 0..=PER_MINUTE {
        assert!(gateway.request("alice").is_none(), "fail-open");
    }
    // As behind Envoy: AUTH's reply is dropped, then Redis refuses the unauthenticated EVAL
    // (`-ERR Protocol error: unauthenticated multibulk length`) and the plugin lets it through.
    let logs = gateway.logs();
    assert!(
        logs.iter().any(|l| l.contains("WRONGPASS")),
        "the host notes the failed AUTH: {logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("malformed lua reply (len=0), fail-open")),
        "{logs:#?}"
    );
    let exists: bool = redis::cmd("EXISTS")
        .arg(key("alice"))
        .query(&mut redis.connection())
        .unwrap();
    assert!(!exists, "nothing written without AUTH");
}

#[test]
fn selects_the_database_given_after_the_cluster_name() {
    let options = RedisOptions {
        password: Some("pw".into()),
        ..RedisOptions::default()
    };
    let redis = RedisServer::start_with_options(&scratch_dir("third-party"), free_port(), options);
    // The SDK passes `outbound|6379||redis.dns?db=5&buffer_flush_timeout=3&...` to
    // proxy_redis_init; SELECT 5 follows AUTH.
    let mut gateway = Gateway::start(
        &redis.address_url(),
        json!({"password": "pw", "database": 5}),
    );
    gateway.assert_limit_enforced("alice");
    let mut conn = redis.connection();
    assert_counted(&mut conn, 5, "alice", PER_MINUTE);
    redis::cmd("SELECT").arg(0).query::<()>(&mut conn).unwrap();
    let in_db0: bool = redis::cmd("EXISTS")
        .arg(key("alice"))
        .query(&mut conn)
        .unwrap();
    assert!(!in_db0, "nothing in db 0");
    let clients = client_list(&mut conn);
    assert!(clients.lines().any(|l| l.contains(" db=5 ")), "{clients}");
}

/// Until Redis stops answering: a PING on a fresh socket gets no reply within 50 ms.
fn wait_until_stalled(redis: &RedisServer) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let mut probe = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        probe.write_all(b"PING\r\n").unwrap();
        let mut reply = [0u8; 16];
        match probe.read(&mut reply) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    panic!("Redis never stalled");
}

#[test]
fn a_call_slower_than_the_timeout_fails_and_the_plugin_fails_open() {
    let redis = RedisServer::start_with_options(
        &scratch_dir("third-party"),
        free_port(),
        RedisOptions::default(),
    );
    let mut gateway = Gateway::start(&redis.url(), json!({"timeout": 200}));
    assert!(gateway.request("alice").is_none());
    // Redis stalls for two seconds, from another connection.
    let mut stall = redis.connection();
    let staller = std::thread::spawn(move || {
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(2)
            .query::<()>(&mut stall)
            .unwrap()
    });
    wait_until_stalled(&redis);
    let started = Instant::now();
    assert!(gateway.request("alice").is_none(), "fail-open");
    let took = started.elapsed();
    staller.join().unwrap();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(1500),
        "answered after {took:?}: the 200 ms timeout, not the stall"
    );
    let logs = gateway.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("cannot connect to the redis cluster")),
        "status non-zero for the slow call: {logs:#?}"
    );
    // The late reply went with the dropped connection: on a new one the limit holds again.
    let mut conn = redis.connection();
    redis::cmd("DEL")
        .arg(key("alice"))
        .query::<()>(&mut conn)
        .unwrap();
    gateway.assert_limit_enforced("alice");
}
