//! `make bench`: every case of `plan_limits_tools::bench` repeated, each repetition run right
//! after its baseline (A B A B ...) with the same wrk load, so that a noisy minute moves both;
//! the median and the spread of the ratios; then how the cost grows with distinct users and
//! with routes, with Envoy's and Redis's memory after each. Writes bench/results.json (every
//! repetition) for bench/chart.py.
//!
//! `plan-limits-bench [--seconds N] [--repetitions N] [--connections N] [--growth-users
//! 1,1000,100000] [--growth-routes 10,1000] [--cases limited,unlimited] [--out DIR]
//! [--perf HZ] [--compare A.wasm,B.wasm]`; `--compare` measures other builds in the same
//! rotation (their cases named `<case>@<file stem>`); `--perf` records Envoy's stacks during each case's load (`make profile`).
//!
//! `--timeline 1,4,32,128` measures instead where one request's time goes at each of those
//! connection counts (the chosen cases, else the limited and unlimited ones): Envoy's access
//! log times each phase (`bench::TIMELINE`), Redis says how long its calls took, wrk how long
//! the client waited; written to `<out>/timeline.json` (`bench/tables.py` prints it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plan_limits_services::envoy::{self, EnvoyOptions, EnvoyParams};
use plan_limits_services::jwt::{DevKey, TokenClaims};
use plan_limits_services::process::{free_port, scratch_dir, Service};
use plan_limits_services::redis_server::RedisServer;
use plan_limits_services::upstream::Nginx;
use plan_limits_services::webdis::Webdis;
use plan_limits_tools::bench::{self, Case, Filters, WrkFigures, WrkFiles};
use serde_json::{json, Value};

struct Options {
    seconds: u64,
    repetitions: u32,
    connections: u32,
    growth_users: Vec<u32>,
    growth_routes: Vec<u32>,
    /// Only these cases (and their baselines); all when empty.
    only: Vec<String>,
    /// Other builds of the filter, measured in the same rotation (baseline, this build, those
    /// builds) on every case of ours: an A/B that the same noisy minute moves alike.
    compare: Vec<PathBuf>,
    /// `perf record` Envoy during each case's load (not the baselines'), into
    /// `<out>/<case>-<port>.perf.data`, with this many samples a second.
    perf: Option<u32>,
    /// Measure one request's timeline at these connection counts instead (`timeline`).
    timeline: Vec<u32>,
    out: PathBuf,
}

fn options() -> Options {
    let mut o = Options {
        seconds: 5,
        repetitions: 3,
        connections: 32,
        growth_users: vec![1, 1000, 100_000],
        growth_routes: vec![10, 1000],
        only: Vec::new(),
        perf: None,
        compare: Vec::new(),
        timeline: Vec::new(),
        out: plan_limits_services::repo_root().join("bench"),
    };
    let list = |v: &str| -> Vec<u32> {
        v.split(',')
            .filter(|s| !s.is_empty())
            .map(|n| n.parse().expect("a list of numbers"))
            .collect()
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => o.seconds = value.parse().expect("--seconds N"),
            "--repetitions" => o.repetitions = value.parse().expect("--repetitions N"),
            "--connections" => o.connections = value.parse().expect("--connections N"),
            "--growth-users" => o.growth_users = list(value),
            "--growth-routes" => o.growth_routes = list(value),
            "--cases" => o.only = value.split(',').map(String::from).collect(),
            "--out" => o.out = PathBuf::from(value),
            "--compare" => o.compare = value.split(',').map(PathBuf::from).collect(),
            "--perf" => o.perf = Some(value.parse().expect("--perf SAMPLES_PER_SECOND")),
            "--timeline" => o.timeline = list(value),
            _ => panic!("unknown option {flag}"),
        }
    }
    o
}

/// What the bench's Envoys share: Redis, webdis, nginx, the token key, the files.
struct Rig {
    dir: PathBuf,
    redis: RedisServer,
    webdis: Webdis,
    nginx: Nginx,
    jwt: std::sync::Arc<DevKey>,
    wasm: PathBuf,
    /// `bench/empty-filter.wat`, assembled.
    empty_wasm: PathBuf,
    script: PathBuf,
    bodies: BTreeMap<usize, PathBuf>,
}

