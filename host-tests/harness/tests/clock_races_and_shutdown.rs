//! What only a host we control can show, for both filter builds against a real Redis: the
//! month rolling over, two VMs racing for the last unit, a client leaving at a chosen moment,
//! Redis errors and a call that never answers, reconfiguration, shutdown, the import lists.
//! (What every gateway does is in `scenarios.rs`, run here and through real Envoy.)

use plan_limits_tests::*;
use plan_limits_wasm_host::{Flow, HostError, Plugin, Upstreams};

/// `user`'s count of `action` in `period` (the harness's clock moves between periods here).
fn counter(h: &Harness, user: &str, period: &str, action: &str) -> u64 {
    usage::counter(&mut h.connection(), user, action, period)
}

on_both_builds!(a_client_that_leaves_releases_its_unit, |build| {
    let mut h = harness(build);
    for _ in 0..4 {
        h.send_on(0, &upload("lee", "free")).unwrap();
    }
    // The fifth is allowed, then the client disconnects before the upstream answers.
    let id = h.begin(0, &upload("lee", "free")).unwrap();
    h.settle_calls(0, id).unwrap();
    assert_eq!(h.vms[0].flow(id), Flow::Continue);
    h.vms[0].end_stream(id).unwrap();
    h.flush(0).unwrap();
    assert_eq!(counter(&h, "lee", "2026-11", "upload"), 4);
    assert_eq!(
        h.send_on(1, &upload("lee", "free")).unwrap().status,
        200,
        "the unit came back"
    );
});

on_both_builds!(the_month_rolls_over_at_midnight_utc, |build| {
    let mut h = harness(build);
    for _ in 0..4 {
        h.send_on(0, &upload("ivy", "free")).unwrap();
    }
    h.set_time("2026-11-30T23:59:59.999Z");
    assert_eq!(h.send_on(0, &upload("ivy", "free")).unwrap().status, 200);
    let out = h.send_on(1, &upload("ivy", "free")).unwrap();
    assert_eq!(out.status, 429);
    assert_eq!(out.header("retry-after"), Some("1"));
    assert_eq!(out.json()["resets_at"], "2026-12-01T00:00:00Z");
    assert_eq!(counter(&h, "ivy", "2026-11", "upload"), 5);

    h.set_time("2026-12-01T00:00:00Z");
    assert_eq!(h.send_on(1, &upload("ivy", "free")).unwrap().status, 200);
    assert_eq!(counter(&h, "ivy", "2026-12", "upload"), 1);
    assert_eq!(counter(&h, "ivy", "2026-11", "upload"), 5);
    let events = usage::events_of(&mut h.connection(), "ivy");
    assert_eq!(events.last().unwrap()["period"], "2026-12");
    // December's allowance runs to January 1st.
    for _ in 0..4 {
        h.send_on(0, &upload("ivy", "free")).unwrap();
    }
    let reply = h.send_on(0, &upload("ivy", "free")).unwrap();
    assert_eq!(reply.json()["resets_at"], "2027-01-01T00:00:00Z");
    assert_eq!(
        reply.header("retry-after"),
        Some(&*(31 * 86_400).to_string())
    );
});

on_both_builds!(two_vms_race_for_the_last_unit, |build| {
    let mut h = harness(build);
    for _ in 0..4 {
        h.send_on(0, &upload("jack", "free")).unwrap();
    }
    let request = upload("jack", "free");
    let a = h.begin(0, &request).unwrap();
    let b = h.begin(1, &request).unwrap();
    assert_eq!(
        (h.vms[0].flow(a), h.vms[1].flow(b)),
        (Flow::Paused, Flow::Paused)
    );
    h.vms[1].deliver_calls().unwrap();
    h.vms[0].deliver_calls().unwrap();
    let (fa, fb) = (h.vms[0].flow(a), h.vms[1].flow(b));
    assert_eq!(
        (&fa, &fb),
        (&Flow::Held, &Flow::Continue),
        "the later reservation loses: held from the upstream while its body comes in"
    );
    h.send_body(0, a, &request).unwrap();
    assert!(matches!(h.vms[0].flow(a), Flow::Responded(ref r) if r.status == 429));
    h.send_body(1, b, &request).unwrap();
    h.finish(1, b, 200).unwrap();
    h.finish(0, a, 200).unwrap();
    assert_eq!(counter(&h, "jack", "2026-11", "upload"), 5);
});

