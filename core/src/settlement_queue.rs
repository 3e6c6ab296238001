//! The worker's settlements on their way to Redis. Each worker keeps one queue and sends it in
//! batches from its root context, so no request waits for its commit and a commit outlives the
//! stream that made it (Envoy cancels a stream's own calls when the stream ends).
//!
//! On one Redis a batch may hold anyone's settlements and one batch is in flight at a time. On
//! a Redis Cluster one call's keys must share a hash slot, so batches are grouped by slot: a
//! batch per slot, several slots' batches in flight at once (one per slot), each answered,
//! retried and backed off on its own, so a master that is down holds back only its slots.

use std::collections::{HashMap, VecDeque};

use crate::cluster;
use crate::entitlements::Recorded;
use crate::redis::functions;
use crate::redis::{RedisReply, TransportError};
use crate::settlement::{SettleMode, Settlement};

/// Which settlements may travel in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// One Redis: any.
    All,
    /// A Redis Cluster: those of users whose keys hash to this slot.
    Slot(u16),
}

#[derive(Debug)]
pub struct SettlementQueue {
    waiting: VecDeque<Settlement>,
    /// Batches on their way to Redis, at most one per group (and a few groups: a list).
    in_flight: Vec<(Group, Vec<Settlement>)>,
    capacity: usize,
    max_batch: usize,
    /// Batches are grouped by hash slot (Redis Cluster).
    by_slot: bool,
    /// Groups whose last batch failed: their next batch waits, backing off while their Redis
    /// is down. Forgotten when a batch of the group succeeds.
    backoff: HashMap<Group, Backoff>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    retry_at_ms: u64,
    next_ms: u64,
}

/// What one batch's answer meant, for metrics and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// Successes counted (commits and counts), and how many of each action and plan (one
    /// metric update each, not one per success).
    pub counted: u64,
    pub counted_by: Vec<(String, String, u64)>,
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
/// On a cluster, at most this many slots' batches are in flight per worker: after an outage
/// the queue drains in waves rather than in one call per slot at once.
pub const MAX_SLOT_BATCHES_IN_FLIGHT: usize = 32;

