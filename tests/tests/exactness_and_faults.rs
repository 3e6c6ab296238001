//! Exact under concurrency, safe under faults, through real Envoy and real Redis: a count
//! always equals the successful actions.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use plan_limits_services::envoy::{self, metric_at};
use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_tests::*;

/// Envoy with a 2 s route timeout.
fn gateway() -> EnvoyGateway {
    envoy_with(|_| {})
}

fn free_upload(user: &str) -> Request {
    upload(user, "free")
}

fn assert_exactly_five_counted(gw: &EnvoyGateway, user: &str, statuses: &[u16]) {
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((ok, limited), (5, statuses.len() - 5), "{statuses:?}");
    let mut redis = gw.redis.connection();
    assert!(eventually(|| counter(gw, user, "upload") == 5));
    assert_eq!(pending(gw, user, "upload"), 0);
    assert_eq!(usage::events_of(&mut redis, user).len(), 5);
    assert_eq!(gw.upstream.successes("/api/upload"), 5);
    println!(
        "{user}: {} requests, {ok} 2xx, {limited} 429, counter 5, events 5",
        statuses.len()
    );
}

#[test]
fn two_hundred_concurrent_uploads_through_two_workers_count_exactly_five() {
    let gw = gateway();
    let statuses = concurrent_uploads(&[gw.gateway_port], "ann", "free", 200);
    assert_exactly_five_counted(&gw, "ann", &statuses);
}

#[test]
fn two_hundred_concurrent_uploads_through_two_envoys_count_exactly_five() {
    let gw = gateway();
    let (port, admin) = (free_port(), free_port());
    let _second = gw.spawn_envoy("envoy-2", port, admin, None).unwrap();
    let statuses = concurrent_uploads(&[gw.gateway_port, port], "ben", "free", 200);
    assert_exactly_five_counted(&gw, "ben", &statuses);
    assert!(
        metric_at(admin, "denied") > 0 && gw.metric("denied") > 0,
        "both Envoys refused some"
    );
}

#[test]
fn an_upstream_timeout_after_the_whole_request_went_is_counted_as_of_unknown_outcome() {
    let gw = gateway();
    let r = free_upload("cat")
        .header("x-demo-delay-ms", "3000")
        .send(gw.gateway_port);
    assert_eq!(r.status, 504, "Envoy's route timeout (2s)");
    // The upstream finished the upload after Envoy stopped waiting: it is counted, as of
    // unknown outcome (the default `on_client_abort: commit`).
    assert!(counts(&gw, "cat", "upload", 1));
    assert!(eventually(|| gw
        .upstream
        .ledger()
        .done("cat", "POST /api/upload")
        == 1));
    let events = usage::events_of(&mut gw.redis.connection(), "cat");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["outcome"], "unknown");
    assert_eq!(pending(&gw, "cat", "upload"), 0);
    // An action whose upstream stops work when Envoy gives up says so, and is not counted.
    let gw = envoy_with(|p| p["actions"]["upload"]["on_client_abort"] = "release".into());
    let r = free_upload("cat")
        .header("x-demo-delay-ms", "3000")
        .send(gw.gateway_port);
    assert_eq!(r.status, 504);
    assert!(eventually(|| gw.metric("released") == 1));
    assert_eq!(counter(&gw, "cat", "upload"), 0);
}

#[test]
fn an_upstream_that_cannot_be_reached_is_not_counted() {
    let mut gw = gateway();
    gw.upstream.service.stop();
    let r = free_upload("cy").send(gw.gateway_port);
    assert_eq!(r.status, 503, "connection refused");
    assert!(eventually(|| gw.metric("released") == 1));
    assert_eq!(counter(&gw, "cy", "upload"), 0);
}

#[test]
fn a_client_that_disconnects_mid_request_is_not_counted() {
    let gw = gateway();
    let mut stream = TcpStream::connect(("127.0.0.1", gw.gateway_port)).unwrap();
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-length: 100000\r\n\r\npartial",
        token("dan", "free")
    );
    stream.write_all(head.as_bytes()).unwrap();
    assert!(
        eventually(|| pending(&gw, "dan", "upload") == 1),
        "reserved"
    );
    drop(stream);
    assert!(
        eventually(|| pending(&gw, "dan", "upload") == 0),
        "released"
    );
    assert_eq!(counter(&gw, "dan", "upload"), 0);
    assert_eq!(gw.upstream.successes("/api/upload"), 0);
}

#[test]
fn a_client_that_disconnects_right_after_the_response_is_counted_once() {
    let gw = gateway();
    let mut stream = TcpStream::connect(("127.0.0.1", gw.gateway_port)).unwrap();
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-length: 2\r\n\r\nok",
        token("eve", "free")
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    drop(stream);
    let mut redis = gw.redis.connection();
    assert!(eventually(|| counter(&gw, "eve", "upload") == 1));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&gw, "eve", "upload"), 1);
    assert_eq!(usage::events_of(&mut redis, "eve").len(), 1);
}

