//! Every behaviour of the end-to-end suite, in our wasmtime host, for both filter builds
//! (webdis and Redis host calls) against a real Redis; plus what only a controllable host can
//! show: month rollover, two VMs racing, Redis errors and a call that never answers.

use plan_limits_wasm_host::harness::{Build, Call, Harness};
use plan_limits_wasm_host::{Flow, HostError, Plugin, Upstreams};
use plan_limits_services::usage;

const MB: u64 = 1024 * 1024;

/// Runs a scenario once per build, as two tests.
macro_rules! scenario {
    ($name:ident, |$build:ident| $body:block) => {
        mod $name {
            use super::*;
            fn run($build: Build) $body
            #[test]
            fn webdis() {
                run(Build::Webdis)
            }
            #[test]
            fn redis_hostcalls() {
                run(Build::RedisHostCalls)
            }
        }
    };
}

fn harness(build: Build) -> Harness {
    let h = Harness::start(build, &plan_limits_services::plans_json(), 2);
    h.set_time("2026-11-27T12:00:00Z");
    h
}

fn upload(user: &str, plan: &str) -> Call {
    Call::new("POST", "/api/upload").user(user, plan).length(10)
}

fn counter(h: &Harness, user: &str, period: &str, action: &str) -> u64 {
    usage::summary(&mut h.connection(), user, period)
        .get(action)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

scenario!(five_uploads_then_429, |build| {
    let mut h = harness(build);
    for i in 0..5 {
        let out = h.send(i % 2, &upload("alice", "free")).unwrap();
        assert_eq!(out.status, 200, "upload {i}");
        assert!(out.reached_upstream);
    }
    let out = h.send(0, &upload("alice", "free")).unwrap();
    assert_eq!(out.status, 429);
    let reply = out.reply.unwrap();
    assert_eq!(reply.header("retry-after").as_deref(), Some("302400"));
    let body = reply.json();
    assert_eq!(body["error"], "Upload limit reached");
    assert_eq!(
        body["message"],
        "You've reached your upload limit of 5 diagrams this month. Upgrade to Professional for unlimited diagrams."
    );
    assert_eq!(
        (
            body["current"].as_u64(),
            body["limit"].as_u64(),
            body["percentage"].as_u64()
        ),
        (Some(5), Some(5), Some(100))
    );
    assert_eq!(body["resets_at"], "2026-12-01T00:00:00Z");
    assert_eq!(body["upgrade"]["plan"], "professional");
    assert_eq!(counter(&h, "alice", "2026-11", "upload"), 5);
    assert_eq!(h.plugin.metric("plan_limits.denied"), 1);
    assert_eq!(h.plugin.metric("plan_limits.counted"), 5);
});

scenario!(a_failed_upload_is_not_counted, |build| {
    let mut h = harness(build);
    let out = h.send(0, &upload("bob", "free").upstream(500)).unwrap();
    assert_eq!(out.status, 500);
    assert_eq!(counter(&h, "bob", "2026-11", "upload"), 0);
    assert_eq!(h.plugin.metric("plan_limits.released"), 1);
    for _ in 0..5 {
        assert_eq!(h.send(1, &upload("bob", "free")).unwrap().status, 200);
    }
    assert_eq!(h.send(0, &upload("bob", "free")).unwrap().status, 429);
});

scenario!(a_client_that_leaves_releases_its_unit, |build| {
    let mut h = harness(build);
    for _ in 0..4 {
        h.send(0, &upload("lee", "free")).unwrap();
    }
    // The fifth is allowed, then the client disconnects before the upstream answers.
    let id = h.begin(0, &upload("lee", "free")).unwrap();
    h.settle_calls(0, id).unwrap();
    assert_eq!(h.vms[0].flow(id), Flow::Continue);
    h.vms[0].end_stream(id).unwrap();
    h.flush(0).unwrap();
    assert_eq!(counter(&h, "lee", "2026-11", "upload"), 4);
    assert_eq!(
        h.send(1, &upload("lee", "free")).unwrap().status,
        200,
        "the unit came back"
    );
});

scenario!(three_ai_analyses_then_429, |build| {
    let mut h = harness(build);
    for kind in ["vision", "photo", "reassess"] {
        let call = Call::new("POST", &format!("/api/teammate?kind={kind}")).user("carol", "free");
        assert_eq!(h.send(0, &call).unwrap().status, 200);
    }
    let out = h
        .send(1, &Call::new("POST", "/api/teammate").user("carol", "free"))
        .unwrap();
    assert_eq!(out.status, 429);
    assert_eq!(
        out.reply.unwrap().json()["error"],
        "AI analysis limit reached"
    );
    let kinds: Vec<_> = usage::events_of(&mut h.connection(), "carol")
        .into_iter()
        .map(|e| e["kind"].clone())
        .collect();
    assert_eq!(kinds, ["vision", "photo", "reassess"]);
});

scenario!(
    professional_uploads_are_unlimited_and_ai_stops_at_100,
    |build| {
        let mut h = harness(build);
        for _ in 0..25 {
            assert_eq!(
                h.send(0, &upload("dave", "professional")).unwrap().status,
                200
            );
        }
        for i in 0..100 {
            let call = Call::new("POST", "/api/teammate").user("dave", "professional");
            assert_eq!(h.send(i % 2, &call).unwrap().status, 200, "analysis {i}");
        }
        let call = Call::new("POST", "/api/teammate").user("dave", "professional");
        assert_eq!(h.send(0, &call).unwrap().status, 429);
        assert_eq!(counter(&h, "dave", "2026-11", "upload"), 25);
        assert_eq!(counter(&h, "dave", "2026-11", "ai_analysis"), 100);
    }
);

scenario!(features_outside_the_plan_are_403, |build| {
    let mut h = harness(build);
    let out = h
        .send(
            0,
            &Call::new("POST", "/api/export/dxf").user("erin", "free"),
        )
        .unwrap();
    assert_eq!(out.status, 403);
    assert_eq!(out.reply.unwrap().json()["upgrade"]["plan"], "professional");
    let out = h
        .send(
            0,
            &Call::new("GET", "/api/v1/diagrams").user("erin", "professional"),
        )
        .unwrap();
    assert_eq!(out.status, 403);
    assert!(!out.reached_upstream);
});

scenario!(file_sizes_follow_the_plan, |build| {
    let mut h = harness(build);
    let out = h
        .send(
            0,
            &Call::new("POST", "/api/upload")
                .user("frank", "free")
                .length(11 * MB),
        )
        .unwrap();
    assert_eq!(out.status, 413);
    let out = h
        .send(
            0,
            &Call::new("POST", "/api/upload")
                .user("grace", "professional")
                .length(50 * MB),
        )
        .unwrap();
    assert_eq!(out.status, 200);
    assert_eq!(
        usage::events_of(&mut h.connection(), "grace")[0]["bytes"],
        (50 * MB).to_string()
    );
});

scenario!(
    unmetered_routes_are_untouched_and_a_missing_user_is_401,
    |build| {
        let mut h = harness(build);
        let out = h.send(0, &Call::new("GET", "/health")).unwrap();
        assert!(out.reached_upstream && out.status == 200);
        assert_eq!(h.vms[0].pending_calls(), 0);
        let out = h
            .send(0, &Call::new("POST", "/api/upload").length(1))
            .unwrap();
        assert_eq!(out.status, 401);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query(&mut h.connection())
            .unwrap();
        assert!(keys.is_empty(), "{keys:?}");
    }
);

scenario!(events_and_summary_hold_what_happened, |build| {
    let mut h = harness(build);
    h.send(0, &upload("heidi", "free")).unwrap();
    h.send(
        1,
        &Call::new("GET", "/api/procedures/9").user("heidi", "free"),
    )
    .unwrap();
    h.send(
        0,
        &Call::new("POST", "/api/export/pdf")
            .user("heidi", "free")
            .upstream(502),
    )
    .unwrap();
    let summary = usage::summary(&mut h.connection(), "heidi", "2026-11");
    assert_eq!(summary["upload"], "1");
    assert_eq!(summary["procedure_view"], "1");
    assert!(!summary.contains_key("pdf_export"));
    assert_eq!(summary["plan"], "free");
    let events = usage::events_of(&mut h.connection(), "heidi");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["at"], "2026-11-27T12:00:00.000Z");
    assert_eq!(events[0]["request_id"], "sim-1");
});

