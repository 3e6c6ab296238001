//! Leases through real Envoy (`redis.lease_units`): one busy user's requests admitted from
//! leased units, exact at the limit across two Envoys, and how much of the allowance leases
//! hold back from the other Envoy near the limit (and for how long).

use std::time::Duration;

use plan_limits_services::process::free_port;
use plan_limits_tests::*;

const LIMIT: u64 = 300;
const LEASE: u64 = 16;
/// Longer than the second Envoy takes to reach the limit, so that what leases hold back shows.
const HOLD_MS: u64 = 3000;

fn api_call(user: &str) -> Request {
    Request::new("GET", "/api/v1/circuits").user(user, "enterprise")
}

/// An Envoy's counter of the filter's (its workers' together), from its admin page.
fn stat(admin: u16, name: &str) -> u64 {
    let text = plan_limits_services::http::get(admin, "/stats?filter=plan_limits").body_text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("wasmcustom.{name}: ")))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
fn leases_count_exactly_and_hold_back_at_most_their_units_for_their_hold_near_the_limit() {
    let gw = envoy_with(|v| {
        v["plans"]["enterprise"]["limits"]["api_call"] = LIMIT.into();
        v["redis"]["lease_units"] = LEASE.into();
        v["redis"]["lease_hold_ms"] = HOLD_MS.into();
    });
    let (port, admin) = (free_port(), free_port());
    let _second = gw.spawn_envoy("envoy-2", port, admin, None).unwrap();
    let user = "lessee";
    // The first Envoy takes the user's first requests (its workers lease units while 160
    // remain), then only the second sends: one unit a call, refused once what is counted plus
    // what the first Envoy's leases hold reaches the limit. Those units were free but held
    // back (the 429's `in_flight`: nothing else is in flight); they go back after the hold.
    let mut admitted = 0;
    for _ in 0..141 {
        assert_eq!(api_call(user).send(gw.gateway_port).status, 200);
        admitted += 1;
    }
    let mut held_back = Vec::new();
    let mut sent = admitted;
    while admitted < LIMIT {
        let r = api_call(user).send(port);
        sent += 1;
        match r.status {
            200 => admitted += 1,
            429 => {
                let body = r.json();
                let (used, in_flight) = (&body["used"], &body["in_flight"]);
                let in_flight = in_flight.as_u64().unwrap();
                assert_eq!(used.as_u64().unwrap() + in_flight, LIMIT, "{body}");
                held_back.push(in_flight);
                std::thread::sleep(Duration::from_millis(HOLD_MS + 100));
            }
            other => panic!("request {sent}: {other}"),
        }
        assert!(
            held_back.len() < 3,
            "held back past the hold: {held_back:?}"
        );
    }
    // Exactly the limit, never more, and nothing left held.
    assert_eq!(api_call(user).send(port).status, 429);
    assert_eq!(api_call(user).send(gw.gateway_port).status, 429);
    assert!(counts(&gw, user, "api_call", LIMIT));
    assert!(eventually(|| pending(&gw, user, "api_call") == 0));
    let leased = stat(gw.admin_port, "plan_limits.leased") + stat(admin, "plan_limits.leased");
    println!(
        "limit {LIMIT}, leases of {LEASE}: {leased} of {LIMIT} admitted from leases; the other Envoy refused while leases held units: {} time(s), units held back: {held_back:?}",
        held_back.len()
    );
    assert!(
        leased > 100,
        "most of the first Envoy's came from leases: {leased}"
    );
    // What leases hold back is at most a lease's spare units per worker holding one (the
    // first Envoy's two workers), and only until their hold ends (one refusal, then none).
    assert!(held_back.len() <= 1, "{held_back:?}");
    assert!(
        held_back.iter().all(|&n| n <= 2 * (LEASE - 1)),
        "{held_back:?}"
    );
}
