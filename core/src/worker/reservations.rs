//! Reservations: sent at once or grouped in the next call, and what their answer decides
//! (on, or answered here; Redis unreachable: the action's failure mode).

use chrono::{DateTime, Utc};

use crate::entitlements::Recorded;
use crate::metrics::{Metric, Outcome};
use crate::plans::Plans;
use crate::redis::functions::{self, ReserveStatus};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::request::{unix_millis, Decision, MeteredRequest};
use crate::responses::{self, LocalResponse};

use super::fail_open::{record_budget, spend_outage_budget};
use super::leases;
use super::{
    count_outcome, invoke, set_identity, Io, LogLevel, Metered, Stream, StreamId, Waiter, Worker,
};

/// With `coalesce_reservations`, the most calls carrying reservations a worker has in flight:
/// a reservation is sent at once while fewer are, and waits for the next answer otherwise (so
/// up to this many requests at once never wait, and under load one call carries many).
pub(super) const RESERVATION_CALLS: usize = 4;

impl Worker {
    /// Sends `stream`'s reservation at once; with `coalesce_reservations`, only while fewer
    /// than `RESERVATION_CALLS` of this worker's are in flight, else it waits, with those
    /// arriving meanwhile, for an answer and goes in the next call with them (a group
    /// commit). `Err`: it could not be sent.
    pub(super) fn ask(
        &mut self,
        stream: StreamId,
        command: RedisCommand,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Result<(), TransportError> {
        // (On a Redis Cluster each reservation goes alone: one call touches one slot.)
        let calls = &mut self.calls;
        let busy = calls.reserving >= RESERVATION_CALLS || !calls.waiting_reservations.is_empty();
        if busy && plans.redis.coalesce_reservations && !plans.redis.cluster_mode {
            calls.waiting_reservations.push((stream, command));
            return Ok(());
        }
        let token = invoke(io, &plans.redis, command)?;
        calls.sent(token, Waiter::Reservations(vec![stream]), now);
        calls.reserving += 1;
        Ok(())
    }

    /// Sends the reservations that waited for the last call, as one call (up to `max_batch`).
    pub(super) fn send_waiting_reservations(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
        let Some(plans) = self.plans.clone() else {
            return;
        };
        while self.calls.reserving < RESERVATION_CALLS
            && !self.calls.waiting_reservations.is_empty()
        {
            let waiting = &mut self.calls.waiting_reservations;
            let n = waiting.len().min(plans.redis.max_batch.max(1));
            let (streams, commands): (Vec<StreamId>, Vec<RedisCommand>) =
                waiting.drain(..n).unzip();
            let command = match <[RedisCommand; 1]>::try_from(commands) {
                Ok([one]) => one,
                Err(many) => functions::reserve_many(&many.iter().collect::<Vec<_>>()),
            };
            let sent = invoke(io, &plans.redis, command);
            match sent {
                Ok(token) => {
                    self.calls.sent(token, Waiter::Reservations(streams), now);
                    self.calls.reserving += 1;
                }
                // Not sent at all: each follows its failure mode now.
                Err(e) => {
                    for stream in streams {
                        self.on_reservation(stream, Err(e.clone()), now, io);
                    }
                }
            }
        }
    }

    /// Asks for `entry`'s reservation again under the same id (its anchor was corrected); the
    /// stream stays paused until the answer.
    fn reserve_again(
        &mut self,
        stream: StreamId,
        mut entry: Metered,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let id = entry.request.reservation_id().to_string();
        let limit = entry.request.limit().unwrap_or(0);
        let command = entry.request.reserve(limit, id, unix_millis(now), plans);
        match self.ask(stream, command, plans, now, io) {
            Ok(()) => {}
            Err(e) => {
                let decision = entry.request.on_reservation(Err(e), now);
                match self.carry_out(stream, &mut entry.request, decision, plans, now, io) {
                    Ok(()) => io.resume(stream),
                    Err(response) => entry.answer_and_resume(stream, response, io),
                }
            }
        }
        self.streams.insert(stream, Stream::Metered(entry));
    }

    /// Counts, logs and remembers what a reservation's answer decided; `Err` is the answer
    /// the client gets instead of the upstream's. A request that goes on gets its verified
    /// identity headers.
    pub(super) fn carry_out(
        &mut self,
        stream: StreamId,
        request: &mut MeteredRequest,
        decision: Decision,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Result<(), LocalResponse> {
        let redis = &plans.redis;
        match decision {
            Decision::Allowed => {
                count_outcome(io, request, Outcome::Allowed);
                set_identity(stream, request, plans, io);
                Ok(())
            }
            Decision::Denied {
                response,
                final_refusal,
            } => {
                count_outcome(io, request, Outcome::Denied);
                let response = with_ratelimit(response, request, plans, now);
                if final_refusal {
                    self.denials
                        .remember(request, &response, now, redis.deny_cache_ms);
                }
                Err(response)
            }
            Decision::Refused(response) => {
                count_outcome(io, request, Outcome::Rejected);
                Err(response)
            }
            Decision::Duplicate(response) => {
                count_outcome(io, request, Outcome::Duplicate);
                Err(response)
            }
            Decision::FailOpen(e) => {
                io.count(Metric::RedisErrors, 1);
                if !spend_outage_budget(request, redis, io) {
                    count_outcome(io, request, Outcome::FailOpenRefused);
                    let response = request.outage_refusal(now);
                    return Err(with_ratelimit(response, request, plans, now));
                }
                count_outcome(io, request, Outcome::FailOpen);
                // No user id: the log is not a place for who did what.
                if let Some(times) = self.fail_open_log.due(unix_millis(now)) {
                    io.log(
                        LogLevel::Warn,
                        format!(
                            "plan-limits: Redis did not answer ({e}); {times} requests let through unchecked (fail_open) in the last second"
                        ),
                    );
                }
                set_identity(stream, request, plans, io);
                Ok(())
            }
            Decision::FailClosed(e, response) => {
                io.count(Metric::RedisErrors, 1);
                count_outcome(io, request, Outcome::FailClosed);
                io.log(
                    LogLevel::Warn,
                    format!(
                        "plan-limits: {} refused (fail_closed): {e}",
                        request.action().key
                    ),
                );
                Err(response)
            }
        }
    }

    /// The paused `stream`'s reservation was answered: it goes on, or is answered here.
    pub(super) fn on_reservation(
        &mut self,
        stream: StreamId,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let (Some(plans), Some(mut entry)) = (self.plans.clone(), self.take_metered(stream)) else {
            return;
        };
        let parsed = reply.and_then(functions::parse_reservation);
        if let Ok(reservation) = &parsed {
            let now_ms = unix_millis(now);
            let for_ms = plans.redis.entitlement_cache_ms;
            // Only billing's record, never the caller's own claim.
            let recorded = Recorded {
                plan: reservation.recorded.then(|| reservation.plan.clone()),
                anchor: reservation.recorded_anchor,
            };
            self.entitlements
                .learn(entry.request.user(), recorded, now_ms, for_ms);
            let anchor = entry.request.anchor_in_force(reservation.recorded_anchor);
            if anchor != entry.request.anchor() && !entry.request.reanchored() {
                // Reserved in the period of a stale anchor: give that back, ask again in the
                // right one (once).
                let granted = reservation.status == ReserveStatus::Granted;
                let leased = reservation.leased;
                self.queue(
                    leases::unkept(&entry.request, leased, now, &plans.redis),
                    io,
                );
                let release = entry
                    .request
                    .abandon_reservation(granted, now, &plans.redis);
                self.queue(release, io);
                entry.request.reanchor(anchor, now);
                self.reserve_again(stream, entry, &plans, now, io);
                return;
            }
        }
        let request = &mut entry.request;
        let decision = request.on_parsed_reservation(parsed.as_ref().map_err(Clone::clone), now);
        if let Ok(reservation) = &parsed {
            self.note_unknown_plan(request, unix_millis(now), io);
            record_budget(request, reservation, &plans.redis, io);
        }
        let carried = self.carry_out(stream, &mut entry.request, decision, &plans, now, io);
        if let Some(reservation) = parsed.ok().filter(|r| r.leased > 0) {
            // Its lease is kept for the user's next requests if it was let through.
            let request = &entry.request;
            if carried.is_ok() {
                self.leases.add(request, reservation, now, &plans.redis);
            } else {
                let unkept = leases::unkept(request, reservation.leased, now, &plans.redis);
                self.queue(unkept, io);
            }
        }
        match carried {
            Ok(()) => io.resume(stream),
            Err(response) => entry.answer_and_resume(stream, response, io),
        }
        self.streams.insert(stream, Stream::Metered(entry));
    }
}

/// A refusal of `request` with the RateLimit fields of its allowance, if plans.json wants
/// them.
fn with_ratelimit(
    mut response: LocalResponse,
    request: &MeteredRequest,
    plans: &Plans,
    now: DateTime<Utc>,
) -> LocalResponse {
    if let (true, Some(quota)) = (plans.ratelimit_headers, request.quota()) {
        let reset = request.period().seconds_until_end(now);
        let key = &request.action().key;
        for (name, value) in responses::ratelimit_fields(key, quota.limit, quota.remaining, reset) {
            response.set_header(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::RESERVATION_CALLS;
    use crate::worker::fixtures::*;

    #[test]
    fn without_coalescing_each_reservation_goes_at_once_however_many_are_in_flight() {
        let calls = RESERVATION_CALLS as u32 + 1;
        let sent_for = |coalesce: bool| {
            let mut io = Recorder::default();
            let json = plans_json_with(|v| v["redis"]["coalesce_reservations"] = coalesce.into());
            let mut w = worker_with(&mut io, &json);
            for stream in 1..=calls {
                let user = format!("u{stream}");
                assert_eq!(send(&mut w, stream, &upload(&user), &mut io), Flow::Pause);
            }
            io.sent.len()
        };
        assert_eq!(sent_for(false), calls as usize, "each at once");
        assert_eq!(
            sent_for(true),
            RESERVATION_CALLS,
            "the default: the last one waits"
        );
    }

    #[test]
    fn a_limited_request_waits_for_its_reservation_then_commits() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        assert_eq!(send(&mut w, 7, &upload("u"), &mut io), Flow::Pause);
        let (token, reserve) = io.last_sent();
        assert_eq!(name(reserve), (&b"FCALL"[..], &b"plan_limits_reserve"[..]));
        assert_eq!(reserve.args[3], b"plan-limits:{u}:2026-11");
        assert_eq!(
            functions::reserve_args(reserve)[3],
            b"000000000000feed-0",
            "the VM's reservation id"
        );
        assert!(
            io.headers_of(7).is_empty(),
            "no identity before the decision"
        );
        w.on_reply(token, granted(), now(), &mut io);
        assert_eq!(io.resumed, [7]);
        assert_eq!(io.count_of(Metric::Allowed), 1);
        assert_eq!(
            io.headers_of(7),
            [
                ("x-user-id", "u"),
                ("x-user-plan", "free"),
                ("x-user-features", "")
            ]
        );
        w.on_response_headers(7, 201, None, now(), &mut io);
        w.on_stream_end(7, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"commit"));
        assert!(batch.args.iter().any(|a| a == b"000000000000feed-0"));
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 1);
    }

    #[test]
    fn billings_anchor_day_moves_a_request_to_its_period_once() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let with_anchor = |status: i64, anchor: &str| {
            let Ok(RedisReply::Array(mut items)) = reserved(status, 0, 1, "free") else {
                unreachable!()
            };
            let text = |s: &str| RedisReply::Bulk(s.as_bytes().to_vec());
            items.extend([RedisReply::Int(0), text(""), text(anchor)]);
            Ok(RedisReply::Array(items))
        };
        // The token names no anchor: the calendar month's keys.
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, first) = io.last_sent();
        assert_eq!(first.args[3], b"plan-limits:{u}:2026-11");
        let id = first.args[12].clone();
        // Billing records the 15th: that unit is given back, and the same reservation asked
        // for in the period from November 15.
        w.on_reply(token, with_anchor(1, "15"), now(), &mut io);
        assert!(io.resumed.is_empty(), "still waiting");
        let (token, again) = io.last_sent();
        assert_eq!(again.args[3], b"plan-limits:{u}:2026-11-15");
        assert_eq!(again.args[12], id, "under the same id");
        w.on_reply(token, with_anchor(1, "15"), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(
            batch.args.iter().any(|a| a == b"release"),
            "the first unit back"
        );
        assert!(batch
            .args
            .iter()
            .any(|a| a == b"plan-limits:{u}:2026-11:pending:upload"));
        // The worker remembers the anchor: the next request asks in the right period at once.
        send(&mut w, 2, &upload("u"), &mut io);
        let (_, next) = io.last_sent();
        assert_eq!(next.args[3], b"plan-limits:{u}:2026-11-15");
    }

    #[test]
    fn a_claimed_plan_in_redis_answers_is_not_taken_for_billings_record() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(1, 0, 1, "free"), now(), &mut io);
        // The same user's token claims enterprise for an API call: enterprise applies.
        let api = head("GET", "/api/v1/x", "u", "enterprise");
        assert_eq!(send(&mut w, 2, &api, &mut io), Flow::Pause);
        assert_eq!(io.status_for(2), None, "not refused as free");
    }

    #[test]
    fn an_upload_that_does_not_fit_in_the_storage_is_refused_with_the_upgrade() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, reserve) = io.last_sent();
        assert!(
            reserve.args.iter().any(|a| a == b"plan-limits:{u}:storage"),
            "the upload asks about the user's storage"
        );
        let gib = 1_i64 << 30;
        w.on_reply(token, with_storage(5, gib - 5, 0), now(), &mut io);
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 403);
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["error"], "Storage limit reached");
        assert_eq!(body["used_bytes"], gib - 5);
        assert_eq!(body["size_bytes"], 10);
        assert_eq!(body["upgrade"]["plan"], "professional");
        assert!(io.resumed.is_empty(), "never forwarded");
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        assert_eq!(w.queued_settlements(), 0, "nothing was reserved");
    }

    #[test]
    fn a_reservation_that_cannot_be_sent_follows_the_failure_mode_at_once() {
        let mut io = Recorder {
            refuse_sends: true,
            ..Recorder::default()
        };
        let mut w = worker(&mut io);
        // upload is fail_open: on at once (the allowance), counted once Redis is back.
        assert_eq!(send(&mut w, 1, &upload("u"), &mut io), Flow::Continue);
        assert_eq!(io.count_of(Metric::FailOpen), 1);
        assert_eq!(io.count_of(Metric::RedisErrors), 1);
        assert!(io
            .logs
            .iter()
            .any(|(l, m)| *l == LogLevel::Warn && m.contains("fail_open") && !m.contains("\"u\"")));
        // api_call is fail_closed: 503.
        let api = head("GET", "/api/v1/x", "u", "enterprise");
        assert_eq!(send(&mut w, 2, &api, &mut io), Flow::Pause);
        assert_eq!(io.status_for(2), Some(503));
        assert_eq!(io.count_of(Metric::FailClosed), 1);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_stream_end(2, true, now(), &mut io);
        io.refuse_sends = false;
        w.on_tick(now() + chrono::Duration::seconds(1), &mut io);
        let (_, batch) = io.last_sent();
        assert!(
            batch.args.iter().any(|a| a == b"count"),
            "the fail-open success is counted"
        );
    }

    #[test]
    fn a_missing_redis_library_fails_like_an_unreachable_redis_and_says_why() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        let missing = Ok(RedisReply::Error("ERR Function not found".into()));
        w.on_reply(token, missing, now(), &mut io);
        assert_eq!(io.resumed, [1], "fail_open within the allowance");
        assert!(
            io.logs
                .iter()
                .any(|(_, m)| m.contains("plan-limits functions load")),
            "{:?}",
            io.logs
        );
    }

    #[test]
    fn reservation_ids_are_unique_per_worker() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for stream in 1..=3 {
            send(&mut w, stream, &upload("u"), &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(token, granted(), now(), &mut io);
        }
        let mut ids: Vec<_> = io
            .sent
            .iter()
            .map(|(_, c)| functions::reserve_args(c)[3].clone())
            .collect();
        ids.dedup();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn reservations_arriving_while_calls_are_in_flight_go_together_in_the_next_call() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        // Up to RESERVATION_CALLS at once: each sent at once.
        let mut first = Vec::new();
        for stream in 1..=RESERVATION_CALLS as u32 {
            let user = format!("a{stream}");
            assert_eq!(send(&mut w, stream, &upload(&user), &mut io), Flow::Pause);
            first.push(io.last_sent().0);
        }
        // Three more meanwhile: they wait; one of them leaves before it is sent.
        for (stream, user) in [(11, "b"), (12, "c"), (13, "d")] {
            assert_eq!(send(&mut w, stream, &upload(user), &mut io), Flow::Pause);
        }
        assert_eq!(io.sent.len(), RESERVATION_CALLS, "the others wait");
        w.on_stream_end(12, true, now(), &mut io);
        // The first answer sends the waiting ones as one call, in their order.
        w.on_reply(first[0], granted(), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        let (batch, call) = io.last_sent();
        assert_eq!(
            name(call),
            (&b"FCALL"[..], &b"plan_limits_reserve_many"[..])
        );
        assert_eq!(call.args[2], b"16", "two reservations' keys");
        assert_eq!(call.args[3], b"plan-limits:{b}:2026-11");
        assert_eq!(call.args[11], b"plan-limits:{d}:2026-11");
        for token in &first[1..] {
            w.on_reply(*token, granted(), now(), &mut io);
        }
        // Each gets its own answer: b granted, d refused (its limit reached).
        let mut items = Vec::new();
        for reply in [reserved(1, 0, 1, "free"), reserved(0, 5, 0, "free")] {
            let Ok(RedisReply::Array(mut one)) = reply else {
                unreachable!()
            };
            one.extend([0, 0, 0, 0, 0, 0].map(RedisReply::Int));
            items.extend(one);
        }
        w.on_reply(batch, Ok(RedisReply::Array(items)), now(), &mut io);
        assert_eq!(io.resumed, [1, 2, 3, 4, 11]);
        assert_eq!(io.status_for(13), Some(429));
        assert_eq!(io.status_for(12), None, "gone before it was sent");
        // A failed call fails each of its reservations alike (fail_open uploads go on).
        let mut alone = Vec::new();
        for stream in 21..21 + RESERVATION_CALLS as u32 {
            send(&mut w, stream, &upload(&format!("e{stream}")), &mut io);
            alone.push(io.last_sent().0);
        }
        send(&mut w, 31, &upload("f"), &mut io);
        send(&mut w, 32, &upload("g"), &mut io);
        w.on_reply(alone[0], granted(), now(), &mut io);
        let (together, _) = io.last_sent();
        let timeout = Err(TransportError::Unknown("timeout".into()));
        w.on_reply(together, timeout, now(), &mut io);
        assert_eq!(io.resumed, [1, 2, 3, 4, 11, 21, 31, 32]);
        assert_eq!(io.count_of(Metric::FailOpen), 2);
    }
}
