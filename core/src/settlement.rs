//! Settlements: what a metered request means for its count (commit, count or release when it
//! ends; extend while it is still in flight), and what `plan_limits_settle` records with it.

use std::rc::Rc;

use crate::config::Gauge;
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
    /// Files were deleted, a member removed: `adds` leaves the user's running total.
    GiveBack,
    /// Settlements of this user and action were given up (`adds` of them; `kind` says why):
    /// recorded as a `lost` event, so what was not counted is on record.
    Lost,
}

impl SettleMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SettleMode::Commit => "commit",
            SettleMode::Count => "count",
            SettleMode::Release => "release",
            SettleMode::Extend => "extend",
            SettleMode::GiveBack => "give_back",
            SettleMode::Lost => "lost",
        }
    }
}

impl Settlement {
    /// The record that `of` (a count or commit, or a give-back) was given up for `reason`.
    pub fn lost(of: &Settlement, reason: &str) -> Self {
        Settlement {
            mode: SettleMode::Lost,
            reservation_id: String::new(),
            kind: reason.to_string(),
            metadata: String::new(),
            in_grace: false,
            bytes: 0,
            idempotency_key: String::new(),
            adds: if of.mode == SettleMode::Lost {
                of.adds
            } else {
                Some(1)
            },
            held: None,
            waiter: None,
            fail_open: false,
            ..of.clone()
        }
    }

    /// Whether losing this settlement loses a count or a give-back (not a release or an
    /// extension, whose reservation expires by itself).
    pub fn loses_a_count(&self) -> bool {
        matches!(
            self.mode,
            SettleMode::Commit | SettleMode::Count | SettleMode::GiveBack | SettleMode::Lost
        )
    }

    /// Whether `other` records a loss of the same user, action, period and reason (so one
    /// record counts both).
    pub fn same_loss(&self, other: &Settlement) -> bool {
        self.user == other.user
            && self.action == other.action
            && self.period_id == other.period_id
            && self.kind == other.kind
    }

    /// A success of a release route: `amount` leaves `user`'s running total of `gauge`
    /// (the bytes a delete freed, one member removed).
    pub fn give_back(
        gauge: Gauge,
        keys: UsageKeys,
        user: &str,
        amount: u64,
        status: u32,
        now: chrono::DateTime<chrono::Utc>,
        request_id: &str,
    ) -> Self {
        let ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        Settlement {
            mode: SettleMode::GiveBack,
            keys,
            reservation_id: String::new(),
            action: gauge.name().to_string(),
            user: user.to_string(),
            plan: String::new(),
            limits_json: Rc::from("{}"),
            kind: String::new(),
            metadata: String::new(),
            in_grace: false,
            bytes: 0,
            status,
            at: crate::period::rfc3339(now, true),
            day: crate::period::date(now),
            request_id: request_id.to_string(),
            idempotency_key: String::new(),
            gauge: Some(gauge),
            adds: Some(amount),
            held: None,
            period_id: String::new(),
            keep_for_ms: 0,
            made_at_ms: ms,
            certain: true,
            waiter: None,
            fail_open: false,
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
    /// What the action records of the request (a JSON object; empty: nothing).
    pub metadata: String,
    /// A success past the limit, in the plan's grace.
    pub in_grace: bool,
    pub bytes: u64,
    pub status: u32,
    /// RFC 3339 time of the upstream's answer.
    pub at: String,
    /// Its UTC day, whose daily counter a count goes to.
    pub day: String,
    pub request_id: String,
    /// The client's idempotency key, if it sent one (empty otherwise).
    pub idempotency_key: String,
    /// The running total its action adds to, if any.
    pub gauge: Option<Gauge>,
    /// What a success adds to it (`GiveBack`: takes off).
    pub adds: Option<u64>,
    /// What its reservation held of it while in flight.
    pub held: Option<u64>,
    pub period_id: String,
    /// How long the summary is kept from now (ms): until its period ends plus the retention.
    pub keep_for_ms: u64,
    /// When it was made (unix ms).
    pub made_at_ms: u64,
    /// The upstream's answer said what happened; `false`: a count of unknown outcome (the
    /// client left, or Envoy gave up waiting, after the whole request was forwarded).
    pub certain: bool,
    /// The stream whose response waits until Redis has applied this (read-your-writes), if
    /// any. Not sent to Redis.
    pub waiter: Option<u32>,
    /// It settles a request let through while Redis was unreachable: once Redis has it, that
    /// pass stops counting against this Envoy's fail-open budget. Not sent to Redis.
    pub fail_open: bool,
}
