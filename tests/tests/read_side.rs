//! The read side, on every gateway: the caller's usage this period and its daily history,
//! answered by the filter from Redis for the verified caller only, never forwarded, never
//! counted.

use plan_limits_tests::*;

fn get(gw: &mut dyn Gateway, path: &str, user: Option<&str>) -> Response {
    let request = Request::new("GET", path);
    gw.send(&match user {
        Some(user) => request.user(user, "free"),
        None => request,
    })
}

on_every_gateway!(the_caller_reads_its_usage_and_history_at_the_edge, |gw| {
    for request in [
        upload("uma", "free"),
        upload("uma", "free"),
        analysis("uma", "free"),
    ] {
        assert_eq!(gw.send(&request).status, 200);
    }
    assert!(counts(gw, "uma", "upload", 2) && counts(gw, "uma", "ai_analysis", 1));

    let r = get(gw, "/api/usage", Some("uma"));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(!r.from_upstream());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let usage = r.json();
    assert_eq!(usage["user"], "uma");
    assert_eq!(usage["plan"]["key"], "free");
    assert_eq!(
        usage["actions"]["upload"],
        serde_json::json!({"label": "upload", "unit": "diagrams", "available": true,
            "used": 2, "in_flight": 0, "limit": 5, "granted": 0, "remaining": 3,
            "percentage": 40})
    );
    assert_eq!(usage["actions"]["ai_analysis"]["used"], 1);
    assert_eq!(usage["actions"]["dxf_export"]["available"], false);
    assert_eq!(usage["upgrade"]["plan"], "professional");
    let period = plan_limits_core::period::BillingPeriod::calendar_month(gw.now());
    assert_eq!(usage["period"]["resets_at"], period.resets_at());

    // The last 30 days, today last, with every action.
    let today = gw.now().date_naive().to_string();
    let history = get(gw, "/api/usage/history", Some("uma")).json();
    let days = history["days"].as_array().unwrap();
    assert_eq!(days.len(), 30);
    assert_eq!(days[29]["date"], today);
    assert_eq!(days[29]["counts"]["upload"], 2);
    assert_eq!(days[29]["total"], 3);
    assert_eq!(days[0]["total"], 0);
    assert_eq!(history["totals"]["ai_analysis"], 1);
    // One day, one action.
    let one = get(
        gw,
        &format!("/api/usage/history?from={today}&to={today}&action=upload"),
        Some("uma"),
    )
    .json();
    assert_eq!(
        one["days"],
        serde_json::json!([{"date": today, "counts": {"upload": 2}, "total": 2}])
    );
    // Bad queries name the parameter.
    let r = get(
        gw,
        "/api/usage/history?from=2026-12-01&to=2026-11-01",
        Some("uma"),
    );
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("from")));
    let r = get(gw, "/api/usage/history?to=someday", Some("uma"));
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("to")));

    // Only the caller's own numbers; no token, no numbers; never counted.
    let other = get(gw, "/api/usage", Some("vic")).json();
    assert_eq!(other["actions"]["upload"]["used"], 0);
    assert_eq!(get(gw, "/api/usage", None).status, 401);
    assert_eq!(
        gw.send(&Request::new("POST", "/api/usage").user("uma", "free"))
            .status,
        405
    );
    assert_eq!(counter(gw, "uma", "upload"), 2);
    assert_eq!(gw.metric("reports"), 4);
});
