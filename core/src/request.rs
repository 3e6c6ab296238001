//! The life of one metered request once admitted: its reservation, the upstream's answer and
//! the end of its stream, each turned into what to tell the client and what to settle.
//!
//! ```text
//! reserve  ──> a command to send (actions the plan limits)
//! reply    ──on_reservation──> Allowed | Denied(429) | Refused(403/413) | FailOpen | FailClosed(503)
//! status   ──on_response──> commit (2xx) / release (otherwise) / count (2xx, nothing reserved)
//! tick     ──extension──> extend (a reservation held long enough to need it)
//! end      ──on_end──> release, or commit (client left, action counts what was forwarded)
//! ```

use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::cluster;
use crate::config::{FailureMode, Gauge, Limit, OnClientAbort, RedisSettings};
use crate::keys::UsageKeys;
use crate::metadata::Metadata;
use crate::period::{self, BillingPeriod};
use crate::plans::{Action, FeatureAccess, Plan, Plans, Terms};
use crate::redis::functions::{
    self, GaugeHold, IdempotencyMark, LeaseAsk, Reservation, ReserveArgs, ReserveStatus,
};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::responses::{self, Exhausted, LocalResponse};
use crate::settlement::{SettleMode, Settlement};

/// A lease is granted only while the user has at least this many times its units left.
pub const LEASE_ROOM_FACTOR: u64 = 10;

/// What admission learnt about a request.
pub struct RequestFacts<'a> {
    pub action: Rc<Action>,
    pub terms: Rc<Terms>,
    pub user: String,
    pub org: Option<String>,
    /// A plan name the caller named that plans.json does not know (the default plan applies).
    pub unknown_plan: Option<String>,
    pub kind: String,
    /// What its usage event records of the request (the action's `metadata`).
    pub metadata: Metadata,
    /// The Content-Length, if declared (none: a chunked body, or no body).
    pub declared_bytes: Option<u64>,
    pub request_id: String,
    /// The client's idempotency key: repeats of the request are one request.
    pub idempotency_key: Option<String>,
    /// The subscription's anchor day the period runs from (0 or 1: the calendar month).
    pub anchor: u32,
    pub period: BillingPeriod,
    pub key_prefix: &'a str,
}

/// A request on a metered route, from admission until it is settled.
#[derive(Debug)]
pub struct MeteredRequest {
    action: Rc<Action>,
    terms: Rc<Terms>,
    user: String,
    org: Option<String>,
    unknown_plan: Option<String>,
    kind: String,
    metadata: Metadata,
    declared_bytes: Option<u64>,
    /// The body that went through so far.
    body_bytes: u64,
    request_id: String,
    idempotency_key: Option<String>,
    anchor: u32,
    /// The anchor the token named (billing's record wins over it).
    claimed_anchor: u32,
    /// The anchor was corrected by billing's record once already.
    reanchored: bool,
    period: BillingPeriod,
    keys: UsageKeys,
    key_prefix: String,
    /// Empty until a reservation is asked for.
    reservation_id: String,
    reserved_limit: u64,
    /// Units of a lease asked for besides its own, until the answer (`lease_asked`).
    lease_asked: u64,
    /// Extra units an operator granted this period, as the reservation's answer said.
    granted: u64,
    /// When Redis last set the reservation's expiry (unix ms).
    held_since_ms: u64,
    /// The allowance as Redis reserved from it: the limit, and what remains after this one.
    quota: Option<Quota>,
    /// For a request that adds to a running total: what its reservation holds there; for an
    /// upload into a limited storage, the room its body may take (refused past it).
    gauge_held: Option<u64>,
    storage_room: Option<u64>,
    /// The whole request went to the upstream (its body too).
    forwarded: bool,
    hold: Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Nothing reserved (unlimited): count on success.
    Unreserved,
    /// Nothing reserved (unlimited), but its idempotency key marked as in flight or what it
    /// would add to a running total held: count on success, release (the mark, the hold)
    /// otherwise.
    Marked,
    /// A reservation was asked for; its answer has not arrived.
    Reserving,
    /// Redis holds a unit for this request until it is committed or released.
    Held,
    /// Redis failed to answer the reservation (fail-open): it may or may not hold one. Count
    /// on success (the count also removes it), release otherwise.
    Uncertain,
    Settled,
}

/// An allowance as a reservation found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    /// What remains after the request (0 when it was refused).
    pub remaining: u64,
    /// Units counted or held, this request's included when it was granted.
    pub taken: u64,
}

impl Quota {
    /// Of a granted unit past the limit (in the plan's grace): how many of the grace are
    /// taken, this one included.
    pub fn in_grace(&self) -> Option<u64> {
        self.taken.checked_sub(self.limit).filter(|n| *n > 0)
    }

