//! The filter's counters, which Envoy exposes as `wasmcustom.plan_limits.*` on its admin
//! `/stats`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Metered requests let through (limited ones after their reservation, or unlimited).
    Allowed,
    /// 429: the monthly limit was reached.
    Denied,
    /// 429: the user's requests came faster than the plan's request rate (and usage reads
    /// past a worker's reads in flight: 503).
    RateLimited,
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
    /// Settlements given up: the queue overflowed, or Redis could not be reached for longer
    /// than it remembers batches (a day). Each lost count is recorded as a `lost` event.
    SettlementsDropped,
    /// Settlements Redis refused to apply (a value out of range), each recorded there as a
    /// `settle_refused` event.
    SettlementsRefused,
    /// An upstream's answer said what it gave back in a value that is not a count (negative,
    /// not a number, past 2^53): nothing is given back for it.
    UpstreamValuesRefused,
    /// Reservations of requests still in flight pushed back (slow uploads).
    Extended,
    /// Limited requests admitted from a lease's units (`redis.lease_units`), without a
    /// reservation call of their own.
    Leased,
    /// Successes answered before Redis acknowledged their count (it did not answer within
    /// four `timeout_ms`): their client's next request may see them in flight.
    CommitsNotAwaited,
    /// A plan name plans.json does not know, in a token or billing's record.
    UnknownPlan,
    /// Refusals answered once their body was read (held from the upstream meanwhile), for
    /// clients that write a whole body before reading.
    AnsweredAfterBody,
    /// Reports answered (the usage endpoints).
    Reports,
    /// 409: a repeat of a request with an idempotency key (neither forwarded nor counted).
    Duplicates,
    /// Verified tokens whose payload Envoy could not hand over whole (a claim it has no
    /// encoding for, such as a null): their claims were read one host call each.
    ClaimsOneByOne,
}

impl Metric {
    pub const ALL: [Metric; 23] = [
        Metric::Allowed,
        Metric::Denied,
        Metric::RateLimited,
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
        Metric::SettlementsRefused,
        Metric::UpstreamValuesRefused,
        Metric::Extended,
        Metric::Leased,
        Metric::CommitsNotAwaited,
        Metric::UnknownPlan,
        Metric::AnsweredAfterBody,
        Metric::Reports,
        Metric::Duplicates,
        Metric::ClaimsOneByOne,
    ];

    /// The name the host defines it under.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Allowed => "plan_limits.allowed",
            Metric::Denied => "plan_limits.denied",
            Metric::RateLimited => "plan_limits.rate_limited",
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
            Metric::SettlementsRefused => "plan_limits.settlements_refused",
            Metric::UpstreamValuesRefused => "plan_limits.upstream_values_refused",
            Metric::Extended => "plan_limits.extended",
            Metric::Leased => "plan_limits.leased",
            Metric::CommitsNotAwaited => "plan_limits.commits_not_awaited",
            Metric::UnknownPlan => "plan_limits.unknown_plan",
            Metric::AnsweredAfterBody => "plan_limits.answered_after_body",
            Metric::Reports => "plan_limits.reports",
            Metric::Duplicates => "plan_limits.duplicates",
            Metric::ClaimsOneByOne => "plan_limits.claims_one_by_one",
        }
    }
}

/// What became of a metered request, as its labeled counter says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    /// 429 from the plan's request rate (spike arrest), before any Redis call.
    RateLimited,
    Rejected,
    Duplicate,
    FailOpen,
    FailOpenRefused,
    FailClosed,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Allowed,
        Outcome::Denied,
        Outcome::RateLimited,
        Outcome::Rejected,
        Outcome::Duplicate,
        Outcome::FailOpen,
        Outcome::FailOpenRefused,
        Outcome::FailClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::Rejected => "rejected",
            Outcome::Duplicate => "duplicate",
            Outcome::FailOpen => "fail_open",
            Outcome::FailOpenRefused => "fail_open_refused",
            Outcome::FailClosed => "fail_closed",
        }
    }

    /// The unlabeled counter it also adds to.
    pub fn metric(self) -> Metric {
        match self {
            Outcome::Allowed => Metric::Allowed,
            Outcome::Denied => Metric::Denied,
            Outcome::RateLimited => Metric::RateLimited,
            Outcome::Rejected => Metric::Rejected,
            Outcome::Duplicate => Metric::Duplicates,
            Outcome::FailOpen => Metric::FailOpen,
            Outcome::FailOpenRefused => Metric::FailOpenRefused,
            Outcome::FailClosed => Metric::FailClosed,
        }
    }
}

