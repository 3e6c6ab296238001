//! `plan-limits`: the operator's tool.
//!
//! ```text
//! plan-limits validate PLANS_JSON
//! plan-limits replay PLANS_JSON SCENARIO_JSONL [--build webdis|redis-hostcalls] [--vms N]
//! plan-limits token USER [--plan P] [--org O] [--ttl SECONDS]
//! plan-limits set-plan USER PLAN            (REDIS_URL: an admin's)
//! plan-limits functions load                (REDIS_URL: an admin's)
//! ```
//!
//! `replay` runs the scenario through the real filter `.wasm` in our wasmtime host, against a
//! real Redis (one it starts on a free loopback port, or `REDIS_URL`), and prints one JSON line
//! per request. It needs the `replay` feature (on by default); without it, this binary builds
//! without wasmtime.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use plan_limits_core::keys;
use plan_limits_core::plans::Plans;
use plan_limits_core::redis::functions;
use plan_limits_core::redis::RedisReply;
use plan_limits_services::jwt::{DevKey, TokenClaims};

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
    /// Print a bearer token `make run`'s gateway accepts (signed with the dev key it made).
    Token {
        user: String,
        /// The plan the token claims (billing's record in Redis wins over it).
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        org: Option<String>,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Where the dev signing key is kept.
        #[arg(long, default_value = ".gateway/jwt")]
        key_dir: PathBuf,
        /// The plans.json whose issuer, audience and claim names the token follows.
        #[arg(long, default_value = "plans.json")]
        plans: PathBuf,
    },
    /// Record USER's plan as billing's (it wins over a token's claim) in the Redis at
    /// REDIS_URL.
    SetPlan {
        user: String,
        plan: String,
        /// The plans.json the plan must be one of.
        #[arg(long, default_value = "plans.json")]
        plans: PathBuf,
    },
    /// The filter's Redis functions, in the Redis at REDIS_URL.
    #[command(subcommand)]
    Functions(Functions),
}

#[derive(Subcommand)]
enum Functions {
    /// Load (or replace) the filter's Redis functions library.
    Load,
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
        Command::Token {
            user,
            plan,
            org,
            ttl,
            key_dir,
            plans,
        } => token(
            &user,
            plan.as_deref(),
            org.as_deref(),
            ttl,
            &key_dir,
            &plans,
        ),
        Command::SetPlan { user, plan, plans } => set_plan(&user, &plan, &plans),
        Command::Functions(Functions::Load) => load_functions(),
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

fn token(
    user: &str,
    plan: Option<&str>,
    org: Option<&str>,
    ttl_secs: u64,
    key_dir: &Path,
    plans: &Path,
) -> Result<(), String> {
    let (_, compiled) = load(plans)?;
    let key = DevKey::load_or_create(key_dir);
    let claims = TokenClaims {
        user,
        plan,
        org,
        ttl_secs,
    };
    println!("{}", key.token(&compiled.identity.jwt, &claims));
    Ok(())
}

/// A connection to the Redis at REDIS_URL (an admin's: the filter's user may not write).
fn redis() -> Result<redis::Connection, String> {
    let url = std::env::var("REDIS_URL")
        .map_err(|_| "set REDIS_URL to an admin's redis:// URL (make run prints it)".to_string())?;
    redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .map_err(|e| format!("{url}: {e}"))
}

fn set_plan(user: &str, plan: &str, plans: &Path) -> Result<(), String> {
    let (_, compiled) = load(plans)?;
    if compiled.plan(plan).is_none() {
        let known: Vec<_> = compiled.plans().iter().map(|p| p.key.as_str()).collect();
        return Err(format!(
            "plan {plan:?} is not in {}: one of {}",
            plans.display(),
            known.join(", ")
        ));
    }
    let key = keys::entitlement_key(&compiled.redis.key_prefix, keys::encoded_user(user));
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    redis::cmd("HSET")
        .arg(&key)
        .arg("plan")
        .arg(plan)
        .arg("updated_at")
        .arg(&now)
        .exec(&mut redis()?)
        .map_err(|e| format!("HSET {key}: {e}"))?;
    println!("{user}: {plan} (a gateway's cache sees it within entitlement_cache_ms)");
    Ok(())
}

fn load_functions() -> Result<(), String> {
    let reply = plan_limits_services::redis_exec::run(&mut redis()?, &functions::load_library());
    match reply {
        RedisReply::Error(e) => Err(format!("FUNCTION LOAD: {e}")),
        _ => {
            println!("the plan_limits library is loaded");
            Ok(())
        }
    }
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
