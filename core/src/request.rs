//! The life of one metered request once admitted: its reservation, the upstream's answer and
//! the end of its stream, each turned into what to tell the client and what to settle.
//!
//! ```text
//! reserve  ──> a command to send (limited actions only)
//! reply    ──on_reservation──> Allowed | Denied(429) | FailOpen | FailClosed(503)
//! status   ──on_response──> commit (2xx) / release (otherwise) / count (2xx, nothing reserved)
//! end      ──on_end──> release, if still held (client gone, stream reset)
//! ```

use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::config::{FailureMode, Limit, RedisSettings};
use crate::keys::UsageKeys;
use crate::period::{self, BillingPeriod};
use crate::plans::{Action, Plan, Terms};
use crate::redis::scripts::{self, Form, ReserveArgs};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::responses::{self, Exhausted, LocalResponse};
use crate::settlement::{SettleMode, Settlement};

/// What admission learnt about a request.
pub struct RequestFacts<'a> {
    pub action: Rc<Action>,
    pub terms: Rc<Terms>,
    pub user: String,
    pub kind: String,
    pub bytes: u64,
    pub request_id: String,
    pub period: BillingPeriod,
    pub key_prefix: &'a str,
}

/// A request on a metered route, from admission until it is settled.
#[derive(Debug)]
pub struct MeteredRequest {
    action: Rc<Action>,
    terms: Rc<Terms>,
    user: String,
    kind: String,
    bytes: u64,
    request_id: String,
    period: BillingPeriod,
    keys: UsageKeys,
    /// Empty until a reservation is asked for.
    reservation_id: String,
    reserved_at_ms: u64,
    reserved_limit: u64,
    hold: Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Nothing reserved (unlimited): count on success.
    Unreserved,
    /// A reservation was asked for; its answer has not arrived.
    Reserving,
    /// Redis holds a unit for this request until it is committed or released.
    Held,
    /// Redis failed to answer the reservation (fail-open): it may or may not hold one. Count
    /// on success (the count also removes it), release otherwise.
    Uncertain,
    Settled,
}

/// What the reservation's answer means for the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// The limit is reached (429). With `final_refusal`, successes alone used the allowance:
    /// no release can free a unit this period, so the refusal may be remembered.
    Denied {
        response: LocalResponse,
        final_refusal: bool,
    },
    /// Redis did not answer usably; the action is `fail_open`, so the request goes on.
    FailOpen(TransportError),
    /// Redis did not answer usably; the action is `fail_closed`.
    FailClosed(TransportError, LocalResponse),
}

impl MeteredRequest {
    pub fn new(facts: RequestFacts) -> Self {
        let keys = UsageKeys::new(
            facts.key_prefix,
            &facts.user,
            &facts.period.id,
            &facts.action.key,
        );
        Self {
            action: facts.action,
            terms: facts.terms,
            user: facts.user,
            kind: facts.kind,
            bytes: facts.bytes,
            request_id: facts.request_id,
            period: facts.period,
            keys,
            reservation_id: String::new(),
            reserved_at_ms: 0,
            reserved_limit: 0,
            hold: Hold::Unreserved,
        }
    }

    pub fn action(&self) -> &Action {
        &self.action
    }

    pub fn plan(&self) -> &Plan {
        &self.terms.plan
    }

