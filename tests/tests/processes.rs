//! Every service a test, `make run` or the bench starts is stopped with all its children: no
//! process outlives the run that started it (nginx's worker used to, still listening).

use std::time::{Duration, Instant};

use plan_limits_services::process::{processes_in_group, scratch_dir};
use plan_limits_services::upstream::Nginx;
use plan_limits_tests::*;

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !stat.is_empty() && state != Some("Z")
}

#[test]
fn no_process_started_by_a_gateway_the_harness_or_the_bench_outlives_it() {
    let gw = envoy();
    let harness = harness(Build::Webdis);
    let nginx = Nginx::start(&scratch_dir("processes"));
    let nginx_group = nginx.service.processes();
    assert!(
        nginx_group.len() >= 2,
        "nginx runs a master and a worker: {nginx_group:?}"
    );
    let mut started = gw.processes();
    assert!(
        started.len() >= 4,
        "Envoy, the upstream, webdis, Redis: {started:?}"
    );
    started.extend(nginx_group);
    for service in [
        harness.redis.as_ref().map(|r| r.service()),
        harness.webdis.as_ref().map(|w| &w.service),
    ]
    .into_iter()
    .flatten()
    {
        started.extend(service.processes());
    }
    assert!(started.iter().all(|&pid| alive(pid)));

    drop(gw);
    drop(harness);
    drop(nginx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while started.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = started.iter().filter(|&&pid| alive(pid)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
    // Nor anything else in their process groups.
    for &pid in &started {
        assert!(processes_in_group(pid).iter().all(|&p| !alive(p)));
    }
}
