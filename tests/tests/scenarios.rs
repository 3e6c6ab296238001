//! What the gateway does for every request kind, written once and run three times: in our
//! wasmtime host with the webdis build and with the Redis host-call build, and through real
//! Envoy (two workers) with webdis, each against a real Redis.

use plan_limits_tests::*;

on_every_gateway!(five_uploads_then_429_with_the_upgrade_json, |gw| {
    for i in 1..=5 {
        let r = gw.send(&upload("alice", "free"));
        assert_eq!(r.status, 200, "upload {i}: {}", r.body_text());
        assert!(r.from_upstream());
    }
    // (Through Envoy, the last commits reach Redis a few milliseconds after their answers;
    // until then they are in flight, and the 429 says so.)
    assert!(counts(gw, "alice", "upload", 5));
    let r = gw.send(&upload("alice", "free"));
    assert_eq!(r.status, 429, "{}", r.body_text());
    assert!(!r.from_upstream());
    let body = r.json();
    assert_eq!(body["error"], "Upload limit reached");
    assert_eq!(
        body["message"],
        "You've reached your upload limit of 5 diagrams this month. Upgrade to Professional for unlimited diagrams."
    );
    assert_eq!(
        (&body["current"], &body["limit"], &body["percentage"]),
        (&5.into(), &5.into(), &100.into())
    );
    assert_eq!((&body["used"], &body["in_flight"]), (&5.into(), &0.into()));
    assert_eq!(
        (&body["action"], &body["plan"]),
        (&"upload".into(), &"free".into())
    );
    assert_eq!(
        body["upgrade"],
        serde_json::json!({"plan": "professional", "name": "Professional", "limit": null})
    );
    // Retry-After points at the period's end, which `resets_at` names.
    let resets_at =
        chrono::DateTime::parse_from_rfc3339(body["resets_at"].as_str().unwrap()).unwrap();
    assert_eq!(resets_at.format("%d %H:%M:%S").to_string(), "01 00:00:00");
    let retry_after: i64 = r.header("retry-after").unwrap().parse().unwrap();
    let expected = resets_at.timestamp() - gw.now().timestamp();
    assert!(
        (retry_after - expected).abs() <= 2,
        "Retry-After {retry_after} vs {expected}"
    );

    assert!(counts(gw, "alice", "upload", 5));
    assert_eq!(pending(gw, "alice", "upload"), 0);
    assert_eq!(usage::events_of(&mut gw.redis(), "alice").len(), 5);
    assert!(eventually(|| gw.metric("counted") == 5));
    assert_eq!(gw.metric("denied"), 1);
});

on_every_gateway!(limited_answers_carry_the_ietf_ratelimit_fields, |gw| {
    // RateLimit: "upload";r=<left>;t=<seconds to the reset>
    let fields = |r: &Response| -> (String, u64, u64) {
        let value = r
            .header("ratelimit")
            .unwrap_or_else(|| panic!("{:?}", r.headers));
        let mut parts = value.split(';');
        let name = parts.next().unwrap().to_string();
        let param = |key: &str, parts: &mut std::str::Split<'_, char>| -> u64 {
            let p = parts.next().unwrap();
            p.strip_prefix(key).unwrap().parse().unwrap()
        };
        let r_ = param("r=", &mut parts);
        let t = param("t=", &mut parts);
        (name, r_, t)
    };
    for left in (0..5).rev() {
        let r = gw.send(&upload("rita", "free"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit-policy"), Some("\"upload\";q=5"));
        let (name, remaining, t) = fields(&r);
        assert_eq!((name.as_str(), remaining), ("\"upload\"", left));
        let end = plan_limits_core::BillingPeriod::calendar_month(gw.now()).end;
        let expected = end.timestamp() - gw.now().timestamp();
        assert!((t as i64 - expected).abs() <= 2, "t={t} vs {expected}");
    }
    // The 429: nothing left, and Retry-After no earlier than t.
    let r = gw.send(&upload("rita", "free"));
    assert_eq!(r.status, 429);
    let (_, remaining, t) = fields(&r);
    assert_eq!(remaining, 0);
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= t, "Retry-After {retry_after} < t {t}");
    // Unlimited actions carry none.
    let r = gw.send(&Request::new("GET", "/api/procedures/7").user("rita", "free"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit"), None);
});

