//! The answer to a stream: what a release gave back, the RateLimit and warning fields, the
//! settlement its status decides, and a success held until Redis counts it.

use chrono::{DateTime, Utc};

use crate::keys::UsageKeys;
use crate::metrics::Metric;
use crate::request::unix_millis;
use crate::responses;
use crate::settlement::{SettleMode, Settlement};
use crate::upstream::{self, Answer};

use super::{Io, LogLevel, ResponseFlow, Stream, StreamId, Worker};

/// The largest amount an upstream may say a release gave back: what Redis's Lua counts exactly.
const MAX_GIVEN_BACK: u64 = 1 << 53;

impl Worker {
    /// The response header the worker wants of `stream`'s answer before its status (what a
    /// release route gave back: bytes freed, members removed), if any.
    pub fn response_header_wanted(&self, stream: StreamId) -> Option<&str> {
        let plans = self.plans.as_ref()?;
        match self.streams.get(&stream)? {
            Stream::Releasing { release, .. } => Some(plans.given_back_header(release.gauge)),
            _ => None,
        }
    }

    /// The response headers `stream`'s usage event may record (its action's metadata read
    /// from the answer), if any.
    pub fn response_metadata_wanted(&self, stream: StreamId) -> Vec<String> {
        self.metered(stream).map_or_else(Vec::new, |entry| {
            let spec = &entry.request.action().metadata;
            spec.response_headers().map(str::to_string).collect()
        })
    }

    /// A response header `stream`'s usage event may record (one it wanted, present).
    pub fn on_response_metadata(&mut self, stream: StreamId, name: &str, value: &[u8]) {
        if let Some(entry) = self.metered_mut(stream) {
            entry.request.on_metadata_header(name, value);
        }
    }

