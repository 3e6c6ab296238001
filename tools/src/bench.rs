//! `make bench`: the same wrk load against Envoy without filters, with Envoy's own
//! `local_ratelimit`, and with our filter on each kind of route, in one run on loopback.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use plan_limits_services::envoy::{self, EnvoyParams};
use plan_limits_services::http::{Body, Request};

/// One benchmark case: an Envoy configuration and the request wrk repeats.
pub struct Case {
    pub name: &'static str,
    pub label: &'static str,
    pub filters: Filters,
    pub method: &'static str,
    pub path: &'static str,
    /// Who sends it: a user and the plan their bearer token claims (signed by the tests' key,
    /// which the bench's Envoy trusts).
    pub caller: Option<(&'static str, &'static str)>,
    /// The body's size (bytes of `x`), 0 for none.
    pub body_bytes: usize,
    pub expect_status: u16,
    pub target_ratio: Option<f64>,
    /// The case each repetition is measured against, run just before it (A B A B ...).
    pub baseline: &'static str,
    /// `gateway.read_your_writes` (a limited success held until Redis counted it).
    pub read_your_writes: bool,
    /// `redis.coalesce_reservations` (past four calls in flight, reservations wait for an
    /// answer and go together in the next call).
    pub coalesce_reservations: bool,
    /// `redis.lease_units` (0: no leases).
    pub lease_units: u64,
    /// Requests go round-robin over this many users' tokens (`<caller>-<i>`, the caller's
    /// plan) instead of the caller's own (0: the caller's).
    pub users: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Filters {
    /// Envoy's identity filters (`header_mutation`, `jwt_authn`) and the router: what every
    /// case has in front of the filter.
    None,
    LocalRateLimit,
    PlanLimits,
    /// `n` instances of a wasm filter that does nothing (`bench/empty-filter.wat`) in one VM,
    /// as ours runs two (the plan filter and the hold filter): Envoy's own cost of running
    /// wasm filters, apart from what ours does in them.
    EmptyWasm(u8),
}

pub const LIMITED_USER: &str = "bench-limited";
pub const EXHAUSTED_USER: &str = "bench-exhausted";
const MB: usize = 1 << 20;

/// A case without a body, a caller or a target (the references).
const fn plain(name: &'static str, label: &'static str, filters: Filters) -> Case {
    Case {
        name,
        label,
        filters,
        method: "GET",
        path: "/health",
        caller: None,
        body_bytes: 0,
        expect_status: 200,
        target_ratio: None,
        baseline: "baseline",
        read_your_writes: true,
        coalesce_reservations: true,
        lease_units: 0,
        users: 0,
    }
}

/// A bare-Envoy upload of `bytes` (the uploads' baseline).
const fn bare_upload(name: &'static str, label: &'static str, bytes: usize) -> Case {
    Case {
        method: "POST",
        path: "/api/upload",
        body_bytes: bytes,
        baseline: name,
        ..plain(name, label, Filters::None)
    }
}

/// An enterprise upload of `bytes` through the filter (unlimited count and storage: no
/// request waits on Redis; each success is settled with its bytes).
const fn upload(name: &'static str, label: &'static str, bytes: usize, base: &'static str) -> Case {
    Case {
        method: "POST",
        path: "/api/upload",
        caller: Some(("bench-uploader", "enterprise")),
        body_bytes: bytes,
        target_ratio: Some(0.95),
        baseline: base,
        ..plain(name, label, Filters::PlanLimits)
    }
}

/// The busy enterprise user's API call (its limit out of reach) through the filter: a limited
/// request that reserves a unit.
const fn limited(name: &'static str, label: &'static str) -> Case {
    Case {
        path: "/api/v1/items",
        caller: Some((LIMITED_USER, "enterprise")),
        ..plain(name, label, Filters::PlanLimits)
    }
}

/// A free user's procedure view (no limit on it: nothing waits on Redis) through `filters`.
const fn unlimited_request(name: &'static str, filters: Filters) -> Case {
    Case {
        path: "/api/procedures/1",
        caller: Some(("bench-unlimited", "free")),
        ..plain(name, name, filters)
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        plain("baseline", "Envoy, no filter", Filters::None),
        plain(
            "local_ratelimit",
            "Envoy local_ratelimit",
            Filters::LocalRateLimit,
        ),
        Case {
            target_ratio: Some(0.95),
            ..plain(
                "unmetered",
                "plan-limits, unmetered route",
                Filters::PlanLimits,
            )
        },
        Case {
            target_ratio: Some(0.60),
            ..limited("limited", "plan-limits, limited plan")
        },
        // The price of read-your-writes: the limited case with each success sent on at once
        // (its commit batched after it) instead of once Redis counted it.
        Case {
            read_your_writes: false,
            ..limited(
                "limited_eventual",
                "plan-limits, limited plan, read_your_writes off",
            )
        },
        // One busy user with much left: a worker reserves 16 units a call (a lease) and
        // admits the next requests from them; each success still commits.
        Case {
            lease_units: 16,
            ..limited("limited_leased", "plan-limits, limited plan, leases of 16")
        },
        // Many users, one unit each: requests round-robin over a thousand users' tokens, so no
        // two in a row share an allowance (reservations still share calls under load).
        Case {
            users: 1000,
            ..limited(
                "limited_many_users",
                "plan-limits, limited plan, 1,000 users",
            )
        },
        // Reservations not coalesced (the default coalesces them): each goes in a call of its
        // own, however many are in flight.
        Case {
            coalesce_reservations: false,
            ..limited(
                "limited_one_call_each",
                "plan-limits, limited plan, a call per reservation",
            )
        },
        Case {
            label: "plan-limits, unlimited plan",
            target_ratio: Some(0.85),
            ..unlimited_request("unlimited", Filters::PlanLimits)
        },
        // Where an unlimited request's cost goes, one layer at a time (references: no target).
        // The same request as the unlimited case, through jwt_authn alone (its token verified,
        // the wasm filters left out), then with one and two empty wasm filters.
        Case {
            label: "jwt_authn only (no wasm)",
            ..unlimited_request("identity", Filters::None)
        },
        Case {
            label: "jwt_authn + 1 empty wasm filter",
            ..unlimited_request("empty_wasm_1", Filters::EmptyWasm(1))
        },
        Case {
            label: "jwt_authn + 2 empty wasm filters",
            ..unlimited_request("empty_wasm_2", Filters::EmptyWasm(2))
        },
        Case {
            method: "POST",
            path: "/api/upload",
            caller: Some((EXHAUSTED_USER, "free")),
            body_bytes: 1,
            expect_status: 429,
            target_ratio: Some(1.0),
            ..plain("denied", "plan-limits, answering 429", Filters::PlanLimits)
        },
        bare_upload("baseline_1mb", "Envoy, no filter, 1 MB upload", MB),
        upload("upload_1mb", "plan-limits, 1 MB upload", MB, "baseline_1mb"),
        bare_upload("baseline_10mb", "Envoy, no filter, 10 MB upload", 10 * MB),
        upload(
            "upload_10mb",
            "plan-limits, 10 MB upload",
            10 * MB,
            "baseline_10mb",
        ),
    ]
}

impl Case {
    /// The request's headers, as wrk.lua reads them (`name: value|name: value`).
    pub fn headers(&self) -> String {
        match self.caller {
            None => String::new(),
            Some((user, plan)) => {
                let request = Request::new(self.method, self.path).user(user, plan);
                request
                    .headers
                    .iter()
                    .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value)))
                    .collect::<Vec<_>>()
                    .join("|")
            }
        }
    }

    /// The same request, to send once before timing.
    pub fn request(&self) -> Request {
        let mut request = Request::new(self.method, self.path);
        if let Some((user, plan)) = self.caller {
            request = request.user(user, plan);
        }
        if self.body_bytes > 0 {
            request = request.body(Body::Bytes(vec![b'x'; self.body_bytes]));
        }
        request
    }

    /// Whether it is a reference (its own baseline).
    pub fn is_baseline(&self) -> bool {
        self.baseline == self.name
    }
}