/// An Envoy started for the bench: the process, its gateway port and its admin port.
type RunningEnvoy = (Service, u16, u16);

impl Rig {
    /// An Envoy of `filters` with `plans`, on one worker.
    fn envoy(&self, name: &str, filters: Filters, plans: &str) -> (Service, u16, u16) {
        self.envoy_of(name, filters, plans, &self.wasm, None)
    }

    /// The same with the filter built as `wasm`.
    fn envoy_of(
        &self,
        name: &str,
        filters: Filters,
        plans: &str,
        wasm: &Path,
        timeline_log: Option<&Path>,
    ) -> (Service, u16, u16) {
        let (port, admin) = (free_port(), free_port());
        let params = EnvoyParams {
            admin_port: admin,
            gateway_port: port,
            upstream_port: self.nginx.port,
            webdis_port: self.webdis.port,
            upstream_timeout: "15s",
            plans_json: plans,
            jwks: &self.jwt.jwks_path(),
            ecds_dir: &self.dir.join(format!("{name}-ecds")),
            redis_cluster_proxy: None,
        };
        envoy::write_filter_configs(params.ecds_dir, plans, wasm).unwrap_or_else(|e| panic!("{e}"));
        let envoy = envoy::start(EnvoyOptions {
            name,
            dir: &self.dir,
            config: &bench::envoy_config(&params, filters, &self.empty_wasm, timeline_log),
            concurrency: 1,
            hot_restart: None,
            port,
        });
        (envoy, port, admin)
    }

    fn files<'a>(&'a self, case: &Case, tokens: Option<&'a Path>) -> WrkFiles<'a> {
        WrkFiles {
            body: self.bodies.get(&case.body_bytes).map(PathBuf::as_path),
            tokens,
        }
    }
}

/// One timed run: under load, then at one connection.
struct Measured {
    load: WrkFigures,
    single: WrkFigures,
    /// CPU time each process used per request under load (µs): where the time goes.
    cpu_us_per_request: BTreeMap<&'static str, f64>,
    /// With `--perf`: Envoy's samples by shared object (percent).
    envoy_samples: Vec<(String, f64)>,
}

fn measure(
    rig: &Rig,
    envoy: u32,
    port: u16,
    case: &Case,
    o: &Options,
    tokens: Option<&Path>,
) -> Measured {
    let files = rig.files(case, tokens);
    let _ = bench::run_wrk(&rig.script, port, case, o.connections, 1, &files); // warm-up
    let processes = [
        ("envoy", Some(envoy)),
        ("nginx", Some(rig.nginx.service.pid())),
        ("webdis", Some(rig.webdis.service.pid())),
        ("redis", Some(rig.redis.service().pid())),
        ("wrk", None),
    ];
    let cpu = || {
        processes.map(|(name, pid)| {
            (
                name,
                pid.map_or_else(bench::waited_children_cpu_us, bench::cpu_us),
            )
        })
    };
    // (Named by port too: a case's --compare builds run on Envoys of their own.)
    let perf_data = o.out.join(format!("{}-{port}.perf.data", case.name));
    let perf = o
        .perf
        .filter(|_| !case.is_baseline())
        .map(|rate| bench::perf_record(envoy, rate, &perf_data));
    let before = cpu();
    let (load, _) = bench::run_wrk(&rig.script, port, case, o.connections, o.seconds, &files);
    let after = cpu();
    let envoy_samples = perf
        .map(|perf| {
            bench::perf_stop(perf);
            bench::perf_shares(&perf_data)
        })
        .unwrap_or_default();
    let requests = load.requests.max(1) as f64;
    let cpu_us_per_request = before
        .iter()
        .zip(&after)
        .map(|((name, b), (_, a))| (*name, a.saturating_sub(*b) as f64 / requests))
        .collect();
    let single_secs = (o.seconds / 2).max(1);
    let (single, _) = bench::run_wrk(&rig.script, port, case, 1, single_secs, &files);
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
    Measured {
        load,
        single,
        cpu_us_per_request,
        envoy_samples,
    }
}

