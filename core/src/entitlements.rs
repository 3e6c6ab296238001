//! Users' plans as billing recorded them (`plan-limits set-plan`), remembered per worker from
//! Redis's answers, for the requests that do not wait on Redis: an unlimited action under the
//! token's plan may be limited under billing's. A reservation always reads billing's record
//! itself; an entry here is at most `entitlement_cache_ms` old.

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct EntitlementCache {
    /// By user: the plan, and until when (unix ms) it is trusted.
    entries: HashMap<String, (String, u64)>,
    capacity: usize,
}

impl EntitlementCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// `user`'s recorded plan, if known and fresh.
    pub fn get(&self, user: &str, now_ms: u64) -> Option<&str> {
        self.entries
            .get(user)
            .filter(|(_, until)| now_ms < *until)
            .map(|(plan, _)| plan.as_str())
    }

    /// What Redis answered for `user`: a recorded plan, or none (the token's plan applies).
    pub fn learn(&mut self, user: &str, plan: Option<&str>, now_ms: u64, for_ms: u64) {
        let Some(plan) = plan else {
            self.entries.remove(user);
            return;
        };
        if self.capacity == 0 || for_ms == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(user) {
            self.entries.retain(|_, (_, until)| now_ms < *until);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries.insert(
            user.to_string(),
            (plan.to_string(), now_ms.saturating_add(for_ms)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_plan_is_trusted_for_its_time() {
        let mut cache = EntitlementCache::new(10);
        cache.learn("u", Some("professional"), 1000, 5000);
        assert_eq!(cache.get("u", 5999), Some("professional"));
        assert_eq!(cache.get("u", 6000), None);
        assert_eq!(cache.get("v", 1000), None);
    }

    #[test]
    fn no_record_forgets_and_a_full_cache_makes_room() {
        let mut cache = EntitlementCache::new(2);
        cache.learn("u", Some("pro"), 0, 10);
        cache.learn("u", None, 1, 10);
        assert_eq!(cache.get("u", 2), None);
        cache.learn("a", Some("pro"), 0, 10);
        cache.learn("b", Some("pro"), 0, 10);
        cache.learn("c", Some("pro"), 20, 10);
        assert_eq!(cache.get("c", 21), Some("pro"));
        cache.learn("d", Some("pro"), 0, 0);
        assert_eq!(cache.get("d", 0), None, "0 turns it off");
    }
}
