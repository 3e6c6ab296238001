//! Redis key names. A user id is percent-encoded before it goes into a key, so no id (with
//! `:`, `*`, `{`, spaces, ...) can name another user's key; the `{...}` hash tag keeps one
//! user's keys in one Redis Cluster slot.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::Gauge;

/// Everything but letters, digits, `-` and `_` is encoded (this also removes `{`, `}` and `:`).
const KEY_SAFE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageKeys {
    /// Hash: one counter per action (the committed count), the plan and its limits at the
    /// time of the last count: the monthly summary.
    pub summary: String,
    /// Sorted set per action: reservations in flight, scored by their expiry (ms).
    pub pending: String,
    /// Sorted set per action: recently committed reservation ids, so a commit sent twice
    /// counts once.
    pub commits: String,
    /// Hash: the user's entitlement as billing recorded it (`plan`), over any claim.
    pub entitlement: String,
    /// The user's own keys, for the ones named by day.
    pub user: UserKeys,
}

impl UsageKeys {
    pub fn new(prefix: &str, user: &str, period_id: &str, action: &str) -> Self {
        let user = UserKeys::new(prefix, user);
        Self {
            summary: user.summary(period_id),
            pending: user.pending(period_id, action),
            commits: format!("{}:{period_id}:commits:{action}", user.base),
            entitlement: user.entitlement(),
            user,
        }
    }
}

/// One user's keys: `<prefix>:{<encoded user>}:...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKeys {
    base: String,
}

impl UserKeys {
    pub fn new(prefix: &str, user: &str) -> Self {
        let user = utf8_percent_encode(user, KEY_SAFE);
        Self {
            base: format!("{prefix}:{{{user}}}"),
        }
    }

    /// Hash: the period's counters, plan and limits.
    pub fn summary(&self, period_id: &str) -> String {
        format!("{}:{period_id}", self.base)
    }

    /// Sorted set: the action's reservations in flight this period.
    pub fn pending(&self, period_id: &str, action: &str) -> String {
        format!("{}:{period_id}:pending:{action}", self.base)
    }

    /// Hash: one day's counters (`2026-11-29`), per action.
    pub fn day(&self, date: &str) -> String {
        format!("{}:day:{date}", self.base)
    }

    pub fn entitlement(&self) -> String {
        format!("{}:entitlement", self.base)
    }

    /// String: the user's running total of `gauge` (bytes stored, members invited).
    pub fn gauge(&self, gauge: Gauge) -> String {
        format!("{}:{}", self.base, gauge.name())
    }

    /// Sorted set: what requests in flight hold of `gauge` (`<reservation id>|<amount>`, by
    /// expiry).
    pub fn gauge_held(&self, gauge: Gauge) -> String {
        format!("{}:{}:held", self.base, gauge.name())
    }

    /// Sorted set: the markers of the idempotency keys the user has remembered, by expiry.
    pub fn idempotency_index(&self) -> String {
        format!("{}:idem", self.base)
    }

    /// String: the marker of a request sent with idempotency key `key` for `action`.
    pub fn idempotency(&self, action: &str, key: &str) -> String {
        let key = utf8_percent_encode(key, KEY_SAFE);
        format!("{}:idem:{action}:{key}", self.base)
    }
}

/// String: the sequence number of the last settlement batch Redis applied for the worker
/// `worker` (one per worker; on a Redis Cluster one per worker and slot, named with `tag`, a
/// hash tag of the slot).
pub fn applied_batches(prefix: &str, worker: &str, tag: Option<u32>) -> String {
    match tag {
        None => format!("{prefix}:applied:{worker}"),
        Some(tag) => format!("{prefix}:applied:{worker}:{{{tag}}}"),
    }
}

/// The user's entitlement record (not per period).
pub fn entitlement_key(prefix: &str, user: impl std::fmt::Display) -> String {
    format!("{prefix}:{{{user}}}:entitlement")
}

/// `user` as it stands in keys.
pub fn encoded_user(user: &str) -> String {
    utf8_percent_encode(user, KEY_SAFE).to_string()
}

/// A user's key taken apart: the user (decoded) and what follows the user's `{...}:` (`2026-11`,
/// `day:2026-11-27`, `2026-11:pending:upload`, `storage`, ...); `None` for another key.
pub fn user_key_parts<'k>(prefix: &str, key: &'k str) -> Option<(String, &'k str)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(":{")?;
    let (user, rest) = rest.split_once("}:")?;
    let user = percent_encoding::percent_decode_str(user)
        .decode_utf8()
        .ok()?
        .into_owned();
    Some((user, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_user_period_and_action() {
        let keys = UsageKeys::new("plan-limits", "u1", "2026-11", "upload");
        assert_eq!(keys.summary, "plan-limits:{u1}:2026-11");
        assert_eq!(keys.pending, "plan-limits:{u1}:2026-11:pending:upload");
        assert_eq!(keys.commits, "plan-limits:{u1}:2026-11:commits:upload");
        assert_eq!(keys.entitlement, "plan-limits:{u1}:entitlement");
        assert_eq!(
            keys.user.day("2026-11-29"),
            "plan-limits:{u1}:day:2026-11-29"
        );
        assert_eq!(
            entitlement_key("p", encoded_user("a b")),
            "p:{a%20b}:entitlement"
        );
    }

    #[test]
    fn separators_in_user_ids_cannot_reach_other_keys() {
        let keys = UsageKeys::new("p", "a}:2026-11:x{*", "2026-11", "upload");
        assert_eq!(keys.summary, "p:{a%7D%3A2026-11%3Ax%7B%2A}:2026-11");
    }

    #[test]
    fn a_users_key_is_taken_apart_into_the_user_and_the_rest() {
        let keys = UsageKeys::new("p", "a}:b c", "2026-11", "upload");
        assert_eq!(
            user_key_parts("p", &keys.pending),
            Some(("a}:b c".to_string(), "2026-11:pending:upload"))
        );
        assert_eq!(user_key_parts("p", "p:events"), None);
        assert_eq!(user_key_parts("q", &keys.summary), None);
    }

    proptest::proptest! {
        #[test]
        fn a_users_keys_name_the_user_back(user in ".{0,16}") {
            let keys = UsageKeys::new("p", &user, "2026-11", "upload");
            let parts = user_key_parts("p", &keys.summary);
            proptest::prop_assert_eq!(parts, Some((user, "2026-11")));
        }

        #[test]
        fn distinct_users_never_share_a_key(a in ".{0,16}", b in ".{0,16}") {
            proptest::prop_assume!(a != b);
            let ka = UsageKeys::new("p", &a, "2026-11", "upload");
            let kb = UsageKeys::new("p", &b, "2026-11", "upload");
            proptest::prop_assert_ne!(&ka.summary, &kb.summary);
            proptest::prop_assert_ne!(&ka.pending, &kb.pending);
            // The user part is one hash tag with no braces or separators inside.
            let inner = &ka.summary["p:{".len()..ka.summary.len() - "}:2026-11".len()];
            let clean = !inner.contains(['{', '}', ':']);
            proptest::prop_assert!(clean, "user part {}", inner);
        }
    }
}
