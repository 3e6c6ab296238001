//! The ledger, through real Envoy: what the demo upstream did (its ledger: handlers that ran to
//! their end with a success, whether or not their answer was read) against what the gateway
//! counted, for the ways a client or an upstream found to get work done uncounted. Each test
//! is one of the cases the ledger issue found by hand; the adversary (`adversary.rs`) looks for
//! more.

use std::time::Duration;

use plan_limits_tests::*;

const UPLOAD: &str = "POST /api/upload";
const ANALYSIS: &str = "POST /api/teammate";

/// What `user`'s requests had the upstream do by `handler`, once its settlements are in.
fn done(gw: &EnvoyGateway, user: &str, handler: &str) -> u64 {
    gw.upstream.ledger().done(user, handler)
}

/// Waits until `user`'s count of `action` equals what the upstream did by `handler`, and
/// returns it (panics, saying both, if it never does).
fn counted_as_done(gw: &EnvoyGateway, user: &str, action: &str, handler: &str) -> u64 {
    let same = eventually(|| counter(gw, user, action) == done(gw, user, handler));
    let (c, d) = (counter(gw, user, action), done(gw, user, handler));
    assert!(same, "{user}: counted {c}, done {d}");
    c
}

#[test]
fn uploads_whose_client_left_after_sending_them_are_counted() {
    let gw = envoy();
    let slow_upload = || upload("uma", "free").header("x-demo-delay-ms", "1000");
    // Eight uploads, one after the other, each client leaving half a second after its whole
    // body went (the upstream takes a second and stores every one it gets).
    let mut answered = Vec::new();
    for _ in 0..8 {
        let status = slow_upload()
            .send_then_leave(gw.gateway_port, Duration::from_millis(500))
            .unwrap();
        answered.push(status);
    }
    // Five went to the upstream (no answer before their clients left), three were refused.
    assert_eq!(
        answered,
        [
            None,
            None,
            None,
            None,
            None,
            Some(429),
            Some(429),
            Some(429)
        ]
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(counted_as_done(&gw, "uma", "upload", UPLOAD), 5);
    let events = usage::events_of(&mut gw.redis.connection(), "uma");
    assert!(
        events.iter().all(|e| e["outcome"] == "unknown"),
        "{events:?}"
    );
    assert_eq!(upload("uma", "free").send(gw.gateway_port).status, 429);
}

#[test]
fn a_client_cannot_set_envoys_upstream_timeout() {
    let gw = envoy();
    let statuses: Vec<u16> = (0..6)
        .map(|_| {
            analysis("tia", "free")
                .header("x-demo-delay-ms", "500")
                .header("x-envoy-upstream-rq-timeout-ms", "50")
                .send(gw.gateway_port)
                .status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    assert_eq!(counted_as_done(&gw, "tia", "ai_analysis", ANALYSIS), 3);
}

#[test]
fn a_client_cannot_make_envoy_repeat_its_request() {
    let gw = envoy();
    let r = analysis("rex", "free")
        .header("x-envoy-retry-on", "retriable-status-codes")
        .header("x-envoy-retriable-status-codes", "200")
        .header("x-envoy-max-retries", "5")
        .send(gw.gateway_port);
    assert_eq!(r.status, 200);
    assert_eq!(gw.upstream.attempts(), 1);
    assert_eq!(counted_as_done(&gw, "rex", "ai_analysis", ANALYSIS), 1);
    // Nor have the upstream run the handler of another method than Envoy metered (the demo
    // upstream, like many frameworks, runs the one an override header names): an unmetered
    // GET stays a GET.
    for header in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        let r = Request::new("GET", "/api/upload")
            .user("rex", "free")
            .header(header, "POST")
            .send(gw.gateway_port);
        assert_eq!(
            (r.status, &r.json()["method"]),
            (200, &"GET".into()),
            "{header}"
        );
    }
    // (Unmetered: the upstream is told no user.)
    let ledger = gw.upstream.ledger();
    assert_eq!(ledger.done("", "GET /api/upload"), 3);
    assert!(
        ledger
            .all_done()
            .iter()
            .all(|(_, handler, _)| handler != UPLOAD),
        "{ledger:?}"
    );
}

#[test]
fn one_upstreams_bad_value_costs_nobody_elses_count() {
    let gw = envoy();
    // Deletes whose upstream says they freed 2^64 - 1 bytes (and other values that are not a
    // count), sent at the same time as other users' analyses, so they share batches.
    let bad = ["18446744073709551615", "-5", "lots", "9007199254740993"];
    std::thread::scope(|s| {
        for (i, value) in bad.iter().enumerate() {
            let port = gw.gateway_port;
            s.spawn(move || {
                let r = Request::new("DELETE", &format!("/api/diagrams/d{i}"))
                    .user("del", "free")
                    .header(plan_limits_services::http::DEMO_FREED_BYTES, *value)
                    .send(port);
                assert_eq!(r.status, 200);
            });
        }
        for n in 0..12 {
            let port = gw.gateway_port;
            s.spawn(move || analysis(&format!("other-{n}"), "professional").send(port));
        }
    });
    for n in 0..12 {
        assert_eq!(
            counted_as_done(&gw, &format!("other-{n}"), "ai_analysis", ANALYSIS),
            1
        );
    }
    assert!(eventually(|| gw.metric("upstream_values_refused") == 4));
    assert_eq!(gw.metric("settlements_dropped"), 0);
    assert_eq!(
        gw.metric("settlements_refused"),
        0,
        "refused in the filter first"
    );
}

#[test]
fn a_client_cannot_cause_fail_open_by_flooding_the_read_endpoints() {
    let gw = envoy();
    let port = gw.gateway_port;
    let flooding = std::sync::atomic::AtomicBool::new(true);
    // 200 connections at once of 90 days of history, from one free token.
    let today = chrono::Utc::now().date_naive();
    let from = today - chrono::Duration::days(89);
    let path = format!("/api/usage/history?from={from}&to={today}");
    let victim = std::thread::scope(|s| {
        let flood: Vec<_> = (0..200)
            .map(|_| {
                let (path, flooding) = (&path, &flooding);
                s.spawn(move || {
                    let mut answers = Vec::new();
                    while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = Request::new("GET", path)
                            .user("flood", "free")
                            .try_send(port);
                        answers.push(r.map_or(0, |r| r.status));
                    }
                    answers
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        // Meanwhile another free user asks for eleven analyses (three allowed).
        let victim: Vec<u16> = (0..11)
            .map(|_| analysis("vic", "free").send(port).status)
            .collect();
        flooding.store(false, std::sync::atomic::Ordering::Relaxed);
        let answers: Vec<u16> = flood.into_iter().flat_map(|t| t.join().unwrap()).collect();
        // The flood was turned away at the edge (spike arrest, reads in flight), never by
        // a Redis that stopped answering.
        assert!(answers.contains(&429), "spike arrest");
        assert!(!answers.contains(&0), "every flood request was answered");
        victim
    });
    assert_eq!(
        victim.iter().filter(|&&s| s == 200).count(),
        3,
        "{victim:?}"
    );
    assert_eq!(gw.metric("fail_open"), 0);
    assert_eq!(gw.metric("redis_errors"), 0);
    assert_eq!(counted_as_done(&gw, "vic", "ai_analysis", ANALYSIS), 3);
}

#[test]
fn what_a_killed_envoy_lost_is_found() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let mut gw = envoy_with(|p| {
        p["redis"]["reservation_ttl_ms"] = 3000.into();
        p["plans"]["professional"]["request_rate"] = serde_json::Value::Null;
    });
    let port = gw.gateway_port;
    let users: Vec<String> = (0..6).map(|i| format!("pro-{i}")).collect();
    let running = AtomicBool::new(true);
    let started = Instant::now();
    // Each client alternates an analysis (limited: reserved in Redis first) and a procedure
    // view (unlimited: counted from the worker's queue), 100 ms or more at the upstream each.
    let answered: Vec<(u32, Vec<Option<u128>>)> = std::thread::scope(|s| {
        let clients: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(i, user)| {
                let running = &running;
                // (Clients out of step, so that the kill finds them in different phases.)
                let analysis_ms = (100 + 23 * i).to_string();
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(37 * i as u64));
                    let mut views = Vec::new();
                    let mut outstanding_views = 0;
                    while running.load(Ordering::Relaxed) {
                        let _ = analysis(user, "professional")
                            .header("x-demo-delay-ms", analysis_ms.as_str())
                            .try_send(port);
                        let view = Request::new("GET", "/api/procedures/1")
                            .user(user, "professional")
                            .header("x-demo-delay-ms", "100");
                        match view.try_send(port) {
                            Ok(r) if r.status == 200 => {
                                views.push(Some(started.elapsed().as_millis()))
                            }
                            _ => {
                                outstanding_views += 1;
                                views.push(None);
                            }
                        }
                    }
                    (outstanding_views, views)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let pid = gw.envoy().pid();
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let killed_at = started.elapsed().as_millis();
        std::thread::sleep(Duration::from_millis(200));
        running.store(false, Ordering::Relaxed);
        let out: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        out.into_iter()
            .map(|(outstanding, views)| {
                // A view answered just before the kill may have been in a queue it took down.
                let late = views
                    .iter()
                    .filter(|t| t.is_some_and(|t| t + 50 >= killed_at && t <= killed_at))
                    .count() as u32;
                (outstanding + late, views)
            })
            .collect()
    });
    // A new Envoy; the dead one's reservations expire unsettled.
    let admin = plan_limits_services::process::free_port();
    let _replacement = gw.spawn_envoy("envoy-2", port, admin, None).unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let plans = plan_limits_core::Plans::from_json(gw.options.plans_json.as_bytes()).unwrap();
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap();
    let mut redis = plan_limits_tools::operator::Redis::connect(&gw.redis.url()).unwrap();
    let scope = plan_limits_tools::audit::Scope::default();
    let audit = plan_limits_tools::audit::run(&mut redis, &plans, &scope, now).unwrap();
    assert!(audit.drift.is_empty(), "{audit}");
    let ledger = gw.upstream.ledger();
    let mut found = 0;
    for (user, (view_bound, _)) in users.iter().zip(&answered) {
        // Every analysis the upstream did is counted, or its loss is on record.
        let lost: u64 = audit
            .lost
            .iter()
            .filter(|l| l.user == *user && l.action == "ai_analysis")
            .map(|l| l.units)
            .sum();
        let (done, counted) = (
            ledger.done(user, ANALYSIS),
            counter(&gw, user, "ai_analysis"),
        );
        assert!(
            done <= counted + lost,
            "{user}: done {done}, counted {counted}, lost on record {lost}\n{audit}"
        );
        found += lost;
        // A view's count lived only in the worker's queue: at most those in flight or just
        // answered when Envoy died are missing.
        let (done, counted) = (
            ledger.done(user, "GET /api/procedures/1"),
            counter(&gw, user, "procedure_view"),
        );
        assert!(
            done <= counted + u64::from(*view_bound),
            "{user} views: done {done}, counted {counted}, bound {view_bound}"
        );
    }
    assert!(found > 0, "the kill caught analyses in flight: {audit}");
}
