//! Settlements: what the end of a metered request means for its count (commit, count or
//! release), and what `settle.lua` records with it.

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
}

impl SettleMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SettleMode::Commit => "commit",
            SettleMode::Count => "count",
            SettleMode::Release => "release",
        }
    }
}

/// One request's settlement: what `settle.lua` needs to count it and record its usage event.
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
    pub request_id: String,
    pub period_id: String,
    /// How long the summary is kept from now (ms): until its period ends plus the retention.
    pub keep_for_ms: u64,
}
