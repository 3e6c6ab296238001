//! The worker's settlements on their way to Redis. Each worker keeps one queue and sends it in
//! batches from its root context, so no request waits for its commit and a commit outlives the
//! stream that made it (Envoy cancels a stream's own calls when the stream ends).

use std::collections::VecDeque;

use crate::entitlements::Recorded;
use crate::redis::functions;
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
    /// Successes counted (commits and counts), and each one's action and plan.
    pub counted: u64,
    pub counted_by: Vec<(String, String)>,
    /// Commits Redis had counted already (a commit sent again after its answer was lost).
    pub commits_unmatched: u64,
    pub released: u64,
    /// Reservations of requests still in flight pushed back.
    pub extended: u64,
    /// Each user's plan as billing recorded it (`None`: no record), as Redis answered.
    pub entitlements: Vec<(String, Recorded)>,
    /// Put back to be sent again (Redis certainly did not run them).
    pub requeued: u64,
    /// Given up: counts whose outcome is unknown (sending them again could count twice), and
    /// commits older than Redis remembers commits for.
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

    /// The batch in flight was answered (or failed). A commit is sent again only while Redis
    /// still remembers commits (`remember_commits_ms`), so that it counts once.
    pub fn on_batch_reply(
        &mut self,
        reply: Result<RedisReply, TransportError>,
        now_ms: u64,
        remember_commits_ms: u64,
    ) -> BatchReport {
        let batch = std::mem::take(&mut self.in_flight);
        let mut report = BatchReport::default();
        match reply.and_then(|r| functions::parse_settled(r, batch.len())) {
            Ok(settled) => {
                self.backoff_ms = MIN_BACKOFF_MS;
                self.retry_at_ms = 0;
                for (item, settled) in batch.into_iter().zip(settled) {
                    match (item.mode, settled.done) {
                        (SettleMode::Release, _) => report.released += 1,
                        (SettleMode::GiveBack, _) => {}
                        (SettleMode::Extend, true) => report.extended += 1,
                        (SettleMode::Extend, false) => {}
                        (_, true) => {
                            report.counted += 1;
                            report
                                .counted_by
                                .push((item.action.clone(), item.plan.clone()));
                        }
                        (SettleMode::Commit, false) => report.commits_unmatched += 1,
                        (SettleMode::Count, false) => report.dropped_unknown += 1,
                    }
                    let record = Recorded {
                        plan: settled.entitled_plan,
                        anchor: settled.entitled_anchor,
                    };
                    report.entitlements.push((item.user, record));
                }
            }
            Err(error) => {
                let certainly_not_run = matches!(error, TransportError::NotSent(_));
                // Commits, releases and extends are idempotent (Redis remembers commits; the
                // others act only on a held reservation), so they are sent again; a count is
                // sent again only if it surely did not run.
                for item in batch.into_iter().rev() {
                    let resend = match item.mode {
                        // Not idempotent: sent again only if it surely did not run.
                        SettleMode::Count | SettleMode::GiveBack => certainly_not_run,
                        SettleMode::Commit => {
                            now_ms.saturating_sub(item.made_at_ms) < remember_commits_ms
                        }
                        SettleMode::Release | SettleMode::Extend => true,
                    };
                    if resend {
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

    const REMEMBER: u64 = 3_600_000;

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
            day: "2026-11-27".into(),
            request_id: String::new(),
            idempotency_key: String::new(),
            gauge: None,
            adds: None,
            held: None,
            period_id: "2026-11".into(),
            keep_for_ms: 1,
            made_at_ms: 0,
        }
    }

    /// What plan_limits_settle answers: per item, done and the user's entitled plan (none).
    fn settled(done: &[i64]) -> Result<RedisReply, TransportError> {
        Ok(RedisReply::Array(
            done.iter()
                .flat_map(|&d| [RedisReply::Int(d), RedisReply::Nil, RedisReply::Nil])
                .collect(),
        ))
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
        let report = q.on_batch_reply(settled(&[1, 0]), 0, REMEMBER);
        assert_eq!((report.counted, report.commits_unmatched), (1, 1));
        assert_eq!(
            report.entitlements,
            [
                ("u".into(), Recorded::default()),
                ("u".into(), Recorded::default())
            ]
        );
        assert_eq!(q.start_batch(0).unwrap()[0].reservation_id, "c");
        q.on_batch_reply(settled(&[1]), 0, REMEMBER);
        assert!(q.is_empty() && !q.batch_in_flight());
    }

    #[test]
    fn extends_and_releases_are_reported() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Extend, "a"));
        q.push(item(SettleMode::Extend, "b"));
        q.push(item(SettleMode::Release, "c"));
        q.start_batch(0).unwrap();
        let report = q.on_batch_reply(settled(&[1, 0, 1]), 0, REMEMBER);
        assert_eq!(
            (report.extended, report.released, report.counted),
            (1, 1, 0)
        );
    }

    #[test]
    fn failures_requeue_what_is_safe_to_resend_and_back_off() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Commit, "a"));
        q.push(item(SettleMode::Count, "b"));
        q.push(item(SettleMode::Release, "c"));
        q.push(item(SettleMode::Extend, "d"));
        q.start_batch(0).unwrap();
        let report = q.on_batch_reply(
            Err(TransportError::Unknown("timeout".into())),
            1000,
            REMEMBER,
        );
        assert_eq!((report.requeued, report.dropped_unknown), (3, 1));
        assert!(q.start_batch(1000).is_none(), "backing off");
        assert!(q.start_batch(1000 + MIN_BACKOFF_MS).is_some());
        let report = q.on_batch_reply(Err(TransportError::NotSent("down".into())), 2000, REMEMBER);
        assert_eq!(report.requeued, 3);
        assert!(
            q.start_batch(2000 + MIN_BACKOFF_MS).is_none(),
            "backoff doubled"
        );
        assert!(q.start_batch(2000 + 2 * MIN_BACKOFF_MS).is_some());
        assert_eq!(
            q.on_batch_reply(settled(&[1, 0, 1]), 3000, REMEMBER)
                .counted,
            1
        );
    }

    #[test]
    fn a_commit_older_than_redis_remembers_is_not_sent_again() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Commit, "a"));
        q.start_batch(0).unwrap();
        let report = q.on_batch_reply(
            Err(TransportError::Unknown("timeout".into())),
            REMEMBER,
            REMEMBER,
        );
        assert_eq!((report.requeued, report.dropped_unknown), (0, 1));
        assert!(q.is_empty());
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