impl SettlementQueue {
    pub fn new(capacity: usize, max_batch: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            in_flight: Vec::new(),
            capacity,
            max_batch: max_batch.max(1),
            by_slot: false,
            backoff: HashMap::new(),
        }
    }

    /// Queues a settlement; returns the oldest one if the queue was full and it had to go.
    pub fn push(&mut self, settlement: Settlement) -> Option<Settlement> {
        let dropped = if self.len() >= self.capacity {
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

    /// Whether batches are split by hash slot (Redis Cluster); applies to batches not yet
    /// started.
    pub fn group_by_slot(&mut self, by_slot: bool) {
        self.by_slot = by_slot;
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
            + self
                .in_flight
                .iter()
                .map(|(_, batch)| batch.len())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any batch is on its way to Redis.
    pub fn batch_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// The call `settlement` can go in.
    pub fn group_of(&self, settlement: &Settlement) -> Group {
        if self.by_slot {
            Group::Slot(cluster::key_slot(settlement.keys.summary.as_bytes()))
        } else {
            Group::All
        }
    }

    /// Whether a batch of `group` may start now: none of it in flight, not backing off.
    fn ready(&self, group: Group, now_ms: u64) -> bool {
        !self.in_flight.iter().any(|(g, _)| *g == group)
            && self
                .backoff
                .get(&group)
                .is_none_or(|b| now_ms >= b.retry_at_ms)
    }

    /// Moves the batches that are due in flight (oldest settlements first, up to `max_batch`
    /// each) and returns their groups: at most one (one Redis), or one per slot up to
    /// `MAX_SLOT_BATCHES_IN_FLIGHT` in flight (a cluster).
    pub fn start_batches(&mut self, now_ms: u64) -> Vec<Group> {
        let most = if self.by_slot {
            MAX_SLOT_BATCHES_IN_FLIGHT
        } else {
            1
        };
        let room = most.saturating_sub(self.in_flight.len());
        let mut started: Vec<(Group, Vec<Settlement>)> = Vec::new();
        let mut left = VecDeque::with_capacity(self.waiting.len());
        while let Some(item) = self.waiting.pop_front() {
            let group = self.group_of(&item);
            let at = match started.iter().position(|(g, _)| *g == group) {
                Some(at) => Some(at),
                None if started.len() < room && self.ready(group, now_ms) => {
                    started.push((group, Vec::new()));
                    Some(started.len() - 1)
                }
                None => None,
            };
            match at.and_then(|at| started.get_mut(at)) {
                Some((_, batch)) if batch.len() < self.max_batch => batch.push(item),
                _ => left.push_back(item),
            }
        }
        self.waiting = left;
        let order = started.iter().map(|(group, _)| *group).collect();
        self.in_flight.extend(started);
        order
    }

    /// Starts the next batch due, if any, and returns it.
    #[cfg(test)]
    pub fn start_batch(&mut self, now_ms: u64) -> Option<&[Settlement]> {
        let group = self.start_batches(now_ms).into_iter().next()?;
        Some(self.in_flight(group))
    }

    /// `group`'s batch on its way (empty when none is).
    pub fn in_flight(&self, group: Group) -> &[Settlement] {
        self.in_flight
            .iter()
            .find(|(g, _)| *g == group)
            .map_or(&[], |(_, batch)| batch.as_slice())
    }

    /// `group`'s batch was answered (or failed). A commit is sent again only while Redis
    /// still remembers commits (`remember_commits_ms`), so that it counts once.
    pub fn on_batch_reply(
        &mut self,
        group: Group,
        reply: Result<RedisReply, TransportError>,
        now_ms: u64,
        remember_commits_ms: u64,
    ) -> BatchReport {
        let batch = match self.in_flight.iter().position(|(g, _)| *g == group) {
            Some(at) => self.in_flight.swap_remove(at).1,
            None => Vec::new(),
        };
        let mut report = BatchReport::default();
        match reply.and_then(|r| functions::parse_settled(r, batch.len())) {
            Ok(settled) => {
                self.backoff.remove(&group);
                for (item, settled) in batch.into_iter().zip(settled) {
                    match (item.mode, settled.done) {
                        (SettleMode::Release, _) => report.released += 1,
                        (SettleMode::GiveBack, _) => {}
                        (SettleMode::Extend, true) => report.extended += 1,
                        (SettleMode::Extend, false) => {}
                        (_, true) => {
                            report.counted += 1;
                            // (A batch holds a few actions and plans: a scan.)
                            let known = report
                                .counted_by
                                .iter_mut()
                                .find(|(a, p, _)| *a == item.action && *p == item.plan);
                            match known {
                                Some((_, _, n)) => *n += 1,
                                None => report.counted_by.push((
                                    item.action.clone(),
                                    item.plan.clone(),
                                    1,
                                )),
                            }
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
                while self.len() > self.capacity {
                    if self.waiting.pop_front().is_none() {
                        break;
                    }
                    report.dropped_unknown += 1;
                }
                let wait = self
                    .backoff
                    .get(&group)
                    .map_or(MIN_BACKOFF_MS, |b| b.next_ms);
                self.backoff.insert(
                    group,
                    Backoff {
                        retry_at_ms: now_ms + wait,
                        next_ms: (wait * 2).min(MAX_BACKOFF_MS),
                    },
                );
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
        item_of("u", mode, id)
    }

    fn item_of(user: &str, mode: SettleMode, id: &str) -> Settlement {
        Settlement {
            mode,
            keys: UsageKeys::new("p", user, "2026-11", "upload"),
            reservation_id: id.into(),
            action: "upload".into(),
            user: user.into(),
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
        let report = q.on_batch_reply(Group::All, settled(&[1, 0]), 0, REMEMBER);
        assert_eq!((report.counted, report.commits_unmatched), (1, 1));
        assert_eq!(
            report.entitlements,
            [
                ("u".into(), Recorded::default()),
                ("u".into(), Recorded::default())
            ]
        );
        assert_eq!(q.start_batch(0).unwrap()[0].reservation_id, "c");
        q.on_batch_reply(Group::All, settled(&[1]), 0, REMEMBER);
        assert!(q.is_empty() && !q.batch_in_flight());
    }

    #[test]
    fn extends_and_releases_are_reported() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Extend, "a"));
        q.push(item(SettleMode::Extend, "b"));
        q.push(item(SettleMode::Release, "c"));
        q.start_batch(0).unwrap();
        let report = q.on_batch_reply(Group::All, settled(&[1, 0, 1]), 0, REMEMBER);
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
            Group::All,
            Err(TransportError::Unknown("timeout".into())),
            1000,
            REMEMBER,
        );
        assert_eq!((report.requeued, report.dropped_unknown), (3, 1));
        assert!(q.start_batch(1000).is_none(), "backing off");
        assert!(q.start_batch(1000 + MIN_BACKOFF_MS).is_some());
        let report = q.on_batch_reply(
            Group::All,
            Err(TransportError::NotSent("down".into())),
            2000,
            REMEMBER,
        );
        assert_eq!(report.requeued, 3);
        assert!(
            q.start_batch(2000 + MIN_BACKOFF_MS).is_none(),
            "backoff doubled"
        );
        assert!(q.start_batch(2000 + 2 * MIN_BACKOFF_MS).is_some());
        assert_eq!(
            q.on_batch_reply(Group::All, settled(&[1, 0, 1]), 3000, REMEMBER)
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
            Group::All,
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

    fn slot_of(user: &str) -> Group {
        Group::Slot(cluster::key_slot(
            UsageKeys::new("p", user, "2026-11", "upload")
                .summary
                .as_bytes(),
        ))
    }

    fn ids(batch: &[Settlement]) -> Vec<&str> {
        batch.iter().map(|s| s.reservation_id.as_str()).collect()
    }

    #[test]
    fn on_one_redis_anyones_settlements_share_a_batch() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item_of("alice", SettleMode::Commit, "a"));
        q.push(item_of("bob", SettleMode::Commit, "b"));
        assert_eq!(q.start_batches(0), [Group::All]);
        assert_eq!(ids(q.in_flight(Group::All)), ["a", "b"]);
    }

    #[test]
    fn on_a_cluster_batches_are_split_by_slot_and_go_together() {
        let (alice, bob) = (slot_of("alice"), slot_of("bob"));
        assert_ne!(alice, bob);
        let mut q = SettlementQueue::new(100, 2);
        q.group_by_slot(true);
        for (user, id) in [
            ("alice", "a1"),
            ("bob", "b1"),
            ("alice", "a2"),
            ("alice", "a3"),
            ("bob", "b2"),
        ] {
            q.push(item_of(user, SettleMode::Commit, id));
        }
        // The oldest first: alice's group, then bob's; each up to max_batch, in order.
        assert_eq!(q.start_batches(0), [alice, bob]);
        assert_eq!(ids(q.in_flight(alice)), ["a1", "a2"]);
        assert_eq!(ids(q.in_flight(bob)), ["b1", "b2"]);
        assert_eq!(q.len(), 5);
        // One batch per slot in flight: a3 waits for alice's answer, whatever bob's does.
        assert!(q.start_batches(0).is_empty());
        q.push(item_of("carol", SettleMode::Count, "c1"));
        assert_eq!(q.start_batches(0), [slot_of("carol")]);
        let report = q.on_batch_reply(bob, settled(&[1, 1]), 0, REMEMBER);
        assert_eq!(report.counted, 2);
        assert!(q.start_batches(0).is_empty(), "alice's is still in flight");
        q.on_batch_reply(alice, settled(&[1, 1]), 0, REMEMBER);
        assert_eq!(q.start_batches(0), [alice]);
        assert_eq!(ids(q.in_flight(alice)), ["a3"]);
        assert!(q.batch_in_flight());
    }

    #[test]
    fn a_failed_slot_is_retried_on_its_own_and_counts_of_unknown_outcome_are_not_resent() {
        let (alice, bob) = (slot_of("alice"), slot_of("bob"));
        let mut q = SettlementQueue::new(100, 10);
        q.group_by_slot(true);
        q.push(item_of("alice", SettleMode::Commit, "a1"));
        q.push(item_of("alice", SettleMode::Count, "a2"));
        q.push(item_of("bob", SettleMode::Count, "b1"));
        assert_eq!(q.start_batches(0), [alice, bob]);
        // Alice's master timed out: her commit goes again (Redis remembers commits), her
        // count does not (it may have run). Bob's succeeded.
        let report = q.on_batch_reply(
            alice,
            Err(TransportError::Unknown("timeout".into())),
            1000,
            REMEMBER,
        );
        assert_eq!((report.requeued, report.dropped_unknown), (1, 1));
        assert_eq!(
            q.on_batch_reply(bob, settled(&[1]), 1000, REMEMBER).counted,
            1
        );
        q.push(item_of("bob", SettleMode::Count, "b2"));
        // Alice's slot backs off; bob's goes on meanwhile.
        assert_eq!(q.start_batches(1000), [bob]);
        q.on_batch_reply(bob, settled(&[1]), 1000, REMEMBER);
        assert!(q.start_batches(1000 + MIN_BACKOFF_MS - 1).is_empty());
        assert_eq!(q.start_batches(1000 + MIN_BACKOFF_MS), [alice]);
        assert_eq!(ids(q.in_flight(alice)), ["a1"]);
        // Failing again doubles only alice's wait.
        q.on_batch_reply(
            alice,
            Err(TransportError::NotSent("down".into())),
            2000,
            REMEMBER,
        );
        assert!(q.start_batches(2000 + MIN_BACKOFF_MS).is_empty());
        assert_eq!(q.start_batches(2000 + 2 * MIN_BACKOFF_MS), [alice]);
        let report = q.on_batch_reply(alice, settled(&[0]), 3000, REMEMBER);
        assert_eq!(report.commits_unmatched, 1, "its first send had counted");
        assert!(q.is_empty() && !q.batch_in_flight());
    }

    #[test]
    fn a_cluster_keeps_a_bounded_number_of_batches_in_flight() {
        let mut q = SettlementQueue::new(10_000, 64);
        q.group_by_slot(true);
        for n in 0..1000 {
            q.push(item_of(
                &format!("user-{n}"),
                SettleMode::Count,
                &n.to_string(),
            ));
        }
        let first = q.start_batches(0);
        assert_eq!(first.len(), MAX_SLOT_BATCHES_IN_FLIGHT);
        assert!(q.start_batches(0).is_empty(), "no room left");
        let answered = q.in_flight(first[0]).len();
        q.on_batch_reply(first[0], settled(&vec![1; answered]), 0, REMEMBER);
        assert_eq!(q.start_batches(0).len(), 1);
        assert_eq!(q.len(), 1000 - answered);
    }

    #[test]
    fn a_full_queue_counts_what_is_in_flight_in_every_slot() {
        let mut q = SettlementQueue::new(3, 10);
        q.group_by_slot(true);
        q.push(item_of("alice", SettleMode::Count, "a"));
        q.push(item_of("bob", SettleMode::Count, "b"));
        q.start_batches(0);
        q.push(item_of("carol", SettleMode::Count, "c"));
        let dropped = q.push(item_of("dave", SettleMode::Count, "d")).unwrap();
        assert_eq!(dropped.reservation_id, "c", "the oldest waiting goes");
        assert_eq!(q.len(), 3);
    }
}
