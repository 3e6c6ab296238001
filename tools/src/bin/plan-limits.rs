//! `plan-limits`: the operator's tool.
//!
//! ```text
//! plan-limits validate PLANS_JSON
//! plan-limits reload [PLANS_JSON] [--ecds-dir DIR] [--wasm FILE] [--admin-port PORT]
//! plan-limits replay PLANS_JSON SCENARIO_JSONL [--build webdis|redis-hostcalls] [--vms N]
//! plan-limits token USER [--plan P] [--org O] [--ttl SECONDS]
//! plan-limits functions load                (REDIS_URL: an admin's, as below)
//! plan-limits usage USER
//! plan-limits history USER [--from YYYY-MM-DD] [--to YYYY-MM-DD] [--action A]
//! plan-limits set-plan USER PLAN [--anchor-day N]
//! plan-limits grant USER ACTION N
//! plan-limits reset USER [ACTION]
//! plan-limits export --from YYYY-MM-DD --to YYYY-MM-DD [--format jsonl|csv]
//! ```
//!
//! `usage` and `history` print the JSON the gateway's endpoints answer; `set-plan`, `grant`
//! and `reset` each write one transaction with an `admin` event (`--operator`, default
//! `$USER`); `export` prints the event stream's events of those days. REDIS_URL may name a
//! master of a Redis Cluster: the commands then work on the whole cluster (`export` reads
//! every slot's stream, `functions load` loads every master).
//!
//! `replay` runs the scenario through the real filter `.wasm` in our wasmtime host, against a
//! real Redis (one it starts on a free loopback port, or `REDIS_URL`), and prints one JSON line
//! per request. It needs the `replay` feature (on by default); without it, this binary builds
//! without wasmtime.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use plan_limits_core::admin::AdminOp;
use plan_limits_core::plans::Plans;
use plan_limits_services::jwt::{DevKey, TokenClaims};
use plan_limits_tools::operator;

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
    /// Swap a plans.json (and the current filter .wasm) into a running gateway without
    /// restarting Envoy: checked first (here, then by the .wasm itself in `envoy --mode
    /// validate`), then written where Envoy watches its filters' configuration.
    Reload {
        #[arg(default_value = "plans.json")]
        plans: PathBuf,
        /// Where the Envoy watches (`make run`'s: .gateway/envoy-ecds).
        #[arg(long, default_value = ".gateway/envoy-ecds")]
        ecds_dir: PathBuf,
        /// The filter module to run (copied in under a name carrying its hash).
        #[arg(long, default_value = "target/plan_limits_filter.wasm")]
        wasm: PathBuf,
        /// Envoy's admin port: wait until Envoy reports the new config loaded (or refused).
        #[arg(long)]
        admin_port: Option<u16>,
    },
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
        /// The day of the month (1 to 31) USER's billing periods start on (a day a month
        /// lacks is its last); by default the calendar month.
        #[arg(long)]
        anchor_day: Option<u32>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// USER's usage this period: the JSON `GET /api/usage` answers.
    Usage {
        user: String,
        #[arg(long, default_value = "plans.json")]
        plans: PathBuf,
    },
    /// USER's daily counts: the JSON `GET /api/usage/history` answers.
    History {
        user: String,
        /// First day (default: 29 days before --to).
        #[arg(long)]
        from: Option<String>,
        /// Last day (default: today, UTC).
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value = "plans.json")]
        plans: PathBuf,
    },
    /// Give USER N more of ACTION this period, on top of the plan's limit.
    Grant {
        user: String,
        action: String,
        units: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set USER's counts this period back to zero: ACTION's, or every action's.
    Reset {
        user: String,
        action: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the events (usage and admin) recorded on days --from to --to (UTC).
    Export {
        #[arg(long)]
        from: chrono::NaiveDate,
        #[arg(long)]
        to: chrono::NaiveDate,
        #[arg(long, value_enum, default_value_t = FormatArg::Jsonl)]
        format: FormatArg,
        #[arg(long, default_value = "plans.json")]
        plans: PathBuf,
    },
    /// The filter's Redis functions, in the Redis at REDIS_URL.
    #[command(subcommand)]
    Functions(Functions),
}

#[derive(Subcommand)]
enum Functions {
    /// Load (or replace) the filter's Redis functions library, and its functions as scripts
    /// (`redis.invoke: evalsha`), on the Redis or on every master of the Redis Cluster.
    Load,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The plans.json whose plans and actions the change must name.
    #[arg(long, default_value = "plans.json")]
    plans: PathBuf,
    /// Who makes the change, recorded in its admin event (default: $USER).
    #[arg(long)]
    operator: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Jsonl,
    Csv,
}

#[derive(Clone, Copy, ValueEnum)]
enum BuildArg {
    Webdis,
    RedisHostcalls,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Validate { plans } => validate(&plans),
        Command::Reload {
            plans,
            ecds_dir,
            wasm,
            admin_port,
        } => reload(&plans, &ecds_dir, &wasm, admin_port),
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
        Command::SetPlan {
            user,
            plan,
            anchor_day,
            admin,
        } => change(&user, &AdminOp::SetPlan { plan, anchor_day }, &admin),
        Command::Grant {
            user,
            action,
            units,
            admin,
        } => change(&user, &AdminOp::Grant { action, units }, &admin),
        Command::Reset {
            user,
            action,
            admin,
        } => change(&user, &AdminOp::Reset { action }, &admin),
        Command::Usage { user, plans } => load(&plans).and_then(|(_, plans)| {
            let json = operator::usage(redis()?.as_dyn(), &plans, &user, chrono::Utc::now())?;
            print_json(&json)
        }),
        Command::History {
            user,
            from,
            to,
            action,
            plans,
        } => load(&plans).and_then(|(_, plans)| {
            let json = operator::history(
                redis()?.as_dyn(),
                &plans,
                &user,
                from.as_deref(),
                to.as_deref(),
                action.as_deref(),
                chrono::Utc::now(),
            )?;
            print_json(&json)
        }),
        Command::Export {
            from,
            to,
            format,
            plans,
        } => load(&plans).and_then(|(_, plans)| {
            let format = match format {
                FormatArg::Jsonl => operator::Format::Jsonl,
                FormatArg::Csv => operator::Format::Csv,
            };
            let mut out = std::io::stdout().lock();
            let n = operator::export(&mut redis()?, &plans, from, to, format, &mut out)?;
            eprintln!("{n} events");
            Ok(())
        }),
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
        anchor_day: None,
        ttl_secs,
    };
    println!("{}", key.token(&compiled.identity.jwt, &claims));
    Ok(())
}

