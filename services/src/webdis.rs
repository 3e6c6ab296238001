//! webdis, the HTTP front of Redis that stock Envoy reaches Redis through.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::{free_port, Service};

pub struct Webdis {
    pub port: u16,
    pub service: Service,
}

impl Webdis {
    /// Starts webdis on `port` (a free one when `None`) in front of the Redis at
    /// `redis_host:redis_port`, logging in with `redis_password` (as Redis's default user:
    /// Debian's webdis 0.1.9 cannot name another); its config and logs go to `dir`.
    pub fn start(
        dir: &Path,
        redis_host: &str,
        redis_port: u16,
        redis_password: Option<&str>,
        port: Option<u16>,
    ) -> Self {
        Self::start_with_commands(
            dir,
            redis_host,
            redis_port,
            redis_password,
            port,
            &["FCALL"],
        )
    }

    /// As `start`, letting through only `commands` (`EVALSHA` in front of Envoy's
    /// `redis_proxy`, which does not forward `FCALL`).
    pub fn start_with_commands(
        dir: &Path,
        redis_host: &str,
        redis_port: u16,
        redis_password: Option<&str>,
        port: Option<u16>,
        commands: &[&str],
    ) -> Self {
        let port = port.unwrap_or_else(free_port);
        let config = dir.join(format!("webdis-{port}.json"));
        let log = dir.join(format!("webdis-{port}-internal.log"));
        let mut json: serde_json::Value = serde_json::from_str(&config_json(
            redis_host,
            redis_port,
            redis_password,
            port,
            &log,
        ))
        .unwrap_or_else(|e| panic!("webdis config: {e}"));
        json["acl"][1]["enabled"] = commands.to_vec().into();
        let json = json.to_string();
        std::fs::write(&config, json).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let mut command = Command::new("webdis");
        command.arg(&config);
        let mut service =
            Service::spawn("webdis", command, &dir.join(format!("webdis-{port}.log")));
        service.wait_for_port(port, Duration::from_secs(10));
        Self { port, service }
    }

    pub fn stop(&mut self) {
        self.service.stop();
    }
}

/// webdis's configuration: loopback only, and nothing but `FCALL` (the filter calls the
/// library's functions and nothing else; Redis's ACL holds the same line behind it).
pub fn config_json(
    redis_host: &str,
    redis_port: u16,
    redis_password: Option<&str>,
    http_port: u16,
    log: &Path,
) -> String {
    let mut config = serde_json::json!({
        "redis_host": redis_host,
        "redis_port": redis_port,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "threads": 2,
        "pool_size": 8,
        "daemonize": false,
        "database": 0,
        "websockets": false,
        "acl": [{"disabled": ["*"]}, {"enabled": ["FCALL"]}],
        "verbosity": 1,
        "logfile": log.display().to_string(),
    });
    if let Some(password) = redis_password {
        config["redis_auth"] = password.into();
    }
    config.to_string()
}
