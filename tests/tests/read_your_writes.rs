//! Read your own writes, through real Envoy: a client that got its 2xx finds it used, not in
//! flight, in its next request, on any worker of any Envoy; the 429 after five uploads is the
//! write-up's.

use plan_limits_services::process::free_port;
use plan_limits_tests::*;

#[test]
fn five_uploads_one_after_another_then_a_sixth_answer_the_write_ups_429_on_any_envoy() {
    let gw = envoy();
    let (port, admin) = (free_port(), free_port());
    let _second = gw.spawn_envoy("envoy-2", port, admin, None).unwrap();
    let ports = [gw.gateway_port, port];
    for round in 0..20 {
        let user = format!("seq-{round}");
        // The two Envoys take turns (each with two workers).
        for i in 0..5 {
            let r = upload(&user, "free").send(ports[(round + i) % 2]);
            assert_eq!(r.status, 200, "{user} upload {i}");
        }
        let sixth = upload(&user, "free").send(ports[(round + 5) % 2]);
        assert_eq!(sixth.status, 429, "{user}");
        let body = sixth.json();
        // The write-up's fields, as it gives them.
        assert_eq!(body["error"], "Upload limit reached", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("You've reached your upload limit of 5 diagrams this month"),
            "{body}"
        );
        assert_eq!(
            (&body["current"], &body["limit"], &body["percentage"]),
            (&5.into(), &5.into(), &100.into()),
            "{user}: {body}"
        );
        assert_eq!((&body["used"], &body["in_flight"]), (&5.into(), &0.into()));
    }
}

#[test]
fn the_usage_endpoint_counts_a_success_as_soon_as_its_answer_arrived() {
    let gw = envoy();
    let (port, admin) = (free_port(), free_port());
    let _second = gw.spawn_envoy("envoy-2", port, admin, None).unwrap();
    // Each analysis through one Envoy, read back at once through the other.
    let turns = [
        (gw.gateway_port, port),
        (port, gw.gateway_port),
        (gw.gateway_port, port),
    ];
    for (i, (send_to, read_from)) in turns.into_iter().enumerate() {
        assert_eq!(analysis("ria", "free").send(send_to).status, 200);
        let usage = Request::new("GET", "/api/usage")
            .user("ria", "free")
            .send(read_from)
            .json();
        let analyses = &usage["actions"]["ai_analysis"];
        assert_eq!(
            (&analyses["used"], &analyses["in_flight"]),
            (&(i as u64 + 1).into(), &0.into()),
            "after analysis {i}: {usage}"
        );
    }
}
