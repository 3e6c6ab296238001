//! A real `redis-server` on a loopback port. As plan-limits runs it (`start_on`,
//! `start_with`): locked down (the filter's user may call the library's functions on the key
//! prefix and nothing else, an admin user may do anything), never evicting, the library
//! loaded, and with `persistent` every write in an append-only file. Plain (`start_with_options`):
//! for someone else's plugin.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use plan_limits_core::{functions, RedisReply, RedisSettings};

use crate::process::Service;

pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    /// The plan-limits users' passwords, when locked down.
    users: Option<Users>,
    service: Service,
}

/// The admin user's name (it may do anything; the filter's is Redis's `default` user, the
/// only one webdis can log in as).
pub const ADMIN_USER: &str = "plan-limits-admin";
/// The memory plan-limits' Redis may use (`make run`, the tests).
pub const MAXMEMORY: &str = "512mb";

/// The commands the library's functions run: Redis checks them against the caller's rights.
const FILTER_COMMANDS: &str = "+fcall +time +get +set +del +exists +hget +hmget +hset +hsetnx \
                               +hincrby +incrby +decrby +zadd +zrem +zcard +zcount +zscore +zrange +zrangebyscore +zremrangebyscore \
                               +pexpire +xadd";

#[derive(Debug, Clone)]
pub(crate) struct Users {
    pub(crate) filter_password: String,
    pub(crate) admin_password: String,
}

impl Users {
    /// The passwords of the Redis in `dir` on `port`: made once, kept for its restarts.
    pub(crate) fn of(dir: &Path, port: u16) -> Self {
        let path = dir.join(format!("redis-{port}.passwords"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some((filter, admin)) = text.trim().split_once(' ') {
                return Self {
                    filter_password: filter.into(),
                    admin_password: admin.into(),
                };
            }
        }
        let users = Self {
            filter_password: random_password(),
            admin_password: random_password(),
        };
        let text = format!("{} {}\n", users.filter_password, users.admin_password);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        users
    }

    /// Redis's ACL file: the filter's rules on the default user (with `+pexpireat`, which
    /// Redis 7.0 needs to replay its append-only file), and the admin.
    fn acl(&self) -> String {
        self.acl_with("")
    }

    /// The ACL file with `extra` rules for the filter's user.
    pub(crate) fn acl_with(&self, extra: &str) -> String {
        let redis = RedisSettings::default();
        let commands = FILTER_COMMANDS
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let mut keys = format!("~{}:*", redis.key_prefix);
        if !redis
            .events_stream
            .starts_with(&format!("{}:", redis.key_prefix))
        {
            keys.push_str(&format!(" ~{}", redis.events_stream));
        }
        format!(
            "user default on >{} resetkeys {keys} resetchannels -@all {commands} +pexpireat{extra}\n\
             user {ADMIN_USER} on >{} ~* &* +@all\n",
            self.filter_password, self.admin_password
        )
    }
}

fn random_password() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if read.is_err() {
        // No /dev/urandom: the time will do for a test's password.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How to start a `RedisServer`.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `requirepass`: the default user's password; `url()` and `connection()` carry it.
    pub password: Option<String>,
    /// As in `start_with`.
    pub persistent: bool,
}

impl RedisServer {
    /// Starts (or restarts) plan-limits' Redis on a given port, without persistence.
    pub fn start_on(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, false)
    }

    /// Starts (or restarts) plan-limits' Redis; with `persistent`, every write goes to an
    /// append-only file in `dir` first, so a restart (even after `kill -9`) keeps the data.
    pub fn start_with(dir: &Path, port: u16, persistent: bool) -> Self {
        let users = Users::of(dir, port);
        let acl = dir.join(format!("redis-{port}.acl"));
        std::fs::write(&acl, users.acl()).unwrap_or_else(|e| panic!("{}: {e}", acl.display()));
        let mut server = Self::spawn(
            dir,
            port,
            persistent,
            &[
                "--aclfile",
                &acl.display().to_string(),
                // Never evict a count: past its memory Redis refuses writes (requests then
                // follow their failure mode), and the PlanLimitsRedisMemoryHigh alert fires at
                // 80 % first. Size it for the users (docs/architecture.md, What is stored in Redis).
                "--maxmemory",
                MAXMEMORY,
                "--maxmemory-policy",
                "noeviction",
            ],
        );
        server.users = Some(users);
        // A restarted Redis answers LOADING while it reads its append-only file.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let loaded =
                crate::redis_exec::run(&mut server.connection(), &functions::load_library());
            match loaded {
                RedisReply::Error(e)
                    if e.starts_with("LOADING") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                RedisReply::Error(e) => panic!("FUNCTION LOAD: {e}"),
                _ => break,
            }
        }
        server
    }

    /// A plain Redis: no ACL but `requirepass` when given.
    pub fn start_with_options(dir: &Path, port: u16, options: RedisOptions) -> Self {
        let password_args = match &options.password {
            Some(password) => vec!["--requirepass".to_string(), password.clone()],
            None => Vec::new(),
        };
        let args: Vec<&str> = password_args.iter().map(String::as_str).collect();
        let mut server = Self::spawn(dir, port, options.persistent, &args);
        server.password = options.password;
        server
    }

    fn spawn(dir: &Path, port: u16, persistent: bool, extra: &[&str]) -> Self {
        let mut command = server_command(dir, port, persistent);
        command.args(extra);
        let mut service = Service::spawn(
            "redis-server",
            command,
            &dir.join(format!("redis-{port}.log")),
        );
        service.wait_for_port(port, Duration::from_secs(10));
        Self {
            port,
            password: None,
            users: None,
            service,
        }
    }

    /// Its process (to see what runs, or to signal it).
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Where to connect with every right: the admin user (plan-limits), or the password.
    pub fn url(&self) -> String {
        match (&self.users, &self.password) {
            (Some(users), _) => format!(
                "redis://{ADMIN_USER}:{}@127.0.0.1:{}/",
                users.admin_password, self.port
            ),
            (None, Some(password)) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            (None, None) => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// Where the filter connects: its own user, which may only call the library's functions.
    pub fn filter_url(&self) -> String {
        match &self.users {
            Some(users) => format!(
                "redis://:{}@127.0.0.1:{}/",
                users.filter_password, self.port
            ),
            None => self.url(),
        }
    }

    /// The filter's password (what webdis logs in with), when locked down.
    pub fn filter_password(&self) -> Option<&str> {
        self.users.as_ref().map(|u| u.filter_password.as_str())
    }

    /// The URL without credentials: where a client that authenticates itself connects.
    pub fn address_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to the test redis")
    }

    pub fn stop(&mut self) {
        self.service.stop();
    }

    /// A clean stop: Redis flushes its append-only file first.
    pub fn shutdown(&mut self) {
        if let Ok(mut conn) = redis::Client::open(self.url()).and_then(|c| c.get_connection()) {
            let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").query(&mut conn);
        }
        let _ = self.service.wait_exit(Duration::from_secs(10));
        self.service.stop();
    }
}

/// `redis-server` on `port` (loopback only) with its files in `dir`; with `persistent`, every
/// write in an append-only file first.
pub(crate) fn server_command(dir: &Path, port: u16, persistent: bool) -> Command {
    let mut command = Command::new("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        &dir.display().to_string(),
        "--appendfilename",
        &format!("appendonly-{port}.aof"),
        "--appendfsync",
        "always",
        "--appendonly",
        if persistent { "yes" } else { "no" },
        // Fault tests stall Redis with DEBUG SLEEP (from loopback only).
        "--enable-debug-command",
        "local",
    ]);
    command
}
