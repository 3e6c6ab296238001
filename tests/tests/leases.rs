//! Leases through real Envoy (`redis.lease_units`): one busy user's requests admitted from
//! leased units, exact at the limit across two Envoys, and how much of the allowance leases
//! hold back from the other Envoy near the limit (and for how long).

use std::time::{Duration, Instant};

use plan_limits_services::process::free_port;
use plan_limits_tests::*;

const LIMIT: u64 = 300;
const LEASE: u64 = 16;
/// Longer than the second Envoy takes to reach the limit, so that what leases hold back shows.
const HOLD_MS: u64 = 5000;

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
    let plans = |lease_units: u64| {
        move |v: &mut serde_json::Value| {
            v["plans"]["enterprise"]["limits"]["api_call"] = LIMIT.into();
            v["redis"]["lease_units"] = lease_units.into();
            v["redis"]["lease_hold_ms"] = HOLD_MS.into();
        }
    };
    let gw = envoy_with(plans(LEASE));
    let (port, admin) = (free_port(), free_port());
    // The second Envoy reserves one unit a call: a lease of its own (while 160 remain) would
    // hold back units from its other worker too, a refusal this test would count as the first
    // Envoy's.
    let _second = gw
        .spawn_envoy_with("envoy-2", port, admin, &plans_with(plans(0)), None)
        .unwrap();
    let user = "lessee";
    // The first Envoy takes the user's first requests (its workers lease units while 160
    // remain) until its leases hold units it is not using (nothing else is in flight: what
    // Redis holds is theirs). Then only the second sends, one unit a call: refused once what is
    // counted plus what the first one's leases hold reaches the limit, until the hold ends.
    let mut admitted = 0;
    let mut held = 0;
    while held == 0 {
        assert!(
            admitted < 140,
            "no lease held units the first Envoy was not using"
        );
        assert_eq!(api_call(user).send(gw.gateway_port).status, 200);
        admitted += 1;
        if admitted >= 120 {
            held = pending(&gw, user, "api_call");
        }
    }
    let (switched, phase_one) = (Instant::now(), admitted);
    // (At most a lease's spare units for each of its two workers.)
    assert!(held <= 2 * (LEASE - 1), "{held}");
    // Refused only while the first Envoy's leases hold units it does not use, never past
    // their hold (plus a tick and a batch): each worker's lease is given back `lease_hold_ms`
    // after its own grant, so the second Envoy may be refused again when the other's is.
    let mut refusals = 0;
    let mut refused_until = Duration::ZERO;
    while admitted < LIMIT {
        let r = api_call(user).send(port);
        match r.status {
            200 => admitted += 1,
            429 => {
                refusals += 1;
                refused_until = switched.elapsed();
                let body = r.json();
                let in_flight = body["in_flight"].as_u64().unwrap_or(0);
                assert_eq!(body["used"], admitted, "{body}");
                assert!(
                    in_flight > 0 && in_flight <= held,
                    "the units free but held back are the first Envoy's leases': {body}"
                );
                assert!(
                    switched.elapsed() < Duration::from_millis(HOLD_MS + 1000),
                    "still held back {:?} after the first Envoy's last request",
                    switched.elapsed()
                );
                if refusals == 1 {
                    assert_eq!(in_flight, held, "all of them at first: {body}");
                    // Held, not let go early: refused again at once, with the same units held.
                    let again = api_call(user).send(port);
                    assert_eq!(again.status, 429);
                    assert_eq!(again.json()["in_flight"], held);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            other => panic!("after {admitted} admitted: {other}"),
        }
    }
    assert!(refusals > 0, "the held units showed: {held}");
    // Exactly the limit, never more, and nothing left held.
    assert_eq!(api_call(user).send(port).status, 429);
    assert_eq!(api_call(user).send(gw.gateway_port).status, 429);
    assert!(counts(&gw, user, "api_call", LIMIT));
    assert!(eventually(|| pending(&gw, user, "api_call") == 0));
    let leased = stat(gw.admin_port, "plan_limits.leased") + stat(admin, "plan_limits.leased");
    println!(
        "limit {LIMIT}, leases of {LEASE}: {leased} of {LIMIT} admitted from leases; the other Envoy was refused while leases held {held} units, until {refused_until:?} after the first Envoy's last request (hold {HOLD_MS} ms)"
    );
    assert!(
        leased * 4 >= phase_one * 3,
        "most of the first Envoy's {phase_one} came from leases: {leased}"
    );
}
