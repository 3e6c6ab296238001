//! While Redis is unreachable, a fail-open action lets a user through at most what this Envoy
//! last knew remained of the allowance, plus `fail_open_allowance`. What remains is known
//! across the Envoy's workers through proxy-wasm shared data: each reservation's answer
//! writes it, each request let through unchecked spends from it.

use crate::keys::encoded_user;

/// The shared-data key of `user`'s budget for `action` (one per user and action: the value
/// names its period, so a new period starts afresh).
pub fn key(prefix: &str, user: &str, action: &str) -> String {
    format!("{prefix}:outage:{{{}}}:{action}", encoded_user(user))
}

/// What this Envoy knows of a user's allowance for an action in a period.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Budget {
    pub period_id: String,
    /// Units left when Redis last answered.
    pub remaining: u64,
    /// Requests let through unchecked since.
    pub spent: u64,
}

impl Budget {
    pub fn encode(&self) -> Vec<u8> {
        format!("{} {} {}", self.period_id, self.remaining, self.spent).into_bytes()
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
        let mut parts = text.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(period), Some(remaining), Some(spent), None) if period == period_id => {
                match (remaining.parse(), spent.parse()) {
                    (Ok(remaining), Ok(spent)) => Budget {
                        period_id: period_id.to_string(),
                        remaining,
                        spent,
                    },
                    _ => fresh(),
                }
            }
            _ => fresh(),
        }
    }

    /// One more request may pass unchecked.
    pub fn may_spend(&self, allowance: u64) -> bool {
        self.spent < self.remaining.saturating_add(allowance)
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
            spent: 0,
        };
        let mut passed = 0;
        while b.may_spend(1) {
            b.spent += 1;
            passed += 1;
        }
        assert_eq!(passed, 3);
        assert!(
            !Budget::default().may_spend(0),
            "nothing known, no allowance"
        );
    }

    #[test]
    fn keys_are_per_user_and_action() {
        assert_eq!(key("p", "a b", "upload"), "p:outage:{a%20b}:upload");
    }
}
