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