on_every_gateway!(a_failed_upload_is_not_counted, |gw| {
    let r = gw.send(&upload("bob", "free").upstream_status(500));
    assert_eq!(r.status, 500, "the upstream's answer reaches the client");
    assert!(eventually(|| gw.metric("released") == 1));
    assert_eq!(counter(gw, "bob", "upload"), 0);
    assert_eq!(pending(gw, "bob", "upload"), 0);
    assert!(usage::events_of(&mut gw.redis(), "bob").is_empty());
    // The failure took nothing from the allowance: five uploads still go through.
    for _ in 0..5 {
        assert_eq!(gw.send(&upload("bob", "free")).status, 200);
    }
    assert_eq!(gw.send(&upload("bob", "free")).status, 429);
    assert!(counts(gw, "bob", "upload", 5));
});

on_every_gateway!(three_ai_analyses_then_429_and_the_kind_is_recorded, |gw| {
    for kind in ["vision", "chat"] {
        let r = gw.send(&analysis("carol", "free").header("x-analysis-kind", kind));
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    let r = gw.send(&Request::new("POST", "/api/teammate?kind=photo").user("carol", "free"));
    assert_eq!(r.status, 200);
    let r = gw.send(&Request::new("POST", "/api/teammate?kind=explain").user("carol", "free"));
    assert_eq!(r.status, 429);
    let body = r.json();
    assert_eq!(body["error"], "AI analysis limit reached");
    assert_eq!((&body["current"], &body["limit"]), (&3.into(), &3.into()));
    assert_eq!(body["upgrade"]["limit"], 100);
    assert!(eventually(|| usage::events_of(&mut gw.redis(), "carol")
        .len()
        == 3));
    let mut kinds: Vec<_> = usage::events_of(&mut gw.redis(), "carol")
        .into_iter()
        .map(|e| e["kind"].clone())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["chat", "photo", "vision"]);
});

on_every_gateway!(
    professional_uploads_are_unlimited_and_ai_analyses_stop_at_100,
    |gw| {
        for _ in 0..30 {
            assert_eq!(gw.send(&upload("dave", "professional")).status, 200);
        }
        for i in 1..=100 {
            let r = gw.send(&analysis("dave", "professional"));
            assert_eq!(r.status, 200, "analysis {i}");
        }
        let r = gw.send(&analysis("dave", "professional"));
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["upgrade"]["plan"], "enterprise");
        // Unlimited uploads are still counted, for analytics.
        assert!(counts(gw, "dave", "upload", 30));
        assert!(counts(gw, "dave", "ai_analysis", 100));
    }
);

on_every_gateway!(features_outside_the_plan_are_403, |gw| {
    let r = gw.send(&Request::new("POST", "/api/export/dxf").user("erin", "free"));
    assert_eq!(r.status, 403);
    let body = r.json();
    assert_eq!(body["feature"], "dxf_export");
    assert_eq!(body["upgrade"]["plan"], "professional");
    let r = gw.send(&Request::new("GET", "/api/v1/diagrams").user("erin", "professional"));
    assert_eq!(r.status, 403);
    assert!(!r.from_upstream());
    assert_eq!(r.json()["upgrade"]["plan"], "enterprise");
    let r = gw.send(&Request::new("POST", "/api/export/dxf").user("erin", "professional"));
    assert_eq!(r.status, 200);
    assert_eq!(gw.metric("rejected"), 2);
});