scenario!(the_month_rolls_over_at_midnight_utc, |build| {
    let mut h = harness(build);
    for _ in 0..4 {
        h.send(0, &upload("ivy", "free")).unwrap();
    }
    h.set_time("2026-11-30T23:59:59.999Z");
    assert_eq!(h.send(0, &upload("ivy", "free")).unwrap().status, 200);
    let out = h.send(1, &upload("ivy", "free")).unwrap();
    assert_eq!(out.status, 429);
    let reply = out.reply.unwrap();
    assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
    assert_eq!(reply.json()["resets_at"], "2026-12-01T00:00:00Z");
    assert_eq!(counter(&h, "ivy", "2026-11", "upload"), 5);

    h.set_time("2026-12-01T00:00:00Z");
    assert_eq!(h.send(1, &upload("ivy", "free")).unwrap().status, 200);
    assert_eq!(counter(&h, "ivy", "2026-12", "upload"), 1);
    assert_eq!(counter(&h, "ivy", "2026-11", "upload"), 5);
    let events = usage::events_of(&mut h.connection(), "ivy");
    assert_eq!(events.last().unwrap()["period"], "2026-12");
    // December's allowance runs to January 1st.
    for _ in 0..4 {
        h.send(0, &upload("ivy", "free")).unwrap();
    }
    let reply = h.send(0, &upload("ivy", "free")).unwrap().reply.unwrap();
    assert_eq!(reply.json()["resets_at"], "2027-01-01T00:00:00Z");
    assert_eq!(
        reply.header("retry-after").as_deref(),
        Some(&*(31 * 86_400).to_string())
    );
});

