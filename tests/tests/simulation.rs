//! The deterministic simulation of the core (`plan_limits_tests::simulation`): many seeds, each
//! a world of Envoys, workers, clients, upstreams, faults and a network, run in simulated time
//! against a real Redis and the real Lua library, the ledger invariant checked after each, and
//! `plan-limits audit` run on what it left (no drift).
//!
//! `SIM_SEEDS=N` runs N seeds (default 300), `SIM_SEEDS=a,b,c` those seeds; `SIM_REQUESTS`
//! requests per seed (default 60). A failing seed prints the line that replays it.

use std::time::Instant;

use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_services::redis_server::RedisServer;
use plan_limits_tests::simulation::{run_seed, Budget, Report};

/// Seeds the adversary or the simulation once found a violation with: kept, so they stay
/// fixed.
const KEPT_SEEDS: &[u64] = &[];

fn seeds() -> Vec<u64> {
    match std::env::var("SIM_SEEDS") {
        Ok(list) if list.contains(',') => list
            .split(',')
            .map(|s| s.trim().parse().expect("SIM_SEEDS: numbers"))
            .collect(),
        Ok(n) => (1..=n.trim().parse::<u64>().expect("SIM_SEEDS: a number")).collect(),
        Err(_) => (1..=300).collect(),
    }
}

#[test]
fn the_ledger_invariant_holds_in_every_simulated_world() {
    let dir = scratch_dir("simulation");
    let server = RedisServer::start_on(&dir, free_port());
    let mut filter = redis::Client::open(server.filter_url())
        .and_then(|c| c.get_connection())
        .expect("the filter's Redis user");
    let mut admin = server.connection();
    let requests = std::env::var("SIM_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60);
    let budget = Budget { requests };
    let started = Instant::now();
    let mut total = Report::default();
    let seeds: Vec<u64> = KEPT_SEEDS.iter().copied().chain(seeds()).collect();
    let mut failures = Vec::new();
    for &seed in &seeds {
        match run_seed(&mut filter, &mut admin, &server.url(), seed, budget) {
            Ok(report) => {
                total.requests += report.requests;
                total.done += report.done;
                total.counted += report.counted;
                total.unknown_not_done += report.unknown_not_done;
                total.lost_on_record += report.lost_on_record;
                total.lost_with_killed_envoy += report.lost_with_killed_envoy;
                total.fail_open += report.fail_open;
                total.audited_losses += report.audited_losses;
                total.awaited_commits += report.awaited_commits;
                total.silent_workers += report.silent_workers;
                total.leased += report.leased;
            }
            Err((violations, faults)) => {
                eprintln!("seed {seed} (faults {faults:?}):");
                for v in violations.iter().take(10) {
                    eprintln!("  {}", v.0);
                }
                eprintln!(
                    "  replay: SIM_SEEDS={seed}, SIM_REQUESTS={requests} cargo test -p plan-limits-tests --test simulation -- --nocapture"
                );
                failures.push(seed);
            }
        }
    }
    println!(
        "{} seeds x {requests} requests in {:.1} s: {total:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "seeds with violations: {failures:?}");
    assert!(
        total.done > 0 && total.counted > 0,
        "the worlds did something"
    );
    // (A replay of one seed may have leases off.)
    if seeds.len() >= 50 {
        assert!(
            total.leased > 0,
            "leases (on for half the seeds) admitted requests"
        );
    }
}
