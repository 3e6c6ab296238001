//! The adversary of issue 17: a seeded, reproducible driver of hostile clients, hostile
//! upstream answers and faults against real Envoy, Redis, webdis and the demo upstream, and
//! the ledger invariant checked after each run. A named list of cases finds only what someone
//! thought of; this draws behaviours and faults at random from a seed, so that whatever a
//! seed finds, the same seed finds again (`ADVERSARY_SEEDS=<seed>`).
//!
//! - `plan`: what a seed decides (requests, client behaviours, upstream answers, faults);
//! - `clients`, `h2`: the clients, HTTP/1.1 and HTTP/2 written by hand;
//! - `faults`: Redis, webdis, Envoy and the upstream broken and brought back;
//! - `quiet`: waiting until nothing moves before reading the outcome;
//! - `invariant`: what must hold per user and action;
//! - `report`: what a run did and found, and how to reproduce it.

pub mod clients;
pub mod faults;
pub mod h2;
pub mod invariant;
pub mod plan;
pub mod quiet;
pub mod report;
pub mod rng;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use plan_limits_services::gateway::{EnvoyGateway, GatewayOptions};

use self::clients::{Context, Tally};
use self::faults::{FaultLog, Progress};
use self::invariant::{Facts, Observation, Terms, Verdict};
use self::plan::{Budget, FaultKinds, Plan, USERS};
use self::quiet::Quiet;

/// Reservations expire after this long unless extended: short, so that a run sees them
/// expire (a killed Envoy's).
pub const RESERVATION_TTL_MS: u64 = 3_000;

/// The plans of every run: the repository's, with short reservations and limits low enough
/// for a run to reach on every plan.
pub fn plans_json() -> String {
    crate::plans_with(|p| {
        p["redis"]["reservation_ttl_ms"] = RESERVATION_TTL_MS.into();
        p["plans"]["professional"]["limits"]["ai_analysis"] = 6.into();
        p["plans"]["professional"]["limits"]["dxf_export"] = 4.into();
        p["plans"]["enterprise"]["limits"]["api_call"] = 8.into();
    })
}

/// Everything one seed's run did and found.
pub struct RunReport {
    pub seed: u64,
    pub budget: Budget,
    pub steps: usize,
    pub tally: Tally,
    pub faults: FaultLog,
    pub quiet: Quiet,
    pub verdict: Verdict,
    /// The filter's own counters, from the last Envoy (`fail_open`, `settlements_dropped`, ...).
    pub metrics: BTreeMap<String, u64>,
    pub took: Duration,
    /// Where the run's configs and logs are (Envoy's among them).
    pub dir: std::path::PathBuf,
}

/// Runs one seed against a fresh gateway and checks the invariant.
pub fn run(seed: u64, budget: Budget) -> RunReport {
    let started = Instant::now();
    let plan = Plan::generate(seed, budget, chrono::Utc::now().date_naive());
    let plans_json = plans_json();
    let terms = Terms::new(&plans_json);
    let mut gw = EnvoyGateway::start(GatewayOptions {
        plans_json,
        upstream_timeout: "2s".into(),
        persistent_redis: true,
        lenient_upstream: true,
        ..GatewayOptions::default()
    });
    if std::env::var_os("ADVERSARY_ENVOY_DEBUG").is_some() {
        envoy_debug_logs(gw.admin_port);
    }
    let periods_before = gw_period(&gw);
    let tokens: Vec<String> = USERS
        .iter()
        .map(|(user, plan)| crate::token(user, plan))
        .collect();
    let (tally, faults) = drive(&mut gw, &plan, &tokens);
    write_trace(&gw.dir, &tally, &faults);
    let settle = Duration::from_millis(plan.longest_upstream_ms().max(RESERVATION_TTL_MS) + 1_000);
    let quiet = quiet::wait_until_quiet(&gw, settle, || probe_reservations(&gw, &terms, &tokens));
    let observed = observe(&gw, &terms, &[periods_before, gw_period(&gw)]);
    let mut verdict = invariant::check(
        &terms,
        &observed,
        Facts {
            faults_ran: !faults.struck.is_empty(),
            envoy_killed: faults.envoy_killed(),
            envoys: faults.envoys,
        },
    );
    audit(&gw, &terms, &mut verdict);
    RunReport {
        seed,
        budget,
        steps: plan.steps().count(),
        tally,
        faults,
        quiet,
        verdict,
        metrics: filter_metrics(&gw),
        took: started.elapsed(),
        dir: gw.dir.clone(),
    }
}

