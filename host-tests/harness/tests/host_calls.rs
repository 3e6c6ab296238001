//! What a request costs in calls into the host, counted by our host per phase: a change that
//! adds one to the unlimited path (Envoy's native code around each call is much of the
//! filter's cost there, docs/performance.md) fails here and says so.

use plan_limits_tests::*;

/// Host calls per request in each phase, over `n` unlimited requests on one VM (after one
/// that warms it), and of the one settlement flush that follows them all.
fn unlimited_requests(h: &mut Harness, request: &Request, n: u64) -> ([u64; 3], u64) {
    h.send_on(0, request).unwrap();
    let mut phases = [0u64; 3];
    for _ in 0..n {
        let before = h.vms[0].host_calls();
        let id = h.begin(0, request).unwrap();
        let headers = h.vms[0].host_calls();
        h.vms[0].response_headers(id, 200, vec![]).unwrap();
        let response = h.vms[0].host_calls();
        h.vms[0].end_stream(id).unwrap();
        phases[0] += headers - before;
        phases[1] += response - headers;
        phases[2] += h.vms[0].host_calls() - response;
    }
    let before = h.vms[0].host_calls();
    h.flush(0).unwrap();
    let flush = h.vms[0].host_calls() - before;
    (phases.map(|calls| calls / n), flush)
}

on_both_builds!(an_unlimited_request_makes_ten_host_calls, |build| {
    let mut h = harness(build);
    let request = Request::new("GET", "/api/procedures/1").user("uma", "free");
    let (per_request, flush) = unlimited_requests(&mut h, &request, 50);
    // Its headers: all of them (1), the token's payload (1), the clock (1), the three identity
    // headers (3), the hold filter's look for its mark (1). Its response: the status (1), the
    // clock (1). Its end: the clock (1). (Its outcome's counters are added at the tick.)
    assert_eq!(per_request, [7, 2, 1], "headers, response, end");
    // The fifty settlements go in one batch, their counters in one call each: a handful of
    // calls for all of them.
    assert!(flush <= 20, "{flush} calls to settle 50 requests");
});

on_both_builds!(
    a_payload_envoy_cannot_encode_costs_a_call_per_claim,
    |build| {
        // A null claim: the whole payload fails, then the four claims are read one by one (and
        // the fallback counted).
        let mut h = harness(build);
        let token = token_with(serde_json::json!({"sub": "uma", "plan": "free", "nickname": null}));
        let request = Request::new("GET", "/api/procedures/1").bearer(&token);
        let (per_request, _) = unlimited_requests(&mut h, &request, 10);
        assert_eq!(per_request, [7 + 4, 2, 1], "headers, response, end");
        assert_eq!(h.metric("claims_one_by_one"), 11);
    }
);
