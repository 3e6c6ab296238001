//! What a run did and found, printed for a person: the faults, what the clients saw, the
//! numbers per user and action, every violation with the seed and the commands that reproduce
//! it, and over all runs what was covered.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::plan::{Budget, FaultKind};
use super::RunReport;

/// The two commands that run `seed` again with the same budget.
pub fn reproduce(seed: u64, budget: Budget) -> String {
    let kinds = budget.fault_kinds.keys();
    format!(
        "ADVERSARY_SEEDS={seed} ADVERSARY_REQUESTS={r} ADVERSARY_FAULTS={f} ADVERSARY_CLIENTS={c} \
         ADVERSARY_FAULT_KINDS={kinds} cargo test -p plan-limits-tests --test adversary -- \
         --nocapture\n\
         make adversary SEEDS={seed} REQUESTS={r} FAULTS={f} CLIENTS={c} FAULT_KINDS={kinds}",
        r = budget.requests,
        f = budget.faults,
        c = budget.clients,
    )
}

fn counts<K: std::fmt::Display>(map: &BTreeMap<K, usize>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One run, as printed after it.
pub fn run(report: &RunReport) -> String {
    let mut out = String::new();
    let b = report.budget;
    let _ = writeln!(
        out,
        "== adversary seed {} ({} requests in {} steps, {} clients, {} fault(s)): {:.1} s",
        report.seed,
        report.tally.requests,
        report.steps,
        b.clients,
        report.faults.struck.len(),
        report.took.as_secs_f64()
    );
    for (kind, at, what) in &report.faults.struck {
        let _ = writeln!(
            out,
            "   fault at {:.1} s: {} ({what})",
            at.as_secs_f64(),
            kind.name()
        );
    }
    let _ = writeln!(out, "   clients saw: {}", counts(&report.tally.seen));
    let _ = writeln!(
        out,
        "   quiet after {:.1} s{}",
        report.quiet.waited.as_secs_f64(),
        if report.quiet.reached {
            String::new()
        } else {
            format!(" (NOT reached, still moving: {:?})", report.quiet.last)
        }
    );
    let metrics: Vec<String> = report
        .metrics
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        out,
        "   filter metrics (last Envoy): {}",
        metrics.join(", ")
    );
    let _ = writeln!(
        out,
        "   {:<24} {:>5} {:>7} {:>6} {:>8} {:>13} {:>5} {:>7} {:>6}",
        "user/action",
        "done",
        "counted",
        "events",
        "unknown",
        "unknown/!done",
        "lost",
        "expired",
        "limit"
    );
    for row in &report.verdict.rows {
        let _ = writeln!(
            out,
            "   {:<24} {:>5} {:>7} {:>6} {:>8} {:>13} {:>5} {:>7} {:>6}",
            format!("{}/{}", row.user, row.action),
            row.done,
            row.counted,
            row.usage_events,
            row.unknown_events,
            row.unknown_not_done,
            row.lost,
            row.expired,
            row.limit.map_or("-".to_string(), |l| l.to_string()),
        );
    }
    for note in &report.verdict.notes {
        let _ = writeln!(out, "   note: {note}");
    }
    let violations = &report.verdict.violations;
    if !violations.is_empty() {
        let _ = writeln!(out, "   VIOLATIONS ({}):", violations.len());
        for v in violations {
            let _ = writeln!(
                out,
                "   ({}) user {:?}, action {}: {}",
                v.invariant, v.user, v.action, v.detail
            );
        }
        let _ = writeln!(out, "   reproduce with:");
        for line in reproduce(report.seed, b).lines() {
            let _ = writeln!(out, "     {line}");
        }
        let _ = writeln!(
            out,
            "   Envoy's, Redis's and webdis's logs: {}",
            report.dir.display()
        );
    }
    out
}

/// Every run together: seeds, requests, what was covered, and what was found.
pub fn summary(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let mut behaviours: BTreeMap<&str, usize> = BTreeMap::new();
    let mut hostile: BTreeMap<&str, usize> = BTreeMap::new();
    let mut answers: BTreeMap<&str, usize> = BTreeMap::new();
    let mut faults: BTreeMap<FaultKind, usize> = BTreeMap::new();
    let mut requests = 0;
    let mut seconds = 0.0;
    for r in reports {
        requests += r.tally.requests;
        seconds += r.took.as_secs_f64();
        for (k, v) in &r.tally.behaviours {
            *behaviours.entry(k).or_default() += v;
        }
        for (k, v) in &r.tally.hostile {
            *hostile.entry(k).or_default() += v;
        }
        for (k, v) in &r.tally.answers {
            *answers.entry(k).or_default() += v;
        }
        for (kind, _, _) in &r.faults.struck {
            *faults.entry(*kind).or_default() += 1;
        }
    }
    let seeds: Vec<String> = reports.iter().map(|r| r.seed.to_string()).collect();
    let _ = writeln!(
        out,
        "== adversary: {} seed(s), {requests} requests, {seconds:.0} s",
        reports.len()
    );
    let _ = writeln!(out, "   seeds: {}", seeds.join(","));
    let _ = writeln!(out, "   client behaviours: {}", counts(&behaviours));
    let _ = writeln!(out, "   hostile headers: {}", counts(&hostile));
    let _ = writeln!(out, "   upstream answers: {}", counts(&answers));
    let fault_names: BTreeMap<&str, usize> = faults.iter().map(|(k, v)| (k.name(), *v)).collect();
    let _ = writeln!(out, "   faults: {}", counts(&fault_names));
    let rows = reports.iter().flat_map(|r| &r.verdict.rows);
    let (unknown, unknown_not_done) = rows.fold((0, 0), |(u, n), row| {
        (u + row.unknown_events, n + row.unknown_not_done)
    });
    let _ = writeln!(
        out,
        "   counted with outcome unknown: {unknown}, of which the upstream did not do \
         {unknown_not_done} (allowed, listed in each run's notes)"
    );
    let failing: Vec<&RunReport> = reports
        .iter()
        .filter(|r| !r.verdict.violations.is_empty())
        .collect();
    if failing.is_empty() {
        let _ = writeln!(out, "   no violation");
    }
    for r in failing {
        let _ = writeln!(
            out,
            "   seed {}: {} violation(s); reproduce: {}",
            r.seed,
            r.verdict.violations.len(),
            reproduce(r.seed, r.budget).lines().next().unwrap_or("")
        );
    }
    out
}