scenario!(two_vms_race_for_the_last_unit, |build| {
    let mut h = harness(build);
    for _ in 0..4 {
        h.send(0, &upload("jack", "free")).unwrap();
    }
    let a = h.begin(0, &upload("jack", "free")).unwrap();
    let b = h.begin(1, &upload("jack", "free")).unwrap();
    assert_eq!(
        (h.vms[0].flow(a), h.vms[1].flow(b)),
        (Flow::Paused, Flow::Paused)
    );
    h.vms[1].deliver_calls().unwrap();
    h.vms[0].deliver_calls().unwrap();
    let (fa, fb) = (h.vms[0].flow(a), h.vms[1].flow(b));
    let winners = [&fa, &fb].iter().filter(|f| ***f == Flow::Continue).count();
    assert_eq!(winners, 1, "{fa:?} {fb:?}");
    assert!(
        matches!(fa, Flow::Responded(ref r) if r.status == 429),
        "the later reservation loses"
    );
    h.finish(1, b, 200).unwrap();
    h.finish(0, a, 200).unwrap();
    assert_eq!(counter(&h, "jack", "2026-11", "upload"), 5);
});

scenario!(a_redis_error_reply_follows_the_failure_mode, |build| {
    let mut h = harness(build);
    // Redis answers every script with an error (NOPERM), as a misconfigured ACL would.
    let mut conn = h.connection();
    let acl = |rule: &str, conn: &mut redis::Connection| {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .exec(conn)
            .unwrap()
    };
    acl("-eval", &mut conn);
    let out = h.send(0, &upload("kim", "free")).unwrap();
    assert_eq!(out.status, 200, "upload is fail_open");
    assert_eq!(h.plugin.metric("plan_limits.fail_open"), 1);
    assert!(h
        .plugin
        .logs()
        .iter()
        .any(|l| l.message.contains("fail_open")));
    let out = h
        .send(0, &Call::new("GET", "/api/v1/x").user("kim", "enterprise"))
        .unwrap();
    assert_eq!(out.status, 503, "api_call is fail_closed");
    assert_eq!(
        out.reply.unwrap().json()["error"],
        "Usage service unavailable"
    );
    assert!(h.plugin.metric("plan_limits.settle_errors") >= 1);
    // Redis recovers: the fail-open success is counted once the queued count goes through.
    acl("+eval", &mut conn);
    h.plugin.clock().advance_millis(1_000);
    h.flush(0).unwrap();
    let logs: Vec<_> = h.plugin.logs().into_iter().map(|l| l.message).collect();
    assert_eq!(counter(&h, "kim", "2026-11", "upload"), 1, "{logs:#?}");
});

scenario!(a_redis_call_that_never_answers_times_out, |build| {
    let mut h = harness(build);
    let id = h.begin(0, &upload("liz", "free")).unwrap();
    assert_eq!(h.vms[0].flow(id), Flow::Paused);
    h.vms[0].time_out_calls().unwrap();
    assert_eq!(
        h.vms[0].flow(id),
        Flow::Continue,
        "fail_open after the timeout"
    );
    h.finish(0, id, 200).unwrap();
    assert_eq!(h.plugin.metric("plan_limits.fail_open"), 1);
    assert_eq!(
        counter(&h, "liz", "2026-11", "upload"),
        1,
        "counted once Redis answers again"
    );

    let id = h
        .begin(1, &Call::new("GET", "/api/v1/x").user("liz", "enterprise"))
        .unwrap();
    h.vms[1].time_out_calls().unwrap();
    assert!(matches!(h.vms[1].flow(id), Flow::Responded(ref r) if r.status == 503));
    h.finish(1, id, 200).unwrap();
});

scenario!(a_bad_reconfiguration_keeps_the_last_good_one, |build| {
    let mut h = harness(build);
    let mut bad: serde_json::Value = serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    bad["plans"]["free"]["limits"]["upload"] = (-1).into();
    assert!(!h.vms[0].configure(bad.to_string().as_bytes()).unwrap());
    assert!(h
        .plugin
        .logs()
        .iter()
        .any(|l| l.message.contains("plans.free.limits.upload")));
    for _ in 0..5 {
        assert_eq!(h.send(0, &upload("mia", "free")).unwrap().status, 200);
    }
    assert_eq!(h.send(0, &upload("mia", "free")).unwrap().status, 429);
});

