//! The worker's settlements on their way to Redis. Each worker keeps one queue and sends it in
//! batches, from whichever callback finds one due (a call's answer outlives the stream whose
//! callback made it), so a commit outlives its stream.
//!
//! Every batch is applied exactly once: it carries the worker's id and a sequence number, and
//! `plan_limits_settle` applies it only if that number is past the last one Redis applied for
//! the worker (kept in one small key per worker). So a batch whose outcome is unknown (its call
//! timed out, or was cut off) is sent again as it was, and counts once whether or not the first
//! attempt ran. Batches of a group go one at a time and in order; a later one waits for an
//! earlier one's answer.
//!
//! On one Redis a batch may hold anyone's settlements. On a Redis Cluster one call's keys must
//! share a hash slot, so batches are grouped by slot: a batch per slot, several slots' batches
//! in flight at once (one per slot), each answered, retried and backed off on its own, so a
//! master that is down holds back only its slots.

use std::collections::{HashMap, VecDeque};

use crate::cluster;
use crate::entitlements::Recorded;
use crate::redis::functions::{self, SettleReply};
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

/// How long Redis remembers the last batch it applied for a worker (and so how long a batch of
/// unknown outcome may still be sent again): a day.
pub const APPLIED_MEMORY_MS: u64 = 86_400_000;

#[derive(Debug)]
pub struct SettlementQueue {
    waiting: VecDeque<Settlement>,
    /// Batches sent and not yet answered, or answered with a failure and waiting to be sent
    /// again as they are: at most one per group (and a few groups: a list).
    outstanding: Vec<Batch>,
    /// The next batch's sequence number, per group.
    next_seq: HashMap<Group, u64>,
    capacity: usize,
    max_batch: usize,
    /// Batches are grouped by hash slot (Redis Cluster).
    by_slot: bool,
}

/// One batch: sent as it was formed however often it must go.
#[derive(Debug)]
struct Batch {
    group: Group,
    seq: u64,
    items: Vec<Settlement>,
    /// On its way (else failed, waiting for `retry_at_ms`).
    in_flight: bool,
    first_sent_ms: u64,
    retry_at_ms: u64,
    next_backoff_ms: u64,
}

