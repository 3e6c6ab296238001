//! What an unreachable Redis lets through: each user's remaining allowance, as Redis last
//! said it, in this Envoy's shared data, and the passes Redis does not have yet.

use crate::config::RedisSettings;
use crate::outage::{self, Budget};
use crate::redis::functions;
use crate::request::MeteredRequest;

use super::Io;

/// What remains of the user's allowance, as Redis just said, for this Envoy's workers to go
/// by should Redis become unreachable.
pub(super) fn record_budget(
    request: &MeteredRequest,
    reservation: &functions::Reservation,
    redis: &RedisSettings,
    io: &mut dyn Io,
) {
    let Some(limit) = request.effective_limit() else {
        return;
    };
    let used = reservation.committed.saturating_add(reservation.pending);
    let budget = Budget {
        period_id: request.period().id.clone(),
        remaining: limit.saturating_sub(used),
        overshoot: used.saturating_sub(limit),
        spent: 0,
    };
    let key = outage::key(&redis.key_prefix, request.user(), &request.action().key);
    io.shared_set(&key, &budget.encode(), None);
}

/// Takes one unit of what this Envoy knows remains for a fail-open request while Redis is
/// unreachable; `false` when none is left.
pub(super) fn spend_outage_budget(
    request: &MeteredRequest,
    redis: &RedisSettings,
    io: &mut dyn Io,
) -> bool {
    let (user, action) = (request.user(), &request.action().key);
    let key = outage::key(&redis.key_prefix, user, action);
    let period = &request.period().id;
    // Another worker may spend at the same moment: retry on a version conflict.
    for _ in 0..8 {
        let (value, version) = io.shared_get(&key);
        let mut budget = Budget::decode(value.as_deref(), period);
        let unsettled = unsettled_passes(io, redis, user, action, period);
        if !budget.may_spend(redis.fail_open_allowance, unsettled) {
            return false;
        }
        budget.spent += 1;
        if io.shared_set(&key, &budget.encode(), version) {
            add_unsettled_pass(io, redis, user, action, period, 1);
            return true;
        }
    }
    false
}

/// This Envoy's fail-open passes of `user`'s `action` that Redis does not have yet.
fn unsettled_passes(
    io: &mut dyn Io,
    redis: &RedisSettings,
    user: &str,
    action: &str,
    period: &str,
) -> u64 {
    let key = outage::unsettled_key(&redis.key_prefix, user, action);
    outage::decode_unsettled(io.shared_get(&key).0.as_deref(), period)
}

/// Adds `by` (1: a pass; -1: its settlement reached Redis) to those passes.
pub(super) fn add_unsettled_pass(
    io: &mut dyn Io,
    redis: &RedisSettings,
    user: &str,
    action: &str,
    period: &str,
    by: i64,
) {
    let key = outage::unsettled_key(&redis.key_prefix, user, action);
    for _ in 0..8 {
        let (value, version) = io.shared_get(&key);
        let n = outage::decode_unsettled(value.as_deref(), period);
        let next = n.saturating_add_signed(by);
        if io.shared_set(&key, &outage::encode_unsettled(period, next), version) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    /// `stream` sends `req`, and its reservation's call times out (Redis does not answer).
    fn timed_out(w: &mut Worker, stream: StreamId, req: &Req, io: &mut Recorder) {
        send(w, stream, req, io);
        let (token, _) = io.last_sent();
        w.on_reply(token, timeout(), now(), io);
    }

    fn timeout() -> Result<RedisReply, TransportError> {
        Err(TransportError::Unknown("timeout".into()))
    }

    #[test]
    fn while_redis_is_unreachable_a_user_gets_what_remained_plus_the_allowance() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        // Redis said 3 of 5 uploads were used (this one included): 2 remain.
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(1, 2, 1, "free"), now(), &mut io);
        // Then Redis stops answering: 2 remain, plus an allowance of 1.
        let mut passed = 0;
        for stream in 10..20 {
            timed_out(&mut w, stream, &upload("u"), &mut io);
            if io.resumed.contains(&stream) {
                passed += 1;
            } else {
                assert_eq!(io.status_for(stream), Some(429));
            }
        }
        assert_eq!(passed, 3);
        assert_eq!(io.count_of(Metric::FailOpenRefused), 7);
        // A user this Envoy knows nothing of gets the allowance only.
        timed_out(&mut w, 30, &upload("stranger"), &mut io);
        timed_out(&mut w, 31, &upload("stranger"), &mut io);
        assert!(io.resumed.contains(&30));
        assert_eq!(io.status_for(31), Some(429));
        // Redis is back, and has counted what the outage let through: 6 of 5 used. Outage
        // after outage, the user gets nothing more this period (the allowance was had).
        send(&mut w, 40, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 6, 0, "free"), now(), &mut io);
        assert_eq!(io.status_for(40), Some(429));
        // (Later than the refusal is remembered: each asks Redis, which does not answer.)
        let later = now() + chrono::Duration::seconds(2);
        for stream in 41..44 {
            let sent = io.sent.len();
            w.on_request_headers(stream, upload("u").head(), false, later, &mut io);
            assert_eq!(io.sent.len(), sent + 1, "asked Redis");
            let (token, _) = io.last_sent();
            w.on_reply(token, timeout(), later, &mut io);
            assert_eq!(io.status_for(stream), Some(429), "outage {stream}");
        }
    }

    #[test]
    fn a_pass_redis_does_not_have_yet_still_counts_against_the_allowance() {
        // Found by the adversary (seed 17131033116926659877): a reservation's answer that came
        // before this Envoy's fail-open pass was settled granted the allowance a second time.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let at = |ms| now() + chrono::Duration::milliseconds(ms);
        // 5 of 5 taken as Redis last said.
        w.on_request_headers(1, upload("u").head(), false, at(0), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(1, 4, 1, "free"), at(0), &mut io);
        // An outage: one passes on the allowance, and succeeds.
        w.on_request_headers(2, upload("u").head(), false, at(10), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, timeout(), at(10), &mut io);
        assert!(io.resumed.contains(&2));
        w.on_response_headers(2, 200, None, at(20), &mut io);
        w.on_stream_end(2, true, at(20), &mut io);
        // Redis is back, and answers a reservation before it has that pass: 5 used.
        w.on_request_headers(3, upload("u").head(), false, at(30), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 5, 0, "free"), at(30), &mut io);
        assert_eq!(io.status_for(3), Some(429));
        // Another outage, past the refusal remembered: nothing more passes.
        w.on_request_headers(4, upload("u").head(), false, at(2000), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, timeout(), at(2000), &mut io);
        assert_eq!(
            io.status_for(4),
            Some(429),
            "the allowance was had this period"
        );
        // Once the pass is in Redis (its batch answered), Redis's numbers say so instead.
        w.on_tick(at(2010), &mut io);
        let (token, batch) = io.last_sent();
        assert_eq!(items_of(batch), 1, "the pass's settlement");
        w.on_reply(token, settled(&[1]), at(2010), &mut io);
        w.on_request_headers(5, upload("u").head(), false, at(4000), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 6, 0, "free"), at(4000), &mut io);
        w.on_request_headers(6, upload("u").head(), false, at(6000), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, timeout(), at(6000), &mut io);
        assert_eq!(io.status_for(6), Some(429));
        assert_eq!(io.count_of(Metric::FailOpen), 1);
    }
}
