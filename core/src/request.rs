//! The life of one request, with no I/O: the shell hands in what arrived (request headers, a
//! Redis reply, the upstream's status, the end of the stream) and gets back what to do.
//!
//! ```text
//! headers ──admit──> Unmetered | Reject(response) | Proceed(metered) | Reserve(metered, cmd)
//! reply   ──on_reservation──> Allowed | Denied(429) | FailOpen | FailClosed(503)
//! status  ──on_response──> commit (2xx) / release (otherwise) / count (2xx, nothing reserved)
//! end     ──on_end──> release, if still held (client gone, stream reset)
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::config::{Config, FailureMode, Plan};
use crate::denials::{Denial, DenialCache};
use crate::keys::UsageKeys;
use crate::period::BillingPeriod;
use crate::redis::scripts::{self, SettleMode, Settlement};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::responses::{self, LocalResponse};
use crate::routes;

/// Parsed configuration plus what is derived from it once, not per request.
#[derive(Debug)]
pub struct Gate {
    pub config: Config,
    /// Each plan's limits as a JSON object, snapshotted into the monthly summary.
    limits_json: BTreeMap<String, Rc<str>>,
    denials: RefCell<DenialCache>,
}

pub enum Admission {
    /// No route matched: pass untouched, count nothing.
    Unmetered,
    /// Answer the client now (401, 400, 403, 411, 413).
    Reject(LocalResponse),
    /// 429 without asking Redis: this user was refused moments ago and no unit can come back.
    Deny(LocalResponse),
    /// Unlimited: let it through without waiting on Redis, count it on success.
    Proceed(MeteredRequest),
    /// Limited: send `RedisCommand` and wait for the reservation before going upstream.
    Reserve(MeteredRequest, RedisCommand),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied(LocalResponse),
    /// Redis did not answer usably; the action is `fail_open`, so the request goes on.
    FailOpen(TransportError),
    /// Redis did not answer usably; the action is `fail_closed`.
    FailClosed(TransportError, LocalResponse),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// A reservation was asked for; its answer has not arrived.
    Reserving,
    /// Redis holds a unit for this request until it is committed or released.
    Held,
    /// Nothing reserved (unlimited): count on success.
    Unreserved,
    /// Redis failed to answer the reservation (fail-open): it may or may not hold one. Count
    /// on success (the count also removes it), release otherwise.
    Uncertain,
    Settled,
}

/// A request on a metered route, from admission until it is settled.
#[derive(Debug)]
pub struct MeteredRequest {
    action: String,
    user: String,
    plan: String,
    kind: String,
    bytes: u64,
    request_id: String,
    reservation_id: String,
    period: BillingPeriod,
    keys: UsageKeys,
    hold: Hold,
}

impl Gate {
    pub fn new(config: Config) -> Self {
        let limits_json = config
            .plans
            .iter()
            .map(|(name, plan)| {
                let json = serde_json::to_string(&plan.limits).expect("limits serialize");
                (name.clone(), Rc::from(json))
            })
            .collect();
        Self {
            config,
            limits_json,
            denials: RefCell::new(DenialCache::new(10_000)),
        }
    }

    fn limit_reached(
        &self,
        metered: &MeteredRequest,
        limit: u64,
        current: u64,
        now: DateTime<Utc>,
    ) -> LocalResponse {
        let plan = self.plan_of(metered);
        responses::limit_reached(
            &self.config,
            &metered.plan,
            plan,
            &metered.action,
            &self.config.actions[&metered.action],
            &metered.period,
            responses::Exhausted {
                current,
                limit,
                retry_after_secs: metered.period.seconds_until_end(now),
            },
        )
    }

