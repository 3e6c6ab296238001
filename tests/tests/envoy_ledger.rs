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