/// What every client did and when the faults struck, in time order, as
/// `adversary-trace.txt` beside the gateway's logs.
fn write_trace(dir: &std::path::Path, tally: &Tally, faults: &FaultLog) {
    let mut lines: Vec<(Duration, String)> = tally.trace.clone();
    for (kind, at, what) in &faults.struck {
        lines.push((*at, format!("FAULT {}: {what}", kind.name())));
    }
    lines.sort_by_key(|(at, _)| *at);
    let text: String = lines
        .iter()
        .map(|(at, line)| format!("{:>8.3} s  {line}\n", at.as_secs_f64()))
        .collect();
    let path = dir.join("adversary-trace.txt");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Envoy logs each request at debug level, headers and Envoy's request id included (to read a
/// violation against: `ADVERSARY_ENVOY_DEBUG=1`, also for an Envoy started after a kill).
pub(crate) fn envoy_debug_logs(admin_port: u16) {
    let _ = plan_limits_services::http::Request::new("POST", "/logging?level=debug")
        .try_send(admin_port);
}

fn gw_period(gw: &EnvoyGateway) -> String {
    plan_limits_services::gateway::Gateway::period(gw)
}

/// The clients, each on its own thread with its share of the plan; the faults on this one
/// (a process started from a thread that then ends would die with it: the services are
/// started with a parent-death signal, which Linux ties to the starting thread).
fn drive(gw: &mut EnvoyGateway, plan: &Plan, tokens: &[String]) -> (Tally, FaultLog) {
    let progress = Progress::default();
    progress
        .clients_running
        .store(plan.clients.len(), Ordering::SeqCst);
    let ctx = Context {
        port: gw.gateway_port,
        tokens,
        started: Instant::now(),
    };
    std::thread::scope(|s| {
        let progress = &progress;
        let clients: Vec<_> = plan
            .clients
            .iter()
            .enumerate()
            .map(|(client, steps)| {
                s.spawn(move || {
                    let mut tally = Tally::default();
                    for step in steps {
                        progress.steps_begun.fetch_add(1, Ordering::SeqCst);
                        let at = ctx.started.elapsed();
                        clients::run_step(step, ctx, &mut tally, at, client);
                    }
                    progress.clients_running.fetch_sub(1, Ordering::SeqCst);
                    tally
                })
            })
            .collect();
        let log = faults::strike_all(gw, &plan.faults, progress, ctx.started);
        let mut tally = Tally::default();
        for client in clients {
            let one = client
                .join()
                .unwrap_or_else(|_| panic!("a client thread panicked"));
            tally.merge(&one);
        }
        (tally, log)
    })
}

/// `plan-limits audit` after the run: every counter, day and running total is what the events
/// say (drift is a violation); its losses on record and silent workers go in the notes.
fn audit(gw: &EnvoyGateway, terms: &Terms, verdict: &mut Verdict) {
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let mut redis = plan_limits_tools::operator::Redis::connect(&gw.redis.url())
        .unwrap_or_else(|e| panic!("audit: {e}"));
    let scope = plan_limits_tools::audit::Scope::default();
    let audit = plan_limits_tools::audit::run(&mut redis, &terms.plans, &scope, now)
        .unwrap_or_else(|e| panic!("audit: {e}"));
    for drift in &audit.drift {
        verdict.violations.push(invariant::Violation {
            invariant: 'd',
            user: drift.user.clone(),
            action: drift.what.clone(),
            detail: format!(
                "plan-limits audit: Redis holds {}, the events say {}",
                drift.found, drift.expected
            ),
        });
    }
    if !audit.lost.is_empty() {
        verdict.notes.push(format!(
            "plan-limits audit lists {} losses on record",
            audit.lost.len()
        ));
    }
}

/// One request per user and limited action that the upstream fails (503): not done, not
/// counted, but its reservation makes Redis look at the reservations that expired.
fn probe_reservations(gw: &EnvoyGateway, terms: &Terms, tokens: &[String]) {
    let routes = [
        ("POST", "/api/upload", "upload"),
        ("POST", "/api/teammate", "ai_analysis"),
        ("POST", "/api/export/dxf", "dxf_export"),
        ("GET", "/api/v1/probe", "api_call"),
    ];
    for ((_, plan), token) in USERS.iter().zip(tokens) {
        for (method, path, action) in routes {
            if terms.limit(plan, action).unwrap_or(0) == 0 {
                continue;
            }
            let _ = plan_limits_services::http::Request::new(method, path)
                .bearer(token)
                .upstream_status(503)
                .body(plan_limits_services::http::Body::Bytes(b"probe".to_vec()))
                .try_send(gw.gateway_port);
        }
    }
}

/// What the run left in the upstream's ledger and in Redis.
fn observe(gw: &EnvoyGateway, terms: &Terms, periods: &[String]) -> Observation {
    let mut conn = gw.redis.connection();
    let events = crate::usage::events(&mut conn);
    let mut all_periods: BTreeSet<String> = periods.iter().cloned().collect();
    all_periods.extend(
        events
            .iter()
            .filter_map(|e| e.get("period").filter(|p| !p.is_empty()).cloned()),
    );
    let mut counters = BTreeMap::new();
    for (user, _) in USERS {
        for period in &all_periods {
            let summary = crate::usage::summary(&mut conn, user, period);
            for action in terms.actions() {
                let n: u64 = summary
                    .get(&action)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                *counters.entry((user.to_string(), action)).or_default() += n;
            }
        }
    }
    Observation {
        ledger: gw.upstream.ledger().0,
        events,
        counters,
    }
}

/// The filter's unlabeled counters from the running Envoy.
fn filter_metrics(gw: &EnvoyGateway) -> BTreeMap<String, u64> {
    let path = "/stats?filter=wasmcustom.plan_limits";
    let Ok(answer) = plan_limits_services::http::Request::new("GET", path).try_send(gw.admin_port)
    else {
        return BTreeMap::new();
    };
    answer
        .body_text()
        .lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| !name.contains("=.="))
        .filter_map(|(name, value)| {
            let value = value.trim().parse::<u64>().ok()?;
            let short = name.trim_start_matches("wasmcustom.");
            (value > 0).then(|| (short.to_string(), value))
        })
        .collect()
}

