//! A real `redis-server` on a free loopback port, without persistence.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::Service;

pub struct RedisServer {
    pub port: u16,
    service: Service,
}

impl RedisServer {
    /// Starts (or restarts) on a given port.
    pub fn start_on(dir: &Path, port: u16) -> Self {
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            // Fault tests stall Redis with DEBUG SLEEP (from loopback only).
            "--enable-debug-command",
            "local",
        ]);
        let mut service = Service::spawn(
            "redis-server",
            command,
            &dir.join(format!("redis-{port}.log")),
        );
        service.wait_for_port(port, Duration::from_secs(10));
        Self { port, service }
    }

    pub fn url(&self) -> String {
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
}