/// A connection to the Redis at REDIS_URL (an admin's: the filter's user may not write), or
/// to the Redis Cluster it is a master of.
fn redis() -> Result<operator::Redis, String> {
    let url = std::env::var("REDIS_URL")
        .map_err(|_| "set REDIS_URL to an admin's redis:// URL (make run prints it)".to_string())?;
    operator::Redis::connect(&url)
}

/// An operator's change to what `user` may do, with its admin event.
fn change(user: &str, op: &AdminOp, args: &AdminArgs) -> Result<(), String> {
    let (_, plans) = load(&args.plans)?;
    let operator = args
        .operator
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".into());
    operator::apply(
        &mut redis()?,
        &plans,
        user,
        op,
        &operator,
        chrono::Utc::now(),
    )
    .map_err(|e| format!("{}: {e}", args.plans.display()))?;
    let done = match op {
        AdminOp::SetPlan {
            plan,
            anchor_day: None,
        } => format!("{user}: billing's plan is {plan}"),
        AdminOp::SetPlan {
            plan,
            anchor_day: Some(day),
        } => format!("{user}: billing's plan is {plan}, its periods start on day {day}"),
        AdminOp::Grant { action, units } => format!("{user}: {units} more {action} this period"),
        AdminOp::Reset { action: Some(a) } => format!("{user}: {a} reset to 0 this period"),
        AdminOp::Reset { action: None } => format!("{user}: every count reset to 0 this period"),
    };
    println!(
        "{done} (recorded as an admin event; a running gateway sees it at the user's next \
         limited request, within deny_cache_ms, and within entitlement_cache_ms for unlimited ones)"
    );
    Ok(())
}

fn print_json(json: &str) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn load_functions() -> Result<(), String> {
    let masters = redis()?.load_library()?;
    let on = match masters {
        1 => String::new(),
        n => format!(" on each of the cluster's {n} masters"),
    };
    println!("the plan_limits library (and its functions as scripts, for EVALSHA) is loaded{on}");
    Ok(())
}

fn validate(path: &Path) -> Result<(), String> {
    let (_, plans) = load(path)?;
    println!("{}", plan_limits_tools::plans_table::render(&plans));
    println!("\n{}: OK", path.display());
    Ok(())
}

fn reload(
    plans: &Path,
    ecds_dir: &Path,
    wasm: &Path,
    admin_port: Option<u16>,
) -> Result<(), String> {
    use plan_limits_tools::reload::{self, Outcome};
    let text = read(plans)?;
    let outcome = reload::reload(&text, wasm, ecds_dir, admin_port)
        .map_err(|e| format!("{}: {e}", plans.display()))?;
    match outcome {
        Outcome::Unchanged => println!("{}: already running, nothing to do", plans.display()),
        Outcome::Swapped { confirmed: true } => {
            println!("{}: loaded by Envoy, no restart", plans.display())
        }
        Outcome::Swapped { confirmed: false } => println!(
            "{}: written to {} (Envoy picks it up; --admin-port waits for it)",
            plans.display(),
            ecds_dir.display()
        ),
    }
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
