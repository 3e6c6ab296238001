//! The tick and the settlements: queued, extended, sent in batches (one per slot on a
//! cluster), their answers applied; drains and held responses that ran out of time.

use chrono::{DateTime, Utc};

use crate::cluster;
use crate::keys;
use crate::metrics::{self, Metric};
use crate::plans::Plans;
use crate::redis::functions::{self, EventsTrim, SettleArgs};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::request::unix_millis;
use crate::settlement::Settlement;
use crate::settlement_queue::{BatchReport, Group, APPLIED_MEMORY_MS};

use super::fail_open::add_unsettled_pass;
use super::{invoke, Io, LogLevel, Stream, Waiter, Worker, HEARTBEAT_MS};

/// Records of lost settlements kept per worker until Redis takes them (one per user, action,
/// period and reason); beyond this many, a loss is counted and logged only.
const MAX_TRACKED_LOSSES: usize = 1024;

impl Worker {
    /// Queues each of `settlements` (none, one, or a lease's units) for the next batch.
    pub(super) fn queue(
        &mut self,
        settlements: impl IntoIterator<Item = Settlement>,
        io: &mut dyn Io,
    ) {
        for settlement in settlements {
            if let Some(dropped) = self.settlements.push(settlement) {
                io.log(
                    LogLevel::Warn,
                    "plan-limits: settlement queue full, oldest settlement dropped".into(),
                );
                self.lose(&dropped, "queue_full", io);
            }
        }
    }

    /// `settlement` is given up: a lost count (or give-back) is counted, logged by the caller,
    /// and kept to be recorded in Redis as a `lost` event (one per user, action, period and
    /// reason, however many) once there is room.
    fn lose(&mut self, settlement: &Settlement, reason: &str, io: &mut dyn Io) {
        if !settlement.loses_a_count() {
            return;
        }
        let lost = Settlement::lost(settlement, reason);
        let units = lost.adds.unwrap_or(1);
        io.count(Metric::SettlementsDropped, units);
        let tracked = self.losses.len();
        match self.losses.iter_mut().find(|l| l.same_loss(&lost)) {
            Some(known) => known.adds = Some(known.adds.unwrap_or(0).saturating_add(units)),
            None if tracked < MAX_TRACKED_LOSSES => self.losses.push(lost),
            None => io.log(
                LogLevel::Error,
                format!("plan-limits: {units} lost settlements could not be recorded as events (too many users with losses)"),
            ),
        }
    }

    /// Moves the records of losses into the queue while it has room to spare.
    fn queue_losses(&mut self) {
        let room = self.settlements.capacity() / 2;
        while self.settlements.len() < room {
            let Some(lost) = self.losses.pop() else { break };
            self.settlements.push(lost);
        }
    }

    /// The periodic tick (`flush_interval_ms`): extend the reservations of requests still in
    /// flight that need it, send queued settlements.
    pub fn on_tick(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
        let now_ms = unix_millis(now);
        self.release_overdue_responses(now_ms, io);
        self.end_overdue_drains(now_ms, io);
        if self.sent_record_at_ms == 0 {
            // (Started: a heartbeat is due a HEARTBEAT_MS from now, unless a batch goes first.)
            self.sent_record_at_ms = now_ms;
        } else if now_ms.saturating_sub(self.sent_record_at_ms) >= HEARTBEAT_MS
            && !self.settlements.batch_in_flight()
        {
            self.send_record(now, io);
        }
        self.extend_held(now, io);
        let expired = self.leases.expire(now_ms, false);
        self.queue(expired, io);
        self.flush(now, io);
        self.report_queue(io);
    }

    /// Refused streams whose body has been read for `max_drain_ms` are answered now, whatever
    /// their client still sends (at one byte a second it holds a connection no longer).
    fn end_overdue_drains(&mut self, now_ms: u64, io: &mut dyn Io) {
        let max_ms = self.plans.as_ref().map_or(0, |p| p.max_drain_ms);
        for (stream, state) in &mut self.streams {
            let drain = match state {
                Stream::Draining(drain) => drain,
                Stream::Metered(entry) => match &mut entry.drain {
                    Some(drain) => drain,
                    None => continue,
                },
                Stream::Reporting(_) | Stream::Releasing { .. } => continue,
            };
            if drain.response.is_some() && drain.overdue(now_ms, max_ms) {
                if let Some(response) = drain.response.take() {
                    io.respond(*stream, &response);
                }
            }
        }
    }