    /// Decides what to do with a request from its method, path and headers.
    /// `headers` returns every raw value of a request header, in order (it is asked only for
    /// metered routes); `reservation_id` is called only when a reservation is needed and must
    /// be unique across every Envoy sharing the Redis.
    pub fn admit(
        &self,
        method: &str,
        path: &str,
        headers: &dyn Fn(&str) -> Vec<Vec<u8>>,
        now: DateTime<Utc>,
        reservation_id: impl FnOnce() -> String,
    ) -> Admission {
        let config = &self.config;
        let Some(action_key) = routes::match_action(&config.routes, method, path) else {
            return Admission::Unmetered;
        };
        let action = &config.actions[action_key];
        let identity = &config.identity;
        // Identity and size headers must be unambiguous: the upstream might read another copy.
        let single = |name: &str| -> Result<Option<Vec<u8>>, LocalResponse> {
            let mut values = headers(name);
            match values.len() {
                0 => Ok(None),
                1 => Ok(values.pop()),
                _ => Err(responses::bad_request(
                    name,
                    "the header appears more than once",
                )),
            }
        };
        let header = |name: &str| headers(name).into_iter().next();
        macro_rules! single {
            ($name:expr) => {
                match single($name) {
                    Ok(value) => value,
                    Err(response) => return Admission::Reject(response),
                }
            };
        }

        let user = match single!(&identity.user_header) {
            None => return Admission::Reject(responses::missing_user(&identity.user_header)),
            Some(raw) if raw.is_empty() => {
                return Admission::Reject(responses::missing_user(&identity.user_header))
            }
            Some(raw) => match validate_user_id(raw, identity.max_user_id_bytes) {
                Ok(user) => user,
                Err(reason) => {
                    return Admission::Reject(responses::bad_request(&identity.user_header, reason))
                }
            },
        };
        let plan_header = single!(&identity.plan_header);
        let plan_name = plan_header
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok());
        let (plan_key, plan) = config.plan_or_default(plan_name);

        if let Some(feature) = &action.feature {
            if !plan.has_feature(feature) {
                return Admission::Reject(responses::feature_unavailable(
                    config, plan_key, plan, action, feature,
                ));
            }
        }

        let content_length = single!("content-length");
        let bytes = match (action.enforce_max_file_size, content_length) {
            (true, None) => return Admission::Reject(responses::length_required()),
            (true, Some(raw)) => match parse_content_length(&raw) {
                Some(bytes) => {
                    if let Some(max) = plan.max_file_size_bytes.filter(|max| bytes > *max) {
                        return Admission::Reject(responses::file_too_large(
                            config, plan_key, plan, bytes, max,
                        ));
                    }
                    bytes
                }
                None => {
                    return Admission::Reject(responses::bad_request(
                        "content-length",
                        "not a whole number of bytes",
                    ))
                }
            },
            (false, raw) => raw.and_then(|raw| parse_content_length(&raw)).unwrap_or(0),
        };

        let kind = action
            .kind
            .as_ref()
            .and_then(|source| {
                let value = source
                    .header
                    .as_deref()
                    .and_then(header)
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .or_else(|| {
                        source
                            .query
                            .as_deref()
                            .and_then(|q| routes::query_param(path, q))
                    })?;
                Some(if source.allowed.contains(&value) {
                    value
                } else {
                    "other".to_string()
                })
            })
            .unwrap_or_default();

        let period = BillingPeriod::calendar_month(now);
        let keys = UsageKeys::new(&config.redis.key_prefix, &user, &period.id, action_key);
        let request_id = header("x-request-id")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        let limit = plan.limit(action_key);
        let mut metered = MeteredRequest {
            action: action_key.to_string(),
            user,
            plan: plan_key.to_string(),
            kind,
            bytes,
            request_id,
            reservation_id: String::new(),
            period,
            keys,
            hold: Hold::Unreserved,
        };
        match limit {
            None => Admission::Proceed(metered),
            Some(limit) => {
                let denied = self
                    .denials
                    .borrow()
                    .get(
                        &metered.user,
                        action_key,
                        &metered.period.id,
                        limit,
                        unix_millis(now),
                    )
                    .map(|d| d.response.clone());
                if let Some(mut response) = denied {
                    let retry_after = metered.period.seconds_until_end(now).to_string();
                    response.set_header("retry-after", retry_after);
                    return Admission::Deny(response);
                }
                metered.reservation_id = reservation_id();
                metered.hold = Hold::Reserving;
                let command = scripts::reserve(
                    &metered.keys,
                    action_key,
                    limit,
                    &metered.reservation_id,
                    unix_millis(now),
                    config.redis.reservation_ttl_ms,
                );
                Admission::Reserve(metered, command)
            }
        }
    }

    fn plan_of(&self, metered: &MeteredRequest) -> &Plan {
        &self.config.plans[&metered.plan]
    }
}