fn main() {
    let o = options();
    std::fs::create_dir_all(&o.out).unwrap();
    let dir = scratch_dir("bench");
    let redis = RedisServer::start_on(&dir, free_port());
    let webdis = Webdis::start(&dir, "127.0.0.1", redis.port, redis.filter_password(), None);
    let mut bodies = BTreeMap::new();
    for case in bench::cases().iter().filter(|c| c.body_bytes > 0) {
        let path = dir.join(format!("body-{}", case.body_bytes));
        std::fs::write(&path, vec![b'x'; case.body_bytes]).unwrap();
        bodies.insert(case.body_bytes, path);
    }
    let rig = Rig {
        nginx: Nginx::start(&dir),
        jwt: DevKey::for_tests(),
        wasm: plan_limits_services::filter_wasm(),
        empty_wasm: bench::empty_wasm(&dir),
        script: plan_limits_services::repo_root().join("bench/wrk.lua"),
        bodies,
        dir,
        redis,
        webdis,
    };
    let plans = bench::bench_plans();
    exhaust_uploads(&rig.redis);
    if !o.timeline.is_empty() {
        timeline(&rig, &o);
        return;
    }

    // Every case's Envoy, started once; each repetition runs a case right after its baseline.
    let cases = bench::cases();
    let chosen = |c: &Case| o.only.is_empty() || o.only.iter().any(|n| n == c.name);
    let envoys: Vec<(Service, u16, u16)> = cases
        .iter()
        .map(|case| {
            let envoy = rig.envoy(case.name, case.filters, &bench::plans_of(case));
            if !chosen(case) {
                return envoy; // (not probed: a filter under experiment may answer otherwise)
            }
            let status = case
                .request()
                .try_send(envoy.1)
                .unwrap_or_else(|e| panic!("{}: probe: {e}", case.name))
                .status;
            assert_eq!(
                status, case.expect_status,
                "{}: probe answered {status}",
                case.name
            );
            envoy
        })
        .collect();
    let index = |name: &str| cases.iter().position(|c| c.name == name).expect("a case");
    // With --compare: the other builds' Envoys for each case of ours.
    let compared: Vec<Vec<(String, RunningEnvoy)>> = cases
        .iter()
        .map(|case| {
            if case.filters != Filters::PlanLimits || !chosen(case) {
                return Vec::new();
            }
            o.compare
                .iter()
                .map(|other| {
                    let build = build_name(other);
                    let name = format!("{}-{build}", case.name);
                    let envoy =
                        rig.envoy_of(&name, case.filters, &bench::plans_of(case), other, None);
                    (build, envoy)
                })
                .collect()
        })
        .collect();
    // (Signed once, for the cases that run: a thousand tokens take a while.)
    let tokens: Vec<Option<PathBuf>> = cases
        .iter()
        .map(|c| chosen(c).then(|| case_tokens(&rig, c)).flatten())
        .collect();
    let mut runs = Vec::new();
    for repetition in 1..=o.repetitions {
        for (i, case) in cases
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.is_baseline() && chosen(c))
        {
            let b = index(case.baseline);
            let base = measure(&rig, envoys[b].0.pid(), envoys[b].1, &cases[b], &o, None);
            let tokens = tokens[i].as_deref();
            let mut measured = vec![(
                case.name.to_string(),
                case.label.to_string(),
                measure(&rig, envoys[i].0.pid(), envoys[i].1, case, &o, tokens),
            )];
            for (build, (envoy, port, _)) in &compared[i] {
                let run = measure(&rig, envoy.pid(), *port, case, &o, tokens);
                let (name, label) = (built(case.name, build), built(case.label, build));
                measured.push((name, label, run));
            }
            for (name, label, run) in measured {
                let ratio = run.load.rps / base.load.rps;
                println!(
                "#{repetition} {:<34} {:>8.0} req/s vs {:>8.0}  ratio {:>5.2}  | 1 conn p50 {:>5.0} µs ({:+.0})",
                label,
                run.load.rps,
                base.load.rps,
                ratio,
                run.single.p50_us,
                run.single.p50_us - base.single.p50_us
            );
                println!(
                    "   CPU µs per request: {}",
                    cpu_line(&run.cpu_us_per_request)
                );
                if !run.envoy_samples.is_empty() {
                    let shares: Vec<String> = run
                        .envoy_samples
                        .iter()
                        .filter(|(_, share)| *share >= 0.5)
                        .map(|(object, share)| format!("{object} {share:.1} %"))
                        .collect();
                    println!("   Envoy's samples (perf): {}", shares.join(", "));
                }
                runs.push(json!({
                "case": name,
                "repetition": repetition,
                "baseline": case.baseline,
                "rps": run.load.rps,
                "baseline_rps": base.load.rps,
                "ratio": ratio,
                "p50_us": run.load.p50_us,
                "p99_us": run.load.p99_us,
                "p50_us_1conn": run.single.p50_us,
                "p99_us_1conn": run.single.p99_us,
                "added_p50_us_1conn": run.single.p50_us - base.single.p50_us,
                "added_p99_us_1conn": run.single.p99_us - base.single.p99_us,
                "cpu_us_per_request": run.cpu_us_per_request,
                "baseline_cpu_us_per_request": base.cpu_us_per_request,
                "envoy_samples_percent": run.envoy_samples.iter().cloned().collect::<BTreeMap<_, _>>(),
            }));
            }
        }
    }
    let summaries: Vec<Value> = cases
        .iter()
        .filter(|c| !c.is_baseline())
        .flat_map(|case| {
            let mut names = vec![(case.name.to_string(), case.label.to_string())];
            for other in &o.compare {
                let build = build_name(other);
                names.push((built(case.name, &build), built(case.label, &build)));
            }
            names
                .into_iter()
                .filter_map(|(name, label)| summarize(case, &name, &label, &runs))
                .collect::<Vec<_>>()
        })
        .collect();
    print_table(&summaries);
    let filter_stats =
        plan_limits_services::http::get(envoys[index("limited")].2, "/stats?filter=plan_limits")
            .body_text()
            .lines()
            .filter(|l| l.starts_with("wasmcustom"))
            .map(String::from)
            .collect::<Vec<_>>();
    drop(envoys);
    drop(compared);

    let growth = growth(&rig, &o, &plans);

    let wasm_bytes = std::fs::metadata(&rig.wasm).map(|m| m.len()).unwrap_or(0);
    let report = json!({
        "seconds": o.seconds,
        "repetitions": o.repetitions,
        "connections": o.connections,
        "load_generator": "wrk -t1",
        "envoy_concurrency": 1,
        "upstream": "nginx return 200",
        "machine": bench::machine(),
        "wasm": rig.wasm.file_name().map(|n| n.to_string_lossy().into_owned()),
        "wasm_bytes": wasm_bytes,
        "cases": summaries,
        "runs": runs,
        "growth": growth,
        "limited_case_filter_stats": filter_stats,
    });
    let json_path = o.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!(
        "optimized filter: {wasm_bytes} bytes\nwrote {}",
        json_path.display()
    );
}