    /// Responses whose commit Redis has not answered in time go on anyway: their count lands
    /// once Redis answers (exactly once); only their client's next request may see it in
    /// flight meanwhile.
    fn release_overdue_responses(&mut self, now_ms: u64, io: &mut dyn Io) {
        for (stream, state) in &mut self.streams {
            let Stream::Metered(entry) = state else {
                continue;
            };
            if entry
                .awaiting_commit_until
                .is_some_and(|until| now_ms >= until)
            {
                entry.awaiting_commit_until = None;
                io.count(Metric::CommitsNotAwaited, 1);
                io.resume_response(*stream);
            }
        }
    }

    /// Brings this worker's share of the queued-settlements gauge up to date.
    pub(super) fn report_queue(&mut self, io: &mut dyn Io) {
        let queued = i64::try_from(self.settlements.len()).unwrap_or(i64::MAX);
        if queued != self.queue_reported {
            io.record(&metrics::settlements_queued(), queued - self.queue_reported);
            self.queue_reported = queued;
        }
    }

    /// A reservation is extended every third of its expiry while its request is in flight,
    /// so a slow upload keeps its unit and a dead Envoy's expires.
    fn extend_held(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
        let Some(plans) = self.plans.clone() else {
            return;
        };
        let every_ms = plans.redis.reservation_ttl_ms / 3;
        let now_ms = unix_millis(now);
        if now_ms.saturating_sub(self.extended_at_ms) < every_ms / 4 {
            return;
        }
        self.extended_at_ms = now_ms;
        let extensions: Vec<Settlement> = self
            .streams
            .values_mut()
            .filter_map(|state| match state {
                Stream::Metered(entry) => entry.request.extension(now, every_ms, &plans.redis),
                _ => None,
            })
            .collect();
        self.queue(extensions, io);
    }

    /// Sends the batches that are due: the next one (one Redis), or one per slot with
    /// settlements waiting and none in flight (a cluster).
    pub(super) fn flush(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
        let Some(plans) = self.plans.clone() else {
            return;
        };
        let redis = &plans.redis;
        let now_ms = unix_millis(now);
        self.queue_losses();
        for group in self.settlements.start_batches(now_ms) {
            let seq = self.settlements.in_flight_seq(group);
            let queued = self.queued_settlements();
            let command = self.settle_command(
                &plans,
                group,
                self.settlements.in_flight(group),
                seq,
                now_ms,
                queued,
            );
            self.sent_record_at_ms = now_ms;
            match invoke(io, redis, command) {
                Ok(token) => {
                    self.said_goodbye |= self.stopping;
                    self.calls.sent(token, Waiter::Batch(group), now);
                }
                Err(e) if self.redis_down_since_ms.is_none() => {
                    self.note_redis(false, now, io);
                    self.apply_batch_reply(group, Err(e), now, io);
                }
                // Requeued with a backoff: this flush does not start it again.
                Err(e) => self.apply_batch_reply(group, Err(e), now, io),
            }
        }
    }

    /// The `plan_limits_settle` call of `items` as `group`'s batch number `seq` (no items: the
    /// worker's heartbeat or goodbye, in its record only).
    pub(super) fn settle_command(
        &self,
        plans: &Plans,
        group: Group,
        items: &[Settlement],
        seq: u64,
        now_ms: u64,
        queued: usize,
    ) -> RedisCommand {
        let redis = &plans.redis;
        let (events_stream, tag) = match group {
            Group::All => (redis.events_stream.clone(), None),
            Group::Slot(slot) => (
                cluster::slot_events_stream(&redis.events_stream, slot),
                Some(cluster::slot_tag(slot)),
            ),
        };
        let applied_key = keys::applied_batches(&redis.key_prefix, &self.ids.worker(), tag);
        functions::settle(
            items,
            SettleArgs {
                events_stream: &events_stream,
                events_trim: match (redis.events_max_len, redis.events_retention_days) {
                    (Some(n), _) => EventsTrim::MaxLen(n),
                    (None, Some(days)) => EventsTrim::MaxAgeMs(u64::from(days) * 86_400_000),
                    (None, None) => EventsTrim::KeepAll,
                },
                now_ms,
                ttl_ms: redis.reservation_ttl_ms,
                remember_commits_ms: redis.commit_memory_ms,
                keep_days_ms: u64::from(redis.history_retention_days) * 86_400_000,
                warning_thresholds: &plans.warnings.thresholds,
                applied_key: &applied_key,
                seq,
                applied_memory_ms: APPLIED_MEMORY_MS,
                queued,
                stopping: self.stopping,
            },
        )
    }

