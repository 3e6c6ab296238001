//! While Redis is unreachable, a fail-open action lets a user through at most what this Envoy
//! last knew remained of the allowance, plus `fail_open_allowance` once per period: what
//! outages let through beyond the limit is counted when Redis is back, and what a later
//! reservation's answer says was used beyond the limit is taken from the allowance, so a
//! user who causes (or waits for) outage after outage gets it once. What remains is known
//! across the Envoy's workers through proxy-wasm shared data: each reservation's answer writes
//! it, each request let through unchecked spends from it.

use crate::keys::encoded_user;

/// The shared-data key of `user`'s budget for `action` (one per user and action: the value
/// names its period, so a new period starts afresh). Reservations' answers write it.
pub fn key(prefix: &str, user: &str, action: &str) -> String {
    format!("{prefix}:outage:{{{}}}:{action}", encoded_user(user))
}

/// The shared-data key of `user`'s fail-open passes for `action` that Redis does not have yet
/// (`<period> <n>`): each pass adds one, its settlement's answer takes it off. A reservation's
/// answer cannot know of them, so they count against the budget on top of what it says.
pub fn unsettled_key(prefix: &str, user: &str, action: &str) -> String {
    format!("{}:unsettled", key(prefix, user, action))
}

/// The passes `value` (an `unsettled_key`'s) holds for `period_id` (0 for another period).
pub fn decode_unsettled(value: Option<&[u8]>, period_id: &str) -> u64 {
    let text = value
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("");
    match text.split_once(' ') {
        Some((period, n)) if period == period_id => n.parse().unwrap_or(0),
        _ => 0,
    }
}

pub fn encode_unsettled(period_id: &str, n: u64) -> Vec<u8> {
    format!("{period_id} {n}").into_bytes()
}

/// What this Envoy knows of a user's allowance for an action in a period.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Budget {
    pub period_id: String,
    /// Units left when Redis last answered.
    pub remaining: u64,
    /// Units used beyond the limit this period when Redis last answered (what earlier outages
    /// let through): taken from the allowance.
    pub overshoot: u64,
    /// Requests let through unchecked since.
    pub spent: u64,
}

impl Budget {
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{} {} {} {}",
            self.period_id, self.remaining, self.overshoot, self.spent
        )
        .into_bytes()
    }

    /// The budget stored for `period_id`; nothing known (zero left) for another period or
    /// an unreadable value.
    pub fn decode(bytes: Option<&[u8]>, period_id: &str) -> Budget {
        let fresh = || Budget {
            period_id: period_id.to_string(),
            ..Budget::default()
        };
        let Some(text) = bytes.and_then(|b| std::str::from_utf8(b).ok()) else {
            return fresh();
        };
        let parts: Vec<&str> = text.split(' ').collect();
        let number = |i: usize| parts.get(i).and_then(|n| n.parse::<u64>().ok());
        match (parts.as_slice(), number(1), number(2), number(3)) {
            ([period, _, _, _], Some(remaining), Some(overshoot), Some(spent))
                if *period == period_id =>
            {
                Budget {
                    period_id: period_id.to_string(),
                    remaining,
                    overshoot,
                    spent,
                }
            }
            _ => fresh(),
        }
    }

    /// One more request may pass unchecked, `unsettled` passes of this Envoy's being still
    /// unknown to Redis: what remained, plus what is left of the period's allowance.
    pub fn may_spend(&self, allowance: u64, unsettled: u64) -> bool {
        let allowance_left = allowance.saturating_sub(self.overshoot);
        self.spent.max(unsettled) < self.remaining.saturating_add(allowance_left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_round_trips_and_belongs_to_its_period() {
        let b = Budget {
            period_id: "2026-11".into(),
            remaining: 2,
            overshoot: 1,
            spent: 1,
        };
        assert_eq!(Budget::decode(Some(&b.encode()), "2026-11"), b);
        assert_eq!(Budget::decode(Some(&b.encode()), "2026-12").remaining, 0);
        assert_eq!(Budget::decode(Some(b"junk"), "2026-11").remaining, 0);
        assert_eq!(Budget::decode(None, "2026-11").spent, 0);
    }

    #[test]
    fn what_remains_plus_the_allowance_may_pass() {
        let mut b = Budget {
            period_id: "p".into(),
            remaining: 2,
            overshoot: 0,
            spent: 0,
        };
        let mut passed = 0;
        while b.may_spend(1, passed) {
            b.spent += 1;
            passed += 1;
        }
        assert_eq!(passed, 3);
        // After that outage, Redis counted the one beyond the limit: the next outage lets
        // nothing more through, however often it comes.
        let after = Budget {
            period_id: "p".into(),
            remaining: 0,
            overshoot: 1,
            spent: 0,
        };
        assert!(!after.may_spend(1, 0));
        assert!(after.may_spend(2, 0), "a larger allowance has one left");
        // Redis answered before it had this Envoy's pass: the pass still counts.
        let answered_early = Budget {
            period_id: "p".into(),
            remaining: 0,
            overshoot: 0,
            spent: 0,
        };
        assert!(answered_early.may_spend(1, 0));
        assert!(!answered_early.may_spend(1, 1));
        assert!(
            !Budget::default().may_spend(0, 0),
            "nothing known, no allowance"
        );
    }

    #[test]
    fn keys_are_per_user_and_action() {
        assert_eq!(key("p", "a b", "upload"), "p:outage:{a%20b}:upload");
    }
}
