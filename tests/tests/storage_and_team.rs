//! Storage and team limits, on every gateway: running totals per user (not per period).
//! Uploads add their bytes to the user's storage and are refused (403 with the upgrade) when
//! they would pass the plan's; a successful delete gives back what the upstream says it freed.
//! Invites add a member to the subscriber's team (who counts as one) and are refused past the
//! plan's `team_members`; a removal gives back what the upstream says it removed.

use plan_limits_core::Gauge;
use plan_limits_services::http::{DEMO_FREED_BYTES, DEMO_REMOVED_MEMBERS};
use plan_limits_services::usage::{gauge_total, set_gauge_total};
use plan_limits_tests::*;

const GIB: u64 = 1 << 30;

fn stored(gw: &dyn Gateway, user: &str) -> u64 {
    gauge_total(&mut gw.redis(), user, Gauge::Storage)
}

fn invited(gw: &dyn Gateway, user: &str) -> u64 {
    gauge_total(&mut gw.redis(), user, Gauge::Team)
}

fn delete(user: &str, freed: u64) -> Request {
    Request::new("DELETE", "/api/diagrams/d1")
        .user(user, "free")
        .header(DEMO_FREED_BYTES, freed.to_string())
}

fn usage_of(gw: &mut dyn Gateway, user: &str, plan: &str) -> serde_json::Value {
    gw.send(&Request::new("GET", "/api/usage").user(user, plan))
        .json()
}

on_every_gateway!(uploads_fill_the_storage_and_deletes_give_it_back, |gw| {
    // The free plan keeps 1 GiB; "sol" has 5 bytes of room left.
    set_gauge_total(&mut gw.redis(), "sol", Gauge::Storage, GIB - 5);
    let diagram = upload("sol", "free"); // 10 bytes
    let r = gw.send(&diagram);
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert!(!r.from_upstream());
    let body = r.json();
    assert_eq!(body["error"], "Storage limit reached");
    assert_eq!(body["used_bytes"], GIB - 5);
    assert_eq!(body["size_bytes"], 10);
    assert_eq!(body["limit_bytes"], GIB);
    assert_eq!(body["upgrade"]["plan"], "professional");
    assert_eq!(
        counter(gw, "sol", "upload"),
        0,
        "a refused upload is not counted"
    );

    // A failed delete frees nothing; a successful one frees what the upstream says.
    let failed = delete("sol", 100).header("x-demo-status", "500");
    assert_eq!(gw.send(&failed).status, 500);
    assert_eq!(gw.send(&delete("sol", 100)).status, 200);
    assert!(eventually(|| stored(gw, "sol") == GIB - 105));

    // Now it fits: counted, and its bytes are stored.
    assert_eq!(gw.send(&diagram).status, 200);
    assert!(counts(gw, "sol", "upload", 1));
    assert!(eventually(|| stored(gw, "sol") == GIB - 95));
    // An upload the upstream refused adds nothing.
    let refused = upload("sol", "free").header("x-demo-status", "422");
    assert_eq!(gw.send(&refused).status, 422);

    // (Its release reaches Redis just after its answer, through Envoy.)
    assert!(eventually(|| usage_of(gw, "sol", "free")["storage"]
        ["in_flight_bytes"]
        == 0));
    assert_eq!(
        usage_of(gw, "sol", "free")["storage"],
        serde_json::json!({"used_bytes": GIB - 95, "in_flight_bytes": 0, "limit_bytes": GIB,
            "remaining_bytes": 95})
    );

    // A delete without a token is refused; another user's delete frees only their own.
    let anonymous = Request::new("DELETE", "/api/diagrams/d1").header(DEMO_FREED_BYTES, "9");
    assert_eq!(gw.send(&anonymous).status, 401);
    assert_eq!(gw.send(&delete("tom", 50)).status, 200);
    assert_eq!(stored(gw, "sol"), GIB - 95);
    // Another spelling of the delete route still gives back.
    let shouted = Request::new("DELETE", "/API/Diagrams/d2")
        .user("sol", "free")
        .header(DEMO_FREED_BYTES, "5");
    gw.send(&shouted);
    assert!(eventually(|| stored(gw, "sol") == GIB - 100));
});

fn invite(user: &str, plan: &str) -> Request {
    Request::new("POST", "/api/team/invites").user(user, plan)
}

fn remove(user: &str, removed: u64) -> Request {
    Request::new("DELETE", "/api/team/members/m1")
        .user(user, "professional")
        .header(DEMO_REMOVED_MEMBERS, removed.to_string())
}

on_every_gateway!(
    a_team_holds_the_plans_members_and_removals_make_room,
    |gw| {
        // Free has no team collaboration at all: 403 with the upgrade.
        let r = gw.send(&invite("pia", "free"));
        assert_eq!(r.status, 403, "{}", r.body_text());
        assert_eq!(r.json()["upgrade"]["plan"], "professional");

        // Professional: five members, the subscriber included, so four invites.
        for n in 1..=4 {
            let r = gw.send(&invite("pia", "professional"));
            assert_eq!(r.status, 200, "invite {n}: {}", r.body_text());
            assert!(eventually(|| invited(gw, "pia") == n));
        }
        let r = gw.send(&invite("pia", "professional"));
        assert_eq!(r.status, 403, "{}", r.body_text());
        assert!(!r.from_upstream());
        let body = r.json();
        assert_eq!(body["error"], "Team limit reached");
        assert_eq!((&body["members"], &body["limit"]), (&5.into(), &5.into()));
        assert_eq!(body["upgrade"]["plan"], "enterprise");
        assert_eq!(
            usage_of(gw, "pia", "professional")["team"],
            serde_json::json!({"members": 5, "in_flight": 0, "limit": 5, "remaining": 0})
        );

        // A removal the upstream says removed nobody (repeated: already gone) makes no room, nor
        // does a failed one; one that removed a member does.
        assert_eq!(gw.send(&remove("pia", 0)).status, 200);
        let failed = remove("pia", 1).header("x-demo-status", "500");
        assert_eq!(gw.send(&failed).status, 500);
        assert_eq!(gw.send(&invite("pia", "professional")).status, 403);
        assert_eq!(gw.send(&remove("pia", 1)).status, 200);
        assert!(eventually(|| invited(gw, "pia") == 3));
        // An invite the upstream refused takes no seat.
        let refused = invite("pia", "professional").header("x-demo-status", "409");
        assert_eq!(gw.send(&refused).status, 409);
        assert!(eventually(|| usage_of(gw, "pia", "professional")["team"]
            ["in_flight"]
            == 0));
        assert_eq!(invited(gw, "pia"), 3);
        assert_eq!(gw.send(&invite("pia", "professional")).status, 200);
        assert!(eventually(|| invited(gw, "pia") == 4));
        assert_eq!(gw.send(&invite("pia", "professional")).status, 403);
    }
);