    /// The highest of `thresholds` (percent of the limit) this request's unit brought the
    /// count to, if it crossed one.
    pub fn crossed(&self, thresholds: &[u8]) -> Option<u8> {
        let before = self.taken.checked_sub(1)?;
        let limit = u128::from(self.limit);
        let reached = |n: u64, t: u8| u128::from(n) * 100 >= u128::from(t) * limit;
        thresholds
            .iter()
            .copied()
            .filter(|t| self.limit > 0 && reached(self.taken, *t) && !reached(before, *t))
            .max()
    }
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
    /// The plan in force (billing's record) does not allow the request (403, 413).
    Refused(LocalResponse),
    /// A request with the same idempotency key came first (409).
    Duplicate(LocalResponse),
    /// Redis did not answer usably; the action is `fail_open`: the request may go on, within
    /// what this Envoy knows remains.
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
            org: facts.org,
            unknown_plan: facts.unknown_plan,
            kind: facts.kind,
            metadata: facts.metadata,
            declared_bytes: facts.declared_bytes,
            body_bytes: 0,
            request_id: facts.request_id,
            idempotency_key: facts.idempotency_key,
            anchor: facts.anchor,
            claimed_anchor: facts.anchor,
            reanchored: false,
            key_prefix: facts.key_prefix.to_string(),
            period: facts.period,
            keys,
            reservation_id: String::new(),
            reserved_limit: 0,
            lease_asked: 0,
            granted: 0,
            held_since_ms: 0,
            quota: None,
            gauge_held: None,
            storage_room: None,
            forwarded: false,
            hold: Hold::Unreserved,
        }
    }

    pub fn action(&self) -> &Action {
        &self.action
    }

    pub fn plan(&self) -> &Plan {
        &self.terms.plan
    }

    /// The terms it is under (the plan in force's, for its action).
    pub fn terms(&self) -> &Terms {
        &self.terms
    }

    pub fn limit(&self) -> Limit {
        self.terms.limit
    }

    /// The plan's limit plus what an operator granted this period (as Redis last said).
    pub fn effective_limit(&self) -> Limit {
        self.terms.limit.map(|l| l.saturating_add(self.granted))
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    #[cfg(test)]
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// A response header some metadata field is read from (the action lists it).
    pub fn on_metadata_header(&mut self, name: &str, value: &[u8]) {
        self.action
            .metadata
            .read_response(&mut self.metadata, name, value);
    }

    /// The body's size: what went through once all of it did, else what was declared (Envoy
    /// holds a body to its Content-Length), else what went through so far.
    pub fn bytes(&self) -> u64 {
        match self.declared_bytes {
            Some(declared) if !self.forwarded => declared,
            _ => self.body_bytes,
        }
    }

    #[cfg(test)]
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The anchor day its period runs from (0 or 1: the calendar month).
    pub fn anchor(&self) -> u32 {
        self.anchor
    }

    /// The anchor day in force after a reservation's answer: billing's, else the token's.
    pub fn anchor_in_force(&self, recorded: Option<u32>) -> u32 {
        recorded.unwrap_or(self.claimed_anchor)
    }

    /// Whether the anchor was corrected after a reservation already.
    pub fn reanchored(&self) -> bool {
        self.reanchored
    }

    /// Gives back what a reservation in the wrong period took (its anchor was stale): the
    /// request is then reserved again, under the same id, in the right one.
    pub fn abandon_reservation(
        &mut self,
        took_a_unit: bool,
        now: DateTime<Utc>,
        redis: &RedisSettings,
    ) -> Option<Settlement> {
        self.hold = Hold::Settled;
        if !took_a_unit {
            return None;
        }
        let mut release = self.settlement(SettleMode::Release, 0, now, redis);
        // The idempotency mark stays: the next reservation, under the same id, keeps it.
        release.idempotency_key.clear();
        Some(release)
    }

    /// The id its reservation was asked under.
    pub fn reservation_id(&self) -> &str {
        &self.reservation_id
    }

    /// Moves the request to the period of another anchor day (billing's record names one).
    pub fn reanchor(&mut self, anchor: u32, now: DateTime<Utc>) {
        self.reanchored = true;
        self.anchor = anchor;
        self.period = BillingPeriod::anchored(now, anchor);
        self.keys = UsageKeys::new(
            &self.key_prefix,
            &self.user,
            &self.period.id,
            &self.action.key,
        );
    }

    /// The client's idempotency key, if it sent one.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// The allowance as its reservation found it (none: unlimited, or Redis did not answer).
    pub fn quota(&self) -> Option<Quota> {
        self.quota
    }

    pub fn period(&self) -> &BillingPeriod {
        &self.period
    }

    pub fn keys(&self) -> &UsageKeys {
        &self.keys
    }

    /// A plan name the caller or billing named that plans.json does not know.
    pub fn unknown_plan(&self) -> Option<&str> {
        self.unknown_plan.as_deref()
    }

    /// Whether the plan in force lets this request through at all: the action's feature
    /// (403) and the file size (413).
    pub fn admissible(&self) -> Result<(), LocalResponse> {
        if let FeatureAccess::Missing { feature, offer } = &self.terms.feature {
            return Err(responses::feature_unavailable(
                &self.action,
                &self.terms.plan,
                feature,
                offer.as_ref(),
            ));
        }
        match (self.max_file_size(), self.declared_bytes) {
            (Some(max), Some(declared)) if declared > max => Err(responses::file_too_large(
                &self.terms.plan,
                Some(declared),
                max,
            )),
            _ => Ok(()),
        }
    }

    /// The file size the plan in force allows, where the action checks it.
    fn max_file_size(&self) -> Option<u64> {
        self.terms
            .plan
            .max_file_size_bytes
            .filter(|_| self.action.enforce_max_file_size)
    }

    /// `len` more bytes of the body go through. A body without a Content-Length is measured
    /// as it streams: past the plan's file size it is refused (413), unless the upstream has
    /// answered already.
    pub fn on_body(&mut self, len: u64) -> Result<(), LocalResponse> {
        self.body_bytes = self.body_bytes.saturating_add(len);
        if let (Some(room), Some(limit)) = (self.storage_room, self.terms.plan.storage_bytes) {
            if self.body_bytes > room && self.hold != Hold::Settled {
                let taken = limit.saturating_sub(room);
                return Err(responses::storage_full(&self.terms.plan, taken, 0, None));
            }
        }
        match self.max_file_size() {
            Some(max) if self.body_bytes > max && self.hold != Hold::Settled => {
                Err(responses::file_too_large(&self.terms.plan, None, max))
            }
            _ => Ok(()),
        }
    }

    /// Puts the request under the terms of another plan (billing's record overrides the
    /// claim); it must still be admissible under them.
    pub fn apply_plan(&mut self, plan: &str) -> Result<(), LocalResponse> {
        if let Some(terms) = self.action.terms_of(plan) {
            self.terms = terms.clone();
        }
        self.admissible()
    }

    /// The request headers the upstream gets: the verified user, the plan in force and the
    /// organisation, replacing whatever the client sent.
    pub fn identity_headers<'a>(
        &'a self,
        user_header: &'a str,
        plan_header: &'a str,
        org_header: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        let mut headers = vec![
            (user_header, self.user.as_str()),
            (plan_header, self.terms.plan.key.as_str()),
        ];
        if let Some(org) = &self.org {
            headers.push((org_header, org.as_str()));
        }
        headers
    }

    /// Asks for one unit of `limit` under `id` (unique across every Envoy sharing the Redis).
    /// Redis applies billing's plan over the claimed one; `fallback` is the plan for a name
    /// plans.json does not know (`None`: refused).
    /// With an idempotency key, the key is marked (an unlimited request then asks too:
    /// `limit` 0); a request that adds to a running total holds what it would add there.
    pub fn reserve(&mut self, limit: u64, id: String, now_ms: u64, plans: &Plans) -> RedisCommand {
        self.reservation_id = id;
        self.reserved_limit = limit;
        self.held_since_ms = now_ms;
        self.hold = Hold::Reserving;
        let lease = self.leasable(&plans.redis).then_some(LeaseAsk {
            units: plans.redis.lease_units,
            room_factor: LEASE_ROOM_FACTOR,
        });
        self.lease_asked = lease.map_or(0, |l| l.units - 1);
        let marker = self
            .idempotency_key
            .as_deref()
            .map(|key| self.keys.user.idempotency(&self.action.key, key));
        let index = self.keys.user.idempotency_index();
        let gauge = self.action.adds_to.map(|gauge| GaugeHold {
            gauge,
            amount: match gauge {
                // A streamed upload (no Content-Length) holds the plan's file size, so that
                // uploads racing each other cannot together pass the storage.
                Gauge::Storage => self.declared_bytes.or(self.max_file_size()).unwrap_or(0),
                Gauge::Team => 1,
            },
            rooms: plans.rooms(gauge),
        });
        self.gauge_held = gauge.map(|hold| hold.amount);
        functions::reserve(ReserveArgs {
            keys: &self.keys,
            action: &self.action.key,
            claimed_plan: &self.terms.plan.key,
            fallback_plan: plans.fallback_plan(),
            reservation_id: &self.reservation_id,
            now_ms,
            ttl_ms: plans.redis.reservation_ttl_ms,
            limits: self.action.limits(),
            idempotency: marker.as_deref().map(|marker| IdempotencyMark {
                marker,
                ttl_ms: plans.idempotency_ttl_ms,
                index: &index,
                max_keys: plans.max_idempotency_keys,
            }),
            gauge,
            lease,
            events_stream: &cluster::events_stream_of(&plans.redis, &self.keys.summary),
            user: &self.user,
            period_id: &self.period.id,
        })
    }

    /// Whether a lease's unit can stand for its reservation: leases are on (`lease_units`
    /// over 1) and it is a limited action whose reservation holds nothing else (no
    /// idempotency key, no running total).
    pub fn leasable(&self, redis: &RedisSettings) -> bool {
        redis.lease_units > 1
            && self.limit().is_some()
            && self.idempotency_key.is_none()
            && self.action.adds_to.is_none()
    }

    /// Admitted with a unit of its worker's lease (`id`, held in Redis like a reservation of
    /// its own), as the reservation that brought the lease was answered.
    pub fn admit_leased(
        &mut self,
        limit: u64,
        id: String,
        lease: &Reservation,
        now: DateTime<Utc>,
    ) -> Decision {
        self.reservation_id = id;
        self.reserved_limit = limit;
        self.held_since_ms = unix_millis(now);
        self.on_reserved(lease, now)
    }

    /// The units of a lease its reservation asked for besides its own, while it waits for the
    /// answer (0 once answered, or when it asked for none): what its end must give back if
    /// the answer comes too late to be read.
    pub fn lease_asked(&self) -> u64 {
        self.lease_asked
    }

    /// What gives a lease's unused unit back: a release of this request's kind (each unit's
    /// id set in it).
    pub fn lease_release(&self, now: DateTime<Utc>, redis: &RedisSettings) -> Settlement {
        let mut release = self.settlement(SettleMode::Release, 0, now, redis);
        release.reservation_id.clear();
        release.metadata.clear();
        release
    }

    /// The reservation's answer (or why there is none) arrived.
    pub fn on_reservation(
        &mut self,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
    ) -> Decision {
        let parsed = reply.and_then(functions::parse_reservation);
        self.on_parsed_reservation(parsed.as_ref().map_err(Clone::clone), now)
    }

    /// The reservation's answer, read (or why there is none).
    pub fn on_parsed_reservation(
        &mut self,
        reservation: Result<&Reservation, TransportError>,
        now: DateTime<Utc>,
    ) -> Decision {
        self.lease_asked = 0;
        match reservation {
            Ok(reservation) => self.on_reserved(reservation, now),
            Err(failure) => self.redis_failed(failure),
        }
    }

    fn on_reserved(&mut self, reservation: &Reservation, now: DateTime<Utc>) -> Decision {
        if reservation.named_plan != reservation.plan {
            self.unknown_plan = Some(reservation.named_plan.clone());
        }
        let granted = reservation.status == ReserveStatus::Granted;
        self.hold = match reservation.status {
            ReserveStatus::Granted => Hold::Held,
            ReserveStatus::Unlimited
                if self.idempotency_key.is_some() || self.gauge_held.is_some() =>
            {
                Hold::Marked
            }
            ReserveStatus::Unlimited => Hold::Unreserved,
            ReserveStatus::Refused
            | ReserveStatus::UnknownPlan
            | ReserveStatus::Duplicate
            | ReserveStatus::Full
            | ReserveStatus::TooManyKeys => Hold::Settled,
        };
        if reservation.status == ReserveStatus::TooManyKeys {
            return Decision::Refused(responses::too_many_idempotency_keys(&self.action.key));
        }
        if reservation.status == ReserveStatus::Duplicate {
            let key = self.idempotency_key.as_deref().unwrap_or_default();
            return Decision::Duplicate(responses::duplicate(
                &self.action,
                key,
                &reservation.first,
            ));
        }
        if reservation.status == ReserveStatus::UnknownPlan {
            return Decision::Refused(responses::unknown_plan(&reservation.named_plan));
        }
        // Billing's record may name another plan than the claim: its terms apply.
        if let Err(response) = self.apply_plan(&reservation.plan) {
            // A unit reserved under them is given back when the stream ends.
            return Decision::Refused(response);
        }
        let taken = reservation.total.saturating_add(reservation.total_held);
        match self.action.adds_to {
            Some(gauge) if reservation.status == ReserveStatus::Full => {
                let plan = &self.terms.plan;
                return Decision::Refused(match gauge {
                    Gauge::Storage => responses::storage_full(
                        plan,
                        reservation.total,
                        reservation.total_held,
                        self.declared_bytes,
                    ),
                    Gauge::Team => {
                        responses::team_full(plan, reservation.total, reservation.total_held)
                    }
                });
            }
            Some(Gauge::Storage) if self.hold != Hold::Settled => {
                self.storage_room = self
                    .terms
                    .plan
                    .storage_bytes
                    .map(|room| room.saturating_sub(taken));
            }
            _ => {}
        }
        self.granted = reservation.granted;
        if let (ReserveStatus::Granted | ReserveStatus::Refused, Some(limit)) =
            (reservation.status, self.effective_limit())
        {
            let taken = reservation.committed.saturating_add(reservation.pending);
            let remaining = if granted {
                limit.saturating_sub(taken)
            } else {
                0
            };
            self.quota = Some(Quota {
                limit,
                remaining,
                taken,
            });
        }
        match reservation.status {
            ReserveStatus::Refused => {
                let limit = self
                    .effective_limit()
                    .unwrap_or(self.reserved_limit.saturating_add(self.granted));
                let usage = Exhausted {
                    used: reservation.committed,
                    in_flight: reservation.pending,
                    limit,
                    grace: self.terms.grace,
                    retry_after_secs: self.period.seconds_until_end(now),
                };
                Decision::Denied {
                    response: responses::limit_reached(
                        &self.action,
                        &self.terms,
                        &self.period,
                        usage,
                    ),
                    final_refusal: reservation.committed >= limit.saturating_add(self.terms.grace),
                }
            }
            _ => {
                debug_assert!(granted || reservation.status == ReserveStatus::Unlimited);
                Decision::Allowed
            }
        }
    }

    fn redis_failed(&mut self, failure: TransportError) -> Decision {
        match self.action.on_redis_error {
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
        }
    }

    /// The 429 of a fail-open request past what this Envoy knows remains while Redis is
    /// unreachable: the limit is taken as reached.
    pub fn outage_refusal(&mut self, now: DateTime<Utc>) -> LocalResponse {
        self.hold = Hold::Settled;
        let limit = self
            .effective_limit()
            .unwrap_or(self.reserved_limit.saturating_add(self.granted));
        self.quota = Some(Quota {
            limit,
            remaining: 0,
            taken: limit,
        });
        // What this Envoy last knew was used up; how much of it was in flight, it cannot tell.
        let usage = Exhausted {
            used: limit,
            in_flight: 0,
            limit,
            grace: 0,
            retry_after_secs: self.period.seconds_until_end(now),
        };
        responses::limit_reached(&self.action, &self.terms, &self.period, usage)
    }

    /// The request's body (all of it) went to the upstream.
    pub fn on_forwarded(&mut self) {
        self.forwarded = true;
    }

    /// A held reservation older than `every_ms` is extended (the request is still in flight,
    /// e.g. a slow upload): its unit, and what it holds of a running total, stay held until
    /// the request ends.
    pub fn extension(
        &mut self,
        now: DateTime<Utc>,
        every_ms: u64,
        redis: &RedisSettings,
    ) -> Option<Settlement> {
        let now_ms = unix_millis(now);
        let holds =
            self.hold == Hold::Held || (self.hold == Hold::Marked && self.gauge_held.is_some());
        if !holds || now_ms.saturating_sub(self.held_since_ms) < every_ms {
            return None;
        }
        self.held_since_ms = now_ms;
        Some(self.settlement(SettleMode::Extend, 0, now, redis))
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
            (Hold::Unreserved | Hold::Marked | Hold::Uncertain, true) => SettleMode::Count,
            (Hold::Held | Hold::Marked | Hold::Reserving | Hold::Uncertain, false) => {
                SettleMode::Release
            }
            (Hold::Unreserved | Hold::Settled, false) | (Hold::Settled | Hold::Reserving, true) => {
                self.hold = Hold::Settled;
                return None;
            }
        };
        let settlement = self.settlement(mode, status, now, redis);
        self.hold = Hold::Settled;
        Some(settlement)
    }

    /// The stream ended without the upstream's answer: its client left, or Envoy answered in
    /// its place (a timeout, a reset). `reached`: the request got to an upstream. The unit still
    /// held is released, unless the whole request was forwarded to an upstream and the action
    /// counts that (`on_client_abort: commit`, the default: the upstream may well do the work
    /// anyway); such a count is recorded as of unknown outcome.
    pub fn on_end(
        &mut self,
        reached: bool,
        now: DateTime<Utc>,
        redis: &RedisSettings,
    ) -> Option<Settlement> {
        let counts_when_forwarded =
            self.forwarded && reached && self.action.on_client_abort == OnClientAbort::Commit;
        let mode = match (self.hold, counts_when_forwarded) {
            (Hold::Held, true) => SettleMode::Commit,
            (Hold::Unreserved | Hold::Marked | Hold::Uncertain, true) => SettleMode::Count,
            (Hold::Held | Hold::Marked | Hold::Reserving | Hold::Uncertain, _) => {
                SettleMode::Release
            }
            (Hold::Unreserved | Hold::Settled, _) => return None,
        };
        let mut settlement = self.settlement(mode, 0, now, redis);
        self.hold = Hold::Settled;
        settlement.certain = mode == SettleMode::Release;
        Some(settlement)
    }

    /// Whether the request still waits for an outcome the upstream's answer would settle (and
    /// so whether its stream's end, or Envoy's reply, must say if the upstream was reached).
    pub fn unsettled(&self) -> bool {
        self.hold != Hold::Settled
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
            metadata: self.metadata.to_json(),
            // (Only a count is in grace; a release gives the unit back.)
            in_grace: matches!(mode, SettleMode::Commit)
                && self.quota.is_some_and(|q| q.in_grace().is_some()),
            bytes: self.bytes(),
            status,
            at: period::rfc3339(now, true),
            day: period::date(now),
            request_id: self.request_id.clone(),
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            gauge: self.action.adds_to,
            adds: match (self.action.adds_to, mode) {
                (Some(Gauge::Storage), SettleMode::Commit | SettleMode::Count) => {
                    Some(self.bytes())
                }
                (Some(Gauge::Team), SettleMode::Commit | SettleMode::Count) => Some(1),
                _ => None,
            },
            held: self.gauge_held,
            period_id: self.period.id.clone(),
            keep_for_ms: unix_millis(kept_until).saturating_sub(unix_millis(now)),
            made_at_ms: unix_millis(now),
            certain: true,
            waiter: None,
            fail_open: self.hold == Hold::Uncertain,
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
    use crate::testing::{head, metered, now, plans, plans_json_with};
    use chrono::TimeZone;
    use serde_json::json;

    fn request(p: &Plans, method: &str, path: &str, plan: &str) -> MeteredRequest {
        metered(p, &head(method, path, "u", plan), now())
    }

    /// An upload of a free user, its reservation asked for.
    fn reserved(p: &Plans) -> MeteredRequest {
        let mut m = request(p, "POST", "/api/upload", "free");
        m.reserve(5, "r1".into(), 1_000, p);
        m
    }

    /// What plan_limits_reserve answers: status, committed, pending, plan (named the same).
    fn reply(
        status: i64,
        committed: i64,
        pending: i64,
        plan: &str,
    ) -> Result<RedisReply, TransportError> {
        Ok(RedisReply::Array(vec![
            RedisReply::Int(status),
            RedisReply::Int(committed),
            RedisReply::Int(pending),
            RedisReply::Bulk(plan.as_bytes().to_vec()),
            RedisReply::Bulk(plan.as_bytes().to_vec()),
            RedisReply::Int(0),
        ]))
    }

    #[test]
    fn a_reservation_sends_every_plans_limit_and_storage_and_the_fallback() {
        let p = plans();
        let mut m = request(&p, "POST", "/api/upload", "free");
        let cmd = m.reserve(5, "r1".into(), 1_000, &p);
        let text: Vec<_> = cmd
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            text[9], "plan-limits:events",
            "where an expired one is recorded"
        );
        assert_eq!(
            text[11..],
            [
                "upload",
                "free",
                "free",
                "r1",
                "1000",
                "61000",
                "60000",
                "",
                // The bytes its Content-Length declares, held in storage while in flight.
                "10",
                "u",
                "2026-11",
                "",
                // No lease: an upload holds bytes of the storage besides its unit.
                "",
                "",
                "enterprise",
                "",
                "",
                "free",
                "5",
                "1073741824",
                "professional",
                "",
                "53687091200"
            ]
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
        assert_eq!(
            m.on_reservation(reply(1, 0, 1, "free"), now()),
            Decision::Allowed
        );
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
        assert!(
            m.on_end(true, now(), &p.redis).is_none(),
            "settled once only"
        );
    }

    #[test]
    fn billings_plan_overrides_the_claim() {
        let p = plans();
        // Claimed free, billing says professional: unlimited uploads, nothing reserved.
        let mut m = reserved(&p);
        assert_eq!(
            m.on_reservation(reply(2, 9, 0, "professional"), now()),
            Decision::Allowed
        );
        assert_eq!(m.plan().key, "professional");
        assert_eq!(
            m.identity_headers("x-user-id", "x-user-plan", "x-org-id"),
            [("x-user-id", "u"), ("x-user-plan", "professional")]
        );
        let s = m.on_response(200, now(), &p.redis).unwrap();
        assert_eq!(
            (s.mode, s.plan.as_str()),
            (SettleMode::Count, "professional")
        );
        // Claimed professional, billing says free: free has no DXF export.
        let mut m = metered(
            &p,
            &head("POST", "/api/export/dxf", "u", "professional"),
            now(),
        );
        m.reserve(50, "r2".into(), 0, &p);
        let Decision::Refused(r) = m.on_reservation(reply(1, 0, 1, "free"), now()) else {
            panic!("free has no DXF export")
        };
        assert_eq!(r.status, 403);
        assert_eq!(
            m.on_end(true, now(), &p.redis).unwrap().mode,
            SettleMode::Release,
            "the unit reserved is given back"
        );
    }

    #[test]
    fn a_user_with_too_many_idempotency_keys_is_refused() {
        let p = plans();
        let mut m = metered(
            &p,
            &head("POST", "/api/upload", "u", "free").header("idempotency-key", b"k"),
            now(),
        );
        m.reserve(5, "r1".into(), 1_000, &p);
        let too_many = Ok(RedisReply::Array(vec![
            RedisReply::Int(6),
            RedisReply::Int(0),
            RedisReply::Int(0),
            RedisReply::Bulk(b"free".to_vec()),
            RedisReply::Bulk(b"free".to_vec()),
            RedisReply::Int(0),
        ]));
        let Decision::Refused(r) = m.on_reservation(too_many, now()) else {
            panic!("refused")
        };
        assert_eq!(r.status, 429);
        assert!(r.body.contains("Too many idempotency keys"), "{}", r.body);
        assert!(m.on_end(true, now(), &p.redis).is_none(), "nothing held");
    }

    #[test]
    fn an_unknown_plan_is_refused_or_named() {
        let p = plans();
        let mut m = reserved(&p);
        let unknown = Ok(RedisReply::Array(vec![
            RedisReply::Int(3),
            RedisReply::Int(0),
            RedisReply::Int(0),
            RedisReply::Bulk(b"gold".to_vec()),
            RedisReply::Bulk(b"gold".to_vec()),
            RedisReply::Int(1),
        ]));
        let Decision::Refused(r) = m.on_reservation(unknown, now()) else {
            panic!("an unknown plan without a fallback is refused")
        };
        assert_eq!(r.status, 403);
        let mut m = reserved(&p);
        let fell_back = Ok(RedisReply::Array(vec![
            RedisReply::Int(1),
            RedisReply::Int(0),
            RedisReply::Int(1),
            RedisReply::Bulk(b"free".to_vec()),
            RedisReply::Bulk(b"gold".to_vec()),
            RedisReply::Int(1),
        ]));
        assert_eq!(m.on_reservation(fell_back, now()), Decision::Allowed);
        assert_eq!(m.unknown_plan(), Some("gold"));
    }

    #[test]
    fn a_failed_upstream_releases_the_unit() {
        let p = plans();
        let mut m = reserved(&p);
        m.on_reservation(reply(1, 0, 1, "free"), now());
        assert_eq!(
            m.on_response(500, now(), &p.redis).unwrap().mode,
            SettleMode::Release
        );
    }

    #[test]
    fn a_request_whose_client_left_after_forwarding_it_is_counted_as_of_unknown_outcome() {
        let p = plans();
        let held = |p: &Plans, id: &str| {
            let mut m = request(p, "POST", "/api/upload", "free");
            m.reserve(5, id.into(), 0, p);
            m.on_reservation(reply(1, 0, 1, "free"), now());
            m
        };
        let mut m = reserved(&p);
        assert_eq!(
            m.on_end(true, now(), &p.redis).unwrap().mode,
            SettleMode::Release,
            "its reservation's answer never came"
        );
        let mut m = held(&p, "r1");
        assert_eq!(
            m.on_end(true, now(), &p.redis).unwrap().mode,
            SettleMode::Release,
            "its body was not all forwarded: the upstream cannot have done it"
        );
        // Forwarded whole to an upstream: the upstream may do the work whether or not anyone
        // waits for its answer. Counted, as of unknown outcome.
        let mut m = held(&p, "r2");
        m.on_forwarded();
        let s = m.on_end(true, now(), &p.redis).unwrap();
        assert_eq!((s.mode, s.certain), (SettleMode::Commit, false));
        assert!(m.on_end(true, now(), &p.redis).is_none(), "settled once");
        // Forwarded, but no upstream was reached (Envoy still waited for a connection).
        let mut m = held(&p, "r3");
        m.on_forwarded();
        assert_eq!(
            m.on_end(false, now(), &p.redis).unwrap().mode,
            SettleMode::Release
        );
        // An action whose upstream stops work when its client leaves says so.
        let json = crate::testing::plans_json_with(|v| {
            v["actions"]["upload"]["on_client_abort"] = "release".into();
        });
        let releasing = Plans::from_json(json.as_bytes()).unwrap();
        let mut m = held(&releasing, "r4");
        m.on_forwarded();
        assert_eq!(
            m.on_end(true, now(), &p.redis).unwrap().mode,
            SettleMode::Release
        );
        // An upstream's own failure answer settles it first.
        let mut m = held(&p, "r5");
        m.on_forwarded();
        assert_eq!(
            m.on_response(502, now(), &p.redis).unwrap().mode,
            SettleMode::Release
        );
        assert!(m.on_end(true, now(), &p.redis).is_none());
    }

    #[test]
    fn a_held_reservation_is_extended_while_the_request_is_in_flight() {
        let p = plans();
        let mut m = reserved(&p);
        assert!(
            m.extension(now(), 20_000, &p.redis).is_none(),
            "not held yet"
        );
        m.on_reservation(reply(1, 0, 1, "free"), now());
        // Reserved at 1 000 ms (unix); now is far later: due.
        let s = m.extension(now(), 20_000, &p.redis).unwrap();
        assert_eq!(
            (s.mode, s.reservation_id.as_str()),
            (SettleMode::Extend, "r1")
        );
        assert!(
            m.extension(now(), 20_000, &p.redis).is_none(),
            "just extended"
        );
        let later = now() + chrono::Duration::seconds(20);
        assert!(m.extension(later, 20_000, &p.redis).is_some());
        m.on_response(200, later, &p.redis);
        assert!(m
            .extension(later + chrono::Duration::seconds(60), 20_000, &p.redis)
            .is_none());
    }

    #[test]
    fn a_unit_that_brings_the_count_to_a_threshold_crosses_it() {
        let quota = |limit, taken| Quota {
            limit,
            remaining: 0,
            taken,
        };
        let t = [80, 90];
        assert_eq!(quota(5, 3).crossed(&t), None, "60 %");
        assert_eq!(quota(5, 4).crossed(&t), Some(80));
        assert_eq!(quota(5, 5).crossed(&t), Some(90));
        assert_eq!(quota(10, 9).crossed(&t), Some(90));
        assert_eq!(
            quota(3, 3).crossed(&t),
            Some(90),
            "66 % to 100 %: the higher"
        );
        assert_eq!(quota(100, 85).crossed(&t), None, "past 80 already");
        assert_eq!(quota(0, 1).crossed(&t), None);
        assert_eq!(quota(5, 0).crossed(&t), None);
    }

    #[test]
    fn a_refused_reservation_is_429_with_what_is_used_and_what_is_in_flight() {
        let p = plans();
        let mut m = reserved(&p);
        let Decision::Denied {
            response,
            final_refusal,
        } = m.on_reservation(reply(0, 4, 1, "free"), now())
        else {
            panic!("expected 429")
        };
        assert_eq!(response.status, 429);
        let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!((&body["used"], &body["in_flight"]), (&4.into(), &1.into()));
        assert_eq!(
            body["percentage"], 100,
            "current (used and in flight) of the limit"
        );
        assert_eq!(
            body["message"],
            "Your upload limit of 5 diagrams this month is taken: 4 used, 1 more in \
             progress. One that fails gives its unit back. Upgrade to Professional for \
             unlimited diagrams."
        );
        assert_eq!(body["current"], 5, "what counts against the limit");
        assert!(!final_refusal, "the unit in flight may be released");
        assert!(m.on_end(true, now(), &p.redis).is_none());
        let mut m = reserved(&p);
        let d = m.on_reservation(reply(0, 5, 0, "free"), now());
        assert!(matches!(
            d,
            Decision::Denied {
                final_refusal: true,
                ..
            }
        ));
    }

    #[test]
    fn a_plans_grace_is_enforced_by_redis_counted_marked_and_named_in_the_429() {
        // Free uploads: 5, and 20 % more in grace (one).
        let p = Plans::from_json(
            plans_json_with(|v| v["plans"]["free"]["grace"] = json!({"upload": {"percent": 20}}))
                .as_bytes(),
        )
        .unwrap();
        let upload = p.actions().iter().find(|a| a.key == "upload").unwrap();
        assert!(upload.limits().contains(&("free".into(), Some(6))));
        assert_eq!(upload.terms(Some("free")).grace, 1);
        // The sixth is granted: in grace, counted and marked so.
        let mut m = reserved(&p);
        assert_eq!(
            m.on_reservation(reply(1, 5, 1, "free"), now()),
            Decision::Allowed
        );
        let quota = m.quota().unwrap();
        assert_eq!(
            (quota.limit, quota.remaining, quota.in_grace()),
            (5, 0, Some(1))
        );
        let s = m.on_response(200, now(), &p.redis).unwrap();
        assert!(s.in_grace && s.mode == SettleMode::Commit);
        // Within the limit: not in grace.
        let mut m = reserved(&p);
        m.on_reservation(reply(1, 3, 1, "free"), now());
        assert!(!m.on_response(200, now(), &p.redis).unwrap().in_grace);
        // The seventh: 429, saying the grace is used, and it stays refused.
        let mut m = reserved(&p);
        let Decision::Denied {
            response,
            final_refusal,
        } = m.on_reservation(reply(0, 6, 0, "free"), now())
        else {
            panic!("not refused")
        };
        assert!(final_refusal);
        let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(
            (&body["current"], &body["limit"], &body["percentage"]),
            (&6.into(), &5.into(), &100.into())
        );
        assert_eq!(body["grace"], json!({"units": 1, "used": 1}));
        assert_eq!(
            body["message"],
            "You've reached your upload limit of 5 diagrams this month, and the 1 more your \
             plan allows in grace. Upgrade to Professional for unlimited diagrams."
        );
        // Units in grace are whole: 20 % of 3 is one; none on an unlimited plan.
        assert_eq!(crate::config::Grace::Percent(20).units(3), 1);
        assert_eq!(crate::config::Grace::Percent(10).units(50), 5);
        let err = Plans::from_json(
            plans_json_with(|v| {
                v["plans"]["professional"]["grace"] = json!({"upload": {"units": 2}})
            })
            .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(
            (err.path.as_str(), err.reason.as_str()),
            (
                "plans.professional.grace.upload",
                "the action is unlimited in this plan"
            )
        );
        for bad in [
            json!({"units": 0}),
            json!({"percent": 101}),
            json!({"days": 3}),
        ] {
            let r = Plans::from_json(
                plans_json_with(|v| v["plans"]["free"]["grace"] = json!({"upload": bad}))
                    .as_bytes(),
            );
            assert!(r.unwrap_err().path.starts_with("plans.free.grace.upload"));
        }
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
        assert_eq!(
            m.on_end(true, now(), &p.redis).unwrap().mode,
            SettleMode::Release
        );

        let mut api = request(&p, "GET", "/api/v1/x", "enterprise");
        api.reserve(10_000, "r2".into(), 0, &p);
        let d = api.on_reservation(Ok(RedisReply::Error("ERR".into())), now());
        assert!(matches!(d, Decision::FailClosed(_, ref r) if r.status == 503));
        assert!(api.on_end(true, now(), &p.redis).is_none());
    }

    #[test]
    fn a_reply_that_is_not_the_functions_is_a_failure() {
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
        assert!(view().on_end(true, now(), &p.redis).is_none());
    }
}
