//! `plan-limits`: the operator's tool.
//!
//! ```text
//! plan-limits validate PLANS_JSON
//! plan-limits replay PLANS_JSON SCENARIO_JSONL [--build webdis|redis-hostcalls] [--vms N]
//! ```
//!
//! `replay` runs the scenario through the real filter `.wasm` in our wasmtime host, against a
//! real Redis (one it starts on a free loopback port, or `REDIS_URL`), and prints one JSON line
//! per request. It needs the `replay` feature (on by default); without it, this binary builds
//! without wasmtime.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use plan_limits_core::plans::Plans;

#[derive(Parser)]
#[command(
    name = "plan-limits",
    about = "Plan limits at the edge: the operator's tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a plans.json and print its plans as a table; a bad file exits non-zero with the
    /// JSON path and the reason.
    Validate { plans: PathBuf },
    /// Replay a scenario (JSON lines, one request each) through the real filter .wasm in our
    /// wasmtime host against a real Redis; prints one JSON line per request.
    Replay {
        plans: PathBuf,
        scenario: PathBuf,
        /// Which filter build runs.
        #[arg(long, value_enum, default_value_t = BuildArg::Webdis)]
        build: BuildArg,
        /// Requests go round-robin to this many VMs, like Envoy workers.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        vms: u16,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BuildArg {
    Webdis,
    RedisHostcalls,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Validate { plans } => validate(&plans),
        Command::Replay {
            plans,
            scenario,
            build,
            vms,
        } => replay(&plans, &scenario, build, vms.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn load(path: &Path) -> Result<(String, Plans), String> {
    let text = read(path)?;
    let plans = Plans::from_json(text.as_bytes()).map_err(|e| e.to_string())?;
    Ok((text, plans))
}

fn validate(path: &Path) -> Result<(), String> {
    let (_, plans) = load(path)?;
    println!("{}", plan_limits_tools::plans_table::render(&plans));
    println!("\n{}: OK", path.display());
    Ok(())
}

#[cfg(feature = "replay")]
fn replay(plans: &Path, scenario: &Path, build: BuildArg, vms: usize) -> Result<(), String> {
    use plan_limits_tools::replay;
    use plan_limits_wasm_host::harness::{Build, Harness};

    let (text, compiled) = load(plans)?;
    let lines = replay::parse_scenario(&read(scenario)?)
        .map_err(|e| format!("{}: {e}", scenario.display()))?;
    let build = match build {
        BuildArg::Webdis => Build::Webdis,
        BuildArg::RedisHostcalls => Build::RedisHostCalls,
    };
    let redis_url = std::env::var("REDIS_URL").ok();
    let mut harness =
        Harness::try_start(build, &text, vms, redis_url).map_err(|e| e.to_string())?;
    for result in replay::run(&mut harness, &compiled, &lines).map_err(|e| e.to_string())? {
        println!("{result}");
    }
    Ok(())
}

#[cfg(not(feature = "replay"))]
fn replay(_: &Path, _: &Path, _: BuildArg, _: usize) -> Result<(), String> {
    Err("this plan-limits was built without replay (cargo build --features replay)".into())
}
