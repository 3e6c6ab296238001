//! What only real Envoy shows: its route table (rendered from plans.json) sends every
//! spelling of a metered route to the filter and nothing else; concurrent requests through its
//! workers; Redis down. Each test starts its own gateway. (What every gateway does is in
//! `scenarios.rs`, run here too.)

use plan_limits_tests::*;

#[test]
fn redis_down_follows_each_actions_failure_mode() {
    let mut gw = envoy();
    gw.redis.stop();
    // upload is fail_open: the request goes through, and a metric says so.
    let r = gw.send(&upload("ivan", "free"));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(gw.metric("fail_open"), 1);
    // api_call is fail_closed: 503 JSON.
    let r = gw.send(&Request::new("GET", "/api/v1/x").user("ivan", "enterprise"));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "Usage service unavailable");
    assert_eq!(gw.metric("fail_closed"), 1);
    assert!(
        gw.envoy().log_text().contains("fail_open"),
        "a log line says so"
    );
}

#[test]
fn concurrent_uploads_never_pass_the_limit() {
    let gw = envoy();
    let port = gw.gateway_port;
    let statuses = concurrent_uploads(&[port], "judy", "free", 40);
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((ok, limited), (5, 35), "{statuses:?}");
    assert!(counts(&gw, "judy", "upload", 5));
    assert_eq!(gw.upstream.successes("/api/upload"), 5);
    assert_eq!(usage::events_of(&mut gw.redis(), "judy").len(), 5);
}

#[test]
fn unmetered_paths_skip_the_filter_and_guarded_ones_are_refused() {
    // Every spelling of a metered route: trust.rs. Here: what is not metered.
    let gw = envoy();
    for path in ["/", "/health", "/health/live", "/docs/x"] {
        let r = Request::new("GET", path).send(gw.gateway_port);
        assert_eq!(r.status, 200, "GET {path} is not metered");
        assert!(r.from_upstream());
    }
    let r = Request::new("POST", "/api/uploads").send(gw.gateway_port);
    assert_eq!(r.status, 403, "under the guarded /api, no route: refused");
    assert_eq!(r.json()["error"], "Route not allowed");
    assert_eq!(gw.metric("allowed"), 0);
}

/// A plan's grace, through real Envoy: past the limit, the grace's successes are counted,
/// answered with a warning and marked in their events; the 429 comes after them and says the
/// grace is used; the usage endpoint shows it.
#[test]
fn a_plans_grace_is_counted_warned_recorded_and_named_in_the_429_after_it() {
    let gw =
        envoy_with(|v| v["plans"]["free"]["grace"] = serde_json::json!({"upload": {"units": 2}}));
    let port = gw.gateway_port;
    for i in 0..5 {
        let r = upload("gina", "free").send(port);
        assert_eq!(r.status, 200, "upload {i}");
        assert!(!r.header("x-usage-warning").unwrap_or("").contains("grace"));
    }
    for in_grace in 1..=2 {
        let r = upload("gina", "free").send(port);
        assert_eq!(r.status, 200, "in grace {in_grace}");
        assert_eq!(
            r.header("x-usage-warning"),
            Some(
                format!(
                    "\"upload\";grace;used={};limit=5;grace_used={in_grace};grace_units=2",
                    5 + in_grace
                )
                .as_str()
            )
        );
    }
    let r = upload("gina", "free").send(port);
    assert_eq!(r.status, 429);
    let body = r.json();
    assert_eq!(
        (&body["current"], &body["limit"], &body["percentage"]),
        (&7.into(), &5.into(), &100.into()),
        "{body}"
    );
    assert_eq!(body["grace"], serde_json::json!({"units": 2, "used": 2}));
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("and the 2 more your plan allows in grace"),
        "{body}"
    );
    assert_eq!(
        counter(&gw, "gina", "upload"),
        7,
        "the grace's successes count"
    );
    let graced = usage::events_of(&mut gw.redis(), "gina")
        .iter()
        .filter(|e| e.get("grace").map(String::as_str) == Some("1"))
        .count();
    assert_eq!(graced, 2);
    let usage = Request::new("GET", "/api/usage")
        .user("gina", "free")
        .send(port)
        .json();
    assert_eq!(
        usage["actions"]["upload"]["grace"],
        serde_json::json!({"units": 2, "used": 2})
    );
}