#[test]
fn a_reservation_of_a_killed_envoy_expires_and_is_never_counted() {
    let mut gw = envoy_with(|p| p["redis"]["reservation_ttl_ms"] = 4000.into());
    for _ in 0..4 {
        assert_eq!(free_upload("fay").send(gw.gateway_port).status, 200);
    }
    assert!(eventually(|| counter(&gw, "fay", "upload") == 4));
    let port = gw.gateway_port;
    // The fifth upload is in flight (slow upstream) when Envoy dies.
    let stuck = std::thread::spawn(move || {
        free_upload("fay")
            .header("x-demo-delay-ms", "10000")
            .try_send(port)
    });
    assert!(eventually(|| pending(&gw, "fay", "upload") == 1));
    // The reservation was made at most this long ago; it expires 4 s after it was made.
    let reserved_at = Instant::now();
    let pid = gw.envoy().pid();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = stuck.join();
    let (port, admin) = (free_port(), free_port());
    let _replacement = gw.spawn_envoy("envoy-2", port, admin, None).unwrap();
    if reserved_at.elapsed() < Duration::from_millis(3000) {
        assert_eq!(
            free_upload("fay").send(port).status,
            429,
            "the dead request still holds its unit"
        );
    }
    std::thread::sleep(Duration::from_millis(4500).saturating_sub(reserved_at.elapsed()));
    assert_eq!(
        free_upload("fay").send(port).status,
        200,
        "the unit is free after the expiry"
    );
    assert!(eventually(|| counter(&gw, "fay", "upload") == 5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counter(&gw, "fay", "upload"),
        5,
        "the dead request is never counted"
    );
}

#[test]
fn the_default_reservation_expiry_outlives_the_route_timeout() {
    let plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    let ttl_ms = plans["redis"]["reservation_ttl_ms"].as_u64().unwrap();
    let run_timeout = GatewayOptions::default().upstream_timeout;
    // Every route's timeout is the run's (Envoy's config as the repository's envoy.yaml has it).
    let plans_json = plan_limits_services::plans_json();
    let config = envoy::config(&envoy::repository_params(&plans_json)).unwrap();
    let routes = config
        .pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes")
        .and_then(|r| r.as_array())
        .unwrap();
    assert!(!routes.is_empty());
    for route in routes {
        assert_eq!(route["route"]["timeout"], run_timeout.as_str(), "{route}");
    }
    let route_ms = run_timeout.trim_end_matches('s').parse::<u64>().unwrap() * 1000;
    assert!(
        ttl_ms > route_ms,
        "reservation_ttl_ms {ttl_ms} vs route timeout {route_ms} ms"
    );
}

#[test]
fn a_late_redis_reply_never_counts_twice() {
    let gw = gateway();
    // A Redis that has served before (it knows the scripts) ...
    assert_eq!(free_upload("warm").send(gw.gateway_port).status, 200);
    // ... stalls past the filter's 250 ms timeout: the reservation and the settlement answer
    // late, after the filter gave up and let the upload through (fail_open).
    let stall = stall_redis(gw.redis.url(), "0.8");
    assert_eq!(free_upload("gus").send(gw.gateway_port).status, 200);
    stall.join().unwrap();
    // Its settlement batch timed out: it goes again, as it was, until Redis answers (webdis may
    // be ejected for a second or two after the stall), and Redis applies it once, however
    // many of its attempts ran.
    assert!(eventually(|| counter(&gw, "gus", "upload") == 1));
    std::thread::sleep(Duration::from_millis(1500)); // every retry and late reply is in
    assert_eq!(counter(&gw, "gus", "upload"), 1, "counted once");
    assert_eq!(gw.metric("settlements_dropped"), 0);
    assert_eq!(
        counter(&gw, "warm", "upload"),
        1,
        "the commit was resent, once"
    );
    assert_eq!(gw.metric("fail_open"), 1);
}

#[test]
fn a_client_cannot_make_envoy_retry() {
    let gw = gateway();
    let r = free_upload("hal")
        .header("x-envoy-retry-on", "5xx")
        .header("x-envoy-max-retries", "2")
        .header("x-demo-fail-times", "1")
        .send(gw.gateway_port);
    assert_eq!(r.status, 503, "the upstream's own failure, not retried");
    assert_eq!(gw.upstream.attempts(), 1);
    assert!(eventually(|| gw.metric("released") == 1));
    assert_eq!(counter(&gw, "hal", "upload"), 0);
}

/// What each route answers while Redis is unreachable: fail-open routes pass, fail-closed 503.
fn assert_failure_modes(gw: &EnvoyGateway, user: &str) {
    for (method, path) in [
        ("POST", "/api/upload"),
        ("POST", "/api/teammate"),
        ("GET", "/api/procedures/1"),
        ("POST", "/api/export/pdf"),
    ] {
        let r = Request::new(method, path)
            .user(user, "free")
            .body(Body::Bytes(b"x".to_vec()))
            .send(gw.gateway_port);
        assert_eq!(
            r.status,
            200,
            "{method} {path} is fail_open: {}",
            r.body_text()
        );
    }
    let r = Request::new("GET", "/api/v1/x")
        .user(user, "enterprise")
        .send(gw.gateway_port);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "Usage service unavailable");
}

