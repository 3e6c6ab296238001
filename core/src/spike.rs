//! Spike arrest: a per-plan cap on how fast one user's requests come (`request_rate` in a
//! plan: requests per second, and a burst), whatever they are for, so no user can flood Redis
//! (every metered request and every usage read costs a call) or the upstreams. A token bucket
//! per user and worker, kept in integer thousandths of a request; a request past it is
//! answered 429 with `Retry-After`, before any Redis call. Per worker: an Envoy with N workers
//! lets a user through at most N times the rate.

use std::collections::HashMap;

use serde::Deserialize;

/// A plan's cap on one user's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RequestRate {
    /// Requests per second, sustained (at least 1).
    pub per_second: u32,
    /// Requests at once after a quiet spell (at least 1).
    pub burst: u32,
}

/// A thousandth of a request: one request costs `WHOLE`.
const WHOLE: u64 = 1000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    at_ms: u64,
}

/// Every user's bucket on one worker, at most `capacity` of them (full ones go first).
#[derive(Debug)]
pub struct RequestRates {
    buckets: HashMap<String, Bucket>,
    capacity: usize,
}

impl RequestRates {
    pub fn new(capacity: usize) -> Self {
        Self {
            buckets: HashMap::new(),
            capacity,
        }
    }

    /// Takes one request of `user` at `now_ms` under `rate`: `Err` with the seconds until one
    /// more may come when the bucket is empty.
    pub fn take(&mut self, user: &str, rate: RequestRate, now_ms: u64) -> Result<(), u64> {
        let full = u64::from(rate.burst.max(1)) * WHOLE;
        let per_ms = u64::from(rate.per_second.max(1));
        if self.buckets.len() >= self.capacity && !self.buckets.contains_key(user) {
            self.forget_rested(now_ms, per_ms, full);
        }
        let bucket = self.buckets.entry(user.to_string()).or_insert(Bucket {
            milli: full,
            at_ms: now_ms,
        });
        let refilled = now_ms.saturating_sub(bucket.at_ms).saturating_mul(per_ms);
        bucket.milli = bucket.milli.saturating_add(refilled).min(full);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        if bucket.milli >= WHOLE {
            bucket.milli -= WHOLE;
            return Ok(());
        }
        let wait_ms = (WHOLE - bucket.milli).div_ceil(per_ms);
        Err(wait_ms.div_ceil(1000).max(1))
    }

    /// Makes room: users whose bucket has refilled lose nothing by being forgotten; if none
    /// has, every bucket goes (rare: more users than `capacity` at full speed on one worker).
    fn forget_rested(&mut self, now_ms: u64, per_ms: u64, full: u64) {
        self.buckets.retain(|_, b| {
            let refilled = now_ms.saturating_sub(b.at_ms).saturating_mul(per_ms);
            b.milli.saturating_add(refilled) < full
        });
        if self.buckets.len() >= self.capacity {
            self.buckets.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: RequestRate = RequestRate {
        per_second: 10,
        burst: 3,
    };

    #[test]
    fn a_burst_passes_then_the_rate_and_a_refusal_says_when_to_retry() {
        let mut rates = RequestRates::new(100);
        for _ in 0..3 {
            assert_eq!(rates.take("u", RATE, 0), Ok(()));
        }
        assert_eq!(rates.take("u", RATE, 0), Err(1));
        // 10 a second: one more every 100 ms.
        assert_eq!(rates.take("u", RATE, 99), Err(1));
        assert_eq!(rates.take("u", RATE, 100), Ok(()));
        assert_eq!(rates.take("u", RATE, 150), Err(1));
        // Others have their own bucket.
        assert_eq!(rates.take("v", RATE, 150), Ok(()));
        // A long quiet spell refills only the burst.
        for _ in 0..3 {
            assert_eq!(rates.take("u", RATE, 60_000), Ok(()));
        }
        assert_eq!(rates.take("u", RATE, 60_000), Err(1));
    }

    #[test]
    fn a_slow_rate_says_how_many_seconds_to_wait() {
        let slow = RequestRate {
            per_second: 1,
            burst: 1,
        };
        let mut rates = RequestRates::new(10);
        assert_eq!(rates.take("u", slow, 0), Ok(()));
        assert_eq!(rates.take("u", slow, 0), Err(1));
        assert_eq!(rates.take("u", slow, 1000), Ok(()));
    }

    #[test]
    fn memory_stays_bounded_and_busy_users_keep_their_buckets() {
        let mut rates = RequestRates::new(2);
        rates.take("busy", RATE, 0).unwrap();
        rates.take("quiet", RATE, 0).unwrap();
        // Much later "quiet" has refilled and makes room; "busy" is still spending.
        rates.take("busy", RATE, 10_000).unwrap();
        rates.take("busy", RATE, 10_000).unwrap();
        rates.take("busy", RATE, 10_000).unwrap();
        rates.take("new", RATE, 10_000).unwrap();
        assert_eq!(rates.buckets.len(), 2);
        assert!(rates.buckets.contains_key("busy"));
        assert_eq!(rates.take("busy", RATE, 10_000), Err(1));
    }
}
