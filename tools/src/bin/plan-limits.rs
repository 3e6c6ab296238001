//! `plan-limits`: the operator's tool.
//!
//! ```text
//! plan-limits validate PLANS_JSON
//! plan-limits reload [PLANS_JSON] [--ecds-dir DIR] [--wasm FILE] [--admin-port PORT]
//! plan-limits schema [--markdown]           (make schema: plans.schema.json, docs/configuration.md)
//! plan-limits diff OLD_JSON NEW_JSON [--scenario SCENARIO_JSONL]
//! plan-limits replay PLANS_JSON SCENARIO_JSONL [--build webdis|redis-hostcalls] [--vms N]
//! plan-limits token USER [--plan P] [--org O] [--ttl SECONDS]
//! plan-limits functions load                (REDIS_URL: an admin's, as below)
//! plan-limits usage USER
//! plan-limits history USER [--from YYYY-MM-DD] [--to YYYY-MM-DD] [--action A]
//! plan-limits set-plan USER PLAN [--anchor-day N]
//! plan-limits grant USER ACTION N
//! plan-limits reset USER [ACTION]
//! plan-limits export --from YYYY-MM-DD --to YYYY-MM-DD [--format jsonl|csv]
//! plan-limits audit [--period P]
//! plan-limits render envoy|istio|envoy-gateway|higress [PLANS_JSON] [--image oci://...] ...
//! plan-limits oci [WASM] [--out DIR] [--tag TAG]
//! ```
//!
//! `usage` and `history` print the JSON the gateway's endpoints answer; `set-plan`, `grant`
//! and `reset` each write one transaction with an `admin` event (`--operator`, default
//! `$USER`); `export` prints the event stream's events of those days. REDIS_URL may name a
//! master of a Redis Cluster: the commands then work on the whole cluster (`export` reads
//! every slot's stream, `functions load` loads every master). `audit` recomputes every
//! counter and running total from the events and prints the drift and the losses on record;
//! it exits non-zero on any drift.
//!
//! `diff` prints what changes from OLD to NEW, one line per change (`free upload: 5 -> 3`), or
//! `no changes`; with `--scenario`, it replays the scenario under each (as `replay` does, each
//! against a Redis of its own) and prints the requests answered differently. It exits 0 whether
//! or not anything changed, non-zero when a file cannot be read or compiled.
//!
//! `replay` runs the scenario through the real filter `.wasm` in our wasmtime host, against a
//! real Redis (one it starts on a free loopback port, or `REDIS_URL`), and prints one JSON line
//! per request. It needs the `replay` feature (on by default); without it, this binary builds
//! without wasmtime.

use std::path::{Path, PathBuf};