/// The plans a case's Envoy runs with.
pub fn plans_of(case: &Case) -> String {
    let mut plans: Value = serde_json::from_str(&bench_plans()).expect("bench plans");
    plans["gateway"]["read_your_writes"] = case.read_your_writes.into();
    plans["redis"]["coalesce_reservations"] = case.coalesce_reservations.into();
    plans["redis"]["lease_units"] = case.lease_units.into();
    plans.to_string()
}

/// The bench's plans: the repository's, with a limit on API calls no run can reach.
pub fn bench_plans() -> String {
    let mut plans: Value =
        serde_json::from_str(&plan_limits_services::plans_json()).expect("plans.json");
    plans["plans"]["enterprise"]["limits"]["api_call"] = json!(1_000_000_000_000u64);
    // The bench measures what a request costs, one busy user at full speed: no spike arrest.
    if let Some(each) = plans["plans"].as_object_mut() {
        for plan in each.values_mut() {
            plan["request_rate"] = Value::Null;
        }
    }
    // (For editors only; a filter built before it knew the key can be measured too.)
    if let Some(object) = plans.as_object_mut() {
        object.remove("$schema");
    }
    plans.to_string()
}

/// Envoy's config (the builder's) with the plan filter and its hold filter replaced for the
/// reference cases; `empty_wasm` is the empty filter's module (`Filters::EmptyWasm`).
/// With `timeline_log`, every request's phases go to that file (`with_timeline_log`).
pub fn envoy_config(
    params: &EnvoyParams,
    filters: Filters,
    empty_wasm: &Path,
    timeline_log: Option<&Path>,
) -> String {
    let mut config = envoy::config(params).expect("Envoy's config");
    if let Some(path) = timeline_log {
        with_timeline_log(&mut config, path);
    }
    let replacement: Vec<Value> = match filters {
        Filters::PlanLimits if timeline_log.is_none() => {
            return envoy::render(params).expect("Envoy's config")
        }
        Filters::PlanLimits => return envoy::to_yaml(&config).expect("Envoy's config"),
        Filters::None => Vec::new(),
        Filters::LocalRateLimit => vec![json!({
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench",
                "token_bucket": {"max_tokens": 1_000_000_000u64, "tokens_per_fill": 1_000_000_000u64, "fill_interval": "1s"},
                "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            },
        })],
        Filters::EmptyWasm(n) => (1..=n)
            .map(|i| {
                json!({
                    "name": format!("empty_wasm_{i}"),
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": {
                            "root_id": format!("empty_{i}"),
                            "vm_config": {
                                "vm_id": "empty",
                                "runtime": "envoy.wasm.runtime.v8",
                                "code": {"local": {"filename": empty_wasm.display().to_string()}},
                            },
                        },
                    },
                })
            })
            .collect(),
    };
    let http_filters = envoy::http_filters_mut(&mut config).expect("the gateway's HTTP filters");
    let at = http_filters
        .iter()
        .position(|f| f["name"] == envoy::DISCOVERED_FILTERS[0])
        .expect("the plan_limits filter");
    http_filters.retain(|f| {
        !envoy::DISCOVERED_FILTERS
            .iter()
            .any(|name| f["name"] == *name)
    });
    http_filters.splice(at..at, replacement);
    envoy::to_yaml(&config).expect("Envoy's config")
}