/// Which seeds to run and how big: from `ADVERSARY_SEEDS` (a count below 10,000, or a comma
/// list of seeds), `ADVERSARY_REQUESTS`, `ADVERSARY_FAULTS`, `ADVERSARY_CLIENTS` and
/// `ADVERSARY_FAULT_KINDS` (e.g. `redis-pause,envoy-kill`); else `default_seeds` with
/// `default_budget`.
pub struct Config {
    pub seeds: Vec<u64>,
    pub budget: Budget,
}

/// Numbers below this in `ADVERSARY_SEEDS` are a count of seeds; seeds themselves are larger.
pub const MAX_SEED_COUNT: u64 = 10_000;

impl Config {
    pub fn from_env(default_seeds: &[u64], default_budget: Budget) -> Self {
        let number = |name: &str, default: usize| -> usize {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
                _ => default,
            }
        };
        let fault_kinds = match std::env::var("ADVERSARY_FAULT_KINDS") {
            Ok(v) if !v.trim().is_empty() => {
                FaultKinds::parse(&v).unwrap_or_else(|e| panic!("ADVERSARY_FAULT_KINDS={v:?}: {e}"))
            }
            _ => default_budget.fault_kinds,
        };
        let budget = Budget {
            requests: number("ADVERSARY_REQUESTS", default_budget.requests),
            faults: number("ADVERSARY_FAULTS", default_budget.faults),
            clients: number("ADVERSARY_CLIENTS", default_budget.clients),
            fault_kinds,
        };
        let seeds = match std::env::var("ADVERSARY_SEEDS") {
            Ok(v) if !v.trim().is_empty() => parse_seeds(&v),
            _ => default_seeds.to_vec(),
        };
        Self { seeds, budget }
    }
}

impl Config {
    /// Whether `ADVERSARY_SEEDS` names the seeds to run (else the defaults run).
    pub fn seeds_named_by_env() -> bool {
        std::env::var("ADVERSARY_SEEDS").is_ok_and(|v| !v.trim().is_empty())
    }
}

/// `"3"`: three fresh seeds (from the clock); `"1234567,7654321"`: those seeds.
pub fn parse_seeds(text: &str) -> Vec<u64> {
    let numbers: Vec<u64> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| panic!("ADVERSARY_SEEDS: {s:?}: {e}"))
        })
        .collect();
    match numbers.as_slice() {
        [count] if *count < MAX_SEED_COUNT => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            (0..*count).map(|i| rng::nth_seed(base, i)).collect()
        }
        seeds => seeds.to_vec(),
    }
}
