//! Operating the gateway: plans.json swapped into a running Envoy (Extension Config
//! Discovery from a watched file) under load, with no failed request, no count lost or
//! doubled, the same process; a config the filter refuses leaves the last good one serving
//! (`exactness_and_faults::a_running_envoy_given_a_bad_config_*`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use plan_limits_services::envoy;
use plan_limits_tests::*;

/// The repository's plans, settling only every `flush_ms` (so that the old configuration
/// still holds queued settlements when it is replaced), with free uploads limited to `uploads`.
fn plans(uploads: u64, flush_ms: u64) -> String {
    plans_with(|p| {
        p["plans"]["free"]["limits"]["upload"] = uploads.into();
        p["redis"]["flush_interval_ms"] = flush_ms.into();
        // (Each client sends as fast as it can: no spike arrest in the way.)
        p["plans"]["free"]["request_rate"] = serde_json::Value::Null;
    })
}

#[test]
fn a_new_plans_json_takes_effect_under_load_without_a_failed_request_or_a_lost_count() {
    let mut gw = EnvoyGateway::start(GatewayOptions {
        plans_json: plans(5, 500),
        ..GatewayOptions::default()
    });
    let port = gw.gateway_port;
    let pid = gw.envoy().pid();
    let view = |user: &str| Request::new("GET", "/api/procedures/1").user(user, "free");

    // Four clients view procedures (unlimited, each counted) while the plans change.
    let running = AtomicBool::new(true);
    let statuses: Vec<Vec<u16>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|i| {
                let (running, user) = (&running, format!("viewer-{i}"));
                s.spawn(move || {
                    let mut seen = Vec::new();
                    while running.load(Ordering::Relaxed) {
                        seen.push(view(&user).try_send(port).map_or(0, |r| r.status));
                    }
                    seen
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        gw.reload("envoy", &plans(3, 500)).unwrap();
        // The new configuration answers: a new free user gets 3 uploads, not 5.
        assert!(eventually(|| {
            let user = format!("probe-{}", rand_suffix());
            (0..4)
                .map(|_| upload(&user, "free").send(port).status)
                .collect::<Vec<_>>()
                == [200, 200, 200, 429]
        }));
        std::thread::sleep(Duration::from_millis(700));
        running.store(false, Ordering::Relaxed);
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });

    let all: Vec<u16> = statuses.concat();
    assert!(all.len() > 100, "load ran: {} requests", all.len());
    assert!(all.iter().all(|&s| s == 200), "every request answered 200");
    assert_eq!(gw.envoy().pid(), pid, "the same Envoy process");
    // Every view counted once, those settled by the old configuration too.
    for (i, seen) in statuses.iter().enumerate() {
        let user = format!("viewer-{i}");
        let n = seen.len() as u64;
        assert!(counts(&gw, &user, "procedure_view", n), "{user}: {n}");
    }
    assert_eq!(
        gw.upstream.successes("/api/procedures/1"),
        all.len() as u64,
        "what the upstream did is what was counted"
    );
    let swaps = "extension_config_discovery.http_filter.plan_limits.config_reload";
    assert!(gw.envoy_stat(swaps) >= 2, "loaded at start, then swapped");
}

#[test]
fn a_new_wasm_is_loaded_without_a_restart_under_its_own_name() {
    let mut gw = envoy();
    let pid = gw.envoy().pid();
    assert_eq!(gw.send(&upload("wes", "free")).status, 200);
    // Another module (here the same bytes, one custom section longer: a new hash).
    let mut code = std::fs::read(plan_limits_services::filter_wasm()).unwrap();
    code.extend_from_slice(&[0, 7, 5, b'b', b'u', b'i', b'l', b'd', 0]);
    let next = gw.dir.join("next.wasm");
    std::fs::write(&next, &code).unwrap();
    let ecds = gw.ecds_dir("envoy");
    let before: Vec<_> = std::fs::read_dir(&ecds).unwrap().collect();
    envoy::write_filter_configs(&ecds, &gw.options.plans_json, &next).unwrap();
    let after: Vec<_> = std::fs::read_dir(&ecds).unwrap().collect();
    assert_eq!(after.len(), before.len() + 1, "a copy named by its hash");
    let swaps = "extension_config_discovery.http_filter.plan_limits.config_reload";
    assert!(eventually(|| gw.envoy_stat(swaps) >= 2));
    // The new VM counts where the old one did.
    for _ in 0..4 {
        assert_eq!(gw.send(&upload("wes", "free")).status, 200);
    }
    assert_eq!(gw.send(&upload("wes", "free")).status, 429);
    assert_eq!(gw.envoy().pid(), pid);
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Every `name{labels} value` sample of a Prometheus text exposition.
fn samples(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value.parse().ok()?))
        })
        .collect()
}