/// One request's life as Envoy's access log times it: each phase between two of Envoy's timing
/// points (`%COMMON_DURATION(FROM:TO:us)%`; DS: the client's side, US: the upstream's, RX/TX:
/// receiving/sending, BEG/END: the first/last byte). Between the request's end and the
/// upstream's first byte sent run `jwt_authn`, our filter and its reservation's round trip;
/// between the upstream's first byte and the client's, the response filters and the wait for
/// a success's commit (read-your-writes).
pub const TIMELINE: [(&str, &str, &str); 5] = [
    ("before_upstream", "DS_RX_END", "US_TX_BEG"),
    ("upstream", "US_TX_BEG", "US_RX_BEG"),
    ("after_upstream", "US_RX_BEG", "DS_TX_BEG"),
    ("to_client", "DS_TX_BEG", "DS_TX_END"),
    ("in_envoy", "DS_RX_BEG", "DS_TX_END"),
];

/// Adds to Envoy's `config` an access log of every request's `TIMELINE`, one JSON object a
/// line, in `path`.
pub fn with_timeline_log(config: &mut Value, path: &Path) {
    let format: serde_json::Map<String, Value> = TIMELINE
        .iter()
        .map(|(name, from, to)| {
            (
                name.to_string(),
                json!(format!("%COMMON_DURATION({from}:{to}:us)%")),
            )
        })
        .collect();
    let manager = config
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .and_then(Value::as_object_mut)
        .expect("the gateway's HTTP connection manager");
    manager.insert(
        "access_log".into(),
        json!([{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path.display().to_string(),
                "log_format": {"json_format": format},
            },
        }]),
    );
}

