//! The whole request path for real: Envoy (2 workers) running the optimized filter `.wasm`,
//! webdis and Redis, and the demo upstream. Each test starts its own gateway.

use plan_limits_services::gateway::{Gateway, GatewayOptions};
use plan_limits_services::http::{Body, Request};
use plan_limits_services::usage::{self, eventually};

const MB: u64 = 1024 * 1024;

fn gateway() -> Gateway {
    Gateway::start(GatewayOptions::default())
}

fn upload(user: &str, plan: &str) -> Request {
    Request::new("POST", "/api/upload")
        .user(user, plan)
        .body(Body::Bytes(b"<diagram/>".to_vec()))
}

#[test]
fn a_free_user_gets_five_uploads_then_429_with_the_upgrade_json() {
    let gw = gateway();
    let mut redis = gw.redis.connection();
    for i in 1..=5 {
        let r = upload("alice", "free").send(gw.gateway_port);
        assert_eq!(r.status, 200, "upload {i}: {}", r.body_text());
        assert_eq!(r.json()["upstream"], "demo");
    }
    let r = upload("alice", "free").send(gw.gateway_port);
    assert_eq!(r.status, 429, "{}", r.body_text());
    let body = r.json();
    assert_eq!(body["error"], "Upload limit reached");
    assert!(body["message"].as_str().unwrap().starts_with(
        "You've reached your upload limit of 5 diagrams this month. Upgrade to Professional"
    ));
    assert_eq!(body["current"], 5);
    assert_eq!(body["limit"], 5);
    assert_eq!(body["percentage"], 100);
    assert_eq!(body["action"], "upload");
    assert_eq!(body["plan"], "free");
    assert_eq!(body["upgrade"]["plan"], "professional");
    assert_eq!(body["upgrade"]["limit"], serde_json::Value::Null);
    let resets_at =
        chrono::DateTime::parse_from_rfc3339(body["resets_at"].as_str().unwrap()).unwrap();
    let retry_after: i64 = r.header("retry-after").unwrap().parse().unwrap();
    let expected = (resets_at.timestamp() - chrono::Utc::now().timestamp()).abs();
    assert!(
        (retry_after - expected).abs() <= 2,
        "Retry-After {retry_after} vs {expected}"
    );
    assert_eq!(resets_at.format("%d %H:%M:%S").to_string(), "01 00:00:00");

    // Commits reach Redis a few milliseconds after the response (batched per worker); until
    // then the reservation holds the unit, which is why the sixth upload was refused.
    assert!(eventually(
        || usage::counter(&mut redis, "alice", "upload") == 5
    ));
    assert_eq!(usage::pending(&mut redis, "alice", "upload"), 0);
    assert_eq!(usage::events_of(&mut redis, "alice").len(), 5);
    assert_eq!(gw.upstream_successes("/api/upload"), 5);
    assert_eq!(gw.metric("denied"), 1);
}

#[test]
fn a_failed_upload_is_not_counted() {
    let gw = gateway();
    let mut redis = gw.redis.connection();
    let r = upload("bob", "free")
        .header("x-demo-status", "500")
        .send(gw.gateway_port);
    assert_eq!(r.status, 500, "the upstream's answer reaches the client");
    assert!(eventually(|| gw.metric("released") == 1));
    assert_eq!(usage::counter(&mut redis, "bob", "upload"), 0);
    assert_eq!(usage::pending(&mut redis, "bob", "upload"), 0);
    assert!(usage::events_of(&mut redis, "bob").is_empty());
    // The failure took nothing from the allowance: five uploads still go through.
    for _ in 0..5 {
        assert_eq!(upload("bob", "free").send(gw.gateway_port).status, 200);
    }
    assert_eq!(upload("bob", "free").send(gw.gateway_port).status, 429);
    assert!(eventually(
        || usage::counter(&mut redis, "bob", "upload") == 5
    ));
}

