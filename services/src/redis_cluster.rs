//! A local Redis Cluster: masters of Debian's `redis-server` with `cluster-enabled yes` on
//! free loopback ports (their bus ports too), joined with `redis-cli --cluster create`, and
//! locked down as `redis_server` runs one Redis: the same ACL users on every master (the
//! filter's may also call the library's functions as scripts, `EVALSHA`, and read the slot
//! map, `CLUSTER SLOTS` and `PING`, which cluster clients and Envoy's `redis_proxy` need), never
//! evicting, the library and its scripts loaded on every master, and with `persistent` every
//! write in an append-only file. Each master is a service in its own process group, stopped
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use plan_limits_core::{functions, RedisCommand, RedisReply};

use crate::process::{free_port, Service};
use crate::redis_exec;
use crate::redis_server::{server_command, Users, ADMIN_USER};

/// What the filter's user may run on a cluster besides what it may on one Redis: its
/// functions as scripts, and what a cluster client needs to learn the slot map (the `redis`
/// crate pings each master first).
const CLUSTER_FILTER_RULES: &str = " +evalsha +cluster|slots +ping";

pub struct RedisCluster {
    pub masters: Vec<Master>,
    pub dir: PathBuf,
    users: Users,
}

pub struct Master {
    pub port: u16,
    /// The cluster bus (`cluster-port`), chosen free like the client port.
    pub bus_port: u16,
    pub service: Service,
}

impl RedisCluster {
    /// Starts `masters` masters (three make a cluster worth the name) in `dir`, joins them
    /// (the slots split evenly), and loads the library and its scripts on each.
    pub fn start(dir: &Path, masters: usize, persistent: bool) -> Self {
        let ports: Vec<(u16, u16)> = (0..masters).map(|_| (free_port(), free_port())).collect();
        let first = ports.first().map_or(0, |(port, _)| *port);
        let users = Users::of(dir, first);
        let acl = dir.join(format!("redis-cluster-{first}.acl"));
        std::fs::write(&acl, users.acl_with(CLUSTER_FILTER_RULES))
            .unwrap_or_else(|e| panic!("{}: {e}", acl.display()));
        let masters = ports
            .into_iter()
            .map(|(port, bus_port)| {
                let mut command = server_command(dir, port, persistent);
                command.args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus_port.to_string(),
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--aclfile",
                    &acl.display().to_string(),
                    "--maxmemory-policy",
                    "noeviction",
                ]);
                let log = dir.join(format!("redis-{port}.log"));
                let mut service = Service::spawn("redis-server", command, &log);
                service.wait_for_port(port, Duration::from_secs(10));
                Master {
                    port,
                    bus_port,
                    service,
                }
            })
            .collect();
        let cluster = Self {
            masters,
            dir: dir.to_path_buf(),
            users,
        };
        cluster.create();
        cluster.wait_until_ok(Duration::from_secs(30));
        cluster.load_library();
        cluster
    }

    /// `redis-cli --cluster create` of every master, as the admin.
    fn create(&self) {
        let mut command = Command::new("redis-cli");
        command
            .env("REDISCLI_AUTH", &self.users.admin_password)
            .args(["--user", ADMIN_USER, "--cluster", "create"])
            .args(self.masters.iter().map(|m| format!("127.0.0.1:{}", m.port)))
            .arg("--cluster-yes");
        let out = command
            .output()
            .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until every master says the cluster is ok and serves its slots.
    fn wait_until_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let states: Vec<String> = (0..self.masters.len())
                .map(|i| {
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query::<String>(&mut self.node_connection(i))
                        .unwrap_or_default()
                })
                .collect();
            if states.iter().all(|s| s.contains("cluster_state:ok")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok after {timeout:?}: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `FUNCTION LOAD REPLACE` of the library and `SCRIPT LOAD` of its functions' scripts on
    /// every master (a restarted master keeps its functions but not its scripts).
    pub fn load_library(&self) {
        for i in 0..self.masters.len() {
            let mut conn = self.node_connection(i);
            let mut commands: Vec<RedisCommand> = vec![functions::load_library()];
            commands.extend(functions::load_scripts());
            for command in &commands {
                if let RedisReply::Error(e) = redis_exec::run(&mut conn, command) {
                    panic!(
                        "{} on master {}: {e}",
                        command_name(command),
                        self.masters[i].port
                    );
                }
            }
        }
    }

    /// The admin's URL of master `i`.
    pub fn node_url(&self, i: usize) -> String {
        format!(
            "redis://{ADMIN_USER}:{}@127.0.0.1:{}/",
            self.users.admin_password, self.masters[i].port
        )
    }

    /// Every master's URL for the admin: a cluster client's seeds.
    pub fn urls(&self) -> Vec<String> {
        (0..self.masters.len()).map(|i| self.node_url(i)).collect()
    }

    /// Every master's URL for the filter's user (which may only call the library).
    pub fn filter_urls(&self) -> Vec<String> {
        self.masters
            .iter()
            .map(|m| {
                format!(
                    "redis://:{}@127.0.0.1:{}/",
                    self.users.filter_password, m.port
                )
            })
            .collect()
    }

    /// The filter's password (for webdis or Envoy's `redis_proxy` to log in with).
    pub fn filter_password(&self) -> &str {
        &self.users.filter_password
    }

    /// A connection to master `i` alone, as the admin (keys of other slots answer `MOVED`).
    pub fn node_connection(&self, i: usize) -> redis::Connection {
        redis::Client::open(self.node_url(i))
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connect to master {}: {e}", self.masters[i].port))
    }

    /// A cluster connection as the admin: each command goes to the master of its key's slot.
    pub fn connection(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connect to the cluster: {e}"))
    }

    /// Every process of the cluster.
    pub fn processes(&self) -> Vec<u32> {
        self.masters
            .iter()
            .flat_map(|m| m.service.processes())
            .collect()
    }

    pub fn stop(&mut self) {
        for master in &mut self.masters {
            master.service.stop();
        }
    }
}

fn command_name(command: &RedisCommand) -> String {
    command
        .args
        .iter()
        .take(2)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