#[test]
fn the_default_build_imports_no_redis_host_calls() {
    let plugin = Plugin::load(&Build::Webdis.wasm(), b"{}", Upstreams::default()).unwrap();
    let imports = plugin.imports();
    assert!(imports.iter().any(|i| i == "env.proxy_http_call"));
    assert!(
        !imports.iter().any(|i| i.contains("proxy_redis")),
        "{imports:?}"
    );
}

#[test]
fn the_hostcalls_build_imports_them() {
    let plugin = Plugin::load(&Build::RedisHostCalls.wasm(), b"{}", Upstreams::default()).unwrap();
    let imports = plugin.imports();
    assert!(imports.iter().any(|i| i == "env.proxy_redis_init"));
    assert!(imports.iter().any(|i| i == "env.proxy_redis_call"));
}

#[test]
fn an_unknown_import_is_named() {
    let engine = wasmtime::Engine::default();
    let module = wasmtime::Module::new(
        &engine,
        r#"(module (import "env" "proxy_teleport" (func (param i32) (result i32))) (memory (export "memory") 1))"#,
    )
    .unwrap();
    let err = Plugin::from_module(engine, module, b"{}", Upstreams::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, HostError::UnknownImport(ref name) if name == "env.proxy_teleport"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the filter imports env.proxy_teleport, which this host does not provide"
    );
}

#[test]
fn a_bad_plans_json_is_refused_at_configure_time() {
    let mut bad: serde_json::Value = serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    bad["routes"][0]["action"] = "print".into();
    let err = Harness::try_start(Build::Webdis, &bad.to_string(), 1, None)
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("routes[0].action: unknown action \"print\""),
        "{message}"
    );
}

scenario!(at_most_one_blocking_redis_call_per_request, |build| {
    let mut h = harness(build);
    // Before the request may go upstream: one call for a limited action ...
    let id = h.begin(0, &upload("ned", "free")).unwrap();
    assert_eq!(
        (h.vms[0].flow(id), h.vms[0].pending_calls()),
        (Flow::Paused, 1)
    );
    h.settle_calls(0, id).unwrap();
    h.finish(0, id, 200).unwrap();
    // ... none for an unlimited one or an unmetered route: they go on at once.
    for call in [
        Call::new("GET", "/api/procedures/1").user("ned", "free"),
        Call::new("GET", "/health"),
    ] {
        let id = h.begin(1, &call).unwrap();
        assert_eq!(
            (h.vms[1].flow(id), h.vms[1].pending_calls()),
            (Flow::Continue, 0),
            "{}",
            call.path
        );
        h.finish(1, id, 200).unwrap();
    }
    // A user refused moments ago is refused again without asking Redis.
    for _ in 0..4 {
        h.send(0, &upload("ned", "free")).unwrap();
    }
    assert_eq!(h.send(0, &upload("ned", "free")).unwrap().status, 429);
    let id = h.begin(0, &upload("ned", "free")).unwrap();
    assert_eq!(h.vms[0].pending_calls(), 0);
    assert!(matches!(h.vms[0].flow(id), Flow::Responded(ref r) if r.status == 429));
    h.finish(0, id, 200).unwrap();
});

scenario!(a_stopping_vm_sends_its_queued_settlements_first, |build| {
    let mut h = harness(build);
    // A success whose settlement is still queued in the worker when Envoy stops the VM.
    let id = h.begin(0, &upload("oli", "free")).unwrap();
    h.settle_calls(0, id).unwrap();
    h.vms[0].response_headers(id, 200, Vec::new()).unwrap();
    h.vms[0].end_stream(id).unwrap();
    assert_eq!(counter(&h, "oli", "2026-11", "upload"), 0);
    assert!(
        !h.vms[0].shut_down().unwrap(),
        "not done while the batch is on its way"
    );
    assert!(!h.vms[0].done_called());
    // (A fresh Redis answers the first batch NOSCRIPT; it goes again with the script.)
    while h.vms[0].pending_calls() > 0 {
        assert!(!h.vms[0].done_called());
        h.vms[0].deliver_calls().unwrap();
    }
    assert!(
        h.vms[0].done_called(),
        "proxy_done once the batch is answered"
    );
    assert_eq!(counter(&h, "oli", "2026-11", "upload"), 1);
    // An idle VM is done at once.
    assert!(h.vms[1].shut_down().unwrap());
});