fn assert_no_trap(gw: &mut EnvoyGateway) {
    let log = gw.envoy().log_text();
    for sign in [
        "RuntimeError",
        "panicked",
        "wasm trap",
        "Function: proxy_on",
    ] {
        assert!(!log.contains(sign), "{sign} in the Envoy log:\n{log}");
    }
}

#[test]
fn webdis_down_follows_the_failure_modes() {
    let mut gw = gateway();
    gw.webdis.stop();
    assert_failure_modes(&gw, "ida");
    assert_eq!(
        gw.metric("fail_open"),
        2,
        "limited actions that skipped their check"
    );
    assert_eq!(gw.metric("fail_closed"), 1);
    assert!(gw.envoy().log_text().contains("fail_open"));
    assert_no_trap(&mut gw);
}

#[test]
fn a_slow_redis_follows_the_failure_modes() {
    let mut gw = gateway();
    let stall = stall_redis(gw.redis.url(), "3");
    assert_failure_modes(&gw, "jon");
    stall.join().unwrap();
    assert_no_trap(&mut gw);
}

#[test]
fn redis_error_replies_follow_the_failure_modes() {
    let mut gw = gateway();
    let mut redis = gw.redis.connection();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-fcall")
        .exec(&mut redis)
        .unwrap();
    assert_failure_modes(&gw, "kay");
    assert_no_trap(&mut gw);
}

#[test]
fn enforcement_resumes_within_a_second_of_redis_coming_back() {
    let mut gw = gateway();
    let port = gw.redis.port;
    gw.redis.stop();
    assert_failure_modes(&gw, "lou");
    gw.redis = plan_limits_services::redis_server::RedisServer::start_on(&gw.dir, port);
    let back = Instant::now();
    // The user already used the month's five uploads.
    let mut redis = gw.redis.connection();
    let keys =
        plan_limits_core::UsageKeys::new(&usage::prefix(), "lou", &usage::this_period(), "upload");
    redis::cmd("HSET")
        .arg(&keys.summary)
        .arg("upload")
        .arg(5)
        .exec(&mut redis)
        .unwrap();
    loop {
        let r = free_upload("lou").send(gw.gateway_port);
        if r.status == 429 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(1),
            "still not enforced after {:?}",
            back.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "enforcement resumed {:?} after Redis came back",
        back.elapsed()
    );
    assert_no_trap(&mut gw);
}

fn bad_plans() -> String {
    let mut plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    plans["plans"]["free"]["limits"]["upload"] = (-1).into();
    plans.to_string()
}

#[test]
fn envoy_validate_refuses_a_bad_plans_json() {
    // The very .wasm runs on_configure in `envoy --mode validate` (what `plan-limits reload`
    // does before swapping a config in).
    let dir = scratch_dir("validate");
    let wasm = plan_limits_services::filter_wasm();
    let good = envoy::validate_with_envoy(&plan_limits_services::plans_json(), &wasm, &dir);
    assert_eq!(good, Ok(()));
    let bad = envoy::validate_with_envoy(&bad_plans(), &wasm, &dir).unwrap_err();
    assert!(
        bad.contains("plans.free.limits.upload: invalid value: integer `-1`"),
        "{bad}"
    );
}

#[test]
fn a_running_envoy_given_a_bad_config_keeps_serving_with_the_last_good_one() {
    let mut gw = gateway();
    assert_eq!(free_upload("max").send(gw.gateway_port).status, 200);
    // A broken plans.json written straight into the watched file (no `reload` to check it
    // first): Envoy runs the filter's on_configure, which refuses it ...
    let rejected = "extension_config_discovery.http_filter.plan_limits.config_fail";
    let before = gw.envoy_stat(rejected);
    let ecds = gw.ecds_dir("envoy");
    let (file, text) = envoy::filter_configs(&bad_plans(), &wasm_in(&ecds))
        .unwrap()
        .remove(0);
    std::fs::write(ecds.join("next.json"), text).unwrap();
    std::fs::rename(ecds.join("next.json"), ecds.join(file)).unwrap();
    assert!(eventually(|| gw.envoy_stat(rejected) > before), "refused");
    assert!(
        eventually(|| gw.envoy().log_text().contains("plans.free.limits.upload")),
        "the reason, with the JSON path, is in Envoy's log"
    );
    // ... and it goes on with the last good plans, in the same process.
    for _ in 0..4 {
        assert_eq!(free_upload("max").send(gw.gateway_port).status, 200);
    }
    assert_eq!(free_upload("max").send(gw.gateway_port).status, 429);
    assert_no_trap(&mut gw);
}