/// What one batch's answer meant, for metrics and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// Successes counted (commits and counts), and how many of each action and plan (one
    /// metric update each, not one per success).
    pub counted: u64,
    pub counted_by: Vec<(String, String, u64)>,
    /// Commits Redis had counted already (a commit whose reservation was committed before).
    pub commits_unmatched: u64,
    pub released: u64,
    /// Reservations of requests still in flight pushed back.
    pub extended: u64,
    /// Each user's plan as billing recorded it (`None`: no record), as Redis answered.
    pub entitlements: Vec<(String, Recorded)>,
    /// Items Redis refused to apply (a value out of range): each recorded there as a
    /// `settle_refused` event.
    pub refused: u64,
    /// The batch was applied by an earlier attempt whose answer was lost: nothing ran now.
    pub applied_before: u64,
    /// Kept to be sent again as it is (the call failed).
    pub retried: u64,
    /// Settlements given up: in a batch Redis could not be reached for longer than it
    /// remembers applied batches (`APPLIED_MEMORY_MS`).
    pub lost: Vec<Settlement>,
    /// Streams whose response waited for one of the batch's items, now applied.
    pub applied_waiters: Vec<u32>,
    /// Fail-open passes now in Redis: `(user, action, period)` of each.
    pub applied_fail_open: Vec<(String, String, String)>,
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
            outstanding: Vec::new(),
            next_seq: HashMap::new(),
            capacity,
            max_batch: max_batch.max(1),
            by_slot: false,
        }
    }

    /// Queues a settlement; returns the oldest one waiting if the queue was full and it had
    /// to go.
    pub fn push(&mut self, settlement: Settlement) -> Option<Settlement> {
        let dropped = if self.len() >= self.capacity {
            self.waiting.pop_front()
        } else {
            None
        };
        self.waiting.push_back(settlement);
        dropped
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A new configuration's bounds; what is queued stays.
    pub fn resize(&mut self, capacity: usize, max_batch: usize) {
        self.capacity = capacity;
        self.max_batch = max_batch.max(1);
    }

    /// Whether batches are split by hash slot (Redis Cluster); applies to batches not yet
    /// formed.
    pub fn group_by_slot(&mut self, by_slot: bool) {
        self.by_slot = by_slot;
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
            + self
                .outstanding
                .iter()
                .map(|batch| batch.items.len())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any batch is on its way to Redis.
    pub fn batch_in_flight(&self) -> bool {
        self.outstanding.iter().any(|b| b.in_flight)
    }

    /// The call `settlement` can go in.
    pub fn group_of(&self, settlement: &Settlement) -> Group {
        if self.by_slot {
            Group::Slot(cluster::key_slot(settlement.keys.summary.as_bytes()))
        } else {
            Group::All
        }
    }

    /// Sends the batches that are due, and returns their groups: failed batches whose wait is
    /// over, as they were; then new ones (oldest settlements first, up to `max_batch` each)
    /// for groups with nothing outstanding. At most one batch in flight (one Redis), or up to
    /// `MAX_SLOT_BATCHES_IN_FLIGHT` (a cluster).
    pub fn start_batches(&mut self, now_ms: u64) -> Vec<Group> {
        let most = if self.by_slot {
            MAX_SLOT_BATCHES_IN_FLIGHT
        } else {
            1
        };
        let mut room = most.saturating_sub(self.outstanding.iter().filter(|b| b.in_flight).count());
        let mut order = Vec::new();
        for batch in &mut self.outstanding {
            if room > 0 && !batch.in_flight && now_ms >= batch.retry_at_ms {
                batch.in_flight = true;
                order.push(batch.group);
                room -= 1;
            }
        }
        let mut started: Vec<(Group, Vec<Settlement>)> = Vec::new();
        let mut left = VecDeque::with_capacity(self.waiting.len());
        while let Some(item) = self.waiting.pop_front() {
            let group = self.group_of(&item);
            let at = match started.iter().position(|(g, _)| *g == group) {
                Some(at) => Some(at),
                None if started.len() < room
                    && !self.outstanding.iter().any(|b| b.group == group) =>
                {
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
        for (group, items) in started {
            let seq = self.next_seq.entry(group).or_insert(1);
            self.outstanding.push(Batch {
                group,
                seq: *seq,
                items,
                in_flight: true,
                first_sent_ms: now_ms,
                retry_at_ms: now_ms,
                next_backoff_ms: MIN_BACKOFF_MS,
            });
            *seq += 1;
            order.push(group);
        }
        order
    }

    /// Starts the next batch due, if any, and returns it.
    #[cfg(test)]
    pub fn start_batch(&mut self, now_ms: u64) -> Option<&[Settlement]> {
        let group = self.start_batches(now_ms).into_iter().next()?;
        Some(self.in_flight(group))
    }

    fn outstanding(&self, group: Group) -> Option<&Batch> {
        self.outstanding.iter().find(|b| b.group == group)
    }

    /// `group`'s batch on its way (empty when none is).
    pub fn in_flight(&self, group: Group) -> &[Settlement] {
        self.outstanding(group)
            .filter(|b| b.in_flight)
            .map_or(&[], |b| b.items.as_slice())
    }

    /// The sequence number of `group`'s batch on its way (Redis applies it only once).
    pub fn in_flight_seq(&self, group: Group) -> u64 {
        self.outstanding(group).map_or(0, |b| b.seq)
    }

    /// `group`'s batch was answered, or failed: a failed batch is kept, to be sent again as it
    /// is after a backoff (Redis applies it once), unless Redis would no longer remember it.
    pub fn on_batch_reply(
        &mut self,
        group: Group,
        reply: Result<RedisReply, TransportError>,
        now_ms: u64,
    ) -> BatchReport {
        let mut report = BatchReport::default();
        let Some(at) = self
            .outstanding
            .iter()
            .position(|b| b.group == group && b.in_flight)
        else {
            return report;
        };
        let n = self.outstanding.get(at).map_or(0, |b| b.items.len());
        match reply.and_then(|r| functions::parse_settled(r, n)) {
            Ok(answer) => {
                let batch = self.outstanding.swap_remove(at);
                report.applied_waiters = batch.items.iter().filter_map(|i| i.waiter).collect();
                report.applied_fail_open = batch
                    .items
                    .iter()
                    .filter(|i| i.fail_open)
                    .map(|i| (i.user.clone(), i.action.clone(), i.period_id.clone()))
                    .collect();
                match answer {
                    SettleReply::Applied(settled) => {
                        for (item, settled) in batch.items.into_iter().zip(settled) {
                            tally(&mut report, &item, settled.done);
                            let record = Recorded {
                                plan: settled.entitled_plan,
                                anchor: settled.entitled_anchor,
                            };
                            report.entitlements.push((item.user, record));
                        }
                    }
                    SettleReply::AppliedBefore => {
                        report.applied_before = batch.items.len() as u64;
                        for item in &batch.items {
                            tally(&mut report, item, Some(true));
                        }
                    }
                }
            }
            Err(error) => {
                if let Some(batch) = self.outstanding.get_mut(at) {
                    if now_ms.saturating_sub(batch.first_sent_ms) >= APPLIED_MEMORY_MS {
                        let batch = self.outstanding.swap_remove(at);
                        report.lost = batch.items;
                    } else {
                        batch.in_flight = false;
                        batch.retry_at_ms = now_ms + batch.next_backoff_ms;
                        batch.next_backoff_ms = (batch.next_backoff_ms * 2).min(MAX_BACKOFF_MS);
                        report.retried = batch.items.len() as u64;
                    }
                }
                report.error = Some(error);
            }
        }
        report
    }
}

/// Adds one answered item to `report`: `done` is what Redis said (`None`: refused).
fn tally(report: &mut BatchReport, item: &Settlement, done: Option<bool>) {
    let Some(done) = done else {
        report.refused += 1;
        return;
    };
    match (item.mode, done) {
        (SettleMode::Release, _) => report.released += 1,
        (SettleMode::GiveBack | SettleMode::Lost, _) => {}
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
                None => report
                    .counted_by
                    .push((item.action.clone(), item.plan.clone(), 1)),
            }
        }
        (SettleMode::Commit | SettleMode::Count, false) => report.commits_unmatched += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::UsageKeys;

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
            metadata: String::new(),
            in_grace: false,
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
            certain: true,
            waiter: None,
            fail_open: false,
        }
    }

    /// What plan_limits_settle answers when it applies a batch: per item, done and the user's
    /// entitled plan (none).
    fn settled(done: &[i64]) -> Result<RedisReply, TransportError> {
        let items = done
            .iter()
            .flat_map(|&d| [RedisReply::Int(d), RedisReply::Nil, RedisReply::Nil]);
        Ok(RedisReply::Array(
            std::iter::once(RedisReply::Int(1)).chain(items).collect(),
        ))
    }

    /// What it answers for a batch it applied before.
    fn applied_before() -> Result<RedisReply, TransportError> {
        Ok(RedisReply::Array(vec![RedisReply::Int(0)]))
    }

    fn timeout() -> Result<RedisReply, TransportError> {
        Err(TransportError::Unknown("timeout".into()))
    }

    #[test]
    fn batches_are_sent_one_at_a_time_each_with_the_next_number() {
        let mut q = SettlementQueue::new(100, 2);
        for id in ["a", "b", "c"] {
            q.push(item(SettleMode::Commit, id));
        }
        let first = q.start_batch(0).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(q.in_flight_seq(Group::All), 1);
        assert!(q.batch_in_flight());
        assert!(q.start_batch(0).is_none(), "one batch in flight");
        let report = q.on_batch_reply(Group::All, settled(&[1, 0]), 0);
        assert_eq!((report.counted, report.commits_unmatched), (1, 1));
        assert_eq!(
            report.entitlements,
            [
                ("u".into(), Recorded::default()),
                ("u".into(), Recorded::default())
            ]
        );
        assert_eq!(q.start_batch(0).unwrap()[0].reservation_id, "c");
        assert_eq!(q.in_flight_seq(Group::All), 2);
        q.on_batch_reply(Group::All, settled(&[1]), 0);
        assert!(q.is_empty() && !q.batch_in_flight());
    }

    #[test]
    fn extends_releases_and_refused_items_are_reported() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Extend, "a"));
        q.push(item(SettleMode::Extend, "b"));
        q.push(item(SettleMode::Release, "c"));
        q.push(item(SettleMode::Count, "d"));
        q.start_batch(0).unwrap();
        let report = q.on_batch_reply(Group::All, settled(&[1, 0, 1, -1]), 0);
        assert_eq!(
            (
                report.extended,
                report.released,
                report.counted,
                report.refused
            ),
            (1, 1, 0, 1)
        );
    }

    #[test]
    fn a_failed_batch_goes_again_as_it_was_after_a_backoff_and_later_ones_wait() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Commit, "a"));
        q.push(item(SettleMode::Count, "b"));
        q.push(item(SettleMode::Release, "c"));
        q.start_batch(0).unwrap();
        // Its outcome is unknown: it may have run. Every item goes again, under the same
        // number, so Redis applies it once either way.
        let report = q.on_batch_reply(Group::All, timeout(), 1000);
        assert_eq!((report.retried, report.lost.len()), (3, 0));
        q.push(item(SettleMode::Count, "d"));
        assert!(q.start_batch(1000).is_none(), "backing off");
        assert_eq!(
            ids(q.start_batch(1000 + MIN_BACKOFF_MS).unwrap()),
            ["a", "b", "c"],
            "the same batch, and only it: d waits for its answer"
        );
        assert_eq!(q.in_flight_seq(Group::All), 1);
        let report = q.on_batch_reply(
            Group::All,
            Err(TransportError::NotSent("down".into())),
            2000,
        );
        assert_eq!(report.retried, 3);
        assert!(
            q.start_batch(2000 + MIN_BACKOFF_MS).is_none(),
            "backoff doubled"
        );
        assert!(q.start_batch(2000 + 2 * MIN_BACKOFF_MS).is_some());
        // Its first attempt had run after all: Redis says so, and nothing runs twice.
        let report = q.on_batch_reply(Group::All, applied_before(), 3000);
        assert_eq!((report.applied_before, report.counted), (3, 2));
        assert_eq!(ids(q.start_batch(3000).unwrap()), ["d"]);
        assert_eq!(q.in_flight_seq(Group::All), 2);
    }

    #[test]
    fn a_batch_redis_no_longer_remembers_is_given_up() {
        let mut q = SettlementQueue::new(100, 10);
        q.push(item(SettleMode::Commit, "a"));
        q.push(item(SettleMode::Count, "b"));
        q.start_batch(0).unwrap();
        q.on_batch_reply(Group::All, timeout(), 10);
        q.start_batch(APPLIED_MEMORY_MS).unwrap();
        let report = q.on_batch_reply(Group::All, timeout(), APPLIED_MEMORY_MS);
        assert_eq!(ids(&report.lost), ["a", "b"]);
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
        let report = q.on_batch_reply(bob, settled(&[1, 1]), 0);
        assert_eq!(report.counted, 2);
        assert!(q.start_batches(0).is_empty(), "alice's is still in flight");
        q.on_batch_reply(alice, settled(&[1, 1]), 0);
        assert_eq!(q.start_batches(0), [alice]);
        assert_eq!(ids(q.in_flight(alice)), ["a3"]);
        assert_eq!(q.in_flight_seq(alice), 2, "numbered per slot");
        assert!(q.batch_in_flight());
    }

    #[test]
    fn a_failed_slot_is_retried_on_its_own() {
        let (alice, bob) = (slot_of("alice"), slot_of("bob"));
        let mut q = SettlementQueue::new(100, 10);
        q.group_by_slot(true);
        q.push(item_of("alice", SettleMode::Commit, "a1"));
        q.push(item_of("alice", SettleMode::Count, "a2"));
        q.push(item_of("bob", SettleMode::Count, "b1"));
        assert_eq!(q.start_batches(0), [alice, bob]);
        // Alice's master timed out: her batch goes again whole. Bob's succeeded.
        let report = q.on_batch_reply(alice, timeout(), 1000);
        assert_eq!(report.retried, 2);
        assert_eq!(q.on_batch_reply(bob, settled(&[1]), 1000).counted, 1);
        q.push(item_of("bob", SettleMode::Count, "b2"));
        q.push(item_of("alice", SettleMode::Count, "a3"));
        // Alice's slot backs off; bob's goes on meanwhile.
        assert_eq!(q.start_batches(1000), [bob]);
        q.on_batch_reply(bob, settled(&[1]), 1000);
        assert!(q.start_batches(1000 + MIN_BACKOFF_MS - 1).is_empty());
        assert_eq!(q.start_batches(1000 + MIN_BACKOFF_MS), [alice]);
        assert_eq!(ids(q.in_flight(alice)), ["a1", "a2"]);
        // Failing again doubles only alice's wait.
        q.on_batch_reply(alice, Err(TransportError::NotSent("down".into())), 2000);
        assert!(q.start_batches(2000 + MIN_BACKOFF_MS).is_empty());
        assert_eq!(q.start_batches(2000 + 2 * MIN_BACKOFF_MS), [alice]);
        let report = q.on_batch_reply(alice, settled(&[0, 1]), 3000);
        assert_eq!(
            report.commits_unmatched, 1,
            "its reservation was committed before"
        );
        assert_eq!(q.start_batches(3000), [alice]);
        assert_eq!(ids(q.in_flight(alice)), ["a3"]);
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
        q.on_batch_reply(first[0], settled(&vec![1; answered]), 0);
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
