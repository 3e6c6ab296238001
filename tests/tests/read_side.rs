//! The read side, on every gateway: the caller's usage this period and its daily history,
//! answered by the filter from Redis for the verified caller only, never forwarded, never
//! counted.

use chrono::Datelike;
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
    let period = plan_limits_core::BillingPeriod::calendar_month(gw.now());
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
    // (Unlimited: counted from the worker's queue, before the analyses that follow.)
    assert!(counts(&gw, "mia", "upload", 2));
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

    // The usage endpoint lists the period's last uses with their metadata, newest first.
    let usage = Request::new("GET", "/api/usage")
        .user("mia", "professional")
        .send(port)
        .json();
    let recent = usage["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 6, "{usage}");
    assert!(recent[..4].iter().all(|r| r["action"] == "ai_analysis"));
    assert!(recent
        .iter()
        .any(|r| r["metadata"]["file_name"] == "pump room.pdf"));

    // The operator's export prints it.
    let mut redis = plan_limits_tools::operator::Redis::connect(&gw.redis.url()).unwrap();
    let plans = plan_limits_core::Plans::from_json(gw.options.plans_json.as_bytes()).unwrap();
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

/// `n` uploads of `user` counted in period `id` on the free plan, as a gateway settled them
/// then (the library's own settle call, from a worker of its own).
fn counted_in_a_past_period(gw: &EnvoyGateway, user: &str, id: &str, n: usize) {
    use plan_limits_core::functions::{self, EventsTrim, SettleArgs};
    use plan_limits_core::{SettleMode, Settlement};
    let plans = plan_limits_core::Plans::from_json(gw.options.plans_json.as_bytes()).unwrap();
    let free = plans.plan("free").unwrap();
    let count = |i: usize| Settlement {
        mode: SettleMode::Count,
        keys: plan_limits_core::UsageKeys::new(&usage::prefix(), user, id, "upload"),
        reservation_id: format!("then-{i}"),
        action: "upload".into(),
        user: user.into(),
        plan: "free".into(),
        limits_json: free.limits_json.clone(),
        kind: String::new(),
        metadata: String::new(),
        in_grace: false,
        bytes: 10,
        status: 200,
        at: format!("{id}-20T12:00:00.000Z"),
        day: format!("{id}-20"),
        request_id: format!("then-{i}"),
        idempotency_key: String::new(),
        gauge: None,
        adds: None,
        held: None,
        period_id: id.into(),
        keep_for_ms: 400 * 86_400_000,
        made_at_ms: 0,
        certain: true,
        waiter: None,
        fail_open: false,
    };
    let batch: Vec<Settlement> = (0..n).map(count).collect();
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap();
    let command = functions::settle(
        &batch,
        SettleArgs {
            events_stream: &usage::events_stream(),
            events_trim: EventsTrim::KeepAll,
            now_ms,
            ttl_ms: 20_000,
            remember_commits_ms: 86_400_000,
            keep_days_ms: 86_400_000,
            warning_thresholds: &[],
            applied_key: &format!("{}:applied:backfill", usage::prefix()),
            seq: 1,
            applied_memory_ms: 86_400_000,
            queued: 0,
            stopping: false,
        },
    );
    plan_limits_services::redis_exec::run(&mut gw.redis(), &command);
}

/// Past periods, through real Envoy: `/api/usage?period=` answers a period still kept with
/// the plan and limits its summary kept (not today's plan), names a bad or unkept one in a
/// 400; the operator's CLI answers the same; the history names the page before, back through
/// the retention.
#[test]
fn past_periods_answer_with_the_limits_they_were_counted_under_and_history_pages_back() {
    let gw = envoy();
    let port = gw.gateway_port;
    let now = gw.now();
    let last = now.date_naive().with_day(1).unwrap().pred_opt().unwrap();
    let last_month = last.format("%Y-%m").to_string();
    counted_in_a_past_period(&gw, "pia", &last_month, 4);
    // Billing moved her to professional since.
    usage::set_plan(&mut gw.redis(), "pia", "professional");
    assert_eq!(upload("pia", "free").send(port).status, 200);
    // (Unlimited now: counted from the worker's queue, within a flush interval.)
    assert!(counts(&gw, "pia", "upload", 1));

    let past = Request::new("GET", &format!("/api/usage?period={last_month}"))
        .user("pia", "free")
        .send(port);
    assert_eq!(past.status, 200, "{}", past.body_text());
    let past = past.json();
    assert_eq!(past["plan"]["key"], "free", "{past}");
    assert_eq!(past["period"]["id"], last_month.as_str());
    assert_eq!(
        (
            &past["actions"]["upload"]["used"],
            &past["actions"]["upload"]["limit"],
            &past["actions"]["upload"]["percentage"]
        ),
        (&4.into(), &5.into(), &80.into())
    );
    // This period, named or not: today's plan, live.
    let this_month = now.format("%Y-%m").to_string();
    for path in [
        "/api/usage".to_string(),
        format!("/api/usage?period={this_month}"),
    ] {
        let current = Request::new("GET", &path)
            .user("pia", "free")
            .send(port)
            .json();
        assert_eq!(current["plan"]["key"], "professional", "{path}: {current}");
        assert_eq!(current["actions"]["upload"]["used"], 1, "{path}");
    }
    for bad in ["2020-01", "next", "2999-01"] {
        let r = Request::new("GET", &format!("/api/usage?period={bad}"))
            .user("pia", "free")
            .send(port);
        assert_eq!(
            (r.status, r.json()["field"].clone()),
            (400, "period".into()),
            "{bad}"
        );
    }

    // The operator's CLI, the same answer.
    let plans = plan_limits_core::Plans::from_json(gw.options.plans_json.as_bytes()).unwrap();
    let cli = plan_limits_tools::operator::usage(
        &mut gw.redis(),
        &plans,
        "pia",
        Some(&last_month),
        chrono::Utc::now(),
    )
    .unwrap();
    let cli: serde_json::Value = serde_json::from_str(&cli).unwrap();
    assert_eq!(cli["actions"], past["actions"]);

    // The history pages back: each answer names the page before, until the retention ends.
    let mut path = "/api/usage/history?action=upload".to_string();
    let (mut pages, mut counted) = (0, 0);
    loop {
        let page = Request::new("GET", &path)
            .user("pia", "free")
            .send(port)
            .json();
        counted += page["totals"]["upload"].as_u64().unwrap();
        pages += 1;
        let previous = &page["previous"];
        if previous.is_null() {
            break;
        }
        path = format!(
            "/api/usage/history?action=upload&from={}&to={}",
            previous["from"].as_str().unwrap(),
            previous["to"].as_str().unwrap()
        );
    }
    // 400 days kept, 30 on the first page, then as long as each page before.
    assert_eq!(pages, 1 + (400 - 30_usize).div_ceil(30));
    assert_eq!(counted, 5, "last month's day and today's");
}
