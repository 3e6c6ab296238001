//! Recent refusals, remembered per worker so a user past the limit is answered 429 without
//! asking Redis each time. Only final refusals are kept (the committed count alone reached the
//! limit, so no release can free a unit this period), and only for `deny_cache_ms`, so a plan
//! change or an admin reset takes effect within that time. A refusal is replayed only to the
//! same user, action, period, plan and limit: never a body made for another plan.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::request::{unix_millis, MeteredRequest};
use crate::responses::{self, LocalResponse};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Denial {
    period_id: String,
    plan: String,
    limit: u64,
    /// The 429 given, answered again as it was (but for `Retry-After`).
    response: LocalResponse,
    /// Unix milliseconds after which Redis is asked again.
    until_ms: u64,
}

#[derive(Debug, Default)]
pub struct DenialCache {
    /// By user and action.
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

    /// The refusal remembered for `request`, if still valid, with its `Retry-After` brought up
    /// to `now`.
    pub fn refusal(&self, request: &MeteredRequest, now: DateTime<Utc>) -> Option<LocalResponse> {
        let limit = request.limit()?;
        let key = (request.user().to_string(), request.action().key.clone());
        let denial = self.entries.get(&key).filter(|d| {
            d.period_id == request.period().id
                && d.plan == request.plan().key
                && d.limit == limit
                && unix_millis(now) < d.until_ms
        })?;
        let mut response = denial.response.clone();
        let retry_after = request.period().seconds_until_end(now);
        response.set_header("retry-after", retry_after.to_string());
        if response.headers.iter().any(|(name, _)| name == "ratelimit") {
            let [_, (name, value)] =
                responses::ratelimit_fields(&request.action().key, limit, 0, retry_after);
            response.set_header(name, value);
        }
        Some(response)
    }

    /// Remembers a final refusal of `request` for `for_ms` (never past the period's end).
    pub fn remember(
        &mut self,
        request: &MeteredRequest,
        response: &LocalResponse,
        now: DateTime<Utc>,
        for_ms: u64,
    ) {
        let Some(limit) = request.limit() else { return };
        if self.capacity == 0 || for_ms == 0 {
            return;
        }
        let now_ms = unix_millis(now);
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, d| now_ms < d.until_ms);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        let until_ms = now_ms
            .saturating_add(for_ms)
            .min(unix_millis(request.period().end));
        self.entries.insert(
            (request.user().to_string(), request.action().key.clone()),
            Denial {
                period_id: request.period().id.clone(),
                plan: request.plan().key.clone(),
                limit,
                response: response.clone(),
                until_ms,
            },
        );
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::Plans;
    use crate::testing::{head, metered, now, plans, plans_json_with};
    use chrono::TimeZone;

    fn at(ms: i64) -> DateTime<Utc> {
        now() + chrono::Duration::milliseconds(ms)
    }

    fn upload(p: &Plans, user: &str, plan: &str, when: DateTime<Utc>) -> MeteredRequest {
        metered(p, &head("POST", "/api/upload", user, plan), when)
    }

    fn response() -> LocalResponse {
        LocalResponse {
            status: 429,
            headers: vec![("retry-after".into(), "1".into())],
            body: "{}".into(),
        }
    }

    #[test]
    fn a_refusal_holds_for_its_time_and_updates_retry_after() {
        let p = plans();
        let mut cache = DenialCache::new(10);
        cache.remember(&upload(&p, "u", "free", at(0)), &response(), at(0), 1000);
        let again = cache
            .refusal(&upload(&p, "u", "free", at(999)), at(999))
            .unwrap();
        assert!(again
            .headers
            .contains(&("retry-after".into(), "302400".into())));
        assert!(cache
            .refusal(&upload(&p, "u", "free", at(1000)), at(1000))
            .is_none());
    }

    #[test]
    fn a_refusal_is_replayed_only_to_the_same_user_plan_and_period() {
        let p = plans();
        let mut cache = DenialCache::new(10);
        cache.remember(&upload(&p, "u", "free", at(0)), &response(), at(0), 1000);
        assert!(cache
            .refusal(&upload(&p, "v", "free", at(1)), at(1))
            .is_none());
        // A plan change (here to one whose upload is limited too, in a patched copy).
        let patched = Plans::from_json(
            plans_json_with(|p| p["plans"]["professional"]["limits"]["upload"] = 5.into())
                .as_bytes(),
        )
        .unwrap();
        assert!(cache
            .refusal(&upload(&patched, "u", "professional", at(1)), at(1))
            .is_none());
        // Another limit for the same plan.
        let raised = Plans::from_json(
            plans_json_with(|p| p["plans"]["free"]["limits"]["upload"] = 6.into()).as_bytes(),
        )
        .unwrap();
        assert!(cache
            .refusal(&upload(&raised, "u", "free", at(1)), at(1))
            .is_none());
    }

    #[test]
    fn a_refusal_never_outlives_its_period() {
        let p = plans();
        let mut cache = DenialCache::new(10);
        let last_ms = Utc.with_ymd_and_hms(2026, 11, 30, 23, 59, 59).unwrap();
        cache.remember(
            &upload(&p, "u", "free", last_ms),
            &response(),
            last_ms,
            60_000,
        );
        let december = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        assert!(cache
            .refusal(&upload(&p, "u", "free", december), december)
            .is_none());
    }

    #[test]
    fn a_full_cache_makes_room_and_zero_turns_it_off() {
        let p = plans();
        let mut cache = DenialCache::new(2);
        cache.remember(&upload(&p, "a", "free", at(0)), &response(), at(0), 10);
        cache.remember(&upload(&p, "b", "free", at(0)), &response(), at(0), 10);
        cache.remember(&upload(&p, "c", "free", at(20)), &response(), at(20), 10);
        assert!(cache
            .refusal(&upload(&p, "c", "free", at(25)), at(25))
            .is_some());
        assert_eq!(cache.len(), 1);
        let mut off = DenialCache::new(10);
        off.remember(&upload(&p, "a", "free", at(0)), &response(), at(0), 0);
        assert!(off.is_empty());
    }
}
