//! Usage reads: a report's one call to Redis, and its answer to the caller.

use chrono::{DateTime, Utc};

use crate::metrics::Metric;
use crate::plans::Plans;
use crate::redis::{RedisReply, TransportError};
use crate::reports::Report;
use crate::request::unix_millis;
use crate::responses;

use super::{answer, invoke, Flow, Io, PendingReport, Stream, StreamId, Waiter, Worker};

impl Worker {
    /// Sends the report's one call; the stream waits for its answer.
    pub(super) fn report(
        &mut self,
        stream: StreamId,
        report: Report,
        drainable: bool,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Flow {
        let mut report = report;
        // Billing's anchor day and plan, as this worker last heard them, over the token's.
        let recorded = self
            .entitlements
            .get(report.user(), unix_millis(now))
            .cloned();
        if let Some(anchor) = recorded.as_ref().and_then(|r| r.anchor) {
            report.reanchor(anchor, now);
        }
        let plan = recorded
            .and_then(|r| r.plan)
            .or_else(|| report.claimed_plan().map(String::from))
            .and_then(|key| plans.plan(&key).cloned())
            .unwrap_or_else(|| plans.default_plan().clone());
        if let Err(response) = self.within_rate(report.user(), &plan, now) {
            io.count(Metric::RateLimited, 1);
            return self.answer_at_head(stream, response, drainable, io);
        }
        // Reads have their own cluster, and a bound per worker: a flood of them never delays
        // a reservation.
        if self.calls.reads_in_flight() >= plans.redis.max_reads_in_flight {
            io.count(Metric::RateLimited, 1);
            return self.answer_at_head(stream, responses::reads_busy(), drainable, io);
        }
        let command = report.command(plans, unix_millis(now));
        match invoke(io, &plans.read_redis, command) {
            Ok(call) => {
                self.calls.sent(call, Waiter::Report(stream), now);
                let pending = PendingReport {
                    report,
                    call,
                    drainable,
                };
                self.streams.insert(stream, Stream::Reporting(pending));
                Flow::Pause
            }
            Err(e) => {
                let response = report.answer(Err(e), plans, now);
                self.answer_at_head(stream, response, drainable, io)
            }
        }
    }

    /// The paused `stream`'s report was answered by Redis: the caller gets it.
    pub(super) fn on_report(
        &mut self,
        stream: StreamId,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let (Some(plans), Some(mut pending)) = (self.plans.clone(), self.take_report(stream))
        else {
            return;
        };
        // Computed for a stale anchor day: asked again, once, for the one in force.
        let stale = reply
            .as_ref()
            .ok()
            .and_then(|r| pending.report.stale_anchor(r));
        if let Some(anchor) = stale {
            pending.report.reanchor(anchor, now);
            let command = pending.report.command(&plans, unix_millis(now));
            if let Ok(call) = invoke(io, &plans.redis, command) {
                self.calls.sent(call, Waiter::Report(stream), now);
                pending.call = call;
                self.streams.insert(stream, Stream::Reporting(pending));
                return;
            }
        }
        io.count(Metric::Reports, 1);
        let response = pending.report.answer(reply, &plans, now);
        if let Some(drain) = answer(stream, response, pending.drainable, io) {
            self.streams.insert(stream, Stream::Draining(drain));
            io.resume(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    #[test]
    fn usage_reads_in_flight_are_bounded_per_worker_and_go_to_their_own_cluster() {
        let mut io = Recorder::default();
        let json = plans_json_with(|p| {
            p["redis"]["max_reads_in_flight"] = 2.into();
            p["redis"]["read_cluster"] = "plan_limits_redis_reads".into();
        });
        let mut w = worker_with(&mut io, &json);
        for (stream, user) in [(1, "a"), (2, "b"), (3, "c")] {
            let read = head("GET", "/api/usage", user, "free");
            assert_eq!(send(&mut w, stream, &read, &mut io), Flow::Pause);
        }
        assert_eq!(io.sent.len(), 2);
        assert_eq!(io.status_for(3), Some(503));
        assert_eq!(io.clusters, ["plan_limits_redis_reads"; 2]);
        // A reservation still goes to the reservations' cluster.
        send(&mut w, 4, &upload("d"), &mut io);
        assert_eq!(io.clusters.last().unwrap(), "plan_limits_redis");
    }

    #[test]
    fn a_report_is_answered_by_the_worker_and_never_forwarded_or_counted() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let get = head("GET", "/api/usage", "u", "free");
        assert_eq!(
            w.on_request_headers(1, get.head(), true, now(), &mut io),
            Flow::Pause
        );
        let (token, call) = io.last_sent();
        assert_eq!(name(call), (&b"FCALL"[..], &b"plan_limits_usage"[..]));
        // Billing's plan and anchor (none), the recent uses (none), the storage and the team,
        // then per action its count, what is in flight and what was granted.
        let mut items = vec![RedisReply::Nil, RedisReply::Nil, RedisReply::Nil];
        items.extend([0; 25].map(RedisReply::Int));
        let reply = Ok(RedisReply::Array(items));
        w.on_reply(token, reply, now(), &mut io);
        assert_eq!(io.status_for(1), Some(200));
        assert!(io.resumed.is_empty(), "never forwarded");
        assert_eq!(io.count_of(Metric::Reports), 1);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        assert_eq!(w.queued_settlements(), 0, "never counted");
        // Without a token: 401; another method: 405.
        let mut anonymous = get.clone();
        anonymous.claims = Default::default();
        w.on_request_headers(2, anonymous.head(), true, now(), &mut io);
        assert_eq!(io.status_for(2), Some(401));
        let post = head("POST", "/api/usage", "u", "free");
        w.on_request_headers(3, post.head(), true, now(), &mut io);
        assert_eq!(io.status_for(3), Some(405));
    }

    #[test]
    fn a_report_for_a_stale_anchor_day_is_asked_again_once() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let get = head("GET", "/api/usage", "u", "free");
        w.on_request_headers(1, get.head(), true, now(), &mut io);
        let (token, first) = io.last_sent();
        assert_eq!(first.args[3], b"plan-limits:{u}:2026-11");
        let reply = |anchor: &str| {
            let mut items = vec![
                RedisReply::Nil,
                RedisReply::Bulk(anchor.as_bytes().to_vec()),
                RedisReply::Nil,
            ];
            items.extend([0; 25].map(RedisReply::Int));
            Ok(RedisReply::Array(items))
        };
        // Billing records the 15th: asked again for the period from November 15.
        w.on_reply(token, reply("15"), now(), &mut io);
        assert!(io.responded.is_empty());
        let (token, again) = io.last_sent();
        assert_eq!(again.args[3], b"plan-limits:{u}:2026-11-15");
        w.on_reply(token, reply("15"), now(), &mut io);
        let (_, answer) = io.responded.last().unwrap();
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["period"]["id"], "2026-11-15");
        assert_eq!(io.count_of(Metric::Reports), 1);
    }
}