on_both_builds!(a_redis_error_reply_follows_the_failure_mode, |build| {
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
    acl("-fcall", &mut conn);
    let out = h.send_on(0, &upload("kim", "free")).unwrap();
    assert_eq!(out.status, 200, "upload is fail_open");
    assert_eq!(h.metric("fail_open"), 1);
    assert!(h
        .plugin
        .logs()
        .iter()
        .any(|l| l.message.contains("fail_open")));
    let out = h
        .send_on(
            0,
            &Request::new("GET", "/api/v1/x").user("kim", "enterprise"),
        )
        .unwrap();
    assert_eq!(out.status, 503, "api_call is fail_closed");
    assert_eq!(out.json()["error"], "Usage service unavailable");
    assert!(h.metric("settle_errors") >= 1);
    // Redis recovers: the fail-open success is counted once the queued count goes through.
    acl("+fcall", &mut conn);
    h.plugin.clock().advance_millis(1_000);
    h.flush(0).unwrap();
    let logs: Vec<_> = h.plugin.logs().into_iter().map(|l| l.message).collect();
    assert_eq!(counter(&h, "kim", "2026-11", "upload"), 1, "{logs:#?}");
});

on_both_builds!(a_redis_call_that_never_answers_times_out, |build| {
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
    assert_eq!(h.metric("fail_open"), 1);
    assert_eq!(
        counter(&h, "liz", "2026-11", "upload"),
        1,
        "counted once Redis answers again"
    );

    let id = h
        .begin(
            1,
            &Request::new("GET", "/api/v1/x").user("liz", "enterprise"),
        )
        .unwrap();
    h.vms[1].time_out_calls().unwrap();
    assert!(matches!(h.vms[1].flow(id), Flow::Responded(ref r) if r.status == 503));
    h.finish(1, id, 200).unwrap();
});

on_both_builds!(a_bad_reconfiguration_keeps_the_last_good_one, |build| {
    let mut h = harness(build);
    let bad = plans_with(|p| p["plans"]["free"]["limits"]["upload"] = (-1).into());
    assert!(!h.vms[0].configure(bad.as_bytes()).unwrap());
    assert!(h
        .plugin
        .logs()
        .iter()
        .any(|l| l.message.contains("plans.free.limits.upload")));
    for _ in 0..5 {
        assert_eq!(h.send_on(0, &upload("mia", "free")).unwrap().status, 200);
    }
    assert_eq!(h.send_on(0, &upload("mia", "free")).unwrap().status, 429);
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
    let bad = plans_with(|p| p["routes"][0]["action"] = "print".into());
    let err = Harness::try_start(Build::Webdis, &bad, 1, None)
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("routes[0].action: unknown action \"print\""),
        "{message}"
    );
}

on_both_builds!(at_most_one_blocking_redis_call_per_request, |build| {
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
        Request::new("GET", "/api/procedures/1").user("ned", "free"),
        Request::new("GET", "/health"),
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
        h.send_on(0, &upload("ned", "free")).unwrap();
    }
    assert_eq!(h.send_on(0, &upload("ned", "free")).unwrap().status, 429);
    let request = upload("ned", "free");
    let id = h.begin(0, &request).unwrap();
    assert_eq!(
        (h.vms[0].flow(id), h.vms[0].pending_calls()),
        (Flow::Held, 0)
    );
    h.send_body(0, id, &request).unwrap();
    assert!(matches!(h.vms[0].flow(id), Flow::Responded(ref r) if r.status == 429));
    h.finish(0, id, 200).unwrap();
});

on_both_builds!(a_stopping_vm_sends_its_queued_settlements_first, |build| {
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
    // An idle VM says goodbye (its record in Redis: stopped, not killed), then is done.
    assert!(!h.vms[1].shut_down().unwrap());
    h.vms[1].deliver_calls().unwrap();
    assert!(h.vms[1].done_called());
    let records: Vec<String> = redis::cmd("KEYS")
        .arg("plan-limits:applied:*")
        .query(&mut h.connection())
        .unwrap();
    let stopped: Vec<String> = records
        .iter()
        .map(|key| {
            redis::cmd("HGET")
                .arg(key)
                .arg("stopped")
                .query(&mut h.connection())
                .unwrap()
        })
        .collect();
    assert_eq!(stopped, ["1", "1"], "both VMs' workers said goodbye");
});
