//! One worker's share of the filter, without I/O: the proxy-wasm shell creates one per root
//! context (one per Envoy worker thread) and hands it every event; the worker answers through
//! `Io`.
//!
//! Events in: plans.json (`configure`), a request's head, its body as it passes, a Redis
//! call's answer, the upstream's status, the end of a stream, a tick, shutdown. Actions out:
//! send this Redis command, answer this stream, resume that one, hold it from the upstream,
//! set its identity headers, count this metric, log this line, read or write this Envoy's
//! shared data, done.
//!
//! A refusal reaches a client that writes its whole body before reading (most HTTP
//! libraries): rather than answering mid-body, which makes Envoy close a connection the client
//! is still writing to (it sees a reset), the worker has the stream held from the upstream,
//! reads and discards the body, and answers at its end (up to `gateway.max_drain_bytes`). A
//! client that asked first (`Expect: 100-continue`) is answered at once.
//!
//! The worker owns its streams, each in one state of its life (metered, draining, reporting,
//! releasing) in one map by stream id; the calls waiting for Redis (by token, each with its
//! waiter: every call gets exactly one answer, delivered to its waiter or dropped with its
//! ended stream); the settlement queue, the refusal and entitlement caches and the
//! reservation ids.

use std::collections::HashMap;
use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::admission::{self, Admission, Release, RequestHead};
use crate::cluster;
use crate::config::RedisSettings;
use crate::denials::DenialCache;
use crate::entitlements::{EntitlementCache, Recorded};
use crate::keys::{self, UsageKeys};
use crate::metrics::{self, LabeledMetric, Metric, Outcome};
use crate::outage::{self, Budget};
use crate::plans::{Plan, Plans};
use crate::redis::functions::{self, EventsTrim, ReserveStatus, SettleArgs};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::reports::Report;
use crate::request::{unix_millis, Decision, MeteredRequest};
use crate::responses::{self, LocalResponse};
use crate::settlement::{SettleMode, Settlement};
use crate::settlement_queue::{BatchReport, Group, SettlementQueue, APPLIED_MEMORY_MS};
use crate::spike::RequestRates;
use crate::upstream::{self, Answer};

/// The host's id of an HTTP stream (its context id).
pub type StreamId = u32;
/// The host's id of an outbound call, given when it is sent and named in its answer.
pub type Token = u32;

/// What the worker asks of its host. The proxy-wasm shell implements it with host calls; the
/// core's tests with a recorder.
pub trait Io {
    /// Sends `command` to Redis by the transport `redis` names; its answer comes back through
    /// `Worker::on_reply` with the token returned.
    fn send(
        &mut self,
        redis: &RedisSettings,
        command: &RedisCommand,
    ) -> Result<Token, TransportError>;
    /// Answers the client of `stream` with `response` instead of the upstream.
    fn respond(&mut self, stream: StreamId, response: &LocalResponse);
    /// Sets a request header of `stream` (replacing any), before it goes upstream.
    fn set_request_header(&mut self, stream: StreamId, name: &str, value: &str);
    /// Sets a response header of `stream` (replacing any), during its response headers.
    fn set_response_header(&mut self, stream: StreamId, name: &str, value: &str);
    /// Lets the paused `stream` go on to the upstream.
    fn resume(&mut self, stream: StreamId);
    /// Lets `stream`'s response, held by `ResponseFlow::AwaitCommit`, go on to its client.
    fn resume_response(&mut self, stream: StreamId);
    /// Has `stream` held before the upstream once its headers go on (Envoy: by the hold
    /// filter that follows this one), so that its body can be read and discarded here;
    /// `false` when nothing can hold it.
    fn hold(&mut self, stream: StreamId) -> bool;
    fn count(&mut self, metric: Metric, by: u64);
    /// Whether a call sent now is answered even if the stream whose callback this is ends
    /// first (proxy-wasm: only calls made on a root context's callbacks are).
    fn answers_outlive_streams(&self) -> bool;
    /// Adds `value` to a labeled counter or gauge, or observes it in a histogram.
    fn record(&mut self, metric: &LabeledMetric, value: i64);
    fn log(&mut self, level: LogLevel, message: String);
    /// This Envoy's shared data (across its workers): the value and its version.
    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes it if still at `version` (any version with `None`); `false` if another worker
    /// wrote it first.
    fn shared_set(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool;
    /// The worker finished what it had to do after `on_shutdown` said it was not done.
    fn done(&mut self);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

/// What the request-headers callback returns to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on to the upstream.
    Continue,
    /// Hold the request: it waits for Redis, or was answered.
    Pause,
}

/// What the response-headers callback returns to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlow {
    Continue,
    /// Hold the response until its success is counted in Redis (read-your-writes); the worker
    /// lets it go with `Io::resume_response`.
    AwaitCommit,
}

/// What the body callback returns to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFlow {
    /// The piece goes on.
    Continue,
    /// The request was refused: the piece is emptied, and the empty piece goes on (to what
    /// holds the request, or as nothing to the upstream).
    Discard,
    /// The request was just answered: the piece is emptied and stops here (the end of the
    /// body must not reach an upstream that has its head).
    Stop,
}

/// Users remembered per worker, in the refusal and entitlement caches; beyond this many, old
/// ones go.
const REMEMBERED_USERS: usize = 10_000;
/// A worker that sent no batch for this long writes its record anyway, so a silent one is
/// known dead (`plan-limits audit` takes one silent for four times this as killed).
pub const HEARTBEAT_MS: u64 = 30_000;
/// The largest amount an upstream may say a release gave back: what Redis's Lua counts exactly.
const MAX_GIVEN_BACK: u64 = 1 << 53;
/// Records of lost settlements kept per worker until Redis takes them (one per user, action,
/// period and reason); beyond this many, a loss is counted and logged only.
const MAX_TRACKED_LOSSES: usize = 1024;
/// Requests let through unchecked, or names of unknown plans, are logged at most this often.
const LOG_EVERY_MS: u64 = 1000;

pub struct Worker {
    plans: Option<Rc<Plans>>,
    /// Every stream the worker still has to do with, in the state of its life.
    streams: HashMap<StreamId, Stream>,
    /// How many metered streams hold their response until its commit (kept as they change,
    /// as the host asks after every event whether to tick fast).
    responses_awaiting_commit: usize,
    calls: Calls,
    /// When settlements were last flushed (ms): ticks come faster while reservations wait.
    flushed_at_ms: u64,
    /// The labeled counter of requests refused before their action was known (named once).
    refused_unknown: LabeledMetric,
    /// This worker's share of the queued-settlements gauge, as last reported.
    queue_reported: i64,
    settlements: SettlementQueue,
    /// Records of settlements given up, waiting for room in the queue (`lost` events).
    losses: Vec<Settlement>,
    denials: DenialCache,
    /// Each user's request rate (spike arrest).
    rates: RequestRates,
    entitlements: EntitlementCache,
    ids: ReservationIds,
    stopping: bool,
    /// A call that says it stopped went to Redis (a batch or a record sent while stopping).
    said_goodbye: bool,
    /// When held reservations were last looked at for extension (unix ms).
    extended_at_ms: u64,
    fail_open_log: RateLimitedLog,
    unknown_plan_log: RateLimitedLog,
    /// Since when this worker's calls to Redis have got nothing usable (unix ms), if they have.
    redis_down_since_ms: Option<u64>,
    /// When this worker last wrote its record in Redis (a batch, a heartbeat; unix ms).
    sent_record_at_ms: u64,
}

/// Where a stream the worker knows is in its life (one it no longer has to do with is not
/// known: an unmetered request, an answered one whose body does not matter).
// Most streams are metered: boxing that state would cost each request an allocation so that
// the few others take less room in the map.
#[allow(clippy::large_enum_variant)]
enum Stream {
    /// A metered request, from its head to its end.
    Metered(Metered),
    /// Refused before it was metered (at its head, or answered its report): its body is read
    /// and discarded before it is answered.
    Draining(Drain),
    /// A report waiting for its call's answer.
    Reporting(PendingReport),
    /// A request on a release route, and what the upstream said it gave back.
    Releasing {
        release: Release,
        freed: Option<u64>,
    },
}

/// A metered stream: its request, and what it waits for besides the upstream.
struct Metered {
    request: MeteredRequest,
    /// Its client may be writing a body it will not read past: a refusal waits for its end.
    drainable: bool,
    /// Refused after its admission (by Redis, or for its body's size): its body is discarded
    /// until its answer goes. (Apart from `awaiting_commit_until`: an upstream may answer
    /// before a body it was still being sent turns out too big.)
    drain: Option<Drain>,
    /// Its response is held until its success is counted, and until when at most (unix ms).
    awaiting_commit_until: Option<u64>,
}