    pub(super) fn on_batch_reply(
        &mut self,
        group: Group,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        self.apply_batch_reply(group, reply, now, io);
        // More may be waiting: keep the queue moving without waiting for the next tick (a
        // failed batch backs off first, so this ends).
        self.flush(now, io);
        if self.stopping && !self.settlements.batch_in_flight() {
            self.report_queue(io);
            // A batch sent before the worker was told to stop did not say goodbye: a record
            // does (its answer ends the worker), so Redis knows it stopped, not killed.
            if self.said_goodbye || self.send_record(now, io).is_none() {
                io.done();
            }
        }
    }

    /// What `group`'s batch's answer means: counts learnt, metrics, what goes again.
    fn apply_batch_reply(
        &mut self,
        group: Group,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let Some(plans) = self.plans.clone() else {
            return;
        };
        let now_ms = unix_millis(now);
        let report = self.settlements.on_batch_reply(group, reply, now_ms);
        for (user, record) in &report.entitlements {
            let for_ms = plans.redis.entitlement_cache_ms;
            self.entitlements
                .learn(user, record.clone(), now_ms, for_ms);
        }
        record(&report, io);
        for lost in &report.lost {
            self.lose(lost, "redis_unreachable", io);
        }
        for stream in &report.applied_waiters {
            let Some(Stream::Metered(entry)) = self.streams.get_mut(stream) else {
                continue;
            };
            if entry.awaiting_commit_until.take().is_some() {
                io.resume_response(*stream);
            }
        }
        for (user, action, period) in &report.applied_fail_open {
            add_unsettled_pass(io, &plans.redis, user, action, period, -1);
        }
    }

    /// Whether Redis just answered this worker usably: the outage gauge and a log line when that
    /// changes.
    pub(super) fn note_redis(&mut self, usable: bool, now: DateTime<Utc>, io: &mut dyn Io) {
        let now_ms = unix_millis(now);
        match (self.redis_down_since_ms, usable) {
            (None, false) => {
                self.redis_down_since_ms = Some(now_ms);
                io.record(&metrics::redis_unreachable(), 1);
                io.log(
                    LogLevel::Warn,
                    "plan-limits: Redis does not answer this worker usably; limits hold only within fail-open's bounds until it does".into(),
                );
            }
            (Some(since), true) => {
                self.redis_down_since_ms = None;
                io.record(&metrics::redis_unreachable(), -1);
                io.log(
                    LogLevel::Info,
                    format!(
                        "plan-limits: Redis answers again after {} ms",
                        now_ms.saturating_sub(since)
                    ),
                );
            }
            _ => {}
        }
    }
}