    pub fn limit(&self) -> Limit {
        self.terms.limit
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn period(&self) -> &BillingPeriod {
        &self.period
    }

    pub fn keys(&self) -> &UsageKeys {
        &self.keys
    }

    /// Asks for one unit of `limit` under `id` (unique across every Envoy sharing the Redis).
    pub fn reserve(&mut self, limit: u64, id: String, now_ms: u64, ttl_ms: u64) -> RedisCommand {
        self.reservation_id = id;
        self.reserved_at_ms = now_ms;
        self.reserved_limit = limit;
        self.hold = Hold::Reserving;
        self.reservation_command(ttl_ms, Form::BySha)
    }

    /// The reservation asked for, again (with the script's source after `NOSCRIPT`); `None`
    /// when none was asked for.
    pub fn reserve_command(&self, ttl_ms: u64, form: Form) -> Option<RedisCommand> {
        (!self.reservation_id.is_empty()).then(|| self.reservation_command(ttl_ms, form))
    }

    fn reservation_command(&self, ttl_ms: u64, form: Form) -> RedisCommand {
        scripts::reserve(
            ReserveArgs {
                keys: &self.keys,
                action: &self.action.key,
                limit: self.reserved_limit,
                reservation_id: &self.reservation_id,
                now_ms: self.reserved_at_ms,
                ttl_ms,
            },
            form,
        )
    }

    /// The reservation's answer (or why there is none) arrived.
    pub fn on_reservation(
        &mut self,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
    ) -> Decision {
        match reply.and_then(scripts::parse_reservation) {
            Ok(r) if r.granted => {
                self.hold = Hold::Held;
                Decision::Allowed
            }
            Ok(r) => {
                self.hold = Hold::Settled;
                let limit = self.reserved_limit;
                let usage = Exhausted {
                    current: r.committed.saturating_add(r.pending),
                    limit,
                    retry_after_secs: self.period.seconds_until_end(now),
                };
                Decision::Denied {
                    response: responses::limit_reached(
                        &self.action,
                        &self.terms,
                        &self.period,
                        usage,
                    ),
                    final_refusal: r.committed >= limit,
                }
            }
            Err(failure) => match self.action.on_redis_error {
                FailureMode::FailOpen => {
                    // Whether the reservation was made is unknown: settle as a plain count on
                    // success (and release the id, in case it was).
                    self.hold = Hold::Uncertain;
                    Decision::FailOpen(failure)
                }
                FailureMode::FailClosed => {
                    self.hold = Hold::Settled;
                    Decision::FailClosed(failure, responses::usage_unavailable(&self.action.key))
                }
            },
        }
    }

    /// The upstream answered with `status`: 2xx counts, anything else gives the unit back.
    pub fn on_response(
        &mut self,
        status: u32,
        now: DateTime<Utc>,
        redis: &RedisSettings,
    ) -> Option<Settlement> {
        let success = (200..300).contains(&status);
        let mode = match (self.hold, success) {
            (Hold::Held, true) => SettleMode::Commit,
            (Hold::Unreserved | Hold::Uncertain, true) => SettleMode::Count,
            (Hold::Held | Hold::Reserving | Hold::Uncertain, false) => SettleMode::Release,
            (Hold::Unreserved | Hold::Settled, false) | (Hold::Settled | Hold::Reserving, true) => {
                self.hold = Hold::Settled;
                return None;
            }
        };
        self.hold = Hold::Settled;
        Some(self.settlement(mode, status, now, redis))
    }

    /// The stream ended: a unit still held (client left, stream reset) is released.
    pub fn on_end(&mut self, now: DateTime<Utc>, redis: &RedisSettings) -> Option<Settlement> {
        match self.hold {
            Hold::Held | Hold::Reserving | Hold::Uncertain => {
                self.hold = Hold::Settled;
                Some(self.settlement(SettleMode::Release, 0, now, redis))
            }
            Hold::Unreserved | Hold::Settled => None,
        }
    }

    fn settlement(
        &self,
        mode: SettleMode,
        status: u32,
        now: DateTime<Utc>,
        redis: &RedisSettings,
    ) -> Settlement {
        let retention = chrono::Duration::days(i64::from(redis.summary_retention_days));
        let kept_until = self
            .period
            .end
            .checked_add_signed(retention)
            .unwrap_or(self.period.end);
        Settlement {
            mode,
            keys: self.keys.clone(),
            reservation_id: self.reservation_id.clone(),
            action: self.action.key.clone(),
            user: self.user.clone(),
            plan: self.terms.plan.key.clone(),
            limits_json: self.terms.plan.limits_json.clone(),
            kind: self.kind.clone(),
            bytes: self.bytes,
            status,
            at: period::rfc3339(now, true),
            request_id: self.request_id.clone(),
            period_id: self.period.id.clone(),
            keep_for_ms: unix_millis(kept_until).saturating_sub(unix_millis(now)),
        }
    }
}

pub fn unix_millis(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::Plans;
    use crate::testing::{head, ints, metered, now, plans};
    use chrono::TimeZone;

    fn request(p: &Plans, method: &str, path: &str, plan: &str) -> MeteredRequest {
        metered(p, &head(method, path, "u", plan), now())
    }

    /// An upload of a free user, its reservation asked for.
    fn reserved(p: &Plans) -> MeteredRequest {
        let mut m = request(p, "POST", "/api/upload", "free");
        m.reserve(5, "r1".into(), 1_000, 60_000);
        m
    }

    /// What reserve.lua answers: granted (1 or 0), committed, pending.
    fn reply(granted: i64, committed: i64, pending: i64) -> Result<RedisReply, TransportError> {
        ints(&[granted, committed, pending])
    }

    #[test]
    fn a_reservation_names_its_id_and_expiry() {
        let p = plans();
        let mut m = request(&p, "POST", "/api/upload", "free");
        assert!(
            m.reserve_command(60_000, Form::BySha).is_none(),
            "none asked for yet"
        );
        let cmd = m.reserve(5, "r1".into(), 1_000, 60_000);
        let text: Vec<_> = cmd
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            text[3..],
            [
                "plan-limits:{u}:2026-11",
                "plan-limits:{u}:2026-11:pending:upload",
                "upload",
                "5",
                "r1",
                "1000",
                "61000",
                "60000"
            ]
        );
        let again = m.reserve_command(60_000, Form::WithSource).unwrap();
        assert_eq!(again.args[0], b"EVAL");
        assert_eq!(
            again.args[2..],
            cmd.args[2..],
            "the same reservation, with the source"
        );
    }