impl Metered {
    fn new(request: MeteredRequest, drainable: bool) -> Self {
        Self {
            request,
            drainable,
            drain: None,
            awaiting_commit_until: None,
        }
    }

    /// Answers the paused stream with a refusal decided by Redis; held, it goes on to what
    /// holds it, and its body comes here.
    fn answer_and_resume(&mut self, stream: StreamId, response: LocalResponse, io: &mut dyn Io) {
        if let Some(drain) = answer(stream, response, self.drainable, io) {
            self.drain = Some(drain);
            io.resume(stream);
        }
    }
}

/// Answers `stream` with `response`: at once, or, when its client may be writing a body,
/// once the body is read (the stream held from the upstream meanwhile). `Some`: held, its
/// drain to keep.
fn answer(
    stream: StreamId,
    response: LocalResponse,
    drainable: bool,
    io: &mut dyn Io,
) -> Option<Drain> {
    if drainable && io.hold(stream) {
        Some(Drain::new(response))
    } else {
        io.respond(stream, &response);
        None
    }
}

/// This worker's calls to Redis: those in flight, by token, and reservations not sent yet.
#[derive(Default)]
struct Calls {
    in_flight: HashMap<Token, Call>,
    /// The reservation call in flight, and the stream whose callback sent it if its answer
    /// dies with that stream (proxy-wasm: a call belongs to the context that made it);
    /// reservations meanwhile wait, in order.
    reserving: Option<(Token, Option<StreamId>)>,
    waiting_reservations: Vec<(StreamId, RedisCommand)>,
}

/// A call in flight: who waits for its answer, and when it was sent.
struct Call {
    waiter: Waiter,
    sent_at: DateTime<Utc>,
}

impl Calls {
    fn sent(&mut self, token: Token, waiter: Waiter, now: DateTime<Utc>) {
        let call = Call {
            waiter,
            sent_at: now,
        };
        self.in_flight.insert(token, call);
    }

    /// Reports waiting for their answer.
    fn reads_in_flight(&self) -> usize {
        let reads = self.in_flight.values();
        reads
            .filter(|c| matches!(c.waiter, Waiter::Report(_)))
            .count()
    }
}

/// A report waiting for its call's answer.
struct PendingReport {
    report: Report,
    call: Token,
    drainable: bool,
}

/// A refused stream's answer, waiting for the end of its body (`None` once given: whatever
/// else arrives is discarded too).
struct Drain {
    response: Option<LocalResponse>,
    read: u64,
    /// When its draining was first seen (the first body piece or tick after the refusal,
    /// unix ms): it ends `max_drain_ms` later at the latest.
    since_ms: Option<u64>,
}

impl Drain {
    fn new(response: LocalResponse) -> Self {
        Self {
            response: Some(response),
            read: 0,
            since_ms: None,
        }
    }

    /// Whether it has been read for `max_ms` by `now_ms` (starting the clock if not yet).
    fn overdue(&mut self, now_ms: u64, max_ms: u64) -> bool {
        let since = *self.since_ms.get_or_insert(now_ms);
        now_ms.saturating_sub(since) >= max_ms
    }
}

/// Who waits for a call's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiter {
    /// Paused streams' reservations (one call for all of them, in this order).
    Reservations(Vec<StreamId>),
    /// A paused stream's report.
    Report(StreamId),
    /// A settlement batch in flight (one per group).
    Batch(Group),
    /// The worker's heartbeat or goodbye.
    Record,
}

/// Reservation ids: a random per-VM prefix and a counter, unique across workers and Envoys.
struct ReservationIds {
    vm_nonce: u64,
    next: u64,
}

impl ReservationIds {
    /// This worker's name in Redis (its settlement batches are applied once per name).
    fn worker(&self) -> String {
        format!("{:016x}", self.vm_nonce)
    }

    fn next(&mut self) -> String {
        let n = self.next;
        self.next = self.next.wrapping_add(1);
        format!("{:016x}-{n}", self.vm_nonce)
    }
}

/// A log line written at most once per `LOG_EVERY_MS`, saying how many it stood for.
#[derive(Default)]
struct RateLimitedLog {
    last_ms: Option<u64>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Whether to write now; the count of occurrences it stands for.
    fn due(&mut self, now_ms: u64) -> Option<u64> {
        match self.last_ms {
            Some(last) if now_ms.saturating_sub(last) < LOG_EVERY_MS => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                let n = self.suppressed + 1;
                self.suppressed = 0;
                Some(n)
            }
        }
    }
}

impl Worker {
    /// `vm_nonce`: random, so reservation ids of different VMs never collide.
    pub fn new(vm_nonce: u64) -> Self {
        let defaults = RedisSettings::default();
        Self {
            plans: None,
            streams: HashMap::new(),
            responses_awaiting_commit: 0,
            calls: Calls::default(),
            queue_reported: 0,
            refused_unknown: metrics::requests("none", "none", Outcome::Rejected),
            flushed_at_ms: 0,
            settlements: SettlementQueue::new(defaults.max_queued_settlements, defaults.max_batch),
            losses: Vec::new(),
            denials: DenialCache::new(REMEMBERED_USERS),
            rates: RequestRates::new(REMEMBERED_USERS),
            entitlements: EntitlementCache::new(REMEMBERED_USERS),
            ids: ReservationIds { vm_nonce, next: 0 },
            stopping: false,
            said_goodbye: false,
            extended_at_ms: 0,
            fail_open_log: RateLimitedLog::default(),
            unknown_plan_log: RateLimitedLog::default(),
            redis_down_since_ms: None,
            sent_record_at_ms: 0,
        }
    }

    fn metered(&self, stream: StreamId) -> Option<&Metered> {
        match self.streams.get(&stream) {
            Some(Stream::Metered(entry)) => Some(entry),
            _ => None,
        }
    }

    fn metered_mut(&mut self, stream: StreamId) -> Option<&mut Metered> {
        match self.streams.get_mut(&stream) {
            Some(Stream::Metered(entry)) => Some(entry),
            _ => None,
        }
    }

    /// Takes `stream`'s metered request out of the map (to put it back once its state moved
    /// on), if it has one.
    fn take_metered(&mut self, stream: StreamId) -> Option<Metered> {
        self.metered(stream)?;
        match self.streams.remove(&stream) {
            Some(Stream::Metered(entry)) => Some(entry),
            _ => None,
        }
    }

    /// Takes `stream`'s report waiting for its answer, if it has one.
    fn take_report(&mut self, stream: StreamId) -> Option<PendingReport> {
        if !matches!(self.streams.get(&stream), Some(Stream::Reporting(_))) {
            return None;
        }
        match self.streams.remove(&stream) {
            Some(Stream::Reporting(pending)) => Some(pending),
            _ => None,
        }
    }

    /// Takes `stream`'s release, and what its upstream said it gave back, if it has one.
    fn take_release(&mut self, stream: StreamId) -> Option<(Release, Option<u64>)> {
        if !matches!(self.streams.get(&stream), Some(Stream::Releasing { .. })) {
            return None;
        }
        match self.streams.remove(&stream) {
            Some(Stream::Releasing { release, freed }) => Some((release, freed)),
            _ => None,
        }
    }

    /// The count of responses awaiting their commit is the streams' (tests only: it is kept
    /// as they change so that nothing need look at every stream after each event).
    #[cfg(test)]
    fn check_awaiting_count(&self) {
        let awaiting = self.streams.values().filter(|state| {
            matches!(state, Stream::Metered(entry) if entry.awaiting_commit_until.is_some())
        });
        assert_eq!(awaiting.count(), self.responses_awaiting_commit);
    }

    /// This worker's name in Redis (its record, its settlement batches).
    pub fn name(&self) -> String {
        self.ids.worker()
    }

    /// The plans in force (none before the first good `configure`).
    pub fn plans(&self) -> Option<&Rc<Plans>> {
        self.plans.as_ref()
    }

    /// Applies a new plans.json; a refused one leaves the last good one in force. Requests in
    /// flight keep the terms they were admitted under; what is queued stays queued.
    pub fn configure(&mut self, json: &[u8], io: &mut dyn Io) -> bool {
        match Plans::from_json(json) {
            Ok(plans) => {
                let redis = &plans.redis;
                self.settlements
                    .resize(redis.max_queued_settlements, redis.max_batch);
                self.settlements.group_by_slot(redis.cluster_mode);
                // (Defined at once, so what alerts on it exists before the first outage.)
                io.record(&metrics::redis_unreachable(), 0);
                io.log(
                    LogLevel::Info,
                    format!(
                        "plan-limits: {} plans, {} actions, {} routes",
                        plans.plans().len(),
                        plans.actions().len(),
                        plans.routes().len()
                    ),
                );
                self.plans = Some(Rc::new(plans));
                true
            }
            Err(e) => {
                io.log(
                    LogLevel::Error,
                    format!("plan-limits: configuration refused: {e}"),
                );
                false
            }
        }
    }