fn value_of(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[test]
fn prometheus_sees_the_filters_counters_with_action_plan_and_outcome_labels() {
    let gw = envoy();
    let port = gw.gateway_port;
    for _ in 0..6 {
        upload("pam", "free").send(port);
    }
    Request::new("GET", "/api/procedures/1")
        .user("pam", "professional")
        .send(port);
    Request::new("POST", "/api/upload").send(port); // no token: 401
    let scrape = || plan_limits_services::http::get(gw.admin_port, "/stats/prometheus").body_text();
    // (Each worker adds its counters at its tick: the last request's, the 401, and the
    // successes counted once Redis answered, show within a few.)
    let rejected = |text: &str| {
        value_of(
            text,
            "plan_limits_requests",
            &[
                ("action", "none"),
                ("plan", "none"),
                ("outcome", "rejected"),
            ],
        )
    };
    assert!(eventually(|| {
        let text = scrape();
        rejected(&text) == 1.0
            && value_of(
                &text,
                "plan_limits_successes_counted",
                &[("action", "upload"), ("plan", "free")],
            ) == 5.0
    }));
    std::thread::sleep(Duration::from_millis(50));
    let text = scrape();
    let requests = |action, plan, outcome| {
        value_of(
            &text,
            "plan_limits_requests",
            &[("action", action), ("plan", plan), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("upload", "free", "allowed"), 5.0);
    assert_eq!(requests("upload", "free", "denied"), 1.0);
    assert_eq!(requests("procedure_view", "professional", "allowed"), 1.0);
    assert_eq!(requests("none", "none", "rejected"), 1.0);
    assert_eq!(
        value_of(&text, "plan_limits_denied", &[]),
        1.0,
        "unlabeled too"
    );
    // Each reservation's round trip observed (the 6th upload was refused by Redis too).
    // (Envoy merges histograms at its stats flush, every 5 s.)
    let reserves = |text: &str| {
        value_of(
            text,
            "plan_limits_redis_round_trip_us_count",
            &[("call", "reserve")],
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while reserves(&scrape()) < 6.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = scrape();
    assert_eq!(reserves(&text), 6.0, "{text}");
    let slowest = [("call", "reserve"), ("le", "+Inf")];
    assert_eq!(
        value_of(&text, "plan_limits_redis_round_trip_us_bucket", &slowest),
        6.0
    );
    assert!(eventually(|| value_of(
        &scrape(),
        "plan_limits_settlements_queued",
        &[]
    ) == 0.0));
    // Never a user; one type per name (Prometheus refuses a name typed twice).
    assert!(!text.contains("pam"), "no user in any label or name");
    let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let distinct: std::collections::BTreeSet<&str> =
        types.iter().filter_map(|l| l.split(' ').nth(2)).collect();
    assert_eq!(types.len(), distinct.len(), "a metric name typed twice");

    // What the alerts and the dashboard in deploy/ query exists.
    let names: std::collections::BTreeSet<String> =
        samples(&text).into_iter().map(|(n, _, _)| n).collect();
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/plan-limits.json",
    ] {
        let queries =
            std::fs::read_to_string(plan_limits_services::repo_root().join(file)).unwrap();
        let used: std::collections::BTreeSet<&str> = queries
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("plan_limits_"))
            .collect();
        assert!(!used.is_empty());
        for name in used {
            assert!(
                names.contains(name),
                "{file} queries {name}, which Envoy does not expose"
            );
        }
    }
}

#[test]
fn redis_has_a_memory_bound_and_what_the_memory_alert_queries_exists() {
    let gw = envoy();
    let max: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query(&mut gw.redis.connection())
        .unwrap();
    assert_eq!(max[1], (512u64 << 20).to_string());
    let policy: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut gw.redis.connection())
        .unwrap();
    assert_eq!(policy[1], "noeviction", "never evict a count");
    // Debian's redis_exporter, logged in as the admin, as deploy/prometheus/scrape.yml has it.
    let port = plan_limits_services::process::free_port();
    let mut exporter = std::process::Command::new("prometheus-redis-exporter");
    exporter.args([
        "--redis.addr",
        &gw.redis.url(),
        "--web.listen-address",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut exporter = plan_limits_services::process::Service::spawn(
        "redis exporter",
        exporter,
        &gw.dir.join("redis-exporter.log"),
    );
    exporter.wait_for_port(port, Duration::from_secs(10));
    let text = plan_limits_services::http::get(port, "/metrics").body_text();
    let names: std::collections::BTreeSet<String> =
        samples(&text).into_iter().map(|(n, _, _)| n).collect();
    let alerts = std::fs::read_to_string(
        plan_limits_services::repo_root().join("deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let used: std::collections::BTreeSet<&str> = alerts
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("redis_"))
        .collect();
    assert!(used.contains("redis_memory_max_bytes"), "{used:?}");
    for name in used {
        assert!(
            names.contains(name),
            "the alerts query {name}: not exported"
        );
    }
    assert_eq!(
        value_of(&text, "redis_memory_max_bytes", &[]),
        (512u64 << 20) as f64
    );
    assert!(value_of(&text, "redis_memory_used_bytes", &[]) > 0.0);
}

#[test]
fn the_alert_rules_and_the_scrape_config_pass_promtool() {
    let root = plan_limits_services::repo_root();
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["check", "config", "deploy/prometheus/scrape.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&root)
            .output()
            .expect("promtool (Debian's prometheus; make deps-test installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