use plan_limits_tools::run_record::{self, RunRecord};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use plan_limits_core::{AdminOp, Plans};
use plan_limits_services::gateway::Ports;
use plan_limits_services::jwt::{DevKey, TokenClaims};
use plan_limits_tools::diff::Side;
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
        /// Default: the plans.json `make run` was started with (else plans.json).
        plans: Option<PathBuf>,
        /// Where the Envoy watches (`make run`'s: .gateway/envoy-ecds).
        #[arg(long, default_value = ".gateway/envoy-ecds")]
        ecds_dir: PathBuf,
        /// The filter module to run (copied in under a name carrying its hash).
        #[arg(long, default_value = "target/plan_limits_filter.wasm")]
        wasm: PathBuf,
        /// Envoy's admin port: wait until Envoy reports the new config loaded (or refused).
        /// Default: `make run`'s.
        #[arg(long)]
        admin_port: Option<u16>,
    },
    /// Print plans.json's JSON Schema (committed as plans.schema.json: `make schema`).
    Schema {
        /// The reference for people instead, in Markdown (committed as docs/configuration.md).
        #[arg(long)]
        markdown: bool,
    },
    /// What changes from one plans.json to another, one line per change ("no changes" when
    /// none): each plan's terms per action, plans, features, sizes, actions, routes, path lists
    /// and every other setting by its JSON path. Exits 0 either way.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// Also replay this scenario (as `replay` takes it) under each, and print the requests
        /// answered differently.
        #[arg(long)]
        scenario: Option<PathBuf>,
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
        /// A past period (YYYY-MM: the one starting that month), as its summary kept it.
        #[arg(long)]
        period: Option<String>,
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
        /// `kind`: each action that records a kind also by kind.
        #[arg(long)]
        by: Option<String>,
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
    /// Recompute every counter (monthly and daily) and running total (storage, team) from the
    /// events and compare them with Redis; list the losses on record. Exits non-zero on drift.
    Audit {
        /// Only this period (`2026-11`, or `2026-11-15` for one from an anchor day) and its days.
        #[arg(long)]
        period: Option<String>,
        #[arg(long, default_value = "plans.json")]
        plans: PathBuf,
    },
    /// The filter's Redis functions, in the Redis at REDIS_URL.
    #[command(subcommand)]
    Functions(Functions),
    /// Print the filter's deployment, derived from plans.json: Envoy's config as `make run`
    /// renders it (envoy), or the manifests for Istio, Envoy Gateway or Higress.
    Render {
        #[arg(value_enum)]
        platform: PlatformArg,
        #[arg(default_value = "plans.json")]
        plans: PathBuf,
        #[command(flatten)]
        kubernetes: Box<KubernetesArgs>,
        #[command(flatten)]
        envoy: Box<EnvoyArgs>,
    },
    /// Pack the filter .wasm as an OCI image (the compat variant Istio and Envoy Gateway
    /// pull) in an OCI image layout directory; prints its digest.
    Oci {
        #[arg(default_value = "target/plan_limits_filter.wasm")]
        wasm: PathBuf,
        /// The layout directory (replaced).
        #[arg(long, default_value = "target/oci/plan-limits-filter")]
        out: PathBuf,
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PlatformArg {
    Envoy,
    Istio,
    EnvoyGateway,
    Higress,
}

/// Where the module, the gateway and the services are (istio, envoy-gateway, higress).
#[derive(clap::Args)]
struct KubernetesArgs {
    /// The module: oci://REGISTRY/REPO:TAG (or REPO@sha256:DIGEST, as `plan-limits oci`
    /// prints), or an https:// URL of the .wasm. Higress needs the Redis host-call build.
    #[arg(long, default_value = "")]
    image: String,
    /// Default: istio-system, default (Envoy Gateway), higress-system.
    #[arg(long)]
    namespace: Option<String>,
    /// Istio: the gateway's labels, key=value[,key=value] (istio=ingressgateway); Envoy
    /// Gateway: the Gateway's name (eg).
    #[arg(long)]
    target: Option<String>,
    /// Where Istio or Envoy Gateway fetches the keys of plans.json's issuer.
    #[arg(long)]
    jwks_uri: Option<String>,
    /// Higress: the JSON Web Key Set of plans.json's issuer (its jwt-auth takes it inline).
    #[arg(long)]
    jwks_file: Option<PathBuf>,
    /// Where the platform's jwt_authn puts the token's payload (default: Istio's
    /// `payload`, Envoy Gateway's issuer).
    #[arg(long)]
    payload_key: Option<String>,
    /// webdis as the mesh knows it (Istio, Envoy Gateway).
    #[arg(long, default_value = plan_limits_tools::render::DEFAULT_WEBDIS_SERVICE)]
    webdis_service: String,
    /// Redis as Higress knows it (Higress).
    #[arg(long, default_value = plan_limits_tools::render::DEFAULT_REDIS_SERVICE)]
    redis_service: String,
    #[arg(long, default_value = plan_limits_tools::render::DEFAULT_HIGRESS_JWT_AUTH_IMAGE)]
    higress_jwt_auth_image: String,
}

/// What envoy.yaml is rendered with (envoy); the defaults are `make run`'s, with which it
/// prints the repository's envoy.yaml (`make envoy-yaml`).
#[derive(clap::Args)]
struct EnvoyArgs {
    #[arg(long, default_value_t = Ports::MAKE_RUN.gateway)]
    gateway_port: u16,
    #[arg(long, default_value_t = Ports::MAKE_RUN.admin)]
    admin_port: u16,
    #[arg(long, default_value_t = Ports::MAKE_RUN.upstream)]
    upstream_port: u16,
    #[arg(long, default_value_t = Ports::MAKE_RUN.webdis)]
    webdis_port: u16,
    #[arg(long, default_value = plan_limits_services::envoy::DEFAULT_UPSTREAM_TIMEOUT)]
    upstream_timeout: String,
    /// The JSON Web Key Set Envoy verifies tokens with (a relative path is from the directory
    /// Envoy runs in: `make run` runs it in the repository's root).
    #[arg(long, default_value = plan_limits_services::envoy::MAKE_RUN_JWKS)]
    jwks: PathBuf,
    /// Where Envoy watches the filters' configuration files (relative as --jwks).
    #[arg(long, default_value = plan_limits_services::envoy::MAKE_RUN_ECDS_DIR)]
    ecds_dir: PathBuf,
    /// Also write the filters' configuration files (and the module) into --ecds-dir.
    #[arg(long)]
    write_ecds: bool,
    /// The module the filters' configuration names (--write-ecds).
    #[arg(long, default_value = "target/plan_limits_filter.wasm")]
    wasm: PathBuf,
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
        } => {
            // What `make run` was started with, unless told otherwise.
            let started = RunRecord::read(&run_record::path());
            let plans = plans
                .or_else(|| {
                    let record = started.as_ref()?;
                    eprintln!(
                        "reloading {}, the plans.json make run was started with",
                        record.plans.display()
                    );
                    Some(record.plans.clone())
                })
                .unwrap_or_else(|| "plans.json".into());
            let admin_port = admin_port.or(started.map(|r| r.admin_port));
            reload(&plans, &ecds_dir, &wasm, admin_port)
        }
        Command::Diff { old, new, scenario } => diff(&old, &new, scenario.as_deref()),
        Command::Schema { markdown } => {
            if markdown {
                print!("{}", plan_limits_tools::schema::markdown());
            } else {
                println!("{}", plan_limits_tools::schema::render());
            }
            Ok(())
        }
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
        Command::Usage {
            user,
            period,
            plans,
        } => load(&plans).and_then(|(_, plans)| {
            let now = chrono::Utc::now();
            let json = operator::usage(redis()?.as_dyn(), &plans, &user, period.as_deref(), now)?;
            print_json(&json)
        }),
        Command::History {
            user,
            from,
            to,
            action,
            by,
            plans,
        } => load(&plans).and_then(|(_, plans)| {
            let json = operator::history(
                redis()?.as_dyn(),
                &plans,
                &user,
                &[
                    ("from", from.as_deref()),
                    ("to", to.as_deref()),
                    ("action", action.as_deref()),
                    ("by", by.as_deref()),
                ],
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
        Command::Audit { period, plans } => load(&plans).and_then(|(_, plans)| {
            let scope = plan_limits_tools::audit::Scope { period };
            let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
            let audit = plan_limits_tools::audit::run(&mut redis()?, &plans, &scope, now)?;
            print!("{audit}");
            match audit.drift.len() {
                0 => Ok(()),
                n => Err(format!("{n} counters differ from their events")),
            }
        }),
        Command::Functions(Functions::Load) => load_functions(),
        Command::Render {
            platform,
            plans,
            kubernetes,
            envoy,
        } => render(platform, &plans, &kubernetes, &envoy),
        Command::Oci { wasm, out, tag } => oci(&wasm, &out, &tag),
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
    let url = match std::env::var("REDIS_URL") {
        Ok(url) => url,
        // Beside the gateway `make run` started: its Redis, saying so.
        Err(_) => {
            let record = RunRecord::read(&run_record::path()).ok_or(
                "set REDIS_URL to an admin's redis:// URL (make run prints it; next to a running `make run`, it is found)",
            )?;
            eprintln!(
                "REDIS_URL is not set: using the Redis of the gateway make run started ({})",
                record.redis_shown()
            );
            record.redis_url
        }
    };
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

fn diff(old: &Path, new: &Path, scenario: Option<&Path>) -> Result<(), String> {
    let side = |path: &Path| -> Result<(String, Side), String> {
        let text = read(path)?;
        let side = Side::from_json(text.as_bytes())
            .map_err(|e| format!("{}: {}: {}", path.display(), e.path, e.reason))?;
        Ok((text, side))
    };
    let ((old_text, old), (new_text, new)) = (side(old)?, side(new)?);
    let changes = plan_limits_tools::diff::changes(&old, &new);
    if changes.is_empty() {
        println!("no changes");
    }
    for change in changes {
        println!("{change}");
    }
    let Some(scenario) = scenario else {
        return Ok(());
    };
    let differ = replay_under_both(scenario, (&old_text, &old.plans), (&new_text, &new.plans))?;
    println!("\nanswered differently in {}:", scenario.display());
    if differ.is_empty() {
        println!("no request answered differently");
    }
    for request in differ {
        println!("{request}");
    }
    Ok(())
}

/// The requests of `scenario` answered differently under the old and the new plans.json.
#[cfg(feature = "replay")]
fn replay_under_both(
    scenario: &Path,
    (old_text, old): (&str, &Plans),
    (new_text, new): (&str, &Plans),
) -> Result<Vec<String>, String> {
    let lines = scenario_lines(scenario)?;
    // Each run on a Redis of its own, so that the second does not start from the first's counts.
    let before = replay_results(old_text, old, &lines, BuildArg::Webdis, 1, None)?;
    let after = replay_results(new_text, new, &lines, BuildArg::Webdis, 1, None)?;
    let file_lines: Vec<usize> = lines.iter().map(|line| line.file_line).collect();
    Ok(plan_limits_tools::diff::answered_differently(
        &file_lines,
        &before,
        &after,
    ))
}

#[cfg(feature = "replay")]
fn scenario_lines(scenario: &Path) -> Result<Vec<plan_limits_tools::replay::ScenarioLine>, String> {
    plan_limits_tools::replay::parse_scenario(&read(scenario)?)
        .map_err(|e| format!("{}: {e}", scenario.display()))
}

fn render(
    platform: PlatformArg,
    plans_path: &Path,
    kube: &KubernetesArgs,
    envoy_args: &EnvoyArgs,
) -> Result<(), String> {
    use plan_limits_services::envoy;
    use plan_limits_tools::render::{self, Platform};

    let (text, plans) = load(plans_path)?;
    let ecds_dir = &envoy_args.ecds_dir;
    let platform = match platform {
        PlatformArg::Envoy => {
            // Paths as given: the defaults (from the repository's root, where `make run` runs
            // Envoy) print the repository's envoy.yaml.
            print!(
                "{}",
                envoy::render(&envoy::EnvoyParams {
                    admin_port: envoy_args.admin_port,
                    gateway_port: envoy_args.gateway_port,
                    upstream_port: envoy_args.upstream_port,
                    webdis_port: envoy_args.webdis_port,
                    upstream_timeout: &envoy_args.upstream_timeout,
                    plans_json: &text,
                    jwks: &envoy_args.jwks,
                    ecds_dir,
                    redis_cluster_proxy: None,
                })?
            );
            if envoy_args.write_ecds {
                envoy::write_filter_configs(ecds_dir, &text, &envoy_args.wasm)?;
                eprintln!("the filters' configuration: {}", ecds_dir.display());
            } else {
                eprintln!(
                    "Envoy reads the filters' configuration (plans.json, the .wasm) from {}: \
                     --write-ecds writes it there, `plan-limits reload` replaces it",
                    ecds_dir.display()
                );
            }
            return Ok(());
        }
        PlatformArg::Istio => Platform::Istio,
        PlatformArg::EnvoyGateway => Platform::EnvoyGateway,
        PlatformArg::Higress => Platform::Higress,
    };
    let jwks = kube.jwks_file.as_deref().map(read).transpose()?;
    let mut options = render::Options {
        image: kube.image.clone(),
        namespace: kube.namespace.clone(),
        target: kube.target.clone(),
        jwks_uri: kube.jwks_uri.clone(),
        jwks: jwks.map(|j| j.trim().to_string()),
        payload_key: kube.payload_key.clone(),
        webdis_service: kube.webdis_service.clone(),
        redis_service: kube.redis_service.clone(),
        higress_jwt_auth_image: kube.higress_jwt_auth_image.clone(),
    };
    let placeholders = options.fill_placeholders(platform);
    if !placeholders.is_empty() {
        eprintln!(
            "placeholders for what only the deployment knows (replace them, or give the flags):"
        );
        for (flag, placeholder) in &placeholders {
            eprintln!("  {flag}: {placeholder}");
        }
    }
    let plans_value: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    // The webdis cluster's bounds, as Envoy's config has them.
    let cluster = envoy::webdis_cluster(envoy_args.webdis_port);
    print!(
        "{}",
        render::kubernetes(platform, &plans, &plans_value, &cluster, &options)?
    );
    Ok(())
}

fn oci(wasm: &Path, out: &Path, tag: &str) -> Result<(), String> {
    let code = std::fs::read(wasm).map_err(|e| format!("{}: {e}", wasm.display()))?;
    let packed = plan_limits_tools::oci::write_layout(&code, out, tag)
        .map_err(|e| format!("{}: {e}", wasm.display()))?;
    println!("{}", packed.manifest_digest);
    // The layout's directory name is the repository's name in the hint.
    let repo = out
        .file_name()
        .map_or("plan-limits-filter".into(), |n| n.to_string_lossy());
    eprintln!(
        "{}: OCI image layout, tag {tag}; push it with\n  skopeo copy oci:{}:{tag} \
         docker://REGISTRY/{repo}:{tag}\nand pin it as oci://REGISTRY/{repo}@{}",
        out.display(),
        out.display(),
        packed.manifest_digest
    );
    Ok(())
}

#[cfg(feature = "replay")]
fn replay(plans: &Path, scenario: &Path, build: BuildArg, vms: usize) -> Result<(), String> {
    let (text, compiled) = load(plans)?;
    let lines = scenario_lines(scenario)?;
    let redis_url = std::env::var("REDIS_URL").ok();
    for result in replay_results(&text, &compiled, &lines, build, vms, redis_url)? {
        println!("{result}");
    }
    Ok(())
}

/// The scenario through the real filter .wasm in our wasmtime host: one JSON value per request.
#[cfg(feature = "replay")]
fn replay_results(
    text: &str,
    compiled: &Plans,
    lines: &[plan_limits_tools::replay::ScenarioLine],
    build: BuildArg,
    vms: usize,
    redis_url: Option<String>,
) -> Result<Vec<serde_json::Value>, String> {
    use plan_limits_harness::{Build, Harness};

    let build = match build {
        BuildArg::Webdis => Build::Webdis,
        BuildArg::RedisHostcalls => Build::RedisHostCalls,
    };
    let mut harness = Harness::try_start(build, text, vms, redis_url).map_err(|e| e.to_string())?;
    plan_limits_tools::replay::run(&mut harness, compiled, lines).map_err(|e| e.to_string())
}

#[cfg(not(feature = "replay"))]
const WITHOUT_REPLAY: &str =
    "this plan-limits was built without replay (cargo build --features replay)";

#[cfg(not(feature = "replay"))]
fn replay(_: &Path, _: &Path, _: BuildArg, _: usize) -> Result<(), String> {
    Err(WITHOUT_REPLAY.into())
}

#[cfg(not(feature = "replay"))]
fn replay_under_both(
    _: &Path,
    _: (&str, &Plans),
    _: (&str, &Plans),
) -> Result<Vec<String>, String> {
    Err(WITHOUT_REPLAY.into())
}