    /// The value of the response header it wanted (absent: none). A value that is not a count
    /// Redis can hold exactly (negative, not a number, past 2^53) gives back nothing, and is
    /// counted and logged: one upstream's bad value must never cost another request's count.
    pub fn on_response_header(&mut self, stream: StreamId, value: Option<&[u8]>, io: &mut dyn Io) {
        let Some(Stream::Releasing { release, freed }) = self.streams.get_mut(&stream) else {
            return;
        };
        let Some(value) = value else {
            *freed = None;
            return;
        };
        *freed = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n <= MAX_GIVEN_BACK);
        if freed.is_none() {
            io.count(Metric::UpstreamValuesRefused, 1);
            let header = self
                .plans
                .as_ref()
                .map_or("", |p| p.given_back_header(release.gauge));
            io.log(
                LogLevel::Warn,
                format!(
                    "plan-limits: the upstream's {header} is not a count ({:?}): nothing given back",
                    String::from_utf8_lossy(value.get(..64).unwrap_or(value))
                ),
            );
        }
    }

    /// Whether the answer with `status` to `stream` needs Envoy's word on where it came from
    /// (`response.code_details`): a failure of a request not settled yet may be Envoy's own
    /// reply for an upstream that timed out or was never reached.
    pub fn wants_answer_details(&self, stream: StreamId, status: u32) -> bool {
        !(200..300).contains(&status) && self.metered(stream).is_some_and(|s| s.request.unsettled())
    }

    /// Whether the end of `stream` needs the host's word on whether it reached an upstream
    /// (a request still unsettled: its client left, or it was reset).
    pub fn wants_upstream_reached(&self, stream: StreamId) -> bool {
        self.metered(stream).is_some_and(|s| s.request.unsettled())
    }

    /// `stream` was answered with `status`; `details` is Envoy's word on where the answer came
    /// from (`None`: the upstream, as far as the host says). A local reply of the filter's own
    /// passes here too: its request is already settled.
    pub fn on_response_headers(
        &mut self,
        stream: StreamId,
        status: u32,
        details: Option<&str>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> ResponseFlow {
        let Some(plans) = self.plans.clone() else {
            return ResponseFlow::Continue;
        };
        let status = match upstream::classify(status, details) {
            Answer::Upstream(status) => status,
            // Envoy answered in the upstream's place: as for a client that left.
            unanswered => {
                if let Some(entry) = self.metered_mut(stream) {
                    let reached = unanswered == Answer::Unknown;
                    let settlement = entry.request.on_end(reached, now, &plans.redis);
                    self.queue(settlement, io);
                }
                self.take_release(stream);
                return ResponseFlow::Continue;
            }
        };
        if let Some((release, freed)) = self.take_release(stream) {
            // A release that succeeded gives back what the upstream says it freed or removed
            // (nothing if it says nothing: a repeated removal must not free a seat twice).
            let amount = freed.filter(|&n| n > 0);
            if let (true, Some(amount)) = ((200..300).contains(&status), amount) {
                let keys = UsageKeys::new(&plans.redis.key_prefix, &release.user, "-", "-");
                let given_back = Settlement::give_back(
                    release.gauge,
                    keys,
                    &release.user,
                    amount,
                    status,
                    now,
                    &release.request_id,
                );
                self.queue(Some(given_back), io);
            }
            return ResponseFlow::Continue;
        }
        let Some(Stream::Metered(entry)) = self.streams.get_mut(&stream) else {
            return ResponseFlow::Continue;
        };
        // The upstream's answer (not one of the filter's own) tells where the allowance stands.
        if let (true, Some(quota), false) = (
            plans.ratelimit_headers,
            entry.request.quota(),
            entry.drain.is_some(),
        ) {
            let request = &entry.request;
            let reset = request.period().seconds_until_end(now);
            let key = &request.action().key;
            for (name, value) in
                responses::ratelimit_fields(key, quota.limit, quota.remaining, reset)
            {
                io.set_response_header(stream, name, &value);
            }
        }
        // A success whose unit brought the count to a warning threshold says so.
        let warning = plans
            .warnings
            .header
            .as_deref()
            .filter(|_| (200..300).contains(&status) && entry.drain.is_none());
        if let (Some(header), Some(quota)) = (warning, entry.request.quota()) {
            // Past the limit, in the plan's grace: counted, and said so.
            if let Some(in_grace) = quota.in_grace() {
                let value = responses::grace_field(
                    &entry.request.action().key,
                    quota.taken,
                    quota.limit,
                    in_grace,
                    entry.request.terms().grace,
                );
                io.set_response_header(stream, header, &value);
            } else if let Some(threshold) = quota.crossed(&plans.warnings.thresholds) {
                let value = responses::warning_field(
                    &entry.request.action().key,
                    threshold,
                    quota.taken,
                    quota.limit,
                );
                io.set_response_header(stream, header, &value);
            }
        }
        let mut settlement = entry.request.on_response(status, now, &plans.redis);
        // Read-your-writes: a limited success reaches its client once Redis counts it, so the
        // client's next request (on any worker, any Envoy) finds it used, not in flight.
        let awaits = plans.read_your_writes
            && self.redis_down_since_ms.is_none()
            && settlement
                .as_ref()
                .is_some_and(|s| s.mode == SettleMode::Commit);
        if let (true, Some(s)) = (awaits, settlement.as_mut()) {
            s.waiter = Some(stream);
            let until = unix_millis(now).saturating_add(4 * plans.redis.timeout_ms);
            entry.awaiting_commit_until = Some(until);
        }
        self.queue(settlement, io);
        if awaits {
            // Sent at once (unless a batch is in flight: its answer sends this one).
            self.flush(now, io);
            ResponseFlow::AwaitCommit
        } else {
            ResponseFlow::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::settlement_queue::Group;
    use crate::worker::fixtures::*;
    use crate::worker::Worker;

    #[test]
    fn a_successful_delete_gives_back_the_bytes_the_upstream_freed() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let delete = head("DELETE", "/api/diagrams/d1", "u", "free");
        assert_eq!(send(&mut w, 1, &delete, &mut io), Flow::Continue);
        assert_eq!(
            io.headers_of(1),
            [("x-user-id", "u")],
            "the verified caller"
        );
        assert_eq!(w.response_header_wanted(1), Some("x-freed-bytes"));
        w.on_response_header(1, Some(b"4096"), &mut io);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        // A failed delete, or one that says nothing, frees nothing.
        send(&mut w, 2, &delete, &mut io);
        w.on_response_header(2, Some(b"4096"), &mut io);
        w.on_response_headers(2, 404, None, now(), &mut io);
        // Values that are not a count give back nothing, and say so.
        for (stream, value) in [
            (3, &b"lots"[..]),
            (4, b"-5"),
            (5, b"18446744073709551615"),
            (6, b"9007199254740993"),
        ] {
            send(&mut w, stream, &delete, &mut io);
            w.on_response_header(stream, Some(value), &mut io);
            w.on_response_headers(stream, 200, None, now(), &mut io);
        }
        assert_eq!(io.count_of(Metric::UpstreamValuesRefused), 4);
        assert!(io
            .logs
            .iter()
            .any(|(_, l)| l.contains("x-freed-bytes is not a count")));
        assert_eq!(w.response_header_wanted(7), None, "only deletes are read");
        assert_eq!(w.queued_settlements(), 1);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"give_back"));
        assert!(batch.args.iter().any(|a| a == b"4096"));
        assert!(batch.args.iter().any(|a| a == b"plan-limits:{u}:storage"));
    }

    #[test]
    fn an_invite_into_a_full_team_is_refused_and_a_removal_gives_back_what_it_removed() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let pro = |method, path| head(method, path, "u", "professional");
        send(&mut w, 1, &pro("POST", "/api/team/invites"), &mut io);
        let (token, reserve) = io.last_sent();
        assert!(reserve.args.iter().any(|a| a == b"plan-limits:{u}:team"));
        // Four members invited besides the subscriber: the professional team is full.
        let Ok(RedisReply::Array(mut items)) = reserved(5, 0, 0, "professional") else {
            unreachable!()
        };
        items.extend([0, 0, 0].map(|_| RedisReply::Nil));
        items.extend([RedisReply::Int(3), RedisReply::Int(1)]);
        w.on_reply(token, Ok(RedisReply::Array(items)), now(), &mut io);
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 403);
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["error"], "Team limit reached");
        assert_eq!(
            (&body["members"], &body["in_flight"]),
            (&4.into(), &1.into())
        );
        assert_eq!(
            body["message"],
            "Your Professional plan has room for 5 team members, you included. Remove a member, \
             or upgrade to Enterprise for an unlimited team."
        );
        // A removal: what the upstream says it removed (0: nobody, nothing given back).
        send(&mut w, 2, &pro("DELETE", "/api/team/members/m1"), &mut io);
        assert_eq!(w.response_header_wanted(2), Some("x-removed-members"));
        w.on_response_header(2, Some(b"0"), &mut io);
        w.on_response_headers(2, 204, None, now(), &mut io);
        assert_eq!(w.queued_settlements(), 0);
        send(&mut w, 3, &pro("DELETE", "/api/team/members/m2"), &mut io);
        w.on_response_header(3, Some(b"1"), &mut io);
        w.on_response_headers(3, 204, None, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"give_back"));
        assert!(batch.args.iter().any(|a| a == b"plan-limits:{u}:team"));
    }

    #[test]
    fn answers_to_limited_actions_carry_the_ratelimit_fields() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let reset = BillingPeriod::calendar_month(now())
            .seconds_until_end(now())
            .to_string();
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        // 2 counted, this one and another in flight: 1 remains after it.
        w.on_reply(token, reserved(1, 2, 2, "free"), now(), &mut io);
        w.on_response_headers(1, 201, None, now(), &mut io);
        let fields: Vec<(&str, String)> = io
            .response_headers
            .iter()
            .filter(|(_, n, _)| n.starts_with("ratelimit"))
            .map(|(_, n, v)| (n.as_str(), v.clone()))
            .collect();
        assert_eq!(
            fields,
            [
                ("ratelimit-policy", "\"upload\";q=5".to_string()),
                ("ratelimit", format!("\"upload\";r=1;t={reset}")),
            ]
        );
        // A 429: nothing remains, and Retry-After is t; so when remembered.
        send(&mut w, 2, &upload("v"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 5, 0, "free"), now(), &mut io);
        send(&mut w, 3, &upload("v"), &mut io);
        for stream in [2, 3] {
            let (_, answer) = io.responded.iter().find(|(s, _)| *s == stream).unwrap();
            let header = |name: &str| {
                answer
                    .headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(
                header("ratelimit"),
                Some(format!("\"upload\";r=0;t={reset}"))
            );
            assert_eq!(header("retry-after"), Some(reset.clone()));
        }
        // Unlimited actions have no allowance to describe.
        let before = io.response_headers.len();
        view_of(&mut w, 4, "u", "free", &mut io);
        assert_eq!(io.response_headers.len(), before);
    }

    #[test]
    fn a_success_that_crosses_a_warning_threshold_says_so() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        // 3 counted and this one: 4 of 5, 80 %.
        w.on_reply(token, reserved(1, 3, 1, "free"), now(), &mut io);
        w.on_response_headers(1, 200, None, now(), &mut io);
        let warning: Vec<&str> = io
            .response_headers
            .iter()
            .filter(|(_, n, _)| n == "x-usage-warning")
            .map(|(_, _, v)| v.as_str())
            .collect();
        assert_eq!(warning, ["\"upload\";threshold=80;used=4;limit=5"]);
        // A failure counts nothing, and says nothing.
        send(&mut w, 2, &upload("v"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(1, 3, 1, "free"), now(), &mut io);
        let before = io.response_headers.len();
        w.on_response_headers(2, 500, None, now(), &mut io);
        assert!(io.response_headers[before..]
            .iter()
            .all(|(_, n, _)| n != "x-usage-warning"));
    }

    #[test]
    fn the_ratelimit_fields_can_be_switched_off() {
        let json =
            plans_json_with(|p| p["gateway"] = serde_json::json!({"ratelimit_headers": false}));
        let mut io = Recorder::default();
        let mut w = worker_with(&mut io, &json);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        w.on_response_headers(1, 200, None, now(), &mut io);
        send(&mut w, 2, &upload("v"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 5, 0, "free"), now(), &mut io);
        assert!(io.response_headers.is_empty());
        let (_, answer) = &io.responded[0];
        assert!(!answer
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("ratelimit")));
    }

    #[test]
    fn an_answer_envoy_gave_in_the_upstreams_place_follows_the_abort_policy() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let forwarded = |w: &mut Worker, stream, io: &mut Recorder| {
            assert_eq!(send(w, stream, &upload("u"), io), Flow::Pause);
            let (token, _) = io.last_sent();
            w.on_reply(token, granted(), now(), io);
            assert_eq!(
                w.on_request_body(stream, 10, true, now(), io),
                BodyFlow::Continue
            );
        };
        // Envoy gave up waiting for an upstream that had the whole request: it may have done
        // the work, so it is counted (the default `on_client_abort: commit`), as unknown.
        forwarded(&mut w, 1, &mut io);
        assert!(w.wants_answer_details(1, 504));
        assert!(
            !w.wants_answer_details(1, 200),
            "a success needs no details"
        );
        w.on_response_headers(1, 504, Some("response_timeout"), now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        assert_eq!(
            next_batch(&mut w, &mut io),
            [("commit".into(), "unknown".into())]
        );
        // The upstream could not be reached at all: nothing was done.
        forwarded(&mut w, 2, &mut io);
        let refused = "upstream_reset_before_response_started{remote_connection_failure}";
        w.on_response_headers(2, 503, Some(refused), now(), &mut io);
        w.on_stream_end(2, true, now(), &mut io);
        // The upstream's own failure: nothing counted.
        forwarded(&mut w, 3, &mut io);
        w.on_response_headers(3, 503, Some("via_upstream"), now(), &mut io);
        assert!(!w.wants_answer_details(3, 503), "settled");
        w.on_stream_end(3, true, now(), &mut io);
        // The client left after sending it all: counted too, unless no upstream was reached.
        forwarded(&mut w, 4, &mut io);
        assert!(w.wants_upstream_reached(4));
        w.on_stream_end(4, true, now(), &mut io);
        forwarded(&mut w, 5, &mut io);
        w.on_stream_end(5, false, now(), &mut io);
        assert_eq!(
            next_batch(&mut w, &mut io),
            [
                ("release".into(), "success".into()),
                ("release".into(), "success".into()),
                ("commit".into(), "unknown".into()),
                ("release".into(), "success".into()),
            ]
        );
    }

    #[test]
    fn a_commit_sent_from_a_stream_that_ends_before_its_answer_is_applied_when_it_comes() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for stream in [1, 2] {
            send(&mut w, stream, &upload("u"), &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(token, granted(), now(), &mut io);
        }
        let batch = |w: &Worker| {
            let items = w.settlements.in_flight(Group::All);
            let waiters: Vec<_> = items.iter().map(|s| s.waiter).collect();
            (w.settlements.in_flight_seq(Group::All), waiters)
        };
        w.on_response_headers(1, 200, None, now(), &mut io);
        let (first, _) = io.last_sent();
        assert_eq!(batch(&w), (1, vec![Some(1)]));
        // Stream 2's commit waits for that batch; then stream 1's client leaves. The call
        // outlives it (Envoy makes every call on the root context): its answer still comes.
        w.on_response_headers(2, 200, None, now(), &mut io);
        assert_eq!(io.last_sent().0, first, "one batch in flight at a time");
        w.on_stream_end(1, true, now(), &mut io);
        assert_eq!(io.last_sent().0, first, "nothing sent again");
        // Its answer sends stream 2's commit at once, whose answer lets it go.
        w.on_reply(first, settled(&[1]), now(), &mut io);
        let (second, _) = io.last_sent();
        assert_ne!(second, first);
        assert_eq!(batch(&w), (2, vec![Some(2)]));
        w.on_reply(second, settled(&[1]), now(), &mut io);
        assert_eq!(io.responses_resumed, [2]);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn a_limited_success_reaches_its_client_once_redis_has_counted_it() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        let sent = io.sent.len();
        let flow = w.on_response_headers(1, 200, None, now(), &mut io);
        assert_eq!(flow, ResponseFlow::AwaitCommit);
        // Its commit goes at once, not at a tick.
        assert_eq!(io.sent.len(), sent + 1);
        let (token, _) = io.last_sent();
        assert!(io.responses_resumed.is_empty(), "not before Redis answers");
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.responses_resumed, [1]);
        // Unlimited successes (nothing reserved) go on at once.
        let view = head("GET", "/api/procedures/1", "u", "free");
        send(&mut w, 2, &view, &mut io);
        assert_eq!(
            w.on_response_headers(2, 200, None, now(), &mut io),
            ResponseFlow::Continue
        );
        // A commit Redis does not answer in time lets its response go anyway.
        send(&mut w, 3, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        w.on_response_headers(3, 200, None, now(), &mut io);
        w.on_tick(now(), &mut io);
        w.on_tick(now() + chrono::Duration::milliseconds(999), &mut io);
        assert_eq!(io.responses_resumed, [1]);
        w.on_tick(now() + chrono::Duration::milliseconds(1000), &mut io);
        assert_eq!(io.responses_resumed, [1, 3]);
        assert_eq!(io.count_of(Metric::CommitsNotAwaited), 1);
    }
}