/// The exhausted user has used the month's uploads already.
fn exhaust_uploads(redis: &RedisServer) {
    let mut conn = redis.connection();
    let keys = plan_limits_core::UsageKeys::new(
        &plan_limits_services::usage::prefix(),
        bench::EXHAUSTED_USER,
        &plan_limits_services::usage::this_period(),
        "upload",
    );
    redis::cmd("HSET")
        .arg(&keys.summary)
        .arg("upload")
        .arg(5)
        .exec(&mut conn)
        .unwrap();
}

/// A case's repetitions: median and spread of its ratio, throughput and added latency.
/// A `--compare` build's name: its file's stem.
fn build_name(wasm: &Path) -> String {
    wasm.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// How a case of a `--compare` build is named.
fn built(name: &str, build: &str) -> String {
    format!("{name}@{build}")
}

/// The median and spread of the runs named `name` (of `case` or of its `--compare` twin).
fn summarize(case: &Case, name: &str, label: &str, runs: &[Value]) -> Option<Value> {
    let mine: Vec<&Value> = runs.iter().filter(|r| r["case"] == name).collect();
    if mine.is_empty() {
        return None;
    }
    let field = |name: &str| -> Vec<f64> { mine.iter().filter_map(|r| r[name].as_f64()).collect() };
    let stat = |name: &str| {
        let (median, low, high) = bench::median_and_spread(&field(name));
        json!({"median": median, "min": low, "max": high})
    };
    let ratio = bench::median_and_spread(&field("ratio")).0;
    // The median CPU per request of each process, the case's and its baselines'.
    let cpu = |key: &str| -> BTreeMap<String, f64> {
        let names = mine
            .first()
            .and_then(|r| r[key].as_object())
            .into_iter()
            .flatten();
        names
            .map(|(name, _)| {
                let each: Vec<f64> = mine.iter().filter_map(|r| r[key][name].as_f64()).collect();
                (name.clone(), bench::median_and_spread(&each).0)
            })
            .collect()
    };
    Some(json!({
        "name": name,
        "label": label,
        "baseline": case.baseline,
        "target_ratio": case.target_ratio,
        "met": case.target_ratio.map(|t| ratio >= t),
        "ratio": stat("ratio"),
        "rps": stat("rps"),
        "baseline_rps": stat("baseline_rps"),
        "added_p50_us_1conn": stat("added_p50_us_1conn"),
        "added_p99_us_1conn": stat("added_p99_us_1conn"),
        "p99_us": stat("p99_us"),
        "cpu_us_per_request": cpu("cpu_us_per_request"),
        "baseline_cpu_us_per_request": cpu("baseline_cpu_us_per_request"),
    }))
}

fn cpu_line(cpu: &BTreeMap<&str, f64>) -> String {
    cpu.iter()
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_table(summaries: &[Value]) {
    println!("\ncase                               ratio (median, min-max)   req/s    added p50 at 1 conn   target");
    for s in summaries {
        println!(
            "{:<34} {:>5.2} ({:.2}-{:.2})  {:>9.0}  {:>+7.0} µs ({:+.0} to {:+.0})  {}",
            s["label"].as_str().unwrap_or(""),
            s["ratio"]["median"].as_f64().unwrap_or(0.0),
            s["ratio"]["min"].as_f64().unwrap_or(0.0),
            s["ratio"]["max"].as_f64().unwrap_or(0.0),
            s["rps"]["median"].as_f64().unwrap_or(0.0),
            s["added_p50_us_1conn"]["median"].as_f64().unwrap_or(0.0),
            s["added_p50_us_1conn"]["min"].as_f64().unwrap_or(0.0),
            s["added_p50_us_1conn"]["max"].as_f64().unwrap_or(0.0),
            match (s["target_ratio"].as_f64(), s["met"].as_bool()) {
                (Some(t), Some(true)) => format!(">= {t}: met"),
                (Some(t), _) => format!(">= {t}: missed"),
                _ => "-".into(),
            }
        );
    }
    println!("\nCPU per request under load, µs (median): the case, then its baseline");
    for s in summaries {
        let line = |key: &str| {
            s[key]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, us)| format!("{name} {:.1}", us.as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<34} {}  |  {}",
            s["label"].as_str().unwrap_or(""),
            line("cpu_us_per_request"),
            line("baseline_cpu_us_per_request")
        );
    }
}

/// How the cost grows: the limited and unlimited cases with more distinct users (round-robin
/// over that many callers' tokens), and the limited case with more routes in plans.json; each
/// run right after a baseline run; Envoy's and Redis's memory after each.
fn growth(rig: &Rig, o: &Options, plans: &str) -> Vec<Value> {
    let cases = bench::cases();
    let case = |name: &str| cases.iter().find(|c| c.name == name).expect("a case");
    let (base_envoy, base_port, _) = rig.envoy("growth-baseline", Filters::None, plans);
    let mut out = Vec::new();
    let mut row = |label: String, envoy: (u32, u16, u16), case: &Case, tokens: Option<&Path>| {
        let baseline = self::case_baseline(&cases);
        let base = measure(rig, base_envoy.pid(), base_port, baseline, o, None);
        let run = measure(rig, envoy.0, envoy.1, case, o, tokens);
        let envoy_memory = envoy_allocated(envoy.2);
        let redis_memory = redis_used_memory(&rig.redis);
        let ratio = run.load.rps / base.load.rps;
        println!(
            "growth: {label:<40} {:>8.0} req/s  ratio {ratio:.2}  +{:.0} µs p50 at 1 conn  Envoy {:.1} MB  Redis {:.1} MB",
            run.load.rps,
            run.single.p50_us - base.single.p50_us,
            envoy_memory as f64 / 1e6,
            redis_memory as f64 / 1e6
        );
        out.push(json!({
            "label": label,
            "case": case.name,
            "rps": run.load.rps,
            "baseline_rps": base.load.rps,
            "ratio": ratio,
            "added_p50_us_1conn": run.single.p50_us - base.single.p50_us,
            "envoy_allocated_bytes": envoy_memory,
            "redis_used_memory_bytes": redis_memory,
        }));
    };
    // Distinct users.
    let (envoy, port, admin) = rig.envoy("growth-users", Filters::PlanLimits, plans);
    for &users in &o.growth_users {
        for name in ["limited", "unlimited"] {
            let c = case(name);
            let tokens = tokens_file(rig, c, users);
            row(
                format!("{name}, {users} distinct users"),
                (envoy.pid(), port, admin),
                c,
                Some(&tokens),
            );
        }
    }
    // Routes in plans.json (the bench's request matches the last one).
    for &routes in &o.growth_routes {
        let plans = with_routes(plans, routes);
        let (envoy, port, admin) = rig.envoy(
            &format!("growth-routes-{routes}"),
            Filters::PlanLimits,
            &plans,
        );
        let c = case("limited");
        let envoy = (envoy.pid(), port, admin);
        row(format!("limited, {routes} routes"), envoy, c, None);
    }
    out
}

fn case_baseline(cases: &[Case]) -> &Case {
    cases
        .iter()
        .find(|c| c.name == "baseline")
        .expect("the baseline")
}

/// The tokens a case's requests go round-robin over (`Case::users`), if it has its own.
fn case_tokens(rig: &Rig, case: &Case) -> Option<PathBuf> {
    (case.users > 0).then(|| tokens_file(rig, case, case.users))
}

/// A file of `users` bearer tokens for the case's plan (`<case user>-<i>`).
fn tokens_file(rig: &Rig, case: &Case, users: u32) -> PathBuf {
    let (user, plan) = case.caller.expect("a caller");
    let path = rig.dir.join(format!("tokens-{}-{users}", case.name));
    let claims = plan_limits_core::JwtClaims::default();
    let mut text = String::new();
    for i in 0..users {
        let user = format!("{user}-{i}");
        text.push_str(&rig.jwt.token(
            &claims,
            &TokenClaims {
                user: &user,
                plan: Some(plan),
                org: None,
                anchor_day: None,
                ttl_secs: 3600,
            },
        ));
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// The bench's plans with `routes` routes: exact paths ahead of the repository's, so that the
/// limited case's request is matched after all of them.
fn with_routes(plans: &str, routes: u32) -> String {
    let mut value: Value = serde_json::from_str(plans).unwrap();
    let own = value["routes"].as_array().cloned().unwrap_or_default();
    let extra = (routes as usize).saturating_sub(own.len());
    let mut all: Vec<Value> = (0..extra)
        .map(|i| json!({"method": "POST", "path": format!("/api/extra/{i}"), "action": "pdf_export"}))
        .collect();
    all.extend(own);
    value["routes"] = Value::Array(all);
    value.to_string()
}

/// Envoy's heap in use (admin `/memory`).
fn envoy_allocated(admin: u16) -> u64 {
    // (Sent chunked: the JSON object is what lies between the braces.)
    let text = plan_limits_services::http::get(admin, "/memory").body_text();
    let object = text
        .find('{')
        .zip(text.rfind('}'))
        .map_or("{}", |(start, end)| &text[start..=end]);
    let memory: Value = serde_json::from_str(object).unwrap_or_default();
    memory["allocated"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .or_else(|| memory["allocated"].as_u64())
        .unwrap_or(0)
}

/// Redis's `INFO section` text (empty if it does not answer).
fn redis_info(redis: &RedisServer, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query(&mut redis.connection())
        .unwrap_or_default()
}

fn redis_used_memory(redis: &RedisServer) -> u64 {
    redis_info(redis, "memory")
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Where one request's time goes, at each of `--timeline`'s connection counts: a fresh Envoy
/// per count (stopped with SIGTERM, so that its access log is written out), wrk's load, then
/// each phase's median and 90th percentile from the log, what wrk saw, and the mean time
/// Redis spent in each function call.
fn timeline(rig: &Rig, o: &Options) {
    let cases = bench::cases();
    let chosen: Vec<&Case> = cases
        .iter()
        .filter(|c| match o.only.is_empty() {
            true => matches!(c.name, "limited" | "unlimited"),
            false => o.only.iter().any(|n| n == c.name),
        })
        .collect();
    let mut rows = Vec::new();
    for case in chosen {
        let tokens = case_tokens(rig, case);
        for &connections in &o.timeline {
            let name = format!("{}-timeline-{connections}", case.name);
            let log = rig.dir.join(format!("{name}.log.json"));
            let _ = std::fs::remove_file(&log);
            let (mut envoy, port, admin) = rig.envoy_of(
                &name,
                case.filters,
                &bench::plans_of(case),
                &rig.wasm,
                Some(&log),
            );
            let files = rig.files(case, tokens.as_deref());
            let _ = bench::run_wrk(&rig.script, port, case, connections, 1, &files); // warm-up
            std::fs::write(&log, "").expect("empty the warm-up's log");
            let redis_before = redis_fcall_usec(&rig.redis);
            let (figures, _) =
                bench::run_wrk(&rig.script, port, case, connections, o.seconds, &files);
            let redis_after = redis_fcall_usec(&rig.redis);
            let stats =
                plan_limits_services::http::get(admin, "/stats?filter=round_trip_us").body_text();
            let round_trips: serde_json::Map<String, Value> = ["reserve", "settle"]
                .into_iter()
                .map(|call| {
                    let p = |q: &str| bench::histogram_percentile(&stats, call, q);
                    (
                        call.to_string(),
                        json!({"p50_us": p("P50"), "p90_us": p("P90")}),
                    )
                })
                .collect();
            // SAFETY: a signal to our own child; Envoy writes its logs out as it exits.
            unsafe { libc::kill(envoy.pid() as i32, libc::SIGTERM) };
            envoy.wait_exit(std::time::Duration::from_secs(10));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let phases: serde_json::Map<String, Value> = bench::timeline(&text)
                .into_iter()
                .map(|(phase, n, p50, p90)| {
                    (
                        phase.to_string(),
                        json!({"requests": n, "p50_us": p50, "p90_us": p90}),
                    )
                })
                .collect();
            let redis_calls = redis_after.0.saturating_sub(redis_before.0).max(1);
            let redis_us = redis_after.1.saturating_sub(redis_before.1) as f64 / redis_calls as f64;
            let row = json!({
                "case": case.name,
                "label": case.label,
                "connections": connections,
                "rps": figures.rps,
                "wrk_p50_us": figures.p50_us,
                "wrk_p99_us": figures.p99_us,
                "redis_us_per_call": redis_us,
                "redis_calls_per_request": redis_calls as f64 / figures.requests.max(1) as f64,
                "phases": phases,
                "filter_round_trip_us": round_trips,
            });
            println!("{row}");
            rows.push(row);
        }
    }
    let out = o.out.join("timeline.json");
    let doc = json!({"machine": bench::machine(), "seconds": o.seconds, "rows": rows});
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap() + "\n")
        .unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    println!("timeline written to {}", out.display());
}

/// Redis's function calls so far (`FCALL` and `EVALSHA`) and the microseconds it spent in them.
fn redis_fcall_usec(redis: &RedisServer) -> (u64, u64) {
    redis_info(redis, "commandstats")
        .lines()
        .filter(|l| l.starts_with("cmdstat_fcall:") || l.starts_with("cmdstat_evalsha:"))
        .map(|l| {
            let field = |name: &str| {
                l.split([':', ','])
                    .find_map(|kv| kv.strip_prefix(name)?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (field("calls="), field("usec="))
        })
        .fold((0, 0), |(c, u), (c2, u2)| (c + c2, u + u2))
}
