//! The upstreams behind the gateway: the demo product (`demo/upstream.py`) and, for the
//! benchmark, nginx answering `return 200`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::{free_port, Service};

/// The demo upstream: 200 JSON on every path; `x-demo-status`, `x-demo-delay-ms` and
/// `x-demo-fail-times` change its answer; `GET /__demo/stats` tells what it did.
pub struct DemoUpstream {
    pub port: u16,
    pub service: Service,
}

impl DemoUpstream {
    /// `lenient`: it reads paths as a lenient web framework does (no case, no `;parameters`,
    /// no trailing dots), and counts its successes by the path its handler saw.
    pub fn start(dir: &Path, port: Option<u16>, lenient: bool) -> Self {
        let port = port.unwrap_or_else(free_port);
        let mut command = Command::new("python3");
        command
            .arg(crate::repo_root().join("demo/upstream.py"))
            .arg(port.to_string());
        if lenient {
            command.arg("--lenient");
        }
        let mut service = Service::spawn(
            "demo upstream",
            command,
            &dir.join(format!("upstream-{port}.log")),
        );
        service.wait_for_port(port, Duration::from_secs(10));
        Self { port, service }
    }

    fn stats(&self) -> serde_json::Value {
        crate::http::get(self.port, "/__demo/stats").json()
    }

    /// 2xx answers it gave for `path`.
    pub fn successes(&self, path: &str) -> u64 {
        self.stats()["successes"][path].as_u64().unwrap_or(0)
    }

    /// Every 2xx it gave, per path.
    pub fn success_map(&self) -> serde_json::Value {
        self.stats()["successes"].clone()
    }

    /// Requests (attempts, retries included) it saw.
    pub fn attempts(&self) -> u64 {
        self.stats()["attempts"].as_u64().unwrap_or(0)
    }

    /// The work it completed, per user and handler, and each request's outcome.
    pub fn ledger(&self) -> Ledger {
        Ledger(crate::http::get(self.port, "/__demo/ledger").json())
    }
}

/// What the demo upstream did (`GET /__demo/ledger`): a handler that ran to its end with a
/// success counts, whether or not its answer was read.
#[derive(Debug, Clone)]
pub struct Ledger(pub serde_json::Value);

impl Ledger {
    /// Work `user`'s requests had done by `handler` (`"POST /api/upload"`).
    pub fn done(&self, user: &str, handler: &str) -> u64 {
        self.0["done"][user][handler].as_u64().unwrap_or(0)
    }

    /// Every user and handler with work done, and how much.
    pub fn all_done(&self) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        if let Some(users) = self.0["done"].as_object() {
            for (user, handlers) in users {
                for (handler, n) in handlers.as_object().into_iter().flatten() {
                    out.push((user.clone(), handler.clone(), n.as_u64().unwrap_or(0)));
                }
            }
        }
        out
    }

    /// What became of the request Envoy named `request_id`: `done`, `failed`, or `None` if it
    /// never reached a handler.
    pub fn outcome(&self, request_id: &str) -> Option<String> {
        self.0["requests"][request_id]["outcome"]
            .as_str()
            .map(String::from)
    }
}

/// nginx answering `return 200` on a free port: an upstream that is never the bottleneck. On
/// `/api/upload` it reads the whole body first (as an upload handler does; answering before
/// the body's end makes Envoy close the client's connection), then answers the same.
pub struct Nginx {
    pub port: u16,
    pub service: Service,
}

impl Nginx {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
                   client_body_temp_path {dir};\n  client_max_body_size 64m;\n\
                   server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 200 'ok'; }}\n\
                     location /api/upload {{\n      client_body_buffer_size 16m;\n\
                       proxy_pass http://127.0.0.1:{port}/;\n      proxy_pass_request_body off;\n\
                       proxy_set_header Content-Length \"\";\n    }}\n  }}\n}}\n",
                dir = dir.display()
            ),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
        let mut command = Command::new("nginx");
        command.arg("-c").arg(&conf).arg("-p").arg(dir);
        let mut service = Service::spawn("nginx", command, &dir.join("nginx.log"));
        service.wait_for_port(port, Duration::from_secs(10));
        Self { port, service }
    }
}
