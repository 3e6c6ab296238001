//! What a request costs in calls into the host (Envoy's native code around each is most of
//! the filter's CPU on the unlimited path): counted by the harness's host, per phase.

use plan_limits_tests::*;

on_both_builds!(an_unlimited_request_s_host_calls, |build| {
    let mut h = harness(build);
    let request = Request::new("GET", "/api/procedures/1").user("uma", "free");
    // Warm: the first request of a worker reads what later ones find cached.
    h.send_on(0, &request).unwrap();
    let n = 50;
    let mut phases = [0u64; 4];
    for _ in 0..n {
        let before = h.vms[0].host_calls();
        let id = h.begin(0, &request).unwrap();
        let headers = h.vms[0].host_calls();
        h.vms[0].response_headers(id, 200, vec![]).unwrap();
        let response = h.vms[0].host_calls();
        h.vms[0].end_stream(id).unwrap();
        let end = h.vms[0].host_calls();
        phases[0] += headers - before;
        phases[1] += response - headers;
        phases[2] += end - response;
    }
    let before = h.vms[0].host_calls();
    h.flush(0).unwrap();
    phases[3] += h.vms[0].host_calls() - before;
    eprintln!(
        "{build:?} per request: headers {} response {} end {}; flush of {n}: {}",
        phases[0] as f64 / n as f64,
        phases[1] as f64 / n as f64,
        phases[2] as f64 / n as f64,
        phases[3]
    );
    panic!();
});