#[test]
fn three_ai_analyses_then_429_and_the_kind_is_recorded() {
    let gw = gateway();
    let mut redis = gw.redis.connection();
    let kinds = ["vision", "chat", "photo"];
    for kind in kinds {
        let r = Request::new("POST", "/api/teammate")
            .user("carol", "free")
            .header("x-analysis-kind", kind)
            .send(gw.gateway_port);
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    let r = Request::new("POST", "/api/teammate?kind=explain")
        .user("carol", "free")
        .send(gw.gateway_port);
    assert_eq!(r.status, 429);
    let body = r.json();
    assert_eq!(body["error"], "AI analysis limit reached");
    assert_eq!(
        (body["current"].as_u64(), body["limit"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(body["upgrade"]["limit"], 100);
    assert!(eventually(
        || usage::events_of(&mut redis, "carol").len() == 3
    ));
    let mut recorded: Vec<_> = usage::events_of(&mut redis, "carol")
        .iter()
        .map(|e| e["kind"].clone())
        .collect();
    recorded.sort();
    assert_eq!(recorded, ["chat", "photo", "vision"]);
}

#[test]
fn professional_uploads_are_unlimited_and_ai_analyses_stop_at_100() {
    let gw = gateway();
    let mut redis = gw.redis.connection();
    for _ in 0..30 {
        assert_eq!(
            upload("dave", "professional").send(gw.gateway_port).status,
            200
        );
    }
    for i in 1..=100 {
        let r = Request::new("POST", "/api/teammate")
            .user("dave", "professional")
            .send(gw.gateway_port);
        assert_eq!(r.status, 200, "analysis {i}");
    }
    let r = Request::new("POST", "/api/teammate")
        .user("dave", "professional")
        .send(gw.gateway_port);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["upgrade"]["plan"], "enterprise");
    // Unlimited uploads are still counted, for analytics.
    assert!(eventually(
        || usage::counter(&mut redis, "dave", "upload") == 30
    ));
    assert!(eventually(|| usage::counter(
        &mut redis,
        "dave",
        "ai_analysis"
    ) == 100));
}

#[test]
fn features_outside_the_plan_are_403() {
    let gw = gateway();
    let r = Request::new("POST", "/api/export/dxf")
        .user("erin", "free")
        .send(gw.gateway_port);
    assert_eq!(r.status, 403);
    let body = r.json();
    assert_eq!(body["feature"], "dxf_export");
    assert_eq!(body["upgrade"]["plan"], "professional");
    let r = Request::new("GET", "/api/v1/diagrams")
        .user("erin", "professional")
        .send(gw.gateway_port);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["upgrade"]["plan"], "enterprise");
    let r = Request::new("POST", "/api/export/dxf")
        .user("erin", "professional")
        .send(gw.gateway_port);
    assert_eq!(r.status, 200);
    assert_eq!(gw.upstream_successes("/api/v1/diagrams"), 0);
}

#[test]
fn file_size_limits_follow_the_plan() {
    let gw = gateway();
    let mut redis = gw.redis.connection();
    let r = Request::new("POST", "/api/upload")
        .user("frank", "free")
        .body(Body::DeclaredOnly(11 * MB))
        .send(gw.gateway_port);
    assert_eq!(r.status, 413);
    let body = r.json();
    assert_eq!(body["max_bytes"], 10 * MB);
    assert_eq!(body["upgrade"]["plan"], "professional");

    let r = Request::new("POST", "/api/upload")
        .user("grace", "professional")
        .body(Body::Zeros(50 * MB))
        .send(gw.gateway_port);
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(eventually(
        || usage::events_of(&mut redis, "grace").len() == 1
    ));
    let event = &usage::events_of(&mut redis, "grace")[0];
    assert_eq!(event["bytes"], (50 * MB).to_string());
    assert_eq!(event["action"], "upload");
    assert_eq!(event["status"], "200");
    assert_eq!(usage::counter(&mut redis, "frank", "upload"), 0);
}

#[test]
fn unmetered_routes_pass_untouched_and_uncounted() {
    let gw = gateway();
    let mut redis = gw.redis.connection();
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/health"),
        ("GET", "/api/upload"),
        ("POST", "/api/uploads"),
    ] {
        let r = Request::new(method, path).send(gw.gateway_port);
        assert_eq!(r.status, 200, "{method} {path}");
        assert_eq!(r.json()["path"], path);
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(
        gw.metric("allowed") + gw.metric("rejected"),
        0,
        "the filter metered none"
    );
}

#[test]
fn a_metered_route_without_a_user_is_401() {
    let gw = gateway();
    let r = Request::new("POST", "/api/teammate").send(gw.gateway_port);
    assert_eq!(r.status, 401);
    assert!(r.json()["message"].as_str().unwrap().contains("x-user-id"));
    assert_eq!(gw.upstream_successes("/api/teammate"), 0);
}

#[test]
fn usage_events_and_the_monthly_summary_hold_what_happened() {
    let gw = gateway();
    let mut redis = gw.redis.connection();
    upload("heidi", "free").send(gw.gateway_port);
    Request::new("GET", "/api/procedures/7")
        .user("heidi", "free")
        .send(gw.gateway_port);
    Request::new("POST", "/api/export/pdf")
        .user("heidi", "free")
        .header("x-request-id", "req-pdf-1")
        .send(gw.gateway_port);
    Request::new("POST", "/api/export/pdf")
        .user("heidi", "free")
        .header("x-demo-status", "502")
        .send(gw.gateway_port);
    assert!(eventually(
        || usage::events_of(&mut redis, "heidi").len() == 3
    ));
    let summary = usage::summary(&mut redis, "heidi", &usage::this_period());
    assert_eq!(summary["upload"], "1");
    assert_eq!(summary["procedure_view"], "1");
    assert_eq!(summary["pdf_export"], "1");
    assert_eq!(summary["plan"], "free");
    let limits: serde_json::Value = serde_json::from_str(&summary["limits"]).unwrap();
    assert_eq!(limits["upload"], 5);
    assert_eq!(limits["ai_analysis"], 3);
    assert_eq!(limits["pdf_export"], serde_json::Value::Null);
    // Each Envoy worker sends its own batches, so events of different workers may interleave.
    let events = usage::events_of(&mut redis, "heidi");
    let mut actions: Vec<_> = events.iter().map(|e| e["action"].as_str()).collect();
    actions.sort();
    assert_eq!(actions, ["pdf_export", "procedure_view", "upload"]);
    let pdf = events.iter().find(|e| e["action"] == "pdf_export").unwrap();
    assert_eq!(pdf["request_id"], "req-pdf-1");
    assert_eq!(pdf["plan"], "free");
    assert_eq!(pdf["period"], usage::this_period());
    let at = chrono::DateTime::parse_from_rfc3339(&pdf["at"]).unwrap();
    assert!((chrono::Utc::now().timestamp() - at.timestamp()).abs() < 60);
}

#[test]
fn redis_down_follows_each_actions_failure_mode() {
    let mut gw = gateway();
    gw.redis.stop();
    // upload is fail_open: the request goes through, and a metric says so.
    let r = upload("ivan", "free").send(gw.gateway_port);
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(gw.metric("fail_open"), 1);
    // api_call is fail_closed: 503 JSON.
    let r = Request::new("GET", "/api/v1/x")
        .user("ivan", "enterprise")
        .send(gw.gateway_port);
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
    let gw = gateway();
    let mut redis = gw.redis.connection();
    let port = gw.gateway_port;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|_| s.spawn(move || upload("judy", "free").send(port).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((ok, limited), (5, 35), "{statuses:?}");
    assert!(eventually(
        || usage::counter(&mut redis, "judy", "upload") == 5
    ));
    assert_eq!(gw.upstream_successes("/api/upload"), 5);
    assert_eq!(usage::events_of(&mut redis, "judy").len(), 5);
}

#[test]
fn envoy_routes_meter_exactly_what_the_filter_matches() {
    // Envoy skips the filter on routes plans.json does not meter; every spelling of a metered
    // route must still reach it (a request without a user is then 401).
    let gw = gateway();
    let metered = [
        ("POST", "/api/upload"),
        ("POST", "/api/upload/"),
        ("POST", "/api/upload?x=1"),
        ("POST", "/api//upload"),
        ("GET", "/api/procedures"),
        ("GET", "/api/procedures/7/steps"),
        ("GET", "/api/v1"),
        ("DELETE", "/api/v1/diagrams/3"),
        ("POST", "/api/export/pdf"),
    ];
    for (method, path) in metered {
        let r = Request::new(method, path)
            .body(Body::Bytes(b"x".to_vec()))
            .send(gw.gateway_port);
        assert_eq!(r.status, 401, "{method} {path} must be metered");
    }
    // A lower-case method never reaches the upstream (Envoy refuses it).
    let r = Request::new("post", "/api/upload")
        .body(Body::Bytes(b"x".to_vec()))
        .send(gw.gateway_port);
    assert_eq!(r.status, 400);
    let unmetered = [
        ("GET", "/api/upload"),
        ("POST", "/api/uploads"),
        ("GET", "/api/proceduresX"),
        ("GET", "/api/v10"),
        ("GET", "/"),
    ];
    for (method, path) in unmetered {
        let r = Request::new(method, path).send(gw.gateway_port);
        assert_eq!(r.status, 200, "{method} {path} is not metered");
    }
}
