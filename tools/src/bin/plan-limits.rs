//! Try a plans.json change before Envoy loads it:
//!
//! ```text
//! plan-limits-sim validate plans.json
//! plan-limits-sim run plans.json scenario.jsonl [--build webdis|redis-hostcalls] [--vms N]
//! ```
//!
//! `run` replays the scenario through the real filter `.wasm` in our wasmtime host, against a
//! real Redis (one it starts on a free loopback port, or `REDIS_URL`), and prints one JSON line
//! per request: the status the client saw, the filter's body when it answered itself, and the
//! counter after the request.

use std::process::ExitCode;

use plan_limits_wasm_host::harness::{read, Build, Harness};
use plan_limits_tools::replay as sim;
use plan_limits_core::config::Config;

fn usage() -> ExitCode {
    eprintln!(
        "usage:\n  plan-limits-sim validate PLANS_JSON\n  plan-limits-sim run PLANS_JSON SCENARIO_JSONL [--build webdis|redis-hostcalls] [--vms N]"
    );
    ExitCode::from(2)
}

fn load_config(path: &str) -> Result<(String, Config), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let config = Config::from_json(text.as_bytes()).map_err(|e| e.to_string())?;
    Ok((text, config))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("validate") if args.len() == 2 => match load_config(&args[1]) {
            Ok((_, config)) => {
                println!("{}", sim::plans_table(&config));
                println!("\n{}: OK", args[1]);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some("run") if args.len() >= 3 => {
            let mut build = Build::Webdis;
            let mut vms = 1;
            let mut rest = args[3..].iter();
            while let Some(flag) = rest.next() {
                match (flag.as_str(), rest.next().map(String::as_str)) {
                    ("--build", Some("webdis")) => build = Build::Webdis,
                    ("--build", Some("redis-hostcalls")) => build = Build::RedisHostCalls,
                    ("--vms", Some(n)) if n.parse::<usize>().is_ok_and(|n| n > 0) => {
                        vms = n.parse().unwrap()
                    }
                    _ => return usage(),
                }
            }
            let (text, config) = match load_config(&args[1]) {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let lines = match sim::parse_scenario(&read(std::path::Path::new(&args[2]))) {
                Ok(lines) => lines,
                Err(e) => {
                    eprintln!("{}: {e}", args[2]);
                    return ExitCode::FAILURE;
                }
            };
            let redis_url = std::env::var("REDIS_URL").ok();
            let mut harness = match Harness::try_start(build, &text, vms, redis_url) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match sim::run(&mut harness, &config, &lines) {
                Ok(results) => {
                    for result in results {
                        println!("{result}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}
