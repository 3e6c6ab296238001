//! The worker's settlements on their way to Redis. Each worker keeps one queue and sends it in
//! batches from its root context, so no request waits for its commit and a commit outlives the
//! stream that made it (Envoy cancels a stream's own calls when the stream ends).

use std::collections::VecDeque;

use crate::redis::{RedisReply, TransportError};
use crate::settlement::{SettleMode, Settlement};

#[derive(Debug)]
pub struct SettlementQueue {
    waiting: VecDeque<Settlement>,
    in_flight: Vec<Settlement>,
    capacity: usize,
    max_batch: usize,
    /// After a failure, the next batch waits until then (ms), backing off while Redis is down.
    retry_at_ms: u64,
    backoff_ms: u64,
}

/// What one batch's answer meant, for metrics and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// Successes counted (commits that still held their reservation, and counts).
    pub counted: u64,
    /// Commits whose reservation was gone (expired, or already committed by a retry).
    pub commits_unmatched: u64,
    pub released: u64,
    /// Put back to be sent again (Redis certainly did not run them).
    pub requeued: u64,
    /// Given up: counts whose outcome is unknown (sending them again could count twice).
    pub dropped_unknown: u64,
    pub error: Option<TransportError>,
}

const MIN_BACKOFF_MS: u64 = 50;
/// Enforcement resumes within a second of Redis coming back.
const MAX_BACKOFF_MS: u64 = 800;

impl SettlementQueue {
    pub fn new(capacity: usize, max_batch: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            in_flight: Vec::new(),
            capacity,
            max_batch: max_batch.max(1),
            retry_at_ms: 0,
            backoff_ms: MIN_BACKOFF_MS,
        }
    }

    /// Queues a settlement; returns the oldest one if the queue was full and it had to go.
    pub fn push(&mut self, settlement: Settlement) -> Option<Settlement> {
        let dropped = if self.waiting.len() + self.in_flight.len() >= self.capacity {
            self.waiting.pop_front()
        } else {
            None
        };
        self.waiting.push_back(settlement);
        dropped
    }

    /// A new configuration's bounds; what is queued stays.
    pub fn resize(&mut self, capacity: usize, max_batch: usize) {
        self.capacity = capacity;
        self.max_batch = max_batch.max(1);
    }

    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a batch is on its way to Redis.
    pub fn batch_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Moves the next batch in flight and returns it, if one is due and none is in flight.
    pub fn start_batch(&mut self, now_ms: u64) -> Option<&[Settlement]> {
        if !self.in_flight.is_empty() || self.waiting.is_empty() || now_ms < self.retry_at_ms {
            return None;
        }
        let n = self.waiting.len().min(self.max_batch);
        self.in_flight = self.waiting.drain(..n).collect();
        Some(&self.in_flight)
    }

    /// The batch on its way (empty when none is).
    pub fn in_flight(&self) -> &[Settlement] {
        &self.in_flight
    }

    /// The batch in flight was answered (or failed).
    pub fn on_batch_reply(
        &mut self,
        reply: Result<RedisReply, TransportError>,
        now_ms: u64,
    ) -> BatchReport {
        let batch = std::mem::take(&mut self.in_flight);
        let mut report = BatchReport::default();
        let results = reply.and_then(|r| {
            let ints = r.into_ints()?;
            if ints.len() == batch.len() {
                Ok(ints)
            } else {
                Err(TransportError::BadReply(format!(
                    "settle returned {} results for {} items",
                    ints.len(),
                    batch.len()
                )))
            }
        });
        match results {
            Ok(counted) => {
                self.backoff_ms = MIN_BACKOFF_MS;
                self.retry_at_ms = 0;
                for (item, counted) in batch.iter().zip(counted) {
                    match (item.mode, counted) {
                        (SettleMode::Release, _) => report.released += 1,
                        (_, 1) => report.counted += 1,
                        (SettleMode::Commit, _) => report.commits_unmatched += 1,
                        (SettleMode::Count, _) => report.dropped_unknown += 1,
                    }
                }
            }
            Err(error) => {
                let certainly_not_run = matches!(error, TransportError::NotSent(_));
                // Commits and releases are idempotent (they act only on a held reservation),
                // so they are always sent again; a count is sent again only if it surely
                // did not run.
                for item in batch.into_iter().rev() {
                    if certainly_not_run || item.mode != SettleMode::Count {
                        report.requeued += 1;
                        self.waiting.push_front(item);
                    } else {
                        report.dropped_unknown += 1;
                    }
                }
                while self.waiting.len() > self.capacity {
                    self.waiting.pop_front();
                    report.dropped_unknown += 1;
                }
                self.retry_at_ms = now_ms + self.backoff_ms;
                self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
                report.error = Some(error);
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::UsageKeys;
    use crate::testing::ints;

    fn item(mode: SettleMode, id: &str) -> Settlement {
        Settlement {
            mode,
            keys: UsageKeys::new("p", "u", "2026-11", "upload"),
            reservation_id: id.into(),
            action: "upload".into(),
            user: "u".into(),
            plan: "free".into(),
            limits_json: "{}".into(),
            kind: String::new(),
            bytes: 0,
            status: 200,
            at: "2026-11-27T00:00:00.000Z".into(),
            request_id: String::new(),
            period_id: "2026-11".into(),
            keep_for_ms: 1,
        }
    }

    #[test]
    fn batches_are_sent_one_at_a_time() {
        let mut q = SettlementQueue::new(100, 2);
        for id in ["a", "b", "c"] {
            q.push(item(SettleMode::Commit, id));
        }
        let first = q.start_batch(0).unwrap();
        assert_eq!(first.len(), 2);
        assert!(q.batch_in_flight());
        assert!(q.start_batch(0).is_none(), "one batch in flight");
        let report = q.on_batch_reply(ints(&[1, 0]), 0);
        assert_eq!((report.counted, report.commits_unmatched), (1, 1));
        assert_eq!(q.start_batch(0).unwrap()[0].reservation_id, "c");
        q.on_batch_reply(ints(&[1]), 0);
        assert!(q.is_empty() && !q.batch_in_flight());
    }

    #[test]
    fn failures_requeue_what_is_safe_to_resend_and_back_off() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Commit, "a"));
        q.push(item(SettleMode::Count, "b"));
        q.push(item(SettleMode::Release, "c"));
        q.start_batch(0).unwrap();
        let report = q.on_batch_reply(Err(TransportError::Unknown("timeout".into())), 1000);
        assert_eq!((report.requeued, report.dropped_unknown), (2, 1));
        assert!(q.start_batch(1000).is_none(), "backing off");
        assert!(q.start_batch(1000 + MIN_BACKOFF_MS).is_some());
        let report = q.on_batch_reply(Err(TransportError::NotSent("down".into())), 2000);
        assert_eq!(report.requeued, 2);
        assert!(
            q.start_batch(2000 + MIN_BACKOFF_MS).is_none(),
            "backoff doubled"
        );
        assert!(q.start_batch(2000 + 2 * MIN_BACKOFF_MS).is_some());
        assert_eq!(q.on_batch_reply(ints(&[1, 0]), 3000).counted, 1);
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let mut q = SettlementQueue::new(2, 10);
        assert!(q.push(item(SettleMode::Count, "a")).is_none());
        assert!(q.push(item(SettleMode::Count, "b")).is_none());
        assert_eq!(
            q.push(item(SettleMode::Count, "c")).unwrap().reservation_id,
            "a"
        );
        assert_eq!(q.len(), 2);
    }
}