    /// A request's head arrived; `end_of_stream`: it has no body.
    pub fn on_request_headers(
        &mut self,
        stream: StreamId,
        head: RequestHead,
        end_of_stream: bool,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Flow {
        let Some(plans) = self.plans.clone() else {
            // Envoy sends no traffic to a filter that refused its configuration; should one
            // arrive, it is not let past an unchecked limit.
            io.respond(stream, &responses::not_configured());
            return Flow::Pause;
        };
        // A body may follow that its client writes before reading any answer.
        let drainable = !end_of_stream
            && !head.expects_continue()
            && head
                .content_length()
                .is_none_or(|n| n <= plans.max_drain_bytes);
        match admission::admit(&plans, head, now) {
            // Not counted: Envoy's own request stats already do, and this path must stay cheap.
            Admission::Unmetered => Flow::Continue,
            Admission::Refused(response) => {
                // (Refused before its action was known: a token, a path, a method.)
                io.count(Metric::Rejected, 1);
                io.record(&self.refused_unknown, 1);
                self.answer_at_head(stream, response, drainable, io)
            }
            Admission::Metered(mut request) => {
                if end_of_stream {
                    request.on_forwarded();
                }
                self.meter(stream, request, drainable, &plans, now, io)
            }
            Admission::Report(report) => self.report(stream, report, drainable, &plans, now, io),
            Admission::Release(release) => {
                // On at once, with the verified caller: its success gives back.
                let identity = &plans.identity;
                io.set_request_header(stream, &identity.user_header, &release.user);
                if let Some(org) = &release.org {
                    io.set_request_header(stream, &identity.org_header, org);
                }
                let releasing = Stream::Releasing {
                    release,
                    freed: None,
                };
                self.streams.insert(stream, releasing);
                Flow::Continue
            }
        }
    }

    /// Sends the report's one call; the stream waits for its answer.
    fn report(
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
        match send(io, &plans.read_redis, command) {
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

    /// Takes one of `user`'s requests from its plan's request rate; `Err`: the 429 to answer.
    fn within_rate(
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

    /// An answer decided from the head, before the stream was metered: a held stream's
    /// headers go on (to what holds it).
    fn answer_at_head(
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

    fn meter(
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
        let command = request.reserve(limit, self.ids.next(), now_ms, plans);
        let mut metered = Metered::new(request, drainable);
        let flow = match self.ask(stream, command, plans, now, io) {
            Ok(()) => Flow::Pause,
            // Not sent at all: the action's failure mode decides, right now.
            Err(e) => {
                let request = &mut metered.request;
                let decision = request.on_reservation(Err(e), now);
                match self.carry_out(stream, request, decision, plans, now, io) {
                    Ok(()) => Flow::Continue,
                    Err(response) => {
                        metered.drain = answer(stream, response, drainable, io);
                        if metered.drain.is_some() {
                            Flow::Continue
                        } else {
                            Flow::Pause
                        }
                    }
                }
            }
        };
        self.streams.insert(stream, Stream::Metered(metered));
        flow
    }

    /// Sends `stream`'s reservation at once if none of this worker's is in flight; else it
    /// waits, with those arriving meanwhile, for that call's answer and goes in the next call
    /// with them (a group commit: one request alone never waits, and under load one call
    /// carries many reservations). `Err`: it could not be sent.
    fn ask(
        &mut self,
        stream: StreamId,
        command: RedisCommand,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Result<(), TransportError> {
        // (On a Redis Cluster each reservation goes alone: one call touches one slot.)
        let calls = &mut self.calls;
        let busy = calls.reserving.is_some() || !calls.waiting_reservations.is_empty();
        if busy && plans.redis.coalesce_reservations && !plans.redis.cluster_mode {
            calls.waiting_reservations.push((stream, command));
            return Ok(());
        }
        let token = send(io, &plans.redis, command)?;
        calls.sent(token, Waiter::Reservations(vec![stream]), now);
        let owner = (!io.answers_outlive_streams()).then_some(stream);
        calls.reserving = Some((token, owner));
        Ok(())
    }

    /// Reservations wait that only a tick can send (their call must be made where its answer
    /// outlives any one stream): the host should tick soon.
    pub fn wants_tick_soon(&self) -> bool {
        #[cfg(test)]
        self.check_awaiting_count();
        !self.calls.waiting_reservations.is_empty() || self.responses_awaiting_commit > 0
    }

    /// Sends the reservations that waited for the last call, as one call (up to `max_batch`),
    /// where its answer cannot die with a stream (else a tick does).
    fn send_waiting_reservations(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
        let Some(plans) = self.plans.clone() else {
            return;
        };
        if !io.answers_outlive_streams() {
            return;
        }
        while self.calls.reserving.is_none() && !self.calls.waiting_reservations.is_empty() {
            let waiting = &mut self.calls.waiting_reservations;
            let n = waiting.len().min(plans.redis.max_batch.max(1));
            let batch: Vec<(StreamId, RedisCommand)> = waiting.drain(..n).collect();
            let streams: Vec<StreamId> = batch.iter().map(|(stream, _)| *stream).collect();
            let sent = match batch.as_slice() {
                [(_, one)] => send(io, &plans.redis, one.clone()),
                many => {
                    let commands: Vec<&RedisCommand> = many.iter().map(|(_, c)| c).collect();
                    send(io, &plans.redis, functions::reserve_many(&commands))
                }
            };
            match sent {
                Ok(token) => {
                    self.calls.sent(token, Waiter::Reservations(streams), now);
                    self.calls.reserving = Some((token, None));
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

    fn note_unknown_plan(&mut self, request: &MeteredRequest, now_ms: u64, io: &mut dyn Io) {
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

    /// Counts, logs and remembers what a reservation's answer decided; `Err` is the answer
    /// the client gets instead of the upstream's. A request that goes on gets its verified
    /// identity headers.
    fn carry_out(
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

    /// A Redis call's answer (or Envoy's word that it failed or timed out) arrived.
    pub fn on_reply(
        &mut self,
        token: Token,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        // Unknown: its stream ended meanwhile (and released what it held).
        let Some(Call { waiter, sent_at }) = self.calls.in_flight.remove(&token) else {
            return;
        };
        let call = match waiter {
            Waiter::Reservations(_) => metrics::Call::Reserve,
            Waiter::Report(_) => metrics::Call::Report,
            Waiter::Batch(_) | Waiter::Record => metrics::Call::Settle,
        };
        let micros = (now - sent_at).num_microseconds().unwrap_or(i64::MAX);
        io.record(&metrics::redis_round_trip(call), micros.max(0));
        let usable = matches!(&reply, Ok(r) if !matches!(r, RedisReply::Error(_)));
        self.note_redis(usable, now, io);
        match waiter {
            Waiter::Reservations(streams) => {
                self.calls.reserving = None;
                let replies = match streams.len() {
                    1 => vec![reply],
                    n => functions::split_reservations(reply, n),
                };
                // (A stream that ended meanwhile is gone: its answer is ignored, and what
                // was reserved for it is released by its end's settlement.)
                for (stream, reply) in streams.into_iter().zip(replies) {
                    self.on_reservation(stream, reply, now, io);
                }
                self.send_waiting_reservations(now, io);
            }
            Waiter::Report(stream) => self.on_report(stream, reply, now, io),
            Waiter::Batch(group) => self.on_batch_reply(group, reply, now, io),
            Waiter::Record => {
                if self.stopping && !self.settlements.batch_in_flight() {
                    io.done();
                }
            }
        }
    }

    /// The paused `stream`'s report was answered by Redis: the caller gets it.
    fn on_report(
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
            if let Ok(call) = send(io, &plans.redis, command) {
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

    /// The paused `stream`'s reservation was answered: it goes on, or is answered here.
    fn on_reservation(
        &mut self,
        stream: StreamId,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let (Some(plans), Some(mut entry)) = (self.plans.clone(), self.take_metered(stream)) else {
            return;
        };
        let numbers = reply
            .as_ref()
            .ok()
            .and_then(|r| functions::parse_reservation(r.clone()).ok());
        if let Some(reservation) = &numbers {
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
                let release = entry
                    .request
                    .abandon_reservation(granted, now, &plans.redis);
                self.queue(release, io);
                entry.request.reanchor(anchor, now);
                self.reserve_again(stream, entry, &plans, now, io);
                return;
            }
        }
        let decision = entry.request.on_reservation(reply, now);
        if let Some(reservation) = numbers {
            let now_ms = unix_millis(now);
            self.note_unknown_plan(&entry.request, now_ms, io);
            record_budget(&entry.request, &reservation, &plans.redis, io);
        }
        match self.carry_out(stream, &mut entry.request, decision, &plans, now, io) {
            Ok(()) => io.resume(stream),
            Err(response) => entry.answer_and_resume(stream, response, io),
        }
        self.streams.insert(stream, Stream::Metered(entry));
    }

    /// `len` bytes of `stream`'s request body passed (`end_of_stream`: the last of it). A
    /// refused stream's body is discarded, and answered at its end; a streamed upload past
    /// its plan's file size is refused here (413), its unit given back.
    pub fn on_request_body(
        &mut self,
        stream: StreamId,
        len: u64,
        end_of_stream: bool,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> BodyFlow {
        let (max, max_ms) = self
            .plans
            .as_ref()
            .map_or((0, 0), |p| (p.max_drain_bytes, p.max_drain_ms));
        let draining = match self.streams.get_mut(&stream) {
            Some(Stream::Draining(drain)) => Some(drain),
            Some(Stream::Metered(entry)) => entry.drain.as_mut(),
            _ => None,
        };
        if let Some(drain) = draining {
            drain.read = drain.read.saturating_add(len);
            let overdue = drain.overdue(unix_millis(now), max_ms);
            if !(end_of_stream || drain.read > max || overdue) {
                return BodyFlow::Discard;
            }
            if let Some(response) = drain.response.take() {
                if end_of_stream {
                    io.count(Metric::AnsweredAfterBody, 1);
                }
                io.respond(stream, &response);
            }
            return BodyFlow::Stop;
        }
        let (Some(plans), Some(Stream::Metered(entry))) =
            (self.plans.clone(), self.streams.get_mut(&stream))
        else {
            return BodyFlow::Continue;
        };
        match entry.request.on_body(len) {
            Ok(()) => {
                if end_of_stream {
                    entry.request.on_forwarded();
                }
                BodyFlow::Continue
            }
            Err(response) => {
                count_outcome(io, &entry.request, Outcome::Rejected);
                let settlement = entry
                    .request
                    .on_response(response.status, now, &plans.redis);
                // Its headers went upstream already: what is discarded here never follows
                // them, and Envoy resets the upstream request when the answer goes.
                let answer_now = if end_of_stream {
                    Some(response)
                } else {
                    entry.drain = Some(Drain::new(response));
                    None
                };
                self.queue(settlement, io);
                match answer_now {
                    Some(response) => {
                        io.respond(stream, &response);
                        BodyFlow::Stop
                    }
                    None => BodyFlow::Discard,
                }
            }
        }
    }

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
            if entry.awaiting_commit_until.replace(until).is_none() {
                self.responses_awaiting_commit += 1;
            }
        }
        self.queue(settlement, io);
        if awaits {
            // Sent at once where its answer outlives the stream (else at the next tick,
            // which comes every millisecond while a response waits).
            if io.answers_outlive_streams() {
                self.flush(now, io);
            }
            ResponseFlow::AwaitCommit
        } else {
            ResponseFlow::Continue
        }
    }

    /// `stream` is gone (completed, reset, or the client left): a unit it still holds is
    /// released, or counted if the whole request reached an upstream (`reached`) and its
    /// action counts that; an answer still owed to it is no longer wanted.
    pub fn on_stream_end(
        &mut self,
        stream: StreamId,
        reached: bool,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let mut entry = match self.streams.remove(&stream) {
            Some(Stream::Metered(entry)) => entry,
            Some(Stream::Reporting(pending)) => {
                self.calls.in_flight.remove(&pending.call);
                return;
            }
            Some(Stream::Draining(_) | Stream::Releasing { .. }) | None => return,
        };
        if entry.awaiting_commit_until.is_some() {
            self.responses_awaiting_commit = self.responses_awaiting_commit.saturating_sub(1);
        }
        // Its own call dies with it: no answer will come (what Redis may have reserved is
        // released by its end's settlement), and the next waits no longer.
        if let Some((token, Some(owner))) = self.calls.reserving {
            if owner == stream {
                self.calls.in_flight.remove(&token);
                self.calls.reserving = None;
            }
        }
        // Not sent yet: it never will be (its end's release asks Redis to let go of nothing).
        self.calls
            .waiting_reservations
            .retain(|(waiting, _)| *waiting != stream);
        let Some(plans) = self.plans.clone() else {
            return;
        };
        let settlement = entry.request.on_end(reached, now, &plans.redis);
        self.queue(settlement, io);
    }

    fn queue(&mut self, settlement: Option<Settlement>, io: &mut dyn Io) {
        let Some(settlement) = settlement else { return };
        if let Some(dropped) = self.settlements.push(settlement) {
            io.log(
                LogLevel::Warn,
                "plan-limits: settlement queue full, oldest settlement dropped".into(),
            );
            self.lose(&dropped, "queue_full", io);
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
        #[cfg(test)]
        self.check_awaiting_count();
        // Ticks come faster while reservations wait: settlements keep their own pace then.
        let fast = self.wants_tick_soon();
        self.send_waiting_reservations(now, io);
        let now_ms = unix_millis(now);
        let every = self.plans.as_ref().map_or(0, |p| p.redis.flush_interval_ms);
        if self.responses_awaiting_commit > 0 {
            // Responses wait for their commits: those go at once.
            self.release_overdue_responses(now_ms, io);
            self.flush(now, io);
        }
        if fast && now_ms.saturating_sub(self.flushed_at_ms) < every {
            return;
        }
        self.flushed_at_ms = now_ms;
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
                self.responses_awaiting_commit = self.responses_awaiting_commit.saturating_sub(1);
                io.count(Metric::CommitsNotAwaited, 1);
                io.resume_response(*stream);
            }
        }
    }

    /// Brings this worker's share of the queued-settlements gauge up to date.
    fn report_queue(&mut self, io: &mut dyn Io) {
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
        for extension in extensions {
            self.queue(Some(extension), io);
        }
    }

    /// Sends the batches that are due: the next one (one Redis), or one per slot with
    /// settlements waiting and none in flight (a cluster).
    fn flush(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
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
            match send(io, redis, command) {
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
    fn settle_command(
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

    /// A worker that sent no batch for `HEARTBEAT_MS` says it is alive, and one that stops
    /// says goodbye: in its record in Redis, one call without items. (On a cluster, in slot
    /// 0's.) `Some` when sent.
    fn send_record(&mut self, now: DateTime<Utc>, io: &mut dyn Io) -> Option<Token> {
        let plans = self.plans.clone()?;
        let group = if plans.redis.cluster_mode {
            Group::Slot(0)
        } else {
            Group::All
        };
        let now_ms = unix_millis(now);
        let command = self.settle_command(&plans, group, &[], 0, now_ms, self.queued_settlements());
        let token = send(io, &plans.redis, command).ok()?;
        self.sent_record_at_ms = now_ms;
        self.said_goodbye |= self.stopping;
        self.calls.sent(token, Waiter::Record, now);
        Some(token)
    }

    fn on_batch_reply(
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
                self.responses_awaiting_commit = self.responses_awaiting_commit.saturating_sub(1);
                io.resume_response(*stream);
            }
        }
        for (user, action, period) in &report.applied_fail_open {
            add_unsettled_pass(io, &plans.redis, user, action, period, -1);
        }
    }

    /// Whether Redis just answered this worker usably: the outage gauge and a log line when that
    /// changes.
    fn note_redis(&mut self, usable: bool, now: DateTime<Utc>, io: &mut dyn Io) {
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

    /// The host is stopping this worker: send what is queued. `true`: done now; otherwise
    /// `Io::done` follows once the last batch is answered.
    pub fn on_shutdown(&mut self, now: DateTime<Utc>, io: &mut dyn Io) -> bool {
        self.stopping = true;
        self.flush(now, io);
        if self.settlements.batch_in_flight() {
            // The last batch says goodbye.
            return false;
        }
        self.report_queue(io);
        // Nothing to send: a goodbye of its own, so Redis knows this worker stopped cleanly.
        self.send_record(now, io).is_none()
    }

    /// Settlements waiting or on their way to Redis, and records of lost ones not sent yet.
    pub fn queued_settlements(&self) -> usize {
        self.settlements.len() + self.losses.len()
    }
}

/// Sends `command` as plans.json says the library's functions are called (`FCALL`, or
/// `EVALSHA` of their scripts).
fn send(
    io: &mut dyn Io,
    redis: &RedisSettings,
    command: RedisCommand,
) -> Result<Token, TransportError> {
    io.send(redis, &functions::invoked(command, redis.invoke))
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

/// The verified user, the plan in force, the organisation and the plan's features, for the
/// upstream.
fn set_identity(stream: StreamId, request: &MeteredRequest, plans: &Plans, io: &mut dyn Io) {
    let identity = &plans.identity;
    for (name, value) in request.identity_headers(
        &identity.user_header,
        &identity.plan_header,
        &identity.org_header,
    ) {
        io.set_request_header(stream, name, value);
    }
    let features = &request.plan().features_header_value;
    io.set_request_header(stream, &identity.features_header, features);
}

/// What remains of the user's allowance, as Redis just said, for this Envoy's workers to go
/// by should Redis become unreachable.
fn record_budget(
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
fn spend_outage_budget(request: &MeteredRequest, redis: &RedisSettings, io: &mut dyn Io) -> bool {
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
fn add_unsettled_pass(
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

/// Counts what became of `request`: the outcome's counter, and the one labeled with its
/// action and plan.
fn count_outcome(io: &mut dyn Io, request: &MeteredRequest, outcome: Outcome) {
    io.count(outcome.metric(), 1);
    if let Some(labeled) = request.terms().metrics.get(outcome) {
        io.record(labeled, 1);
    }
}

fn record(report: &BatchReport, io: &mut dyn Io) {
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
    use super::*;
    use crate::period::BillingPeriod;
    use crate::settlement::SettleMode;
    use crate::testing::{head, now, plans_json_with, Recorder, Req, PLANS_JSON};

    fn worker(io: &mut Recorder) -> Worker {
        worker_with(io, PLANS_JSON)
    }

    /// A worker with `redis.coalesce_reservations` on.
    fn coalescing_worker(io: &mut Recorder) -> Worker {
        let json = crate::testing::plans_json_with(|v| {
            v["redis"]["coalesce_reservations"] = true.into();
        });
        worker_with(io, &json)
    }

    #[test]
    fn by_default_each_reservation_goes_at_once() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for (stream, user) in [(1, "a"), (2, "b"), (3, "c")] {
            assert_eq!(send(&mut w, stream, &upload(user), &mut io), Flow::Pause);
        }
        assert_eq!(io.sent.len(), 3, "three calls in flight, none waiting");
        assert!(!w.wants_tick_soon());
    }

    fn worker_with(io: &mut Recorder, json: &str) -> Worker {
        let mut w = Worker::new(0xfeed);
        assert!(w.configure(json.as_bytes(), io));
        w
    }

    fn send(w: &mut Worker, stream: StreamId, req: &Req, io: &mut Recorder) -> Flow {
        w.on_request_headers(stream, req.head(), false, now(), io)
    }

    fn upload(user: &str) -> Req {
        head("POST", "/api/upload", user, "free")
    }

    /// An unlimited request (a procedure view) that succeeds and ends: one count queued.
    fn view_succeeds(w: &mut Worker, stream: StreamId, io: &mut Recorder) {
        let h = head("GET", "/api/procedures/1", "u", "free");
        assert_eq!(send(w, stream, &h, io), Flow::Continue);
        w.on_response_headers(stream, 200, None, now(), io);
        w.on_stream_end(stream, true, now(), io);
    }

    /// What plan_limits_reserve answers under `plan`, claimed (billing recorded nothing).
    fn reserved(
        status: i64,
        committed: i64,
        pending: i64,
        plan: &str,
    ) -> Result<RedisReply, TransportError> {
        reply(status, committed, pending, plan, false)
    }

    /// What plan_limits_reserve answers under `plan`, which billing recorded.
    fn recorded(
        status: i64,
        committed: i64,
        pending: i64,
        plan: &str,
    ) -> Result<RedisReply, TransportError> {
        reply(status, committed, pending, plan, true)
    }

    fn reply(
        status: i64,
        committed: i64,
        pending: i64,
        plan: &str,
        recorded: bool,
    ) -> Result<RedisReply, TransportError> {
        Ok(RedisReply::Array(vec![
            RedisReply::Int(status),
            RedisReply::Int(committed),
            RedisReply::Int(pending),
            RedisReply::Bulk(plan.into()),
            RedisReply::Bulk(plan.into()),
            RedisReply::Int(i64::from(recorded)),
        ]))
    }

    fn granted() -> Result<RedisReply, TransportError> {
        reserved(1, 0, 1, "free")
    }

    /// What plan_limits_settle answers: the batch applied, each item done, no entitlement
    /// recorded.
    fn settled(done: &[i64]) -> Result<RedisReply, TransportError> {
        let items = done
            .iter()
            .flat_map(|&d| [RedisReply::Int(d), RedisReply::Nil, RedisReply::Nil]);
        Ok(RedisReply::Array(
            std::iter::once(RedisReply::Int(1)).chain(items).collect(),
        ))
    }

    fn name(command: &RedisCommand) -> (&[u8], &[u8]) {
        (&command.args[0], &command.args[1])
    }

    #[test]
    fn unmetered_requests_go_on_untouched() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let flow = send(&mut w, 1, &head("GET", "/health", "", ""), &mut io);
        assert_eq!(flow, Flow::Continue);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        assert!(io.sent.is_empty() && io.counts.is_empty() && io.responded.is_empty());
        assert!(io.headers.is_empty());
    }

    /// A recorder with a hold filter after the plan filter, as envoy.yaml renders it.
    fn holding() -> Recorder {
        Recorder {
            holds: true,
            ..Recorder::default()
        }
    }

    #[test]
    fn a_refusal_waits_for_the_body_its_client_is_still_writing() {
        let mut io = holding();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        // Its headers go on, to the hold filter; its body comes here and goes nowhere.
        assert_eq!(send(&mut w, 1, &no_token, &mut io), Flow::Continue);
        assert_eq!(io.held, [1]);
        assert!(io.responded.is_empty());
        let piece = w.on_request_body(1, 4, false, now(), &mut io);
        assert_eq!(piece, BodyFlow::Discard);
        assert!(io.responded.is_empty());
        let last = w.on_request_body(1, 6, true, now(), &mut io);
        assert_eq!(last, BodyFlow::Stop);
        assert_eq!(io.status_for(1), Some(401));
        assert_eq!(io.count_of(Metric::AnsweredAfterBody), 1);
        assert_eq!(io.count_of(Metric::Rejected), 1);
    }

    #[test]
    fn a_refused_body_is_read_for_max_drain_ms_at_most() {
        let mut io = holding();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        // A client at a byte a second: answered once max_drain_ms (10 s) have passed, by its
        // next byte or by a tick, whichever comes first.
        for stream in [1, 2] {
            assert_eq!(send(&mut w, stream, &no_token, &mut io), Flow::Continue);
            let piece = w.on_request_body(stream, 1, false, now(), &mut io);
            assert_eq!(piece, BodyFlow::Discard);
        }
        let later = now() + chrono::Duration::milliseconds(9_999);
        assert_eq!(
            w.on_request_body(1, 1, false, later, &mut io),
            BodyFlow::Discard
        );
        w.on_tick(later, &mut io);
        assert!(io.responded.is_empty());
        let late = now() + chrono::Duration::seconds(10);
        assert_eq!(
            w.on_request_body(1, 1, false, late, &mut io),
            BodyFlow::Stop
        );
        assert_eq!(io.status_for(1), Some(401));
        w.on_tick(late, &mut io);
        assert_eq!(io.status_for(2), Some(401));
        assert_eq!(io.responded.len(), 2, "each answered once");
        w.on_tick(late + chrono::Duration::seconds(1), &mut io);
        assert_eq!(io.responded.len(), 2);
    }

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
    fn a_body_past_what_is_worth_reading_is_answered_there() {
        let json = plans_json_with(|p| p["gateway"] = serde_json::json!({"max_drain_bytes": 100}));
        let mut io = holding();
        let mut w = worker_with(&mut io, &json);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        no_token.headers.retain(|(n, _)| n != "content-length");
        assert_eq!(send(&mut w, 1, &no_token, &mut io), Flow::Continue);
        w.on_request_body(1, 100, false, now(), &mut io);
        assert!(io.responded.is_empty());
        let past = w.on_request_body(1, 1, false, now(), &mut io);
        assert_eq!(past, BodyFlow::Stop);
        assert_eq!(io.status_for(1), Some(401));
        assert_eq!(io.count_of(Metric::AnsweredAfterBody), 0);
        // Anything after the answer stops too, and is answered no more.
        let later = w.on_request_body(1, 1, true, now(), &mut io);
        assert_eq!(later, BodyFlow::Stop);
        assert_eq!(io.responded.len(), 1);
    }

    #[test]
    fn a_429_after_the_reservation_waits_for_the_body_too() {
        let mut io = holding();
        let mut w = worker(&mut io);
        assert_eq!(send(&mut w, 1, &upload("u"), &mut io), Flow::Pause);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 5, 0, "free"), now(), &mut io);
        // Resumed into the hold filter, not to the upstream.
        assert_eq!(
            (io.held.as_slice(), io.resumed.as_slice()),
            (&[1][..], &[1][..])
        );
        assert!(io.responded.is_empty());
        assert_eq!(io.count_of(Metric::Allowed), 0);
        w.on_request_body(1, 10, true, now(), &mut io);
        assert_eq!(io.status_for(1), Some(429));
        // The remembered refusal of the same user, decided from the head, waits as well.
        assert_eq!(send(&mut w, 2, &upload("u"), &mut io), Flow::Continue);
        assert_eq!(io.held, [1, 2]);
        w.on_request_body(2, 10, true, now(), &mut io);
        assert_eq!(io.status_for(2), Some(429));
    }

    #[test]
    fn a_client_that_leaves_while_its_body_is_discarded_leaves_nothing_behind() {
        let mut io = holding();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        send(&mut w, 1, &no_token, &mut io);
        w.on_request_body(1, 4, false, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        assert!(io.responded.is_empty());
        assert_eq!(
            w.on_request_body(1, 4, true, now(), &mut io),
            BodyFlow::Continue
        );
        assert!(io.responded.is_empty());
    }

    /// A free user's upload without a Content-Length (a chunked body).
    fn streamed_upload(user: &str) -> Req {
        let mut req = upload(user);
        req.headers.retain(|(n, _)| n != "content-length");
        req
    }

    #[test]
    fn a_streamed_upload_past_the_plans_file_size_is_refused_as_it_streams() {
        let mut io = holding();
        let mut w = worker(&mut io);
        assert_eq!(send(&mut w, 1, &streamed_upload("u"), &mut io), Flow::Pause);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        let mb = 1 << 20;
        for _ in 0..10 {
            let piece = w.on_request_body(1, mb, false, now(), &mut io);
            assert_eq!(piece, BodyFlow::Continue);
        }
        // One byte past the free plan's 10 MB: that piece and the rest never reach the
        // upstream; the answer waits for the end of the body.
        let piece = w.on_request_body(1, 1, false, now(), &mut io);
        assert_eq!(piece, BodyFlow::Discard);
        assert!(io.responded.is_empty());
        let piece = w.on_request_body(1, mb, true, now(), &mut io);
        assert_eq!(piece, BodyFlow::Stop, "its end never reaches the upstream");
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 413);
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["max_bytes"], 10 * mb);
        assert_eq!(io.count_of(Metric::Rejected), 1);
        // Its unit is given back; its own 413 passing the response path changes nothing.
        w.on_response_headers(1, 413, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"release"));
        assert!(!batch.args.iter().any(|a| a == b"commit"));
    }

    #[test]
    fn a_streamed_upload_is_counted_with_the_bytes_its_body_had() {
        let mut io = holding();
        let mut w = worker(&mut io);
        send(&mut w, 1, &streamed_upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        w.on_request_body(1, 700, false, now(), &mut io);
        w.on_request_body(1, 300, true, now(), &mut io);
        w.on_response_headers(1, 201, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"commit"));
        assert!(batch.args.iter().any(|a| a == b"1000"), "the body's bytes");
    }

    /// plan_limits_reserve's answer to a free user's upload with `stored` and `held` bytes
    /// already in their storage.
    fn with_storage(status: i64, stored: i64, held: i64) -> Result<RedisReply, TransportError> {
        let Ok(RedisReply::Array(mut items)) = reserved(status, 0, 1, "free") else {
            unreachable!()
        };
        items.extend([
            RedisReply::Int(0),
            RedisReply::Nil,
            RedisReply::Nil,
            RedisReply::Int(stored),
            RedisReply::Int(held),
        ]);
        Ok(RedisReply::Array(items))
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
    fn a_streamed_upload_holds_the_file_size_and_is_refused_past_the_room_left() {
        let mut io = holding();
        let mut w = worker(&mut io);
        send(&mut w, 1, &streamed_upload("u"), &mut io);
        let (token, reserve) = io.last_sent();
        let mb = 1_u64 << 20;
        assert!(
            reserve
                .args
                .iter()
                .any(|a| a == (10 * mb).to_string().as_bytes()),
            "no Content-Length: it holds the plan's file size"
        );
        // 1 MB of room is left when it starts (others hold 2 MB).
        let gib = 1_i64 << 30;
        let room = 1 << 20;
        let stored = gib - room - 2 * (1 << 20);
        w.on_reply(token, with_storage(1, stored, 2 << 20), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        assert_eq!(
            w.on_request_body(1, mb, false, now(), &mut io),
            BodyFlow::Continue
        );
        assert_eq!(
            w.on_request_body(1, 1, false, now(), &mut io),
            BodyFlow::Discard
        );
        assert_eq!(
            w.on_request_body(1, 1, true, now(), &mut io),
            BodyFlow::Stop
        );
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 403);
        w.on_response_headers(1, 403, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(
            batch.args.iter().any(|a| a == b"release"),
            "the unit goes back"
        );
        assert!(
            batch
                .args
                .iter()
                .any(|a| a == (10 * mb).to_string().as_bytes()),
            "and the bytes it held"
        );
    }

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
        view_succeeds(&mut w, 4, &mut io);
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
        assert_eq!(name(batch), (&b"FCALL"[..], &b"plan_limits_settle"[..]));
        assert!(batch.args.iter().any(|a| a == b"count"));
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 1);
        assert_eq!(w.queued_settlements(), 0);
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

    /// The settlement modes and outcomes in the next batch (answered: all done).
    fn next_batch(w: &mut Worker, io: &mut Recorder) -> Vec<(String, String)> {
        w.on_tick(now(), io);
        let (token, batch) = io.last_sent();
        let batch = batch.clone();
        let numkeys: usize = String::from_utf8_lossy(&batch.args[2]).parse().unwrap();
        w.on_reply(token, settled(&vec![1; (numkeys - 2) / 8]), now(), io);
        let text = |a: &[u8]| String::from_utf8_lossy(a).into_owned();
        let modes = ["commit", "count", "release", "extend", "give_back", "lost"];
        let at: Vec<usize> = (0..batch.args.len())
            .filter(|&i| modes.contains(&text(&batch.args[i]).as_str()))
            .filter(|&i| i + 16 < batch.args.len())
            .collect();
        at.into_iter()
            .map(|i| (text(&batch.args[i]), text(&batch.args[i + 16])))
            .collect()
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
    fn a_limited_success_reaches_its_client_once_redis_has_counted_it() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        // (The webdis build: a call made on the stream's context would die with it.)
        io.on_a_stream = true;
        let flow = w.on_response_headers(1, 200, None, now(), &mut io);
        io.on_a_stream = false;
        assert_eq!(flow, ResponseFlow::AwaitCommit);
        assert!(
            w.wants_tick_soon(),
            "its commit goes at the next tick, not the next flush"
        );
        let sent = io.sent.len();
        w.on_tick(now(), &mut io);
        assert_eq!(io.sent.len(), sent + 1);
        assert!(io.responses_resumed.is_empty(), "not before Redis answers");
        let (token, _) = io.last_sent();
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.responses_resumed, [1]);
        assert!(!w.wants_tick_soon());
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
        // Where answers outlive streams (Redis host calls), the commit goes at once.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        let sent = io.sent.len();
        w.on_response_headers(1, 200, None, now(), &mut io);
        assert_eq!(io.sent.len(), sent + 1, "not waiting for a tick");
    }

    #[test]
    fn billings_plan_applies_and_is_remembered_for_requests_that_do_not_wait() {
        let mut io = Recorder::default();
        // A plan where procedure views are limited, so that billing's record matters for them.
        let json = plans_json_with(|p| p["plans"]["free"]["limits"]["procedure_view"] = 2.into());
        let mut w = worker_with(&mut io, &json);
        // The token says professional (unlimited views); nothing known yet: on at once.
        let view = head("GET", "/api/procedures/1", "u", "professional");
        assert_eq!(send(&mut w, 1, &view, &mut io), Flow::Continue);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
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
            send(&mut w, stream, &upload("u"), &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(
                token,
                Err(TransportError::Unknown("timeout".into())),
                now(),
                &mut io,
            );
            if io.resumed.contains(&stream) {
                passed += 1;
            } else {
                assert_eq!(io.status_for(stream), Some(429));
            }
        }
        assert_eq!(passed, 3);
        assert_eq!(io.count_of(Metric::FailOpenRefused), 7);
        // A user this Envoy knows nothing of gets the allowance only.
        send(&mut w, 30, &upload("stranger"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(
            token,
            Err(TransportError::Unknown("timeout".into())),
            now(),
            &mut io,
        );
        send(&mut w, 31, &upload("stranger"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(
            token,
            Err(TransportError::Unknown("timeout".into())),
            now(),
            &mut io,
        );
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
            let timeout = Err(TransportError::Unknown("timeout".into()));
            w.on_reply(token, timeout, later, &mut io);
            assert_eq!(io.status_for(stream), Some(429), "outage {stream}");
        }
    }

    #[test]
    fn a_pass_redis_does_not_have_yet_still_counts_against_the_allowance() {
        // Found by the adversary (seed 17131033116926659877): a reservation's answer that came
        // before this Envoy's fail-open pass was settled granted the allowance a second time.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let timeout = || Err(TransportError::Unknown("timeout".into()));
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
        let numkeys: usize = String::from_utf8_lossy(&batch.args[2]).parse().unwrap();
        w.on_reply(
            token,
            settled(&vec![1; (numkeys - 2) / 8]),
            at(2010),
            &mut io,
        );
        w.on_request_headers(5, upload("u").head(), false, at(4000), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 6, 0, "free"), at(4000), &mut io);
        w.on_request_headers(6, upload("u").head(), false, at(6000), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, timeout(), at(6000), &mut io);
        assert_eq!(io.status_for(6), Some(429));
        assert_eq!(io.count_of(Metric::FailOpen), 1);
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
    fn a_stream_that_ends_while_waiting_releases_and_ignores_the_late_answer() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_stream_end(1, true, now(), &mut io);
        w.on_reply(token, granted(), now(), &mut io);
        assert!(io.resumed.is_empty() && io.responded.is_empty());
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"release"));
    }

    #[test]
    fn answers_to_unknown_calls_are_ignored() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_reply(99, granted(), now(), &mut io);
        assert!(io.resumed.is_empty() && io.responded.is_empty() && io.counts.is_empty());
    }

    #[test]
    fn upstream_failures_and_departures_release() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for (stream, status) in [(1, Some(500)), (2, None)] {
            send(&mut w, stream, &upload("u"), &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(token, granted(), now(), &mut io);
            if let Some(status) = status {
                w.on_response_headers(stream, status, None, now(), &mut io);
            }
            w.on_stream_end(stream, true, now(), &mut io);
        }
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        let releases = batch.args.iter().filter(|a| *a == b"release").count();
        assert_eq!(releases, 2);
        w.on_reply(token, settled(&[0, 0]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Released), 2);
        assert_eq!(io.count_of(Metric::Counted), 0);
    }

    #[test]
    fn an_analysis_fully_forwarded_is_counted_when_its_client_leaves() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let ai = head("POST", "/api/teammate", "u", "free");
        for stream in [1, 2] {
            send(&mut w, stream, &ai, &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(token, granted(), now(), &mut io);
        }
        assert_eq!(
            w.on_request_body(1, 10, true, now(), &mut io),
            BodyFlow::Continue
        );
        w.on_stream_end(1, true, now(), &mut io);
        w.on_stream_end(2, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        let modes: Vec<&[u8]> = batch
            .args
            .iter()
            .map(Vec::as_slice)
            .filter(|a| *a == b"commit" || *a == b"release")
            .collect();
        assert_eq!(modes, [&b"commit"[..], &b"release"[..]]);
        let (token, _) = io.last_sent();
        w.on_reply(token, settled(&[1, 0]), now(), &mut io);
        // A request without a body is forwarded with its headers.
        let ai_no_body = head("POST", "/api/teammate", "v", "free");
        w.on_request_headers(4, ai_no_body.head(), true, now(), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        w.on_stream_end(4, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"commit"));
    }

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

    #[test]
    fn outcomes_round_trips_and_the_queue_are_recorded_with_labels_never_a_user() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        let later = now() + chrono::Duration::milliseconds(3);
        w.on_reply(token, reserved(0, 5, 0, "free"), later, &mut io);
        view_succeeds(&mut w, 2, &mut io);
        w.on_tick(later, &mut io);
        let (batch, _) = io.last_sent();
        w.on_reply(batch, settled(&[1]), later, &mut io);
        w.on_tick(later, &mut io);
        let names: Vec<(&str, i64)> = io
            .recorded
            .iter()
            .map(|(m, v)| (m.name.as_str(), *v))
            .collect();
        assert!(names.contains(&(
            "action=.=upload;.;plan=.=free;.;outcome=.=denied;.;plan_limits_requests",
            1
        )));
        assert!(names.contains(&("call=.=reserve;.;plan_limits_redis_round_trip_us", 3000)));
        assert!(names.contains(&(
            "action=.=procedure_view;.;plan=.=free;.;plan_limits_successes_counted",
            1
        )));
        // The view's settlement queued (+1), then sent and answered (-1).
        let queued: i64 = names
            .iter()
            .filter(|(n, _)| *n == "plan_limits_settlements_queued")
            .map(|(_, v)| v)
            .sum();
        assert_eq!(queued, 0);
        assert!(names.iter().all(|(n, _)| !n.contains("=.=u;")), "no user");
    }

    #[test]
    fn a_batch_of_successes_updates_their_counter_once_per_action_and_plan() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for stream in 1..=3 {
            view_succeeds(&mut w, stream, &mut io);
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
        view_succeeds(&mut w, 1, &mut io);
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
            view_succeeds(&mut w, stream, &mut io);
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
            view_succeeds(&mut w, stream, &mut io);
        }
        assert_eq!(io.count_of(Metric::SettlementsDropped), 3);
        for _ in 0..3 {
            w.on_tick(now(), &mut io);
            let (token, batch) = io.last_sent();
            let numkeys: usize = String::from_utf8_lossy(&batch.args[2]).parse().unwrap();
            let items = vec![1; (numkeys - 2) / 8];
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
    fn a_stopping_worker_sends_what_is_queued_then_is_done() {
        // Idle: it says goodbye (its record in Redis, so it is not taken for killed), then is
        // done; without Redis, at once.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        assert!(!w.on_shutdown(now(), &mut io), "a goodbye is on its way");
        let (token, goodbye) = io.last_sent();
        assert_eq!(goodbye.args[2], b"2", "no items: the record alone");
        assert_eq!(goodbye.args.last().unwrap(), b"1", "stopping");
        w.on_reply(
            token,
            Ok(RedisReply::Array(vec![RedisReply::Int(1)])),
            now(),
            &mut io,
        );
        assert_eq!(io.done, 1);
        let mut io = Recorder {
            refuse_sends: true,
            ..Recorder::default()
        };
        let mut w = worker(&mut io);
        assert!(
            w.on_shutdown(now(), &mut io),
            "nothing can be sent: done at once"
        );
        // With settlements queued: they go, saying it stops, then it is done.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        view_succeeds(&mut w, 1, &mut io);
        assert!(!w.on_shutdown(now(), &mut io), "a batch is on its way");
        let (token, batch) = io.last_sent();
        assert_eq!(batch.args[24], b"1", "the batch says it stops");
        assert_eq!(io.done, 0);
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.done, 1);
        assert_eq!(io.count_of(Metric::Counted), 1);
    }

    #[test]
    fn a_worker_that_sends_nothing_for_a_while_says_it_is_alive() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_tick(now(), &mut io);
        w.on_tick(now() + chrono::Duration::milliseconds(29_999), &mut io);
        assert!(io.sent.is_empty());
        w.on_tick(now() + chrono::Duration::seconds(30), &mut io);
        let (_, heartbeat) = io.last_sent();
        assert_eq!(name(heartbeat).1, b"plan_limits_settle");
        assert_eq!(heartbeat.args[2], b"2", "no items");
        assert_eq!(heartbeat.args[4], b"plan-limits:applied:000000000000feed");
    }

    /// A procedure view by `user` that succeeds and ends: one count queued.
    fn view_of(w: &mut Worker, stream: StreamId, user: &str, io: &mut Recorder) {
        let h = head("GET", "/api/procedures/1", user, "free");
        assert_eq!(send(w, stream, &h, io), Flow::Continue);
        w.on_response_headers(stream, 200, None, now(), io);
        w.on_stream_end(stream, true, now(), io);
    }

    fn on_a_cluster(p: &mut serde_json::Value) {
        p["redis"]["cluster_mode"] = true.into();
    }

    /// The hash slot of every key a settle call names (its numkeys keys).
    fn slots_of(command: &RedisCommand) -> Vec<u16> {
        let n: usize = std::str::from_utf8(&command.args[2])
            .unwrap()
            .parse()
            .unwrap();
        command.args[3..3 + n]
            .iter()
            .map(|key| cluster::key_slot(key))
            .collect()
    }

    #[test]
    fn on_a_cluster_each_slots_settlements_go_in_a_call_of_their_own() {
        let mut io = Recorder::default();
        let mut w = worker_with(&mut io, &plans_json_with(on_a_cluster));
        for (stream, user) in [(1, "alice"), (2, "bob"), (3, "alice")] {
            view_of(&mut w, stream, user, &mut io);
        }
        w.on_tick(now(), &mut io);
        assert_eq!(io.sent.len(), 2, "one call per slot: {:?}", io.sent);
        let mut slots = Vec::new();
        for (_, command) in &io.sent {
            assert_eq!(name(command), (&b"FCALL"[..], &b"plan_limits_settle"[..]));
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
        view_of(&mut w, 1, "alice", &mut io);
        view_of(&mut w, 2, "bob", &mut io);
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
        view_of(&mut w, 3, "bob", &mut io);
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
    fn with_evalsha_every_call_names_its_functions_script() {
        let mut io = Recorder::default();
        let json = plans_json_with(|p| p["redis"]["invoke"] = "evalsha".into());
        let mut w = worker_with(&mut io, &json);
        assert_eq!(send(&mut w, 1, &upload("u"), &mut io), Flow::Pause);
        let (token, reserve) = io.last_sent();
        let sha = functions::script_sha("plan_limits_reserve").unwrap();
        assert_eq!(name(reserve), (&b"EVALSHA"[..], sha.as_bytes()));
        w.on_reply(token, granted(), now(), &mut io);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, settle) = io.last_sent();
        let sha = functions::script_sha("plan_limits_settle").unwrap();
        assert_eq!(name(settle), (&b"EVALSHA"[..], sha.as_bytes()));
    }

    #[test]
    fn a_bad_configuration_keeps_the_last_good_one() {
        let mut io = Recorder::default();
        let mut w = Worker::new(1);
        assert_eq!(send(&mut w, 1, &upload("u"), &mut io), Flow::Pause);
        assert_eq!(
            io.status_for(1),
            Some(503),
            "never let through unconfigured"
        );
        assert!(!w.configure(b"{", &mut io));
        assert!(w.plans().is_none());
        assert!(w.configure(PLANS_JSON.as_bytes(), &mut io));
        let bad = plans_json_with(|p| p["plans"]["free"]["limits"]["upload"] = (-1).into());
        assert!(!w.configure(bad.as_bytes(), &mut io));
        assert!(io
            .logs
            .iter()
            .any(|(l, m)| *l == LogLevel::Error && m.contains("plans.free.limits.upload")));
        send(&mut w, 2, &upload("u"), &mut io);
        let (_, reserve) = io.last_sent();
        let limits = reserve.args[13..].to_vec();
        assert!(
            limits.windows(2).any(|w| w[0] == b"free" && w[1] == b"5"),
            "still the last good limit"
        );
    }

    #[test]
    fn a_request_in_flight_keeps_the_terms_it_was_admitted_under() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        let changed = plans_json_with(|p| p["plans"]["free"]["limits"]["upload"] = 3.into());
        assert!(w.configure(changed.as_bytes(), &mut io));
        w.on_reply(token, reserved(0, 5, 0, "free"), now(), &mut io);
        let (_, refusal) = io.responded.last().unwrap();
        assert!(refusal.body.contains("\"limit\":5"), "{}", refusal.body);
        send(&mut w, 2, &upload("u"), &mut io);
        let (_, reserve) = io.last_sent();
        let limits = reserve.args[13..].to_vec();
        assert!(
            limits.windows(2).any(|w| w[0] == b"free" && w[1] == b"3"),
            "new requests get the new limit"
        );
    }

    #[test]
    fn waiting_reservations_are_sent_by_a_tick_when_answers_die_with_streams() {
        // proxy-wasm: an answer belongs to the context whose callback sent the call.
        let mut io = Recorder {
            on_a_stream: true,
            ..Recorder::default()
        };
        let mut w = coalescing_worker(&mut io);
        send(&mut w, 1, &upload("a"), &mut io);
        let (first, _) = io.last_sent();
        send(&mut w, 2, &upload("b"), &mut io);
        assert!(w.wants_tick_soon());
        // The first answer arrives on stream 1's context: the next call waits for the root.
        w.on_reply(first, granted(), now(), &mut io);
        assert_eq!(io.sent.len(), 1);
        io.on_a_stream = false;
        w.on_tick(now(), &mut io);
        let (_, call) = io.last_sent();
        assert_eq!(call.args[3], b"plan-limits:{b}:2026-11", "sent by the tick");
        assert!(!w.wants_tick_soon());

        // A stream whose own call is in flight leaves: its answer will never come, and the
        // reservations behind it do not wait for it.
        let (second, _) = io.last_sent();
        w.on_reply(second, granted(), now(), &mut io);
        io.on_a_stream = true;
        send(&mut w, 3, &upload("c"), &mut io);
        send(&mut w, 4, &upload("d"), &mut io);
        let before = io.sent.len();
        w.on_stream_end(3, true, now(), &mut io);
        io.on_a_stream = false;
        w.on_tick(now() + chrono::Duration::milliseconds(1), &mut io);
        assert_eq!(io.sent.len(), before + 1);
        assert_eq!(io.last_sent().1.args[3], b"plan-limits:{d}:2026-11");
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
    fn reservations_arriving_while_one_is_in_flight_go_together_in_the_next_call() {
        let mut io = Recorder::default();
        let mut w = coalescing_worker(&mut io);
        // Alone: sent at once.
        assert_eq!(send(&mut w, 1, &upload("a"), &mut io), Flow::Pause);
        let (first, _) = io.last_sent();
        // Three more meanwhile: they wait; one of them leaves before it is sent.
        for (stream, user) in [(2, "b"), (3, "c"), (4, "d")] {
            assert_eq!(send(&mut w, stream, &upload(user), &mut io), Flow::Pause);
        }
        assert_eq!(
            io.sent.len(),
            1,
            "nothing more sent while one call is in flight"
        );
        w.on_stream_end(3, true, now(), &mut io);
        // The first answer sends the waiting ones as one call, in their order.
        w.on_reply(first, granted(), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        let (batch, call) = io.last_sent();
        assert_eq!(
            name(call),
            (&b"FCALL"[..], &b"plan_limits_reserve_many"[..])
        );
        assert_eq!(call.args[2], b"16", "two reservations' keys");
        assert_eq!(call.args[3], b"plan-limits:{b}:2026-11");
        assert_eq!(call.args[11], b"plan-limits:{d}:2026-11");
        // Each gets its own answer: b granted, d refused (its limit reached).
        let mut items = Vec::new();
        for reply in [reserved(1, 0, 1, "free"), reserved(0, 5, 0, "free")] {
            let Ok(RedisReply::Array(mut one)) = reply else {
                unreachable!()
            };
            one.extend([0, 0, 0, 0, 0].map(RedisReply::Int));
            items.extend(one);
        }
        w.on_reply(batch, Ok(RedisReply::Array(items)), now(), &mut io);
        assert_eq!(io.resumed, [1, 2]);
        assert_eq!(io.status_for(4), Some(429));
        assert_eq!(io.status_for(3), None, "gone before it was sent");
        // A failed call fails each of its reservations alike (fail_open uploads go on).
        send(&mut w, 5, &upload("e"), &mut io);
        let (alone, _) = io.last_sent();
        send(&mut w, 6, &upload("f"), &mut io);
        send(&mut w, 7, &upload("g"), &mut io);
        w.on_reply(alone, granted(), now(), &mut io);
        let (together, _) = io.last_sent();
        let timeout = Err(TransportError::Unknown("timeout".into()));
        w.on_reply(together, timeout, now(), &mut io);
        assert_eq!(io.resumed, [1, 2, 5, 6, 7]);
        assert_eq!(io.count_of(Metric::FailOpen), 2);
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
        io.on_a_stream = true; // (queued for the next tick, not sent at once)
        w.on_response_headers(1, 200, None, now(), &mut io);
        assert_eq!(w.settlements.len(), 1);
        let s = &w.settlements.start_batch(0).unwrap()[0];
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