impl MeteredRequest {
    pub fn action(&self) -> &str {
        &self.action
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The reservation's answer (or why there is none) arrived.
    pub fn on_reservation(
        &mut self,
        gate: &Gate,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
    ) -> Decision {
        let reservation = reply.and_then(|reply| {
            let ints = reply.into_ints()?;
            scripts::parse_reservation(&ints)
                .ok_or_else(|| TransportError::BadReply(format!("reserve returned {ints:?}")))
        });
        let failure = match reservation {
            Ok(r) if r.granted => {
                self.hold = Hold::Held;
                return Decision::Allowed;
            }
            Ok(r) => {
                self.hold = Hold::Settled;
                let limit = gate.plan_of(self).limit(&self.action).unwrap_or(0);
                let response = gate.limit_reached(self, limit, r.committed + r.pending, now);
                let cache_ms = gate.config.redis.deny_cache_ms;
                // Final for this period only when successes alone used the allowance.
                if r.committed >= limit && cache_ms > 0 {
                    let now_ms = unix_millis(now);
                    let until_ms = (now_ms + cache_ms).min(unix_millis(self.period.end));
                    let denial = Denial {
                        period_id: self.period.id.clone(),
                        limit,
                        response: response.clone(),
                        until_ms,
                    };
                    gate.denials
                        .borrow_mut()
                        .remember(&self.user, &self.action, denial, now_ms);
                }
                return Decision::Denied(response);
            }
            Err(failure) => failure,
        };
        match gate.config.actions[&self.action].on_redis_error {
            FailureMode::FailOpen => {
                // Whether the reservation was made is unknown: settle as a plain count on
                // success (and release the id, in case it was).
                self.hold = Hold::Uncertain;
                Decision::FailOpen(failure)
            }
            FailureMode::FailClosed => {
                self.hold = Hold::Settled;
                let response = responses::usage_unavailable(&self.action);
                Decision::FailClosed(failure, response)
            }
        }
    }

    /// The upstream answered with `status`: 2xx counts, anything else gives the unit back.
    pub fn on_response(
        &mut self,
        gate: &Gate,
        status: u32,
        now: DateTime<Utc>,
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
        Some(self.settlement(gate, mode, status, now))
    }

    /// The stream ended: a unit still held (client left, stream reset) is released.
    pub fn on_end(&mut self, gate: &Gate, now: DateTime<Utc>) -> Option<Settlement> {
        match self.hold {
            Hold::Held | Hold::Reserving | Hold::Uncertain => {
                self.hold = Hold::Settled;
                Some(self.settlement(gate, SettleMode::Release, 0, now))
            }
            Hold::Unreserved | Hold::Settled => None,
        }
    }

    fn settlement(
        &self,
        gate: &Gate,
        mode: SettleMode,
        status: u32,
        now: DateTime<Utc>,
    ) -> Settlement {
        let retention = chrono::Duration::days(i64::from(gate.config.redis.summary_retention_days));
        Settlement {
            mode,
            keys: self.keys.clone(),
            reservation_id: self.reservation_id.clone(),
            action: self.action.clone(),
            user: self.user.clone(),
            plan: self.plan.clone(),
            limits_json: gate.limits_json[&self.plan].clone(),
            kind: self.kind.clone(),
            bytes: self.bytes,
            status,
            at: crate::period::rfc3339(now, true),
            request_id: self.request_id.clone(),
            period_id: self.period.id.clone(),
            keep_for_ms: unix_millis(self.period.end + retention).saturating_sub(unix_millis(now)),
        }
    }
}

fn validate_user_id(raw: Vec<u8>, max_bytes: usize) -> Result<String, &'static str> {
    if raw.len() > max_bytes {
        return Err("user id is longer than identity.max_user_id_bytes");
    }
    let user = String::from_utf8(raw).map_err(|_| "user id is not UTF-8")?;
    if user.chars().any(char::is_control) {
        return Err("user id contains control characters");
    }
    Ok(user)
}