on_every_gateway!(file_size_limits_follow_the_plan, |gw| {
    let r = gw.send(
        &Request::new("POST", "/api/upload")
            .user("frank", "free")
            .body(Body::ExpectContinue(11 * MB)),
    );
    assert_eq!(r.status, 413);
    let body = r.json();
    assert_eq!(body["max_bytes"], 10 * MB);
    assert_eq!(body["upgrade"]["plan"], "professional");
    let r = gw.send(
        &Request::new("POST", "/api/upload")
            .user("grace", "professional")
            .body(Body::Zeros(50 * MB)),
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(eventually(|| usage::events_of(&mut gw.redis(), "grace")
        .len()
        == 1));
    let event = &usage::events_of(&mut gw.redis(), "grace")[0];
    assert_eq!(event["bytes"], (50 * MB).to_string());
    assert_eq!(
        (event["action"].as_str(), event["status"].as_str()),
        ("upload", "200")
    );
    assert_eq!(counter(gw, "frank", "upload"), 0);
});

on_every_gateway!(
    unmetered_routes_pass_untouched_and_a_request_without_a_token_is_401,
    |gw| {
        for (method, path) in [("GET", "/"), ("GET", "/health"), ("GET", "/api/upload")] {
            let r = gw.send(&Request::new(method, path));
            assert_eq!(r.status, 200, "{method} {path}");
            assert!(r.from_upstream());
        }
        assert_eq!(
            gw.metric("allowed") + gw.metric("rejected"),
            0,
            "the filter metered none"
        );
        let r = gw
            .send(&Request::new("POST", "/api/teammate").trusted_identity("victim", "enterprise"));
        assert_eq!(
            r.status, 401,
            "identity headers a client sends choose nothing"
        );
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .contains("bearer token"));
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert!(!r.from_upstream());
        assert!(
            usage::keys(&mut gw.redis()).is_empty(),
            "nothing was written"
        );
    }
);

on_every_gateway!(
    usage_events_and_the_monthly_summary_hold_what_happened,
    |gw| {
        gw.send(&upload("heidi", "free"));
        gw.send(&Request::new("GET", "/api/procedures/7").user("heidi", "free"));
        gw.send(
            &Request::new("POST", "/api/export/pdf")
                .user("heidi", "free")
                .header("x-request-id", "req-pdf-1"),
        );
        gw.send(
            &Request::new("POST", "/api/export/pdf")
                .user("heidi", "free")
                .upstream_status(502),
        );
        assert!(eventually(|| usage::events_of(&mut gw.redis(), "heidi")
            .len()
            == 3));
        let summary = usage::summary(&mut gw.redis(), "heidi", &gw.period());
        assert_eq!(summary["upload"], "1");
        assert_eq!(summary["procedure_view"], "1");
        assert_eq!(summary["pdf_export"], "1");
        assert_eq!(summary["plan"], "free");
        let limits: serde_json::Value = serde_json::from_str(&summary["limits"]).unwrap();
        assert_eq!(
            (&limits["upload"], &limits["ai_analysis"]),
            (&5.into(), &3.into())
        );
        assert_eq!(limits["pdf_export"], serde_json::Value::Null);
        // Each Envoy worker sends its own batches, so events of different workers may interleave.
        let events = usage::events_of(&mut gw.redis(), "heidi");
        let mut actions: Vec<_> = events.iter().map(|e| e["action"].as_str()).collect();
        actions.sort();
        assert_eq!(actions, ["pdf_export", "procedure_view", "upload"]);
        let pdf = events.iter().find(|e| e["action"] == "pdf_export").unwrap();
        // (The client's own id in our host; Envoy names every request itself.)
        assert!(
            pdf["request_id"] == "req-pdf-1" || pdf["request_id"].len() == 36,
            "{pdf:?}"
        );
        assert_eq!(
            (pdf["plan"].as_str(), pdf["status"].as_str()),
            ("free", "200")
        );
        assert_eq!(pdf["period"], gw.period());
        let at = chrono::DateTime::parse_from_rfc3339(&pdf["at"]).unwrap();
        assert!((gw.now().timestamp() - at.timestamp()).abs() < 60, "{at}");
    }
);

on_every_gateway!(
    claims_are_read_in_one_call_unless_envoy_cannot_encode_the_payload,
    |gw| {
        // Envoy hands the filter the whole payload in one host call; a null claim anywhere in
        // it fails that call, and the filter reads the claims it needs one by one instead.
        let token = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "nell", "plan": "professional",
                "org": "nell-org", "roles": ["admin", 2], "profile": {"theme": "dark"}});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            token_with(claims)
        };
        let identity = |r: &Response| r.json()["identity"].clone();
        let expected = serde_json::json!({"x-user-id": "nell",
            "x-user-plan": "professional", "x-org-id": "nell-org",
            "x-user-features": "team_collaboration,priority_support,dxf_export"});
        let r =
            gw.send(&Request::new("POST", "/api/teammate").bearer(&token(serde_json::json!({}))));
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert_eq!(identity(&r), expected);
        assert_eq!(gw.metric("claims_one_by_one"), 0);
        let null = token(serde_json::json!({"nickname": null}));
        let r = gw.send(&Request::new("POST", "/api/teammate").bearer(&null));
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert_eq!(identity(&r), expected);
        assert_eq!(gw.metric("claims_one_by_one"), 1);
        assert!(counts(gw, "nell", "ai_analysis", 2));
    }
);