/// Each `TIMELINE` phase's median and 90th percentile (µs) over an access log's lines, and how
/// many requests had it (a request no upstream was sent has no upstream phases).
pub fn timeline(log: &str) -> Vec<(&'static str, usize, f64, f64)> {
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    TIMELINE
        .iter()
        .map(|(name, _, _)| {
            let mut values: Vec<f64> = lines
                .iter()
                .filter_map(|l| match &l[*name] {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                })
                .collect();
            values.sort_by(f64::total_cmp);
            let at = |q: f64| {
                let i = ((values.len() as f64 - 1.0) * q).round() as usize;
                values.get(i).copied().unwrap_or(f64::NAN)
            };
            (*name, values.len(), at(0.5), at(0.9))
        })
        .collect()
}

/// A percentile (`P50`, `P90`) since Envoy started of the filter's Redis round trips for
/// `call`, from its admin `/stats` text (`...call=.=reserve;.;plan_limits_redis_round_trip_us:
/// P0(nan,225) ... P50(nan,530.5) ...`: the second value is the cumulative one).
pub fn histogram_percentile(stats: &str, call: &str, quantile: &str) -> Option<f64> {
    let line = stats
        .lines()
        .find(|l| l.contains(&format!("call=.={call};.;")))?;
    let at = line.find(&format!(" {quantile}("))? + quantile.len() + 2;
    let inside = line.get(at..)?.split(')').next()?;
    inside.split(',').nth(1)?.trim().parse().ok()
}

/// Assembles `bench/empty-filter.wat` (binaryen's `wasm-as`) into `dir`.
pub fn empty_wasm(dir: &Path) -> std::path::PathBuf {
    let source = plan_limits_services::repo_root().join("bench/empty-filter.wat");
    let out = dir.join("empty-filter.wasm");
    let status = Command::new("wasm-as")
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("wasm-as (binaryen; make deps installs it)");
    assert!(status.success(), "wasm-as {}", source.display());
    out
}

/// CPU time (user and system, µs) that process `pid`, its threads and the processes it
/// started (nginx's workers) have used so far, from Linux's /proc.
pub fn cpu_us(pid: u32) -> u64 {
    let ticks = |stat: &str| -> Option<(u32, u64)> {
        // Fields after the command's closing parenthesis: state, ppid, ..., utime (14th), stime.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let used = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((ppid, used))
    };
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0, |(_, t)| t);
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| ticks(&s))
        .filter(|(ppid, _)| *ppid == pid)
        .map(|(_, t)| t)
        .sum();
    (own + children) * 1_000_000 / clock_ticks_per_second()
}

/// CPU time (µs) used by this process's children that have been waited for (each wrk run).
pub fn waited_children_cpu_us() -> u64 {
    // SAFETY: getrusage writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100).max(1)
}

/// Starts `perf record` of process `pid` at `rate` samples a second. (PyPI's Envoy is
/// stripped and V8 takes no flags from Envoy, so a report names shared objects, not
/// functions: Envoy's code, the wasm code V8 compiled (anonymous memory), libc, the kernel.)
pub fn perf_record(pid: u32, rate: u32, out: &Path) -> std::process::Child {
    Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            &rate.to_string(),
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("perf (apt-get install linux-perf)")
}