/// A Content-Length is ASCII digits only (no sign, no spaces) and fits in u64.
fn parse_content_length(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

pub fn unix_millis(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn gate() -> Gate {
        Gate::new(Config::from_json(include_bytes!("../../plans.json")).unwrap())
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
    }

    fn admit(gate: &Gate, method: &str, path: &str, headers: &[(&str, &[u8])]) -> Admission {
        let lookup = |name: &str| {
            headers
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.to_vec())
                .collect()
        };
        gate.admit(method, path, &lookup, now(), || "r1".into())
    }

    fn status(admission: &Admission) -> Option<u32> {
        match admission {
            Admission::Reject(r) => Some(r.status),
            _ => None,
        }
    }

    #[test]
    fn unmatched_routes_are_unmetered() {
        assert!(matches!(
            admit(&gate(), "GET", "/health", &[]),
            Admission::Unmetered
        ));
    }

    #[test]
    fn a_metered_route_without_a_user_is_401() {
        let g = gate();
        assert_eq!(status(&admit(&g, "POST", "/api/upload", &[])), Some(401));
        assert_eq!(
            status(&admit(&g, "POST", "/api/upload", &[("x-user-id", b"")])),
            Some(401)
        );
    }

    #[test]
    fn bad_user_ids_are_400() {
        let g = gate();
        let long = vec![b'a'; 65_536];
        for bad in [&long[..], b"\xff\xfe", b"a\nb"] {
            let a = admit(&g, "POST", "/api/teammate", &[("x-user-id", bad)]);
            assert_eq!(status(&a), Some(400));
        }
    }

    #[test]
    fn duplicated_identity_or_length_headers_are_400() {
        let g = gate();
        for name in ["x-user-id", "x-user-plan", "content-length"] {
            let mut headers: Vec<(&str, &[u8])> = vec![
                ("x-user-id", b"u"),
                ("x-user-plan", b"free"),
                ("content-length", b"1"),
            ];
            headers.push((name, b"other"));
            let a = admit(&g, "POST", "/api/upload", &headers);
            assert_eq!(status(&a), Some(400), "{name}");
        }
    }

    #[test]
    fn a_limited_action_asks_for_a_reservation() {
        let g = gate();
        let a = admit(
            &g,
            "POST",
            "/api/teammate?kind=vision",
            &[("x-user-id", b"u:1")],
        );
        let Admission::Reserve(metered, cmd) = a else {
            panic!("expected a reservation")
        };
        assert_eq!(metered.kind, "vision");
        assert_eq!(metered.plan, "free");
        assert_eq!(cmd.args[3], b"plan-limits:{u%3A1}:2026-11");
        assert_eq!(cmd.args[6], b"3");
    }

    #[test]
    fn unlimited_actions_proceed_without_redis() {
        let g = gate();
        let a = admit(
            &g,
            "POST",
            "/api/upload",
            &[
                ("x-user-id", b"u"),
                ("x-user-plan", b"professional"),
                ("content-length", b"1"),
            ],
        );
        assert!(matches!(a, Admission::Proceed(_)));
    }

    #[test]
    fn features_outside_the_plan_are_403() {
        let g = gate();
        let a = admit(&g, "POST", "/api/export/dxf", &[("x-user-id", b"u")]);
        assert_eq!(status(&a), Some(403));
        let a = admit(
            &g,
            "POST",
            "/api/export/dxf",
            &[("x-user-id", b"u"), ("x-user-plan", b"professional")],
        );
        assert!(matches!(a, Admission::Reserve(..)));
    }

    #[test]
    fn upload_sizes_are_checked_against_the_plan() {
        let g = gate();
        let mb11 = (11 * 1024 * 1024).to_string();
        let mb50 = (50 * 1024 * 1024).to_string();
        let free = admit(
            &g,
            "POST",
            "/api/upload",
            &[("x-user-id", b"u"), ("content-length", mb11.as_bytes())],
        );
        assert_eq!(status(&free), Some(413));
        let pro = admit(
            &g,
            "POST",
            "/api/upload",
            &[
                ("x-user-id", b"u"),
                ("x-user-plan", b"professional"),
                ("content-length", mb50.as_bytes()),
            ],
        );
        assert!(matches!(pro, Admission::Proceed(ref m) if m.bytes == 50 * 1024 * 1024));
    }

    #[test]
    fn uploads_need_a_valid_content_length() {
        let g = gate();
        assert_eq!(
            status(&admit(&g, "POST", "/api/upload", &[("x-user-id", b"u")])),
            Some(411)
        );
        for bad in [&b"-1"[..], b"12a", b"", b" 1", b"99999999999999999999999"] {
            let a = admit(
                &g,
                "POST",
                "/api/upload",
                &[("x-user-id", b"u"), ("content-length", bad)],
            );
            assert_eq!(status(&a), Some(400), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// What reserve.lua answers: granted (1 or 0), committed, pending.
    fn reply(granted: i64, committed: i64, pending: i64) -> Result<RedisReply, TransportError> {
        Ok(RedisReply::Array(vec![
            RedisReply::Int(granted),
            RedisReply::Int(committed),
            RedisReply::Int(pending),
        ]))
    }

    fn reserved(g: &Gate) -> MeteredRequest {
        match admit(
            g,
            "POST",
            "/api/upload",
            &[("x-user-id", b"u"), ("content-length", b"10")],
        ) {
            Admission::Reserve(m, _) => m,
            _ => panic!("expected a reservation"),
        }
    }

    #[test]
    fn a_granted_reservation_commits_on_2xx() {
        let g = gate();
        let mut m = reserved(&g);
        assert_eq!(
            m.on_reservation(&g, reply(1, 0, 1), now()),
            Decision::Allowed
        );
        let s = m.on_response(&g, 201, now()).unwrap();
        assert_eq!(s.mode, SettleMode::Commit);
        assert_eq!(s.bytes, 10);
        assert_eq!(s.at, "2026-11-27T12:00:00.000Z");
        assert!(m.on_end(&g, now()).is_none(), "settled once only");
    }

    #[test]
    fn a_failed_upstream_releases_the_unit() {
        let g = gate();
        let mut m = reserved(&g);
        m.on_reservation(&g, reply(1, 0, 1), now());
        assert_eq!(
            m.on_response(&g, 500, now()).unwrap().mode,
            SettleMode::Release
        );
    }

    #[test]
    fn a_client_that_leaves_releases_the_unit() {
        let g = gate();
        let mut m = reserved(&g);
        assert_eq!(m.on_end(&g, now()).unwrap().mode, SettleMode::Release);
        let mut m = reserved(&g);
        m.on_reservation(&g, reply(1, 0, 1), now());
        assert_eq!(m.on_end(&g, now()).unwrap().mode, SettleMode::Release);
    }

    #[test]
    fn a_refused_reservation_is_429_with_the_current_usage() {
        let g = gate();
        let mut m = reserved(&g);
        let d = m.on_reservation(&g, reply(0, 4, 1), now());
        let Decision::Denied(r) = d else {
            panic!("expected 429")
        };
        assert_eq!(r.status, 429);
        assert!(r.body.contains("\"current\":5"));
        assert!(m.on_end(&g, now()).is_none());
    }

    #[test]
    fn a_final_refusal_is_remembered_briefly() {
        let g = gate();
        let mut m = reserved(&g);
        m.on_reservation(&g, reply(0, 5, 0), now());
        let a = admit(
            &g,
            "POST",
            "/api/upload",
            &[("x-user-id", b"u"), ("content-length", b"10")],
        );
        let Admission::Deny(r) = a else {
            panic!("expected a remembered refusal")
        };
        assert_eq!(r.status, 429);
        assert!(r.body.contains("\"current\":5"));
        // Another user, and the same user a second later, ask Redis again.
        let other = admit(
            &g,
            "POST",
            "/api/upload",
            &[("x-user-id", b"v"), ("content-length", b"10")],
        );
        assert!(matches!(other, Admission::Reserve(..)));
        let later = g.admit(
            "POST",
            "/api/upload",
            &|n: &str| {
                if n == "x-user-id" {
                    vec![b"u".to_vec()]
                } else if n == "content-length" {
                    vec![b"1".to_vec()]
                } else {
                    vec![]
                }
            },
            now() + chrono::Duration::milliseconds(1000),
            || "r".into(),
        );
        assert!(matches!(later, Admission::Reserve(..)));
    }

    #[test]
    fn a_refusal_while_units_are_in_flight_is_not_remembered() {
        let g = gate();
        let mut m = reserved(&g);
        m.on_reservation(&g, reply(0, 4, 1), now());
        let a = admit(
            &g,
            "POST",
            "/api/upload",
            &[("x-user-id", b"u"), ("content-length", b"10")],
        );
        assert!(
            matches!(a, Admission::Reserve(..)),
            "the unit in flight may be released"
        );
    }

    #[test]
    fn redis_failures_follow_the_action_failure_mode() {
        let g = gate();
        let mut m = reserved(&g);
        let d = m.on_reservation(&g, Err(TransportError::Unknown("timeout".into())), now());
        assert!(matches!(d, Decision::FailOpen(_)));
        assert_eq!(
            m.on_response(&g, 200, now()).unwrap().mode,
            SettleMode::Count
        );

        let mut api = match admit(
            &g,
            "GET",
            "/api/v1/x",
            &[("x-user-id", b"u"), ("x-user-plan", b"enterprise")],
        ) {
            Admission::Reserve(m, _) => m,
            _ => panic!("expected a reservation"),
        };
        let d = api.on_reservation(&g, Ok(RedisReply::Error("ERR".into())), now());
        assert!(matches!(d, Decision::FailClosed(_, ref r) if r.status == 503));
    }

    #[test]
    fn unlimited_successes_are_counted_and_failures_are_not() {
        let g = gate();
        let proceed = |g: &Gate| match admit(g, "GET", "/api/procedures/1", &[("x-user-id", b"u")])
        {
            Admission::Proceed(m) => m,
            _ => panic!("expected proceed"),
        };
        assert_eq!(
            proceed(&g).on_response(&g, 200, now()).unwrap().mode,
            SettleMode::Count
        );
        assert!(proceed(&g).on_response(&g, 404, now()).is_none());
        assert!(proceed(&g).on_end(&g, now()).is_none());
    }

    proptest::proptest! {
        #[test]
        fn fuzz_admission_headers(user in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                             plan in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                                             length in proptest::collection::vec(proptest::num::u8::ANY, 0..24)) {
            let g = gate();
            let a = admit(&g, "POST", "/api/upload", &[("x-user-id", &user), ("x-user-plan", &plan), ("content-length", &length)]);
            if let Admission::Reserve(m, _) | Admission::Proceed(m) = a {
                proptest::prop_assert_eq!(m.user.as_bytes(), &user[..]);
            }
        }
    }
}