on_every_gateway!(
    the_upstream_gets_the_verified_caller_not_what_the_client_claims,
    |gw| {
        let r = gw.send(
            &analysis("alice", "professional")
                .header("x-user-id", "victim")
                .header("x-user-plan", "enterprise")
                .header("X-Org-Id", "victim-org")
                .header("x-user-features", "white_labeling,custom_ai_training"),
        );
        assert_eq!(r.status, 200, "{}", r.body_text());
        // The plan in force's features, for a service to gate any of them without a lookup.
        assert_eq!(
            r.json()["identity"],
            serde_json::json!({"x-user-id": "alice", "x-user-plan": "professional",
                "x-org-id": null,
                "x-user-features": "team_collaboration,priority_support,dxf_export"})
        );
        assert!(counts(gw, "alice", "ai_analysis", 1));
        assert_eq!(counter(gw, "victim", "ai_analysis"), 0);
        // A token signed by another key, or no token at all but garbage, is no token.
        let other = plan_limits_services::jwt::DevKey::load_or_create(
            &plan_limits_services::process::scratch_dir("other-key"),
        );
        let forged = other.token(
            &plan_limits_core::JwtClaims::default(),
            &plan_limits_services::jwt::TokenClaims {
                user: "alice",
                plan: Some("enterprise"),
                org: None,
                anchor_day: None,
                ttl_secs: 60,
            },
        );
        let r = gw.send(&Request::new("POST", "/api/teammate").bearer(&forged));
        assert_eq!(r.status, 401);
        let r = gw.send(&Request::new("POST", "/api/teammate").bearer("not.a.token"));
        assert_eq!(r.status, 401);
    }
);

on_every_gateway!(billings_plan_wins_over_the_tokens_claim, |gw| {
    // Upgraded by billing after the token was minted: professional's unlimited uploads.
    usage::set_plan(&mut gw.redis(), "gina", "professional");
    for i in 1..=7 {
        let r = gw.send(&upload("gina", "free"));
        assert_eq!(r.status, 200, "upload {i}");
        assert_eq!(r.json()["identity"]["x-user-plan"], "professional");
    }
    // Downgraded by billing: free's 3 analyses, whatever the token says.
    usage::set_plan(&mut gw.redis(), "hugo", "free");
    let statuses: Vec<u16> = (0..5)
        .map(|_| gw.send(&analysis("hugo", "professional")).status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // ... and for an action the token's plan leaves unlimited, once Redis has told the
    // worker (the first requests may pass on the token's plan; they are counted).
    let mut passed = 0;
    for _ in 0..10 {
        if gw.send(&upload("hugo", "professional")).status == 200 {
            passed += 1;
        }
    }
    assert!(
        (5..=7).contains(&passed),
        "{passed} uploads passed under free's 5"
    );
    assert!(counts(gw, "hugo", "upload", passed));
});

on_every_gateway!(
    an_unknown_plan_gets_the_default_plans_terms_and_is_counted,
    |gw| {
        for _ in 0..5 {
            assert_eq!(gw.send(&upload("ivan", "platinum")).status, 200);
        }
        let r = gw.send(&upload("ivan", "platinum"));
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["plan"], "free");
        assert!(gw.metric("unknown_plan") >= 5);
    }
);