/// The .wasm copy the Envoy watching `ecds` was given.
fn wasm_in(ecds: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(ecds)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wasm"))
        .unwrap()
}

#[test]
fn hostile_requests_cannot_crash_skip_metering_or_reach_another_users_counter() {
    let mut gw = gateway();
    let teammate = || Request::new("POST", "/api/teammate");
    let forged = plan_limits_services::jwt::DevKey::load_or_create(&scratch_dir("forged")).token(
        &plan_limits_core::JwtClaims::default(),
        &plan_limits_services::jwt::TokenClaims {
            user: "victim",
            plan: Some("enterprise"),
            org: None,
            anchor_day: None,
            ttl_secs: 60,
        },
    );
    let upload_with_length = |length: &str| {
        Request::new("POST", "/api/upload")
            .user("a", "free")
            .header("content-length", length)
    };
    let cases: Vec<(&str, Request, &[u16])> = vec![
        ("no token", teammate(), &[401]),
        (
            "identity headers without a token",
            teammate().trusted_identity("victim", "enterprise"),
            &[401],
        ),
        ("a forged token", teammate().bearer(&forged), &[401]),
        ("not a token", teammate().bearer("a.b.c"), &[401]),
        (
            "two tokens",
            teammate().user("a", "free").user("b", "enterprise"),
            &[400, 401],
        ),
        ("an empty user", teammate().user("", "free"), &[401]),
        (
            "a 2 KB user id",
            teammate().user(&"a".repeat(2048), "free"),
            &[400],
        ),
        (
            "a 64 KB user id",
            teammate().user(&"a".repeat(64 * 1024), "free"),
            &[400, 431],
        ),
        (
            "a user id with a newline",
            teammate().user("a\nb", "free"),
            &[400],
        ),
        ("length not a number", upload_with_length("abc"), &[400]),
        ("negative length", upload_with_length("-1"), &[400]),
        (
            "length over u64",
            upload_with_length("99999999999999999999999"),
            &[400, 413],
        ),
    ];
    for (what, request, allowed) in cases {
        let status = match request.try_send(gw.gateway_port) {
            Ok(r) => r.status,
            Err(e) => panic!("{what}: no answer: {e}"),
        };
        assert!(
            allowed.contains(&status),
            "{what}: {status}, expected one of {allowed:?}"
        );
    }
    // Ids with key separators and patterns are ordinary ids: metered, each on its own key.
    let odd = [
        "a:b",
        "*",
        "x y",
        "{u}",
        "}:{",
        "plan-limits:{victim}:2026-11",
    ];
    for user in odd {
        assert_eq!(
            teammate().user(user, "free").send(gw.gateway_port).status,
            200,
            "{user:?}"
        );
    }
    assert_eq!(
        teammate()
            .user("victim", "free")
            .send(gw.gateway_port)
            .status,
        200
    );
    // A plan plans.json does not know gets the default plan, on the caller's own key.
    assert_eq!(
        teammate()
            .user("odd-plan", "platinum")
            .send(gw.gateway_port)
            .status,
        200
    );
    let mut redis = gw.redis.connection();
    let all: Vec<&str> = odd.iter().copied().chain(["victim", "odd-plan"]).collect();
    for user in &all {
        assert!(
            eventually(|| counter(&gw, user, "ai_analysis") == 1),
            "{user:?}"
        );
    }
    assert!(gw.metric("unknown_plan") >= 1);
    let period = usage::this_period();
    let mut expected: Vec<String> = all
        .iter()
        .flat_map(|u| {
            let keys =
                plan_limits_core::UsageKeys::new(&usage::prefix(), u, &period, "ai_analysis");
            let today = plan_limits_core::utc_date(chrono::Utc::now());
            [keys.summary, keys.commits, keys.user.day(&today)]
        })
        .collect();
    expected.push(usage::events_stream());
    expected.sort();
    // (Besides each worker's record of the settlement batches Redis applied.)
    let applied = format!("{}:applied:", usage::prefix());
    let keys: Vec<String> = usage::keys(&mut redis)
        .into_iter()
        .filter(|k| !k.starts_with(&applied))
        .collect();
    assert_eq!(keys, expected, "no request reached a key it does not own");
    assert_no_trap(&mut gw);
}
