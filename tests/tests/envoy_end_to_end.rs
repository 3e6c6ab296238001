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
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|_| s.spawn(move || upload("judy", "free").send(port).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((ok, limited), (5, 35), "{statuses:?}");
    assert!(counts(&gw, "judy", "upload", 5));
    assert_eq!(gw.upstream.successes("/api/upload"), 5);
    assert_eq!(usage::events_of(&mut gw.redis(), "judy").len(), 5);
}

#[test]
fn envoy_routes_meter_exactly_what_the_filter_matches() {
    // Envoy skips the filter on routes plans.json does not meter; every spelling of a metered
    // route must still reach it (a request without a user is then 401).
    let gw = envoy();
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
