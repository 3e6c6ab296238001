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

/// Usage metadata, through real Envoy: a usage event records what plans.json lists for its
/// action (from the request, else from the upstream's answer), cut to length, and nothing
/// else; `plan-limits export` prints it; the history groups AI analyses by kind.
#[test]
fn usage_events_record_the_listed_metadata_and_history_groups_analyses_by_kind() {
    let gw = envoy();
    let port = gw.gateway_port;
    let long_name = format!("{}.pdf", "p".repeat(300));
    let uploads = [
        upload("mia", "professional")
            .header(
                "content-disposition",
                "attachment; filename=\"pump room.pdf\"",
            )
            .header("content-type", "application/pdf")
            .header("x-has-diagram", "true"),
        upload("mia", "professional").header("x-file-name", long_name.as_str()),
    ];
    for request in &uploads {
        assert_eq!(request.send(port).status, 200);
    }
    let analyses = [
        ("vision", Some("s-7")),
        ("vision", None),
        ("chat", None),
        ("teleport", None),
    ];
    for (kind, session) in analyses {
        let request = analysis("mia", "professional")
            .header("x-analysis-kind", kind)
            .header("x-has-diagram", "true")
            .header("x-has-image", "false");
        let request = match session {
            Some(id) => request.header("x-session-id", id),
            None => request,
        };
        assert_eq!(request.send(port).status, 200);
    }
    // (Events of different workers come in either order.)
    let events = usage::events_of(&mut gw.redis(), "mia");
    let metadata_of = |action: &str| -> Vec<serde_json::Value> {
        let mut of: Vec<serde_json::Value> = events
            .iter()
            .filter(|e| e["action"] == action)
            .map(|e| serde_json::from_str(&e["metadata"]).unwrap())
            .collect();
        of.sort_by_key(|m| m.to_string());
        of
    };
    let uploaded = metadata_of("upload");
    assert_eq!(
        uploaded[0],
        serde_json::json!({"file_name": "pump room.pdf", "content_type": "application/pdf"}),
        "only what plans.json lists for uploads"
    );
    assert_eq!(
        uploaded[1],
        serde_json::json!({"file_name": long_name[..255]}),
        "cut to max_len"
    );
    let analysed = metadata_of("ai_analysis");
    assert_eq!(analysed.len(), 4);
    assert!(analysed.contains(
        &serde_json::json!({"has_diagram": "true", "has_image": "false", "session": "s-7"})
    ));
    // Without one, the session the AI teammate opened (its answer's header): each its own.
    let mut sessions: Vec<&str> = analysed
        .iter()
        .map(|m| m["session"].as_str().unwrap())
        .collect();
    sessions.dedup();
    assert_eq!(sessions.len(), 4, "{analysed:?}");

    // The operator's export prints it.
    let mut redis = plan_limits_tools::operator::Redis::connect(&gw.redis.url()).unwrap();
    let plans =
        plan_limits_core::plans::Plans::from_json(gw.options.plans_json.as_bytes()).unwrap();
    let today = gw.now().date_naive();
    let mut csv = Vec::new();
    use plan_limits_tools::operator::{export, Format};
    export(&mut redis, &plans, today, today, Format::Csv, &mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",metadata"), "{csv}");
    assert!(csv.contains(r#"""file_name"":""pump room.pdf"""#), "{csv}");

    // The history, AI analyses by kind (an unknown kind is `other`).
    let history = Request::new("GET", "/api/usage/history?action=ai_analysis&by=kind")
        .user("mia", "professional")
        .send(port)
        .json();
    assert_eq!(history["totals"]["ai_analysis"], 4, "{history}");
    let by_kind = &history["totals_by_kind"]["ai_analysis"];
    assert_eq!(
        (&by_kind["vision"], &by_kind["chat"], &by_kind["other"]),
        (&2.into(), &1.into(), &1.into()),
        "{history}"
    );
}
