//! A real `redis-server` on a free loopback port, without persistence unless asked, with a
//! password when asked.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::Service;

pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    service: Service,
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
    /// Starts (or restarts) on a given port, without persistence.
    pub fn start_on(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, false)
    }

    /// With `persistent`, every write goes to an append-only file in `dir`, so a restart
    /// (after `SHUTDOWN`) keeps the data, as a production Redis would.
    pub fn start_with(dir: &Path, port: u16, persistent: bool) -> Self {
        Self::start_with_options(
            dir,
            port,
            RedisOptions {
                persistent,
                ..RedisOptions::default()
            },
        )
    }

    pub fn start_with_options(dir: &Path, port: u16, options: RedisOptions) -> Self {
        let persistent = options.persistent;
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
        if let Some(password) = &options.password {
            command.args(["--requirepass", password]);
        }
        let mut service = Service::spawn(
            "redis-server",
            command,
            &dir.join(format!("redis-{port}.log")),
        );
        service.wait_for_port(port, Duration::from_secs(10));
        Self {
            port,
            password: options.password,
            service,
        }
    }

    /// Its process (to see what runs, or to signal it).
    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
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
