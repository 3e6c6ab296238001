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
//!
//! Here: the state, and the dispatch of a request's head (by what admission makes of it) and
//! of a call's answer (by who waits for it). Each family of events has its file: `head` (a
//! metered request's head), `reads` (usage reports), `reservations` (and what their answer
//! decides), `fail_open` (what an unreachable Redis lets through), `body`, `response`,
//! `stream_end`, `settling` (the tick, settlement batches and their answers), `shutdown`
//! (and the worker's record in Redis).

use std::collections::HashMap;
use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::admission::{self, Admission, Release, RequestHead};
use crate::config::RedisSettings;
use crate::denials::DenialCache;
use crate::entitlements::EntitlementCache;
use crate::metrics::{self, LabeledMetric, Metric, Outcome};
use crate::plans::Plans;
use crate::redis::functions;
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::reports::Report;
use crate::request::MeteredRequest;
use crate::responses::{self, LocalResponse};
use crate::settlement::Settlement;
use crate::settlement_queue::{Group, SettlementQueue};
use crate::spike::RequestRates;

mod body;
mod fail_open;
#[cfg(test)]
mod fixtures;
mod head;
mod leases;
mod reads;
mod reservations;
mod response;
mod settling;
mod shutdown;
mod stream_end;

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

/// Requests let through unchecked, or names of unknown plans, are logged at most this often.
const LOG_EVERY_MS: u64 = 1000;

pub struct Worker {
    plans: Option<Rc<Plans>>,
    /// Every stream the worker still has to do with, in the state of its life.
    streams: HashMap<StreamId, Stream>,
    calls: Calls,
    /// Units this worker holds of users' allowances for the requests to come.
    leases: leases::Leases,
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
    /// until its answer goes. (Not a state of its own beside `awaiting_commit_until`: an
    /// upstream may answer, its success awaiting its commit, before the body it was still
    /// being sent turns out too big.)
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
    /// Calls carrying reservations in flight; with `coalesce_reservations`, while there are
    /// `RESERVATION_CALLS` of them, reservations wait, in order, for the next answer.
    reserving: usize,
    waiting_reservations: Vec<(StreamId, RedisCommand)>,
}

/// A call in flight: who waits for its answer and when it was sent. Its answer comes
/// whichever callback sent it, even after that stream ended (Envoy makes every call on the
/// root context; our SDK hands an answer to the root when its maker is gone).
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
            calls: Calls::default(),
            queue_reported: 0,
            refused_unknown: metrics::requests("none", "none", Outcome::Rejected),
            leases: leases::Leases::default(),
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
                self.calls.reserving = self.calls.reserving.saturating_sub(1);
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

    /// Settlements waiting or on their way to Redis, and records of lost ones not sent yet.
    pub fn queued_settlements(&self) -> usize {
        self.settlements.len() + self.losses.len()
    }
}

/// Sends `command` as plans.json says the library's functions are called (`FCALL`, or
/// `EVALSHA` of their scripts).
fn invoke(
    io: &mut dyn Io,
    redis: &RedisSettings,
    command: RedisCommand,
) -> Result<Token, TransportError> {
    io.send(redis, &functions::invoked(command, redis.invoke))
}

/// Counts what became of `request`: the outcome's counter, and the one labeled with its
/// action and plan.
fn count_outcome(io: &mut dyn Io, request: &MeteredRequest, outcome: Outcome) {
    io.count(outcome.metric(), 1);
    if let Some(labeled) = request.terms().metrics.get(outcome) {
        io.record(labeled, 1);
    }
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

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

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

    #[test]
    fn answers_to_unknown_calls_are_ignored() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_reply(99, granted(), now(), &mut io);
        assert!(io.resumed.is_empty() && io.responded.is_empty() && io.counts.is_empty());
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
        let sha = functions::script_sha("plan_limits_settle_v2").unwrap();
        assert_eq!(name(settle), (&b"EVALSHA"[..], sha.as_bytes()));
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
    fn outcomes_round_trips_and_the_queue_are_recorded_with_labels_never_a_user() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        let later = now() + chrono::Duration::milliseconds(3);
        w.on_reply(token, reserved(0, 5, 0, "free"), later, &mut io);
        view_of(&mut w, 2, "u", "free", &mut io);
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
}