on_every_gateway!(crossing_a_warning_threshold_is_said_once, |gw| {
    let warning = |r: &Response| r.header("x-usage-warning").map(String::from);
    let mut warnings = Vec::new();
    for _ in 0..5 {
        let r = gw.send(&upload("wes", "free"));
        assert_eq!(r.status, 200);
        warnings.push(warning(&r));
        // (Through Envoy, the counts reach Redis a few milliseconds after each answer.)
        assert!(counts(gw, "wes", "upload", warnings.len() as u64));
    }
    assert_eq!(
        warnings,
        [
            None,
            None,
            None,
            Some("\"upload\";threshold=80;used=4;limit=5".into()),
            Some("\"upload\";threshold=90;used=5;limit=5".into()),
        ]
    );
    let crossed: Vec<String> = usage::events(&mut gw.redis())
        .into_iter()
        .filter(|e| e["event"] == "threshold_crossed" && e["user"] == "wes")
        .map(|e| format!("{}@{}", e["threshold"], e["used"]))
        .collect();
    assert_eq!(crossed, ["80@4", "90@5"]);
});

on_every_gateway!(
    a_request_sent_again_with_its_idempotency_key_is_counted_once,
    |gw| {
        let keyed = |key: &str| upload("ida", "free").header("idempotency-key", key);
        assert_eq!(gw.send(&keyed("up-1")).status, 200);
        assert!(counts(gw, "ida", "upload", 1));
        // Its repeat: 409, not forwarded, not counted.
        let r = gw.send(&keyed("up-1"));
        assert_eq!(r.status, 409, "{}", r.body_text());
        assert!(!r.from_upstream());
        let body = r.json();
        assert_eq!(
            (&body["state"], &body["idempotency_key"]),
            (&"completed".into(), &"up-1".into())
        );
        // A failed one is not counted, so its retry is a new request.
        assert_eq!(gw.send(&keyed("up-2").upstream_status(500)).status, 500);
        assert!(eventually(|| pending(gw, "ida", "upload") == 0));
        assert_eq!(gw.send(&keyed("up-2")).status, 200);
        assert!(counts(gw, "ida", "upload", 2));
        // Unlimited actions too, when the client sends a key.
        let view = || {
            Request::new("GET", "/api/procedures/3")
                .user("ida", "free")
                .header("idempotency-key", "pv-1")
        };
        assert_eq!(gw.send(&view()).status, 200);
        assert!(counts(gw, "ida", "procedure_view", 1));
        assert_eq!(gw.send(&view()).status, 409);
        assert_eq!(counter(gw, "ida", "procedure_view"), 1);
        let keys: Vec<String> = usage::events_of(&mut gw.redis(), "ida")
            .into_iter()
            .map(|e| e["idempotency_key"].clone())
            .collect();
        assert_eq!(keys, ["up-1", "up-2", "pv-1"]);
        assert_eq!(gw.metric("duplicates"), 2);
    }
);

on_every_gateway!(billings_anchor_day_moves_counts_to_its_period, |gw| {
    use plan_limits_core::BillingPeriod;
    for _ in 0..2 {
        assert_eq!(gw.send(&upload("ana", "free")).status, 200);
    }
    assert!(counts(gw, "ana", "upload", 2));
    // Billing records that ana's periods start on the 15th: the gateway learns it from the
    // next reservation's answer, gives back the unit it took in the calendar month and counts
    // the upload in the period from the 15th.
    usage::set_anchor(&mut gw.redis(), "ana", 15);
    let anchored = BillingPeriod::anchored(gw.now(), 15);
    assert_eq!(gw.send(&upload("ana", "free")).status, 200);
    let in_anchored =
        |gw: &dyn Gateway| usage::counter(&mut gw.redis(), "ana", "upload", &anchored.id);
    assert!(eventually(|| in_anchored(gw) == 1));
    assert_eq!(
        counter(gw, "ana", "upload"),
        2,
        "the calendar month's count is left"
    );
    assert!(
        eventually(|| pending(gw, "ana", "upload") == 0),
        "its unit given back"
    );
    // The read side and the 429 follow it.
    let usage = gw
        .send(&Request::new("GET", "/api/usage").user("ana", "free"))
        .json();
    assert_eq!(usage["period"]["id"], anchored.id);
    assert_eq!(usage["actions"]["upload"]["used"], 1);
    for _ in 0..4 {
        assert_eq!(gw.send(&upload("ana", "free")).status, 200);
    }
    assert!(eventually(|| in_anchored(gw) == 5));
    let r = gw.send(&upload("ana", "free"));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["resets_at"], anchored.resets_at());
});