/// Stops a `perf record` the way Ctrl-C does, so that it writes its file.
pub fn perf_stop(mut perf: std::process::Child) {
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(perf.id() as libc::pid_t, libc::SIGINT);
    }
    let _ = perf.wait();
}

/// Shares of the samples in a `perf record` file by shared object, largest first (the wasm
/// code V8 compiled is named `wasm (V8 JIT)`).
pub fn perf_shares(file: &Path) -> Vec<(String, f64)> {
    let out = Command::new("perf")
        .args(["report", "--sort", "dso", "--stdio", "-q", "-i"])
        .arg(file)
        .output()
        .expect("perf report");
    parse_perf_shares(&String::from_utf8_lossy(&out.stdout))
}

fn parse_perf_shares(report: &str) -> Vec<(String, f64)> {
    report
        .lines()
        .filter_map(|line| {
            let (share, object) = line.trim().split_once('%')?;
            let object = object.trim();
            let object = if object.starts_with("[JIT]") {
                "wasm (V8 JIT)"
            } else {
                object
            };
            Some((object.to_string(), share.trim().parse().ok()?))
        })
        .collect()
}

/// wrk's figures: requests/s, p50 and p99 in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkFigures {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    /// Answers that were not 2xx or 3xx (the 429s of the denied case).
    pub non_2xx: u64,
}

pub fn parse_wrk(output: &str) -> Option<WrkFigures> {
    let rps = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let percentile = |p: &str| {
        output.lines().find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next()? == p)
                .then(|| parse_duration_us(parts.next()?))
                .flatten()
        })
    };
    let requests = output.lines().find_map(|l| {
        l.trim()
            .split_once(" requests in ")
            .and_then(|(n, _)| n.parse().ok())
    })?;
    let non_2xx = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Some(WrkFigures {
        rps,
        p50_us: percentile("50%")?,
        p99_us: percentile("99%")?,
        requests,
        non_2xx,
    })
}

fn parse_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

/// Files wrk's script reads: the body, and the callers' tokens (round-robin).
#[derive(Default)]
pub struct WrkFiles<'a> {
    pub body: Option<&'a Path>,
    pub tokens: Option<&'a Path>,
}

