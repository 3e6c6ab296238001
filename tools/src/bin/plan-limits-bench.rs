//! `make bench`: runs every case of `plan_limits_tools::bench` for a fixed time with the same wrk
//! load, prints a table, and writes bench/results.json (and the chart, from bench/chart.py).
//!
//! `plan-limits-bench [--seconds N] [--connections N] [--out DIR]`

use std::path::PathBuf;
use std::time::Duration;

use plan_limits_services::envoy::{self, EnvoyOptions, EnvoyParams};
use plan_limits_services::jwt::DevKey;
use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_services::redis_server::RedisServer;
use plan_limits_services::upstream::Nginx;
use plan_limits_services::webdis::Webdis;
use plan_limits_tools::bench::{self, Filters};
use serde_json::json;

fn main() {
    let mut seconds = 10u64;
    let mut connections = 32u32;
    let mut out = plan_limits_services::repo_root().join("bench");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => seconds = value.parse().expect("--seconds N"),
            "--connections" => connections = value.parse().expect("--connections N"),
            "--out" => out = PathBuf::from(value),
            _ => panic!("unknown option {flag}"),
        }
    }
    std::fs::create_dir_all(&out).unwrap();
    let dir = scratch_dir("bench");
    let redis = RedisServer::start_on(&dir, free_port());
    let webdis = Webdis::start(&dir, "127.0.0.1", redis.port, redis.filter_password(), None);
    let jwt = DevKey::for_tests();
    let nginx = Nginx::start(&dir);
    let wasm = plan_limits_services::filter_wasm();
    let plans = bench::bench_plans();
    let script = plan_limits_services::repo_root().join("bench/wrk.lua");

    // The exhausted user has used the month's uploads already.
    let mut conn = redis.connection();
    let period = plan_limits_services::usage::this_period();
    let keys = plan_limits_core::keys::UsageKeys::new(
        &plan_limits_services::usage::prefix(),
        bench::EXHAUSTED_USER,
        &period,
        "upload",
    );
    redis::cmd("HSET")
        .arg(&keys.summary)
        .arg("upload")
        .arg(5)
        .exec(&mut conn)
        .unwrap();

    let mut results = Vec::new();
    let mut baseline: Option<(f64, f64, f64)> = None;
    for case in bench::cases() {
        let (port, admin) = (free_port(), free_port());
        let params = EnvoyParams {
            admin_port: admin,
            gateway_port: port,
            upstream_port: nginx.port,
            webdis_port: webdis.port,
            upstream_timeout: "15s",
            plans_json: &plans,
            jwks: &jwt.jwks_path(),
            ecds_dir: &dir.join(format!("{}-ecds", case.name)),
            redis_cluster_proxy: None,
        };
        envoy::write_filter_configs(params.ecds_dir, &plans, &wasm)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut envoy = envoy::start(EnvoyOptions {
            name: case.name,
            dir: &dir,
            config: &bench::envoy_config(&params, case.filters),
            concurrency: 1,
            hot_restart: None,
            port,
        });
        // One request first: the case must answer as intended before it is timed.
        let status = case.request().send(port).status;
        assert_eq!(
            status, case.expect_status,
            "{}: probe answered {status}",
            case.name
        );
        let _ = bench::run_wrk(&script, port, &case, connections, 1); // warm-up
        let (load, _) = bench::run_wrk(&script, port, &case, connections, seconds);
        let (single, _) = bench::run_wrk(&script, port, &case, 1, (seconds / 2).max(1));
        for figures in [&load, &single] {
            let expected_non_2xx = if case.expect_status < 300 {
                0
            } else {
                figures.requests
            };
            assert_eq!(
                figures.non_2xx, expected_non_2xx,
                "{}: every answer must be {}",
                case.name, case.expect_status
            );
        }
        let base = *baseline.get_or_insert((load.rps, single.p50_us, single.p99_us));
        let ratio = load.rps / base.0;
        println!(
            "{:<34} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  ratio {:>5.2}  | 1 conn: p50 {:>5.0} µs (+{:>4.0})  p99 {:>5.0} µs (+{:>4.0})",
            case.label, load.rps, load.p50_us, load.p99_us, ratio, single.p50_us, single.p50_us - base.1, single.p99_us, single.p99_us - base.2
        );
        let filter_stats =
            plan_limits_services::http::get(admin, "/stats?filter=plan_limits").body_text();
        results.push(json!({
            "name": case.name,
            "label": case.label,
            "rps": load.rps,
            "requests": load.requests,
            "p50_us": load.p50_us,
            "p99_us": load.p99_us,
            "ratio": ratio,
            "target_ratio": case.target_ratio,
            "p50_us_1conn": single.p50_us,
            "p99_us_1conn": single.p99_us,
            "added_p50_us_1conn": single.p50_us - base.1,
            "added_p99_us_1conn": single.p99_us - base.2,
            "filter_stats": filter_stats.lines().filter(|l| l.starts_with("wasmcustom")).collect::<Vec<_>>(),
            "filters": match case.filters { Filters::None => "none", Filters::LocalRateLimit => "local_ratelimit", Filters::PlanLimits => "plan_limits" },
        }));
        envoy.stop();
        std::thread::sleep(Duration::from_millis(200));
    }
    let wasm_bytes = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
    let report = json!({
        "seconds": seconds,
        "connections": connections,
        "load_generator": "wrk -t1",
        "envoy_concurrency": 1,
        "upstream": "nginx return 200",
        "machine": bench::machine(),
        "wasm": wasm.file_name().map(|n| n.to_string_lossy().into_owned()),
        "wasm_bytes": wasm_bytes,
        "cases": results,
    });
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!(
        "optimized filter: {wasm_bytes} bytes\nwrote {}",
        json_path.display()
    );
}
