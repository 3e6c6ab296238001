//! The filter's counters, which Envoy exposes as `wasmcustom.plan_limits.*` on its admin
//! `/stats`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Metered requests let through (limited ones after their reservation, or unlimited).
    Allowed,
    /// 429: the monthly limit was reached.
    Denied,
    /// 401, 400, 403, 405, 413: refused before any Redis call (or a streamed body too large).
    Rejected,
    /// Redis did not answer usably and the action is `fail_open`: let through unchecked.
    FailOpen,
    /// Redis did not answer usably, and the user had used what this Envoy knew remained (429).
    FailOpenRefused,
    /// Redis did not answer usably and the action is `fail_closed`: 503.
    FailClosed,
    /// Reservations without a usable answer (either failure mode).
    RedisErrors,
    /// Successes counted in Redis.
    Counted,
    /// Reserved units given back (upstream failure, client gone).
    Released,
    /// Commits that found no reservation (it expired, or a retry already committed it).
    CommitsUnmatched,
    /// Settlement batches that failed.
    SettleErrors,
    /// Settlements given up: the queue overflowed, or a count's outcome was unknown.
    SettlementsDropped,
    /// Reservations of requests still in flight pushed back (slow uploads).
    Extended,
    /// A plan name plans.json does not know, in a token or billing's record.
    UnknownPlan,
    /// Refusals answered once their body was read (held from the upstream meanwhile), for
    /// clients that write a whole body before reading.
    AnsweredAfterBody,
    /// Reports answered (the usage endpoints).
    Reports,
    /// 409: a repeat of a request with an idempotency key (neither forwarded nor counted).
    Duplicates,
}

impl Metric {
    pub const ALL: [Metric; 17] = [
        Metric::Allowed,
        Metric::Denied,
        Metric::Rejected,
        Metric::FailOpen,
        Metric::FailOpenRefused,
        Metric::FailClosed,
        Metric::RedisErrors,
        Metric::Counted,
        Metric::Released,
        Metric::CommitsUnmatched,
        Metric::SettleErrors,
        Metric::SettlementsDropped,
        Metric::Extended,
        Metric::UnknownPlan,
        Metric::AnsweredAfterBody,
        Metric::Reports,
        Metric::Duplicates,
    ];

    /// The name the host defines it under.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Allowed => "plan_limits.allowed",
            Metric::Denied => "plan_limits.denied",
            Metric::Rejected => "plan_limits.rejected",
            Metric::FailOpen => "plan_limits.fail_open",
            Metric::FailOpenRefused => "plan_limits.fail_open_refused",
            Metric::FailClosed => "plan_limits.fail_closed",
            Metric::RedisErrors => "plan_limits.redis_errors",
            Metric::Counted => "plan_limits.counted",
            Metric::Released => "plan_limits.released",
            Metric::CommitsUnmatched => "plan_limits.commits_unmatched",
            Metric::SettleErrors => "plan_limits.settle_errors",
            Metric::SettlementsDropped => "plan_limits.settlements_dropped",
            Metric::Extended => "plan_limits.extended",
            Metric::UnknownPlan => "plan_limits.unknown_plan",
            Metric::AnsweredAfterBody => "plan_limits.answered_after_body",
            Metric::Reports => "plan_limits.reports",
            Metric::Duplicates => "plan_limits.duplicates",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_its_own_name() {
        let mut names: Vec<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Metric::ALL.len());
        assert!(names.iter().all(|n| n.starts_with("plan_limits.")));
    }
}