/// The Redis calls whose round trip is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Reserve,
    Settle,
    Report,
}

impl Call {
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Reserve => "reserve",
            Call::Settle => "settle",
            Call::Report => "report",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Only grows.
    Counter,
    /// Moves both ways: recorded as a change (each worker adds its own share).
    Gauge,
    /// Each value recorded is one observation.
    Histogram,
}

/// A metric with labels. Its name carries them in the tag syntax Envoy's `stats_tags`
/// extract (`<label>=.=<value>;.;`, the metric's own name last, as Istio's stats do), so that
/// `/stats/prometheus` shows `plan_limits_requests{action="upload",plan="free",...}`. Labels
/// name actions, plans and outcomes, never a user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabeledMetric {
    pub kind: MetricKind,
    pub name: String,
}

/// The labels Envoy must extract (rendered into envoy.yaml's `stats_config`).
pub const LABELS: [&str; 4] = ["action", "plan", "outcome", "call"];

fn labeled(kind: MetricKind, labels: &[(&str, &str)], name: &str) -> LabeledMetric {
    let mut out = String::new();
    for (label, value) in labels {
        out.push_str(label);
        out.push_str("=.=");
        // Only what a tag value may hold: a plan or action name is the operator's string.
        out.extend(value.chars().map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' => c,
            _ => '_',
        }));
        out.push_str(";.;");
    }
    out.push_str(name);
    LabeledMetric { kind, name: out }
}

/// Metered requests by action, plan in force and outcome.
pub fn requests(action: &str, plan: &str, outcome: Outcome) -> LabeledMetric {
    labeled(
        MetricKind::Counter,
        &[
            ("action", action),
            ("plan", plan),
            ("outcome", outcome.as_str()),
        ],
        "plan_limits_requests",
    )
}

/// One action's and plan's `requests` counters, one per outcome: named once when plans.json
/// is compiled, not on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeMetrics(Vec<LabeledMetric>);

impl OutcomeMetrics {
    pub fn new(action: &str, plan: &str) -> Self {
        Self(
            Outcome::ALL
                .iter()
                .map(|&outcome| requests(action, plan, outcome))
                .collect(),
        )
    }

    pub fn get(&self, outcome: Outcome) -> Option<&LabeledMetric> {
        let i = Outcome::ALL.iter().position(|&o| o == outcome)?;
        self.0.get(i)
    }
}

/// Successes counted in Redis, by action and plan.
pub fn counted(action: &str, plan: &str) -> LabeledMetric {
    labeled(
        MetricKind::Counter,
        &[("action", action), ("plan", plan)],
        "plan_limits_successes_counted",
    )
}

/// A Redis call's round trip, in microseconds.
pub fn redis_round_trip(call: Call) -> LabeledMetric {
    labeled(
        MetricKind::Histogram,
        &[("call", call.as_str())],
        "plan_limits_redis_round_trip_us",
    )
}

/// Settlements queued, not yet sent (each worker adds its own).
pub fn settlements_queued() -> LabeledMetric {
    labeled(MetricKind::Gauge, &[], "plan_limits_settlements_queued")
}

/// Workers of this Envoy whose last call to Redis got nothing usable (each adds its own 1):
/// above 0 for long is an outage (limits enforced only within fail-open's bounds).
pub fn redis_unreachable() -> LabeledMetric {
    labeled(MetricKind::Gauge, &[], "plan_limits_redis_unreachable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_in_envoys_tag_syntax_and_values_cannot_break_it() {
        assert_eq!(
            requests("upload", "free", Outcome::Denied).name,
            "action=.=upload;.;plan=.=free;.;outcome=.=denied;.;plan_limits_requests"
        );
        assert_eq!(
            counted("upload", "pro;.;x=.=y").name,
            "action=.=upload;.;plan=.=pro___x___y;.;plan_limits_successes_counted"
        );
        assert_eq!(settlements_queued().name, "plan_limits_settlements_queued");
    }

    #[test]
    fn every_metric_has_its_own_name() {
        let mut names: Vec<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Metric::ALL.len());
        assert!(names.iter().all(|n| n.starts_with("plan_limits.")));
    }
}
