//! A metered request's head: billing's record over its token, its plan's request rate, a
//! refusal remembered, and its reservation asked for (or taken from a lease, or, unlimited,
//! on at once).

use chrono::{DateTime, Utc};

use crate::metrics::{Metric, Outcome};
use crate::plans::{Plan, Plans};
use crate::request::{unix_millis, Decision, MeteredRequest};
use crate::responses::{self, LocalResponse};

use super::{
    answer, count_outcome, set_identity, Flow, Io, LogLevel, Metered, Stream, StreamId, Worker,
};

impl Worker {
    /// An answer decided from the head, before the stream was metered: a held stream's
    /// headers go on (to what holds it).
    pub(super) fn answer_at_head(
        &mut self,
        stream: StreamId,
        response: LocalResponse,
        drainable: bool,
        io: &mut dyn Io,
    ) -> Flow {
        match answer(stream, response, drainable, io) {
            Some(drain) => {
                self.streams.insert(stream, Stream::Draining(drain));
                Flow::Continue
            }
            None => Flow::Pause,
        }
    }

    pub(super) fn meter(
        &mut self,
        stream: StreamId,
        mut request: MeteredRequest,
        drainable: bool,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Flow {
        let now_ms = unix_millis(now);
        // Billing's record, as this worker last heard it, over the token's plan and anchor.
        let recorded = self
            .entitlements
            .get(request.user(), now_ms)
            .cloned()
            .unwrap_or_default();
        if let Some(anchor) = recorded.anchor.filter(|a| *a != request.anchor()) {
            request.reanchor(anchor, now);
        }
        if let Some(plan) = recorded.plan.filter(|plan| *plan != request.plan().key) {
            if let Err(response) = request.apply_plan(&plan) {
                count_outcome(io, &request, Outcome::Rejected);
                return self.answer_at_head(stream, response, drainable, io);
            }
        }
        self.note_unknown_plan(&request, now_ms, io);
        let plan = request.terms().plan.clone();
        if let Err(response) = self.within_rate(request.user(), &plan, now) {
            count_outcome(io, &request, Outcome::RateLimited);
            return self.answer_at_head(stream, response, drainable, io);
        }
        // An idempotency key is checked in Redis even for an unlimited action (the client asked
        // for it, and pays the round trip), and so is a request adding to a limited gauge (an
        // upload into a limited storage, an invite into a limited team).
        let gauge_limited = request
            .action()
            .adds_to
            .is_some_and(|gauge| request.plan().room(gauge).is_some());
        let limit = match (request.limit(), request.idempotency_key()) {
            (Some(limit), _) => Some(limit),
            (None, Some(_)) => Some(0),
            (None, None) if gauge_limited => Some(0),
            (None, None) => None,
        };
        let Some(limit) = limit else {
            // Unlimited: on at once, counted on success.
            count_outcome(io, &request, Outcome::Allowed);
            set_identity(stream, &request, plans, io);
            let metered = Metered::new(request, drainable);
            self.streams.insert(stream, Stream::Metered(metered));
            return Flow::Continue;
        };
        // (A repeat of a request with an idempotency key is told so by Redis, not refused.)
        let remembered = match request.idempotency_key() {
            None => self.denials.refusal(&request, now),
            Some(_) => None,
        };
        if let Some(response) = remembered {
            count_outcome(io, &request, Outcome::Denied);
            return self.answer_at_head(stream, response, drainable, io);
        }
        if request.leasable(&plans.redis) {
            if let Some((id, granted)) = self.leases.take(&request, now_ms) {
                let decision = request.admit_leased(limit, id, granted, now);
                io.count(Metric::Leased, 1);
                return self.decided_at_head(stream, request, decision, drainable, plans, now, io);
            }
        }
        let command = request.reserve(limit, self.ids.next(), now_ms, plans);
        match self.ask(stream, command, plans, now, io) {
            Ok(()) => {
                let metered = Metered::new(request, drainable);
                self.streams.insert(stream, Stream::Metered(metered));
                Flow::Pause
            }
            // Not sent at all: the action's failure mode decides, right now.
            Err(e) => {
                let decision = request.on_reservation(Err(e), now);
                self.decided_at_head(stream, request, decision, drainable, plans, now, io)
            }
        }
    }

    /// Carries out what was decided of `request` without waiting for Redis (a lease's unit,
    /// or a reservation that could not be sent).
    #[allow(clippy::too_many_arguments)]
    fn decided_at_head(
        &mut self,
        stream: StreamId,
        request: MeteredRequest,
        decision: Decision,
        drainable: bool,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Flow {
        let mut metered = Metered::new(request, drainable);
        let flow = match self.carry_out(stream, &mut metered.request, decision, plans, now, io) {
            Ok(()) => Flow::Continue,
            Err(response) => {
                metered.drain = answer(stream, response, drainable, io);
                if metered.drain.is_some() {
                    Flow::Continue
                } else {
                    Flow::Pause
                }
            }
        };
        self.streams.insert(stream, Stream::Metered(metered));
        flow
    }

    /// Takes one of `user`'s requests from its plan's request rate; `Err`: the 429 to answer.
    pub(super) fn within_rate(
        &mut self,
        user: &str,
        plan: &Plan,
        now: DateTime<Utc>,
    ) -> Result<(), LocalResponse> {
        let Some(rate) = plan.request_rate else {
            return Ok(());
        };
        self.rates
            .take(user, rate, unix_millis(now))
            .map_err(|secs| responses::too_many_requests(plan, rate.per_second, secs))
    }

    pub(super) fn note_unknown_plan(
        &mut self,
        request: &MeteredRequest,
        now_ms: u64,
        io: &mut dyn Io,
    ) {
        let Some(plan) = request.unknown_plan() else {
            return;
        };
        io.count(Metric::UnknownPlan, 1);
        if let Some(times) = self.unknown_plan_log.due(now_ms) {
            io.log(
                LogLevel::Warn,
                format!(
                    "plan-limits: plan {plan:?} is not in plans.json; the default plan applies ({times} requests in the last second)"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    #[test]
    fn a_user_past_the_plans_request_rate_is_refused_before_any_redis_call() {
        let mut io = Recorder::default();
        let json = plans_json_with(|p| {
            p["plans"]["free"]["request_rate"] = serde_json::json!({"per_second": 2, "burst": 3});
        });
        let mut w = worker_with(&mut io, &json);
        let view = head("GET", "/api/procedures/1", "u", "free");
        for stream in 1..=3 {
            assert_eq!(send(&mut w, stream, &view, &mut io), Flow::Continue);
        }
        let sent = io.sent.len();
        assert_eq!(send(&mut w, 4, &upload("u"), &mut io), Flow::Pause);
        assert_eq!(io.sent.len(), sent, "no reservation asked for");
        let (_, refused) = io.responded.last().unwrap();
        assert_eq!(refused.status, 429);
        assert!(
            refused.body.contains("at most 2 requests a second"),
            "{}",
            refused.body
        );
        assert!(refused
            .headers
            .iter()
            .any(|(n, v)| n == "retry-after" && v == "1"));
        assert_eq!(io.count_of(Metric::RateLimited), 1);
        // Usage reads count too; another user is not held back; half a second later one more.
        assert_eq!(
            send(&mut w, 5, &head("GET", "/api/usage", "u", "free"), &mut io),
            Flow::Pause
        );
        assert_eq!(io.status_for(5), Some(429));
        assert_eq!(send(&mut w, 6, &upload("v"), &mut io), Flow::Pause);
        assert!(io.status_for(6).is_none(), "v reserves");
        let later = now() + chrono::Duration::milliseconds(500);
        let flow = w.on_request_headers(7, view.head(), true, later, &mut io);
        assert_eq!(flow, Flow::Continue);
    }

    #[test]
    fn a_refusal_is_answered_at_once_when_no_body_is_being_written() {
        let mut io = holding();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        // No body follows.
        let flow = w.on_request_headers(1, no_token.head(), true, now(), &mut io);
        assert_eq!(flow, Flow::Pause);
        // The client waits for a go-ahead before sending it.
        let asks = no_token.clone().header("expect", b"100-Continue");
        assert_eq!(send(&mut w, 2, &asks, &mut io), Flow::Pause);
        // More than is worth reading.
        let mut huge = no_token.clone();
        huge.headers.retain(|(n, _)| n != "content-length");
        let huge = huge.header("content-length", (65u64 << 20).to_string().as_bytes());
        assert_eq!(send(&mut w, 3, &huge, &mut io), Flow::Pause);
        assert!(io.held.is_empty());
        for stream in [1, 2, 3] {
            assert_eq!(io.status_for(stream), Some(401));
        }
        // Without a hold filter, nothing can keep the request from the upstream: at once.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        assert_eq!(send(&mut w, 1, &no_token, &mut io), Flow::Pause);
        assert_eq!(io.status_for(1), Some(401));
    }

    #[test]
    fn a_refused_request_is_answered_and_counted() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        assert_eq!(send(&mut w, 1, &no_token, &mut io), Flow::Pause);
        assert_eq!(io.status_for(1), Some(401));
        assert_eq!(io.count_of(Metric::Rejected), 1);
        // Envoy passes the local reply through the response path: nothing to settle.
        w.on_response_headers(1, 401, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn an_unlimited_success_goes_on_at_once_with_its_identity_and_is_counted_in_the_next_batch() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let h = head("GET", "/api/procedures/1", "u", "free");
        assert_eq!(send(&mut w, 1, &h, &mut io), Flow::Continue);
        assert!(io.sent.is_empty(), "no Redis call before the upstream");
        assert_eq!(io.count_of(Metric::Allowed), 1);
        assert_eq!(
            io.headers_of(1),
            [
                ("x-user-id", "u"),
                ("x-user-plan", "free"),
                ("x-user-features", "")
            ]
        );
        // A plan with features says them all.
        let pro = head("GET", "/api/procedures/1", "p", "professional");
        send(&mut w, 9, &pro, &mut io);
        assert!(io.headers_of(9).contains(&(
            "x-user-features",
            "team_collaboration,priority_support,dxf_export"
        )));
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        assert_eq!(w.queued_settlements(), 1);
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        assert_eq!(name(batch), (&b"FCALL"[..], &b"plan_limits_settle_v2"[..]));
        assert!(batch.args.iter().any(|a| a == b"count"));
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 1);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn billings_plan_applies_and_is_remembered_for_requests_that_do_not_wait() {
        let mut io = Recorder::default();
        // A plan where procedure views are limited, so that billing's record matters for them.
        let json = plans_json_with(|p| p["plans"]["free"]["limits"]["procedure_view"] = 2.into());
        let mut w = worker_with(&mut io, &json);
        // The token says professional (unlimited views); nothing known yet: on at once.
        view_of(&mut w, 1, "u", "professional", &mut io);
        // Redis's answer to the batch says billing records free for this user ...
        w.on_tick(now(), &mut io);
        let (token, _) = io.last_sent();
        let reply = Ok(RedisReply::Array(vec![
            RedisReply::Int(1),
            RedisReply::Int(1),
            RedisReply::Bulk(b"free".to_vec()),
            RedisReply::Nil,
        ]));
        w.on_reply(token, reply, now(), &mut io);
        // ... so the next view is limited: it reserves under free's limit.
        let view = head("GET", "/api/procedures/1", "u", "professional");
        assert_eq!(send(&mut w, 2, &view, &mut io), Flow::Pause);
        let (token, reserve) = io.last_sent();
        assert_eq!(name(reserve).1, b"plan_limits_reserve");
        assert_eq!(
            functions::reserve_args(reserve)[1],
            b"free",
            "the claimed plan sent is billing's"
        );
        w.on_reply(token, recorded(1, 1, 1, "free"), now(), &mut io);
        assert_eq!(io.headers_of(2)[1], ("x-user-plan", "free"));
        // An upgrade recorded by billing shows in the next reservation's answer.
        send(&mut w, 3, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, recorded(2, 5, 0, "professional"), now(), &mut io);
        assert_eq!(io.resumed, [2, 3], "professional uploads are unlimited");
        assert_eq!(io.headers_of(3)[1], ("x-user-plan", "professional"));
    }

    #[test]
    fn an_unknown_plan_is_counted_and_logged_at_most_once_a_second() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for stream in 1..=3 {
            let h = head("GET", "/api/procedures/1", "u", "platinum");
            assert_eq!(send(&mut w, stream, &h, &mut io), Flow::Continue);
        }
        assert_eq!(io.count_of(Metric::UnknownPlan), 3);
        let lines = io
            .logs
            .iter()
            .filter(|(_, m)| m.contains("platinum"))
            .count();
        assert_eq!(lines, 1);
        assert_eq!(io.headers_of(1)[1], ("x-user-plan", "free"));
    }

    #[test]
    fn a_final_refusal_is_answered_again_without_redis_until_it_expires() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 5, 0, "free"), now(), &mut io);
        assert_eq!(io.status_for(1), Some(429));
        assert!(io.resumed.is_empty());
        w.on_stream_end(1, true, now(), &mut io);
        let sends = io.sent.len();
        let later = now() + chrono::Duration::milliseconds(999);
        let u = upload("u");
        assert_eq!(
            w.on_request_headers(2, u.head(), false, later, &mut io),
            Flow::Pause
        );
        assert_eq!(io.sent.len(), sends, "answered from the refusal cache");
        assert_eq!(io.status_for(2), Some(429));
        assert_eq!(io.count_of(Metric::Denied), 2);
        // Another user, and the same user once deny_cache_ms (1 s) passed, ask Redis again.
        let v = upload("v");
        w.on_request_headers(3, v.head(), false, later, &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), later, &mut io);
        let second_later = now() + chrono::Duration::seconds(1);
        w.on_request_headers(4, u.head(), false, second_later, &mut io);
        assert_eq!(io.sent.len(), sends + 2);
    }

    #[test]
    fn a_refusal_while_a_unit_is_in_flight_is_not_remembered() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 4, 1, "free"), now(), &mut io);
        let sends = io.sent.len();
        send(&mut w, 2, &upload("u"), &mut io);
        assert_eq!(
            io.sent.len(),
            sends + 1,
            "the unit in flight may still be released"
        );
    }

    #[test]
    fn an_idempotency_key_makes_repeats_one_request() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        // Even an unlimited action asks Redis when the client sends a key.
        let view = head("GET", "/api/procedures/1", "u", "free").header("idempotency-key", b"k-1");
        assert_eq!(send(&mut w, 1, &view, &mut io), Flow::Pause);
        let (token, reserve) = io.last_sent();
        assert_eq!(reserve.args[2], b"8");
        assert_eq!(reserve.args[6], b"plan-limits:{u}:idem:procedure_view:k-1");
        w.on_reply(token, reserved(2, 0, 0, "free"), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"count"));
        assert!(
            batch.args.iter().any(|a| a == b"k-1"),
            "recorded with its key"
        );
        w.on_reply(token, settled(&[1]), now(), &mut io);
        // Its repeat: 409, neither forwarded nor counted.
        send(&mut w, 2, &view, &mut io);
        let (token, _) = io.last_sent();
        let mut first = match reserved(4, 0, 0, "free") {
            Ok(RedisReply::Array(items)) => items,
            _ => unreachable!(),
        };
        first.extend([
            RedisReply::Int(0),
            RedisReply::Bulk(b"done:2026-11-27T12:00:00.000Z".to_vec()),
        ]);
        w.on_reply(token, Ok(RedisReply::Array(first)), now(), &mut io);
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 409);
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(
            (&body["state"], &body["completed_at"]),
            (&"completed".into(), &"2026-11-27T12:00:00.000Z".into())
        );
        assert_eq!(io.resumed, [1]);
        assert_eq!(io.count_of(Metric::Duplicates), 1);
        w.on_stream_end(2, true, now(), &mut io);
        assert_eq!(w.queued_settlements(), 0);
        // A key that is not plain is refused by name.
        let bad = upload("u").header("idempotency-key", b"a b");
        send(&mut w, 3, &bad, &mut io);
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 400);
        assert!(answer.body.contains("\"field\":\"idempotency-key\""));
    }

    #[test]
    fn an_unlimited_upload_into_a_limited_storage_holds_its_bytes_until_it_ends() {
        // Professional uploads are unlimited in number, not in storage.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let pro = head("POST", "/api/upload", "u", "professional");
        assert_eq!(send(&mut w, 1, &pro, &mut io), Flow::Pause, "asks Redis");
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(2, 0, 0, "professional"), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        // Still in flight a third of the expiry later: its bytes stay held.
        let later = now() + chrono::Duration::seconds(20);
        w.on_tick(later, &mut io);
        let (token, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"extend"));
        w.on_reply(token, settled(&[0]), later, &mut io);
        // The upstream failed: what it held is let go.
        w.on_response_headers(1, 502, None, later, &mut io);
        w.on_stream_end(1, true, later, &mut io);
        w.on_tick(later + chrono::Duration::seconds(1), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"release"));
        assert!(batch
            .args
            .iter()
            .any(|a| a == b"plan-limits:{u}:storage:held"));
    }
}
