//! What became of a request at the upstream, as Envoy tells it: an answer from the upstream
//! itself, or Envoy's own reply when there was none (a timeout, a reset, no upstream at all).
//! A success is counted, a failure is not; when the upstream may have done the work without
//! answering, the action's `on_client_abort` decides, as for a client that left.

/// Envoy's `response.code_details` of an answer the upstream gave itself.
pub const VIA_UPSTREAM: &str = "via_upstream";

/// Where a response came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The upstream answered with this status.
    Upstream(u32),
    /// Envoy answered: the request never reached an upstream (no connection, no healthy
    /// host, a pool overflow, a filter's own refusal).
    NeverSent,
    /// Envoy answered after the request reached the upstream (a timeout, a reset): the
    /// upstream may or may not have done the work.
    Unknown,
}

/// The answer a response with `status` and Envoy's `details` (its `response.code_details`;
/// `None`: the host does not say, so the status is taken as the upstream's) stands for.
pub fn classify(status: u32, details: Option<&str>) -> Answer {
    let Some(details) = details.filter(|d| *d != VIA_UPSTREAM) else {
        return Answer::Upstream(status);
    };
    // e.g. `upstream_reset_before_response_started{remote_connection_failure|...}`,
    // `{overflow}`, `no_healthy_upstream`: nothing reached an upstream.
    let never_sent = [
        "connection_failure",
        "overflow",
        "no_healthy_upstream",
        "cluster_not_found",
    ];
    // e.g. `response_timeout`, `upstream_per_try_timeout`,
    // `upstream_reset_before_response_started{connection_termination}`.
    let reached = details.contains("upstream") || details.contains("timeout");
    if never_sent.iter().any(|n| details.contains(n)) || !reached {
        Answer::NeverSent
    } else {
        Answer::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoys_details_tell_whether_the_upstream_answered_or_may_have_done_the_work() {
        let cases = [
            (200, Some("via_upstream"), Answer::Upstream(200)),
            (503, Some("via_upstream"), Answer::Upstream(503)),
            (503, None, Answer::Upstream(503)),
            // Seen from Envoy 1.40 (a route timeout, a socket closed without an answer, a
            // per-try timeout): the request reached the upstream.
            (504, Some("response_timeout"), Answer::Unknown),
            (
                503,
                Some("upstream_reset_before_response_started{connection_termination}"),
                Answer::Unknown,
            ),
            (504, Some("upstream_per_try_timeout"), Answer::Unknown),
            // Nothing reached an upstream.
            (
                503,
                Some("upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"),
                Answer::NeverSent,
            ),
            (
                503,
                Some("upstream_reset_before_response_started{overflow}"),
                Answer::NeverSent,
            ),
            (503, Some("no_healthy_upstream"), Answer::NeverSent),
            (404, Some("route_not_found"), Answer::NeverSent),
            (403, Some("ext_authz_denied"), Answer::NeverSent),
        ];
        for (status, details, expected) in cases {
            assert_eq!(classify(status, details), expected, "{details:?}");
        }
    }
}
