//! Settlements: what a metered request means for its count (commit, count or release when it
//! ends; extend while it is still in flight), and what `plan_limits_settle` records with it.

use std::rc::Rc;

use crate::keys::UsageKeys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleMode {
    /// The upstream succeeded: the held reservation becomes a count.
    Commit,
    /// A success with nothing reserved (unlimited plan, or Redis was unreachable): count it.
    Count,
    /// The upstream failed or the client left: give the reserved unit back.
    Release,
    /// The request is still in flight: its reservation keeps holding its unit.
    Extend,
}

impl SettleMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SettleMode::Commit => "commit",
            SettleMode::Count => "count",
            SettleMode::Release => "release",
            SettleMode::Extend => "extend",
        }
    }
}

/// One request's settlement: what `plan_limits_settle` needs to count it and record its
/// usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub mode: SettleMode,
    pub keys: UsageKeys,
    pub reservation_id: String,
    pub action: String,
    pub user: String,
    pub plan: String,
    /// The plan's limits when the request was made (JSON object), kept in the summary.
    pub limits_json: Rc<str>,
    pub kind: String,
    pub bytes: u64,
    pub status: u32,
    /// RFC 3339 time of the upstream's answer.
    pub at: String,
    /// Its UTC day, whose daily counter a count goes to.
    pub day: String,
    pub request_id: String,
    /// The client's idempotency key, if it sent one (empty otherwise).
    pub idempotency_key: String,
    pub period_id: String,
    /// How long the summary is kept from now (ms): until its period ends plus the retention.
    pub keep_for_ms: u64,
    /// When it was made (unix ms): a commit is sent again only while Redis remembers commits.
    pub made_at_ms: u64,
}
