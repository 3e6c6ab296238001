//! Recent refusals, remembered per worker so a user past the limit is answered 429 without
//! asking Redis each time. Only final refusals are kept (the committed count alone reached the
//! limit, so no release can free a unit this period), and only for `deny_cache_ms`, so a plan
//! change or an admin reset takes effect within that time.

use std::collections::HashMap;

use crate::responses::LocalResponse;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub period_id: String,
    pub limit: u64,
    /// The 429 given, answered again as it was (but for `Retry-After`).
    pub response: LocalResponse,
    /// Unix milliseconds after which Redis is asked again.
    pub until_ms: u64,
}

#[derive(Debug, Default)]
pub struct DenialCache {
    entries: HashMap<(String, String), Denial>,
    capacity: usize,
}

impl DenialCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// A refusal still valid for `user`'s `action` in `period_id` under `limit`.
    pub fn get(
        &self,
        user: &str,
        action: &str,
        period_id: &str,
        limit: u64,
        now_ms: u64,
    ) -> Option<&Denial> {
        self.entries
            .get(&(user.to_string(), action.to_string()))
            .filter(|d| d.period_id == period_id && d.limit == limit && now_ms < d.until_ms)
    }

    pub fn remember(&mut self, user: &str, action: &str, denial: Denial, now_ms: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, d| now_ms < d.until_ms);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries
            .insert((user.to_string(), action.to_string()), denial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(until_ms: u64) -> Denial {
        Denial {
            period_id: "2026-11".into(),
            limit: 5,
            response: LocalResponse {
                status: 429,
                headers: Vec::new(),
                body: String::new(),
            },
            until_ms,
        }
    }

    #[test]
    fn a_denial_holds_until_it_expires_for_the_same_period_and_limit() {
        let mut cache = DenialCache::new(10);
        cache.remember("u", "upload", denial(2000), 1000);
        assert!(cache.get("u", "upload", "2026-11", 5, 1999).is_some());
        assert!(
            cache.get("u", "upload", "2026-11", 5, 2000).is_none(),
            "expired"
        );
        assert!(
            cache.get("u", "upload", "2026-12", 5, 1500).is_none(),
            "a new month"
        );
        assert!(
            cache.get("u", "upload", "2026-11", 100, 1500).is_none(),
            "another plan's limit"
        );
        assert!(cache.get("v", "upload", "2026-11", 5, 1500).is_none());
    }

    #[test]
    fn a_full_cache_makes_room() {
        let mut cache = DenialCache::new(2);
        cache.remember("a", "x", denial(10), 0);
        cache.remember("b", "x", denial(10), 0);
        cache.remember("c", "x", denial(10), 20);
        assert!(cache.get("c", "x", "2026-11", 5, 5).is_some());
        assert_eq!(cache.entries.len(), 1);
    }
}
