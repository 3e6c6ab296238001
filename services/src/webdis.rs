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
    /// `redis_host:redis_port`; its config and logs go to `dir`.
    pub fn start(dir: &Path, redis_host: &str, redis_port: u16, port: Option<u16>) -> Self {
        let port = port.unwrap_or_else(free_port);
        let config = dir.join(format!("webdis-{port}.json"));
        let log = dir.join(format!("webdis-{port}-internal.log"));
        std::fs::write(&config, config_json(redis_host, redis_port, port, &log))
            .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
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

/// webdis's configuration: loopback only, and nothing but the filter's two script commands
/// (EVALSHA, and EVAL for the first call after a Redis restart).
pub fn config_json(redis_host: &str, redis_port: u16, http_port: u16, log: &Path) -> String {
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