pub(super) fn record(report: &BatchReport, io: &mut dyn Io) {
    io.count(Metric::Counted, report.counted);
    for (action, plan, n) in &report.counted_by {
        io.record(
            &metrics::counted(action, plan),
            i64::try_from(*n).unwrap_or(i64::MAX),
        );
    }
    io.count(Metric::Released, report.released);
    io.count(Metric::Extended, report.extended);
    io.count(Metric::CommitsUnmatched, report.commits_unmatched);
    io.count(Metric::SettlementsRefused, report.refused);
    if report.refused > 0 {
        io.log(
            LogLevel::Error,
            format!(
                "plan-limits: Redis refused {} settlements (a value out of range); each is a settle_refused event",
                report.refused
            ),
        );
    }
    if report.applied_before > 0 {
        io.log(
            LogLevel::Info,
            format!(
                "plan-limits: a settlement batch of {} sent again had been applied by its first attempt",
                report.applied_before
            ),
        );
    }
    if let Some(e) = &report.error {
        io.count(Metric::SettleErrors, 1);
        io.log(
            LogLevel::Warn,
            format!(
                "plan-limits: settlement batch failed ({e}); {} to send again as they were, {} given up",
                report.retried,
                report.lost.len()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    #[test]
    fn reservations_of_requests_still_in_flight_are_extended() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        w.on_tick(now(), &mut io);
        assert_eq!(w.queued_settlements(), 0, "just reserved");
        // A third of the 60 s expiry later, the upload is still being sent.
        let later = now() + chrono::Duration::seconds(20);
        w.on_tick(later, &mut io);
        let (token, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"extend"));
        w.on_reply(token, settled(&[1]), later, &mut io);
        assert_eq!(io.count_of(Metric::Extended), 1);
        w.on_response_headers(1, 200, None, later, &mut io);
        w.on_stream_end(1, true, later, &mut io);
        let much_later = later + chrono::Duration::seconds(60);
        w.on_tick(much_later, &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"commit"));
        assert!(
            !batch.args.iter().any(|a| a == b"extend"),
            "settled: no more extensions"
        );
    }

    #[test]
    fn a_batch_of_successes_updates_their_counter_once_per_action_and_plan() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for stream in 1..=3 {
            view_of(&mut w, stream, "u", "free", &mut io);
        }
        w.on_tick(now(), &mut io);
        let (batch, _) = io.last_sent();
        w.on_reply(batch, settled(&[1, 1, 1]), now(), &mut io);
        let counted: Vec<i64> = io
            .recorded
            .iter()
            .filter(|(m, _)| m.name.ends_with("plan_limits_successes_counted"))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(counted, [3]);
    }

    #[test]
    fn a_settlement_batch_that_cannot_be_sent_is_retried() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        view_of(&mut w, 1, "u", "free", &mut io);
        io.refuse_sends = true;
        w.on_tick(now(), &mut io);
        assert_eq!(io.count_of(Metric::SettleErrors), 1);
        assert_eq!(w.queued_settlements(), 1, "kept: it certainly did not run");
        io.refuse_sends = false;
        w.on_tick(now() + chrono::Duration::seconds(1), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 1);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn a_full_settlement_queue_drops_the_oldest_and_says_so() {
        let mut io = Recorder::default();
        let json = plans_json_with(|p| p["redis"]["max_queued_settlements"] = 2.into());
        let mut w = worker_with(&mut io, &json);
        for stream in 1..=3 {
            view_of(&mut w, stream, "u", "free", &mut io);
        }
        assert_eq!(
            w.queued_settlements(),
            3,
            "two, and the record of the lost one"
        );
        assert_eq!(io.count_of(Metric::SettlementsDropped), 1);
        // Two more are lost the same way: one record of the user's three lost views goes to
        // Redis once the queue has room.
        for stream in 4..=5 {
            view_of(&mut w, stream, "u", "free", &mut io);
        }
        assert_eq!(io.count_of(Metric::SettlementsDropped), 3);
        for _ in 0..3 {
            w.on_tick(now(), &mut io);
            let (token, batch) = io.last_sent();
            let items = vec![1; items_of(batch)];
            w.on_reply(token, settled(&items), now(), &mut io);
        }
        let lost: Vec<_> = io
            .sent
            .iter()
            .filter(|(_, c)| c.args.iter().any(|a| a == b"lost"))
            .collect();
        assert_eq!(lost.len(), 1, "one record");
        let args = &lost[0].1.args;
        let at = args.iter().position(|a| a == b"lost").unwrap();
        assert_eq!(args[at + 2], b"procedure_view");
        assert_eq!(args[at + 6], b"queue_full", "why, in its kind");
        assert_eq!(args[at + 14], b"3", "three units");
    }

    #[test]
    fn a_batch_names_each_key_once_and_limits_only_when_they_change() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for (stream, user) in [(1, "alice"), (2, "alice"), (3, "bob"), (4, "alice")] {
            view_of(&mut w, stream, user, "free", &mut io);
        }
        // Bob again, on another plan (other limits).
        view_of(&mut w, 5, "bob", "professional", &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert_eq!(items_of(batch), 5);
        let text = |a: &[u8]| String::from_utf8_lossy(a).into_owned();
        let call = settle_call(batch);
        let keys: Vec<String> = call.keys.iter().map(|k| text(k)).collect();
        // The stream, the worker's record, then five keys of each user (summary, pending,
        // commits, entitlement, day; the marker and gauges stand in with them): 12, not 42.
        assert_eq!(keys.len(), 12, "{keys:?}");
        let items = call.items;
        for (item, user) in items.iter().zip(["alice", "alice", "bob", "alice", "bob"]) {
            assert_eq!(text(&item[3]), user);
            // Each position names a key of its own user (the item's last field).
            for position in text(item.last().unwrap()).split(' ') {
                let key = &keys[position.parse::<usize>().unwrap() - 1];
                assert!(key.contains(&format!("{{{user}}}")), "{key} for {user}");
            }
        }
        // Limits in full for the first item and where the plan changes, else ''.
        let limits: Vec<bool> = items.iter().map(|item| item[5].is_empty()).collect();
        assert_eq!(limits, [false, true, true, true, false]);
    }

    #[test]
    fn on_a_cluster_each_slots_settlements_go_in_a_call_of_their_own() {
        let mut io = Recorder::default();
        let mut w = worker_with(&mut io, &plans_json_with(on_a_cluster));
        for (stream, user) in [(1, "alice"), (2, "bob"), (3, "alice")] {
            view_of(&mut w, stream, user, "free", &mut io);
        }
        w.on_tick(now(), &mut io);
        assert_eq!(io.sent.len(), 2, "one call per slot: {:?}", io.sent);
        let mut slots = Vec::new();
        for (_, command) in &io.sent {
            assert_eq!(
                name(command),
                (&b"FCALL"[..], &b"plan_limits_settle_v2"[..])
            );
            let keys = slots_of(command);
            assert!(keys.iter().all(|&k| k == keys[0]), "one slot: {keys:?}");
            // The events stream first, in the same slot.
            let stream = String::from_utf8(command.args[3].clone()).unwrap();
            assert!(stream.starts_with(&format!("plan-limits:events:{}:{{", keys[0])));
            slots.push(keys[0]);
        }
        assert_ne!(slots[0], slots[1]);
        let alices = io.sent[0].1.args.iter().filter(|a| *a == b"count").count();
        assert_eq!(alices, 2, "alice's two views share her slot's call");
        // Answered in either order; a stopping worker is done once both are.
        let (first, second) = (io.sent[0].0, io.sent[1].0);
        assert!(!w.on_shutdown(now(), &mut io));
        w.on_reply(second, settled(&[1]), now(), &mut io);
        assert_eq!(io.done, 0, "alice's call is still on its way");
        w.on_reply(first, settled(&[1, 1]), now(), &mut io);
        // Neither batch said goodbye (both went before the worker was told to stop): a record
        // does, and its answer ends the worker.
        assert_eq!(io.done, 0);
        let (goodbye, record) = io.last_sent();
        assert_eq!(
            record.args.last().map(Vec::as_slice),
            Some(&b"1"[..]),
            "it stops"
        );
        w.on_reply(goodbye, settled(&[]), now(), &mut io);
        assert_eq!(io.done, 1);
        assert_eq!(io.count_of(Metric::Counted), 3);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn on_a_cluster_a_slot_whose_call_fails_does_not_hold_back_the_others() {
        let mut io = Recorder::default();
        let mut w = worker_with(&mut io, &plans_json_with(on_a_cluster));
        view_of(&mut w, 1, "alice", "free", &mut io);
        view_of(&mut w, 2, "bob", "free", &mut io);
        w.on_tick(now(), &mut io);
        let (alice, bob) = (io.sent[0].0, io.sent[1].0);
        w.on_reply(
            alice,
            Err(TransportError::NotSent("down".into())),
            now(),
            &mut io,
        );
        assert_eq!(
            w.queued_settlements(),
            2,
            "alice's kept: it certainly did not run"
        );
        w.on_reply(bob, settled(&[1]), now(), &mut io);
        view_of(&mut w, 3, "bob", "free", &mut io);
        w.on_tick(now(), &mut io);
        let (token, command) = io.last_sent();
        assert_eq!(io.sent.len(), 3, "bob's goes; alice's backs off");
        assert!(command.args.iter().any(|a| a == b"bob"));
        w.on_reply(token, settled(&[1]), now(), &mut io);
        w.on_tick(now() + chrono::Duration::seconds(1), &mut io);
        let (token, command) = io.last_sent();
        assert!(command.args.iter().any(|a| a == b"alice"));
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 3);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn settlements_carry_the_request() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let h = head("POST", "/api/teammate?kind=vision", "u", "free")
            .header("x-request-id", b"req-1")
            .header("x-has-diagram", b"true")
            .header("authorization", b"Bearer secret");
        send(&mut w, 1, &h, &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        // The session the upstream opened, as plans.json lists for AI analyses.
        assert_eq!(w.response_metadata_wanted(1), ["x-session-id"]);
        w.on_response_metadata(1, "x-session-id", b"s-42");
        w.on_response_headers(1, 200, None, now(), &mut io);
        let s = &w.settlements.in_flight(Group::All)[0];
        assert_eq!(
            (
                s.mode,
                s.action.as_str(),
                s.kind.as_str(),
                s.request_id.as_str()
            ),
            (SettleMode::Commit, "ai_analysis", "vision", "req-1")
        );
        assert_eq!(s.metadata, r#"{"has_diagram":"true","session":"s-42"}"#);
    }
}
