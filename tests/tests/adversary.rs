//! The adversary (issue 17) through real Envoy, Redis, webdis and the demo upstream: seeded
//! hostile clients, hostile upstream answers and faults, then the ledger invariant for every
//! user and action (see `plan_limits_tests::adversary`). By default a short budget (part of
//! `make test`): two seeds of 150 requests with one fault each, and every kept seed with its
//! own budget. `ADVERSARY_SEEDS` (a count below 10,000 of fresh seeds, or a comma list of
//! seeds), `ADVERSARY_REQUESTS`, `ADVERSARY_FAULTS`, `ADVERSARY_CLIENTS` and
//! `ADVERSARY_FAULT_KINDS` (`redis-pause,redis-restart,webdis-restart,envoy-kill,
//! upstream-pause` or `all`) run other seeds; `make adversary` runs a long budget.
//! `ADVERSARY_ENVOY_DEBUG=1` has Envoy log every request (with its request id) to read a
//! violation against; each run's `adversary-trace.txt` (what every client did and saw, when the
//! faults struck) is beside Envoy's log, in the directory the report names.

use plan_limits_tests::adversary::plan::{Budget, FaultKinds};
use plan_limits_tests::adversary::{self, report};

/// Seeds that found a violation since fixed, each with the budget it was found with (the
/// reproduction command prints both): each runs again in the short budget. A seed names a
/// plan only for the generator that drew it: when `adversary::plan` changes how it draws,
/// check that each kept seed still finds what it found (or drop it).
const KEPT_SEEDS: &[(u64, Budget)] = &[
    // One Envoy granted the fail-open allowance twice in a period: a reservation's answer that
    // came before its pass was settled reset the budget (free-a's analyses: 5 done of 3).
    (
        17_131_033_116_926_659_877,
        Budget {
            requests: 300,
            faults: 4,
            clients: 6,
            fault_kinds: FaultKinds::WITHOUT_ENVOY_KILL,
        },
    ),
    // plan-limits audit reported the day's new counts by kind (`ai_analysis:vision`) as drift:
    // it did not recompute them from the events' kind.
    (
        1_995_482_960_539_311_777,
        Budget {
            requests: 600,
            faults: 5,
            clients: 6,
            fault_kinds: FaultKinds::ALL,
        },
    ),
];

/// The short budget's own seeds: the same every time, so `make test` is repeatable.
const SHORT_SEEDS: [u64; 2] = [0x5eed_0000_0001_7a11, 0x5eed_0000_0002_b0b5];

const SHORT_BUDGET: Budget = Budget {
    requests: 150,
    faults: 1,
    clients: 6,
    fault_kinds: FaultKinds::ALL,
};

#[test]
fn no_client_behaviour_and_no_fault_gets_metered_work_done_uncounted_or_counted_undone() {
    let config = adversary::Config::from_env(&SHORT_SEEDS, SHORT_BUDGET);
    let mut runs: Vec<(u64, Budget)> = config.seeds.iter().map(|s| (*s, config.budget)).collect();
    if !adversary::Config::seeds_named_by_env() {
        runs.extend_from_slice(KEPT_SEEDS);
    }
    let mut reports = Vec::new();
    for (seed, budget) in runs {
        let report = adversary::run(seed, budget);
        println!("{}", report::run(&report));
        reports.push(report);
    }
    let summary = report::summary(&reports);
    println!("{summary}");
    let failing: Vec<String> = reports
        .iter()
        .filter(|r| !r.verdict.violations.is_empty())
        .map(report::run)
        .collect();
    assert!(
        failing.is_empty(),
        "the ledger invariant does not hold:\n{}\n{summary}",
        failing.join("\n")
    );
}
