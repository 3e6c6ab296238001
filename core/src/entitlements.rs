//! Users' subscriptions as billing recorded them (`plan-limits set-plan`: the plan, and the
//! anchor day their periods run from), remembered per worker from Redis's answers, for the
//! requests that do not wait on Redis: an unlimited action under the token's plan may be
//! limited under billing's, and counts go to the period of billing's anchor. A reservation
//! always reads billing's record itself; an entry here is at most `entitlement_cache_ms` old.

use std::collections::HashMap;

/// What billing recorded for a user (either may be absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    pub plan: Option<String>,
    pub anchor: Option<u32>,
}

impl Recorded {
    fn is_empty(&self) -> bool {
        self.plan.is_none() && self.anchor.is_none()
    }
}

#[derive(Debug, Default)]
pub struct EntitlementCache {
    /// By user: the record, and until when (unix ms) it is trusted.
    entries: HashMap<String, (Recorded, u64)>,
    capacity: usize,
}

impl EntitlementCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// `user`'s record, if known and fresh.
    pub fn get(&self, user: &str, now_ms: u64) -> Option<&Recorded> {
        self.entries
            .get(user)
            .filter(|(_, until)| now_ms < *until)
            .map(|(record, _)| record)
    }

    /// What Redis answered for `user`: its record, or none (the token's plan and anchor apply).
    pub fn learn(&mut self, user: &str, record: Recorded, now_ms: u64, for_ms: u64) {
        if record.is_empty() {
            self.entries.remove(user);
            return;
        }
        if self.capacity == 0 || for_ms == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(user) {
            self.entries.retain(|_, (_, until)| now_ms < *until);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries
            .insert(user.to_string(), (record, now_ms.saturating_add(for_ms)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(name: &str) -> Recorded {
        Recorded {
            plan: Some(name.into()),
            anchor: None,
        }
    }

    #[test]
    fn a_record_is_trusted_for_its_time() {
        let mut cache = EntitlementCache::new(10);
        cache.learn("u", plan("professional"), 1000, 5000);
        assert_eq!(cache.get("u", 5999), Some(&plan("professional")));
        assert_eq!(cache.get("u", 6000), None);
        assert_eq!(cache.get("v", 1000), None);
        let anchored = Recorded {
            plan: None,
            anchor: Some(15),
        };
        cache.learn("w", anchored.clone(), 0, 10);
        assert_eq!(cache.get("w", 1), Some(&anchored));
    }

    #[test]
    fn no_record_forgets_and_a_full_cache_makes_room() {
        let mut cache = EntitlementCache::new(2);
        cache.learn("u", plan("pro"), 0, 10);
        cache.learn("u", Recorded::default(), 1, 10);
        assert_eq!(cache.get("u", 2), None);
        cache.learn("a", plan("pro"), 0, 10);
        cache.learn("b", plan("pro"), 0, 10);
        cache.learn("c", plan("pro"), 20, 10);
        assert_eq!(cache.get("c", 21), Some(&plan("pro")));
        cache.learn("d", plan("pro"), 0, 0);
        assert_eq!(cache.get("d", 0), None, "0 turns it off");
    }
}