    #[test]
    fn unlimited_successes_are_counted_without_a_reservation() {
        let p = plans();
        let mut m = request(&p, "POST", "/api/upload", "professional");
        assert_eq!(m.limit(), None);
        let s = m.on_response(200, now(), &p.redis).unwrap();
        assert_eq!((s.mode, s.reservation_id.as_str()), (SettleMode::Count, ""));
    }

    #[test]
    fn a_granted_reservation_commits_on_2xx() {
        let p = plans();
        let mut m = reserved(&p);
        assert_eq!(m.on_reservation(reply(1, 0, 1), now()), Decision::Allowed);
        let s = m.on_response(201, now(), &p.redis).unwrap();
        assert_eq!(s.mode, SettleMode::Commit);
        assert_eq!(
            (s.bytes, s.status, s.reservation_id.as_str()),
            (10, 201, "r1")
        );
        assert_eq!(s.at, "2026-11-27T12:00:00.000Z");
        assert_eq!(s.plan, "free");
        assert!(s.limits_json.contains("\"upload\":5"));
        // Kept until the end of November plus 400 days.
        let end = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        assert_eq!(
            s.keep_for_ms,
            unix_millis(end) - unix_millis(now()) + 400 * 86_400_000
        );
        assert!(m.on_end(now(), &p.redis).is_none(), "settled once only");
    }

    #[test]
    fn a_failed_upstream_releases_the_unit() {
        let p = plans();
        let mut m = reserved(&p);
        m.on_reservation(reply(1, 0, 1), now());
        assert_eq!(
            m.on_response(500, now(), &p.redis).unwrap().mode,
            SettleMode::Release
        );
    }

    #[test]
    fn a_client_that_leaves_releases_the_unit() {
        let p = plans();
        let mut m = reserved(&p);
        assert_eq!(m.on_end(now(), &p.redis).unwrap().mode, SettleMode::Release);
        let mut m = reserved(&p);
        m.on_reservation(reply(1, 0, 1), now());
        assert_eq!(m.on_end(now(), &p.redis).unwrap().mode, SettleMode::Release);
    }

    #[test]
    fn a_refused_reservation_is_429_with_the_current_usage() {
        let p = plans();
        let mut m = reserved(&p);
        let Decision::Denied {
            response,
            final_refusal,
        } = m.on_reservation(reply(0, 4, 1), now())
        else {
            panic!("expected 429")
        };
        assert_eq!(response.status, 429);
        assert!(response.body.contains("\"current\":5"));
        assert!(!final_refusal, "the unit in flight may be released");
        assert!(m.on_end(now(), &p.redis).is_none());
        let mut m = reserved(&p);
        let d = m.on_reservation(reply(0, 5, 0), now());
        assert!(matches!(
            d,
            Decision::Denied {
                final_refusal: true,
                ..
            }
        ));
    }

    #[test]
    fn redis_failures_follow_the_action_failure_mode() {
        let p = plans();
        let mut m = reserved(&p);
        let d = m.on_reservation(Err(TransportError::Unknown("timeout".into())), now());
        assert!(matches!(d, Decision::FailOpen(_)));
        let s = m.on_response(200, now(), &p.redis).unwrap();
        assert_eq!(
            (s.mode, s.reservation_id.as_str()),
            (SettleMode::Count, "r1")
        );

        let mut m = reserved(&p);
        m.on_reservation(Err(TransportError::Unknown("timeout".into())), now());
        assert_eq!(m.on_end(now(), &p.redis).unwrap().mode, SettleMode::Release);

        let mut api = request(&p, "GET", "/api/v1/x", "enterprise");
        api.reserve(10_000, "r2".into(), 0, 1);
        let d = api.on_reservation(Ok(RedisReply::Error("ERR".into())), now());
        assert!(matches!(d, Decision::FailClosed(_, ref r) if r.status == 503));
        assert!(api.on_end(now(), &p.redis).is_none());
    }

    #[test]
    fn a_reply_that_is_not_reserve_luas_is_a_failure() {
        let p = plans();
        let mut m = reserved(&p);
        let d = m.on_reservation(Ok(RedisReply::Bulk(b"OK".to_vec())), now());
        assert!(matches!(d, Decision::FailOpen(TransportError::BadReply(_))));
    }

    #[test]
    fn unlimited_successes_are_counted_and_failures_are_not() {
        let p = plans();
        let view = || request(&p, "GET", "/api/procedures/1", "free");
        assert_eq!(
            view().on_response(200, now(), &p.redis).unwrap().mode,
            SettleMode::Count
        );
        assert!(view().on_response(404, now(), &p.redis).is_none());
        assert!(view().on_end(now(), &p.redis).is_none());
    }
}