pub fn run_wrk(
    script: &Path,
    port: u16,
    case: &Case,
    connections: u32,
    seconds: u64,
    files: &WrkFiles,
) -> (WrkFigures, String) {
    let path_env = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}{}", case.path))
        .env("BENCH_METHOD", case.method)
        .env("BENCH_PATH", case.path)
        .env("BENCH_HEADERS", case.headers())
        .env("BENCH_BODY_FILE", path_env(files.body))
        .env("BENCH_TOKENS_FILE", path_env(files.tokens))
        .output()
        .expect("run wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let figures = parse_wrk(&text).unwrap_or_else(|| {
        panic!(
            "cannot read wrk's output:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (figures, text)
}

/// The median and the spread (lowest, highest) of `values`.
pub fn median_and_spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

/// What machine the figures come from.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference cases' Envoy: the builder's config with the plan filter and its hold
    /// filter swapped for the case's, where they were; Envoy accepts those without wasm.
    #[test]
    fn a_reference_case_swaps_both_discovered_filters_for_its_own() {
        let dir = plan_limits_services::process::scratch_dir("bench-envoy-config");
        let key = plan_limits_services::jwt::DevKey::load_or_create(&dir.join("jwt"));
        let plans = bench_plans();
        let params = EnvoyParams {
            admin_port: 1,
            gateway_port: 2,
            upstream_port: 3,
            webdis_port: 4,
            upstream_timeout: "15s",
            plans_json: &plans,
            jwks: &key.jwks_path(),
            ecds_dir: &dir.join("ecds"),
            redis_cluster_proxy: None,
        };
        let empty = Path::new("/empty.wasm");
        let names = |filters: Filters| -> Vec<String> {
            let yaml = envoy_config(&params, filters, empty, None);
            let mut config: Value = serde_norway::from_str(&yaml).unwrap();
            envoy::http_filters_mut(&mut config)
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap().to_string())
                .collect()
        };
        let identity = [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.jwt_authn",
        ];
        let router = "envoy.filters.http.router";
        assert_eq!(names(Filters::PlanLimits)[2..4], envoy::DISCOVERED_FILTERS);
        assert_eq!(names(Filters::None), [identity[0], identity[1], router]);
        assert_eq!(
            names(Filters::LocalRateLimit),
            [
                identity[0],
                identity[1],
                "envoy.filters.http.local_ratelimit",
                router
            ]
        );
        assert_eq!(
            names(Filters::EmptyWasm(2)),
            [
                identity[0],
                identity[1],
                "empty_wasm_1",
                "empty_wasm_2",
                router
            ]
        );
        for filters in [Filters::None, Filters::LocalRateLimit] {
            let path = dir.join("envoy.yaml");
            std::fs::write(&path, envoy_config(&params, filters, empty, None)).unwrap();
            let out = Command::new(envoy::envoy_bin())
                .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn a_timeline_log_is_read_phase_by_phase() {
        let mut config = json!({"static_resources": {"listeners": [{"filter_chains": [{"filters": [{"typed_config": {}}]}]}]}});
        with_timeline_log(&mut config, Path::new("/tmp/t.log"));
        let format = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"];
        assert_eq!(
            format["before_upstream"],
            "%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%"
        );
        // Envoy writes a duration as a number, and "-" when a point was never reached.
        let log = (1..=10)
            .map(|i| {
                format!(
                    r#"{{"before_upstream":{},"upstream":"-","in_envoy":"{}"}}"#,
                    i * 100,
                    i
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let phases = timeline(&log);
        assert_eq!(phases[0], ("before_upstream", 10, 600.0, 900.0));
        assert_eq!(phases[1].1, 0, "no request reached the upstream");
        assert_eq!(phases[4], ("in_envoy", 10, 6.0, 9.0));
    }

    #[test]
    fn a_round_trip_percentile_is_read_from_envoys_stats() {
        let stats = "wasmcustom.call=.=reserve;.;plan_limits_redis_round_trip_us: P0(nan,225) P50(nan,530.5) P90(nan,2817)\n\
                     wasmcustom.call=.=settle;.;plan_limits_redis_round_trip_us: P0(nan,285) P50(3.5,1749.2) P90(nan,4074)";
        assert_eq!(histogram_percentile(stats, "reserve", "P50"), Some(530.5));
        assert_eq!(histogram_percentile(stats, "settle", "P50"), Some(1749.2));
        assert_eq!(histogram_percentile(stats, "settle", "P90"), Some(4074.0));
        assert_eq!(histogram_percentile(stats, "read", "P50"), None);
    }

    #[test]
    fn perf_shares_name_the_jit_code() {
        let report = "    67.25%  envoy            \n    13.33%  [JIT] tid 15744  \n\n";
        assert_eq!(
            parse_perf_shares(report),
            [
                ("envoy".to_string(), 67.25),
                ("wasm (V8 JIT)".to_string(), 13.33)
            ]
        );
    }

    #[test]
    fn the_median_of_an_even_count_is_the_middle_pair_s_mean() {
        assert_eq!(median_and_spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_and_spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn wrk_output_is_read() {
        let out = "  Latency Distribution\n     50%  512.00us\n     75%    1.20ms\n     90%    2.00ms\n     99%    4.50ms\n  1000 requests in 1.00s, 1MB read\n  Non-2xx or 3xx responses: 7\nRequests/sec:  41234.56\n";
        assert_eq!(
            parse_wrk(out),
            Some(WrkFigures {
                rps: 41234.56,
                p50_us: 512.0,
                p99_us: 4500.0,
                requests: 1000,
                non_2xx: 7
            })
        );
        assert_eq!(parse_wrk("nothing"), None);
    }
}
