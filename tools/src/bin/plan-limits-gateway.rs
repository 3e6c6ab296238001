//! `make run`: the gateway on fixed loopback ports, in the foreground until Ctrl-C.
//! Redis, webdis, the demo upstream and Envoy are children of this process and stop with it.
//! It does not depend on wasmtime, so `make run` compiles only what it runs.
//! `--prepare` (`make build`) writes only the files the repository's envoy.yaml names into
//! `.gateway/` and exits.

use std::path::PathBuf;
use std::time::Instant;

use plan_limits_services::gateway::{EnvoyGateway, GatewayOptions, Ports};
use plan_limits_services::jwt::TokenClaims;

fn port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{var}={v} is not a port"))
        })
        .unwrap_or(default)
}

fn main() {
    // At the defaults, Envoy runs the repository's envoy.yaml (rendered for these ports).
    let defaults = Ports::MAKE_RUN;
    let ports = Ports {
        gateway: port("GATEWAY_PORT", defaults.gateway),
        admin: port("ADMIN_PORT", defaults.admin),
        upstream: port("UPSTREAM_PORT", defaults.upstream),
        webdis: port("WEBDIS_PORT", defaults.webdis),
        redis: port("REDIS_PORT", defaults.redis),
    };
    let plans = std::env::var("PLANS_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| plan_limits_services::repo_root().join("plans.json"));
    let plans_json = std::fs::read_to_string(&plans)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", plans.display()));
    if let Err(e) = plan_limits_core::Plans::from_json(plans_json.as_bytes()) {
        eprintln!("{}: {e}", plans.display());
        std::process::exit(1);
    }
    let dir = plan_limits_services::repo_root().join(".gateway");
    if std::env::args().nth(1).as_deref() == Some("--prepare") {
        // `make build`: only the files the repository's envoy.yaml names, so that
        // `envoy --mode validate -c envoy.yaml` passes from the root.
        let wasm = plan_limits_services::filter_wasm();
        if let Err(e) = plan_limits_services::gateway::prepare_files(&dir, &plans_json, &wasm) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        println!(
            "{}: the dev key's JWKS and the filters' ECDS files envoy.yaml names",
            dir.display()
        );
        return;
    }
    let started = Instant::now();
    let compiled =
        plan_limits_core::Plans::from_json(plans_json.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let gw = EnvoyGateway::start(GatewayOptions {
        plans_json,
        ports: Some(ports),
        dir: Some(dir.clone()),
        verbose: true,
        persistent_redis: true,
        jwt_dir: Some(dir.join("jwt")),
        ..GatewayOptions::default()
    });
    let record = plan_limits_tools::run_record::RunRecord {
        plans: std::path::absolute(&plans).unwrap_or_else(|_| plans.clone()),
        redis_url: gw.redis.url(),
        admin_port: gw.admin_port,
    };
    if let Err(e) = record.write(&plan_limits_tools::run_record::path()) {
        eprintln!("{e}: make reload and plan-limits will not find this gateway");
    }
    let g = gw.gateway_port;
    let token = |user: &str, plan: &str| {
        gw.jwt.token(
            &compiled.identity.jwt,
            &TokenClaims {
                user,
                plan: Some(plan),
                org: None,
                anchor_day: None,
                ttl_secs: 24 * 3600,
            },
        )
    };
    let alice = token("alice", "free");
    println!(
        r#"
Gateway ready in {secs:.1} s on http://127.0.0.1:{g} (Envoy admin http://127.0.0.1:{admin}), plans from {plans}
Redis (admin) at {redis}; configs, logs and the dev signing key in {dir}

Try, as alice on the free plan (a token valid for a day; more: plan-limits token USER --plan P):
  TOKEN={alice}
  curl -i -X POST -H "authorization: Bearer $TOKEN" -H 'x-file-name: pump-room.pdf' --data 'diagram' http://127.0.0.1:{g}/api/upload
  curl -i -X POST -H "authorization: Bearer $TOKEN" -H 'x-analysis-kind: vision' -H 'x-has-diagram: true' http://127.0.0.1:{g}/api/teammate
  curl -i -X POST -H "authorization: Bearer $TOKEN" http://127.0.0.1:{g}/api/export/dxf
  curl -i -X POST -H "authorization: Bearer $TOKEN" -H 'x-demo-status: 500' --data 'x' http://127.0.0.1:{g}/api/upload
  curl -i -X POST -H 'x-user-id: alice' -H 'x-user-plan: enterprise' --data 'x' http://127.0.0.1:{g}/api/upload
  curl -s -H "authorization: Bearer $TOKEN" http://127.0.0.1:{g}/api/usage
  curl -s -H "authorization: Bearer $TOKEN" 'http://127.0.0.1:{g}/api/usage/history?action=upload'
  the usage page, in a browser: http://127.0.0.1:{g}/usage#token={alice}
  cargo run -q -p plan-limits-tools --bin plan-limits -- set-plan alice professional   (finds this Redis)
  redis-cli -u '{redis}' HGETALL 'plan-limits:{{alice}}:{period}'
  redis-cli -u '{redis}' XRANGE plan-limits:events - +
  curl -s http://127.0.0.1:{admin}/stats?filter=plan_limits
  a diagram deleted gives its bytes back to storage (the upload's answer names its diagram_id):
  curl -i -X DELETE -H "authorization: Bearer $TOKEN" http://127.0.0.1:{g}/api/diagrams/d1

Edit {plans}, then `make reload` in another terminal: Envoy loads it without a restart.
Ctrl-C stops everything."#,
        secs = started.elapsed().as_secs_f64(),
        admin = gw.admin_port,
        plans = plans.display(),
        redis = gw.redis.url(),
        dir = dir.display(),
        period = plan_limits_services::usage::this_period(),
    );
    let signal = wait_for_stop_signal();
    println!("\nsignal {signal}: stopping Envoy, the upstream, webdis and Redis");
    drop(gw);
}

/// Blocks until SIGINT (Ctrl-C) or SIGTERM, even if this process was started with them
/// ignored (as background jobs of scripts are).
fn wait_for_stop_signal() -> i32 {
    // SAFETY: plain libc signal-mask calls on this thread; no handlers run Rust code.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            libc::signal(signal, libc::SIG_DFL);
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut received = 0;
        libc::sigwait(&set, &mut received);
        received
    }
}
