//! One worker's share of the filter, without I/O: the proxy-wasm shell creates one per root
//! context (one per Envoy worker thread) and hands it every event; the worker answers through
//! `Io`.
//!
//! Events in: plans.json (`configure`), request headers, a Redis call's answer, the upstream's
//! status, the end of a stream, a tick, shutdown. Actions out: send this Redis command, answer
//! this stream, resume that one, count this metric, log this line, done.
//!
//! The worker owns the metered streams in flight, the calls waiting for Redis (by token, each
//! with its waiter), the settlement queue, the refusal cache and the reservation ids. Every
//! call it sends gets exactly one answer delivered to its waiter: a `NOSCRIPT` reply is sent
//! once more with the script's source, and if that cannot be sent, the waiter gets the failure.

use std::collections::HashMap;
use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::admission::{self, Admission, RequestHead};
use crate::config::RedisSettings;
use crate::denials::DenialCache;
use crate::metrics::Metric;
use crate::plans::Plans;
use crate::redis::scripts::{self, Form};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::request::{unix_millis, Decision, MeteredRequest};
use crate::responses::{self, LocalResponse};
use crate::settlement::Settlement;
use crate::settlement_queue::{BatchReport, SettlementQueue};

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
    /// Lets the paused `stream` go on to the upstream.
    fn resume(&mut self, stream: StreamId);
    fn count(&mut self, metric: Metric, by: u64);
    fn log(&mut self, level: LogLevel, message: String);
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

/// Refusals remembered per worker (`deny_cache_ms`); beyond this many users, old ones go.
const REMEMBERED_REFUSALS: usize = 10_000;

pub struct Worker {
    plans: Option<Rc<Plans>>,
    streams: HashMap<StreamId, Stream>,
    calls: HashMap<Token, Call>,
    settlements: SettlementQueue,
    denials: DenialCache,
    ids: ReservationIds,
    stopping: bool,
}

/// A metered stream, from its headers to its end.
struct Stream {
    request: MeteredRequest,
    /// The reservation call it waits for, if any.
    call: Option<Token>,
}

/// A call waiting for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Call {
    waiter: Waiter,
    form: Form,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiter {
    /// A paused stream's reservation.
    Reservation(StreamId),
    /// The settlement batch in flight.
    Batch,
}

/// Reservation ids: a random per-VM prefix and a counter, unique across workers and Envoys.
struct ReservationIds {
    vm_nonce: u64,
    next: u64,
}

impl ReservationIds {
    fn next(&mut self) -> String {
        let n = self.next;
        self.next = self.next.wrapping_add(1);
        format!("{:016x}-{n}", self.vm_nonce)
    }
}

impl Worker {
    /// `vm_nonce`: random, so reservation ids of different VMs never collide.
    pub fn new(vm_nonce: u64) -> Self {
        let defaults = RedisSettings::default();
        Self {
            plans: None,
            streams: HashMap::new(),
            calls: HashMap::new(),
            settlements: SettlementQueue::new(defaults.max_queued_settlements, defaults.max_batch),
            denials: DenialCache::new(REMEMBERED_REFUSALS),
            ids: ReservationIds { vm_nonce, next: 0 },
            stopping: false,
        }
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

    /// A request's headers arrived (all of them, pseudo-headers included).
    pub fn on_request_headers(
        &mut self,
        stream: StreamId,
        headers: &[(String, Vec<u8>)],
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Flow {
        let Some(plans) = self.plans.clone() else {
            // Envoy sends no traffic to a filter that refused its configuration; should one
            // arrive, it is not let past an unchecked limit.
            io.respond(stream, &responses::not_configured());
            return Flow::Pause;
        };
        match admission::admit(&plans, RequestHead::new(headers), now) {
            // Not counted: Envoy's own request stats already do, and this path must stay cheap.
            Admission::Unmetered => Flow::Continue,
            Admission::Refused(response) => {
                io.count(Metric::Rejected, 1);
                io.respond(stream, &response);
                Flow::Pause
            }
            Admission::Metered(request) => self.meter(stream, request, &plans, now, io),
        }
    }

    fn meter(
        &mut self,
        stream: StreamId,
        mut request: MeteredRequest,
        plans: &Plans,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Flow {
        let Some(limit) = request.limit() else {
            // Unlimited: on at once, counted on success.
            io.count(Metric::Allowed, 1);
            self.streams.insert(
                stream,
                Stream {
                    request,
                    call: None,
                },
            );
            return Flow::Continue;
        };
        if let Some(response) = self.denials.refusal(&request, now) {
            io.count(Metric::Denied, 1);
            io.respond(stream, &response);
            return Flow::Pause;
        }
        let redis = &plans.redis;
        let command = request.reserve(
            limit,
            self.ids.next(),
            unix_millis(now),
            redis.reservation_ttl_ms,
        );
        let flow = match io.send(redis, &command) {
            Ok(token) => {
                self.calls.insert(
                    token,
                    Call {
                        waiter: Waiter::Reservation(stream),
                        form: Form::BySha,
                    },
                );
                self.streams.insert(
                    stream,
                    Stream {
                        request,
                        call: Some(token),
                    },
                );
                return Flow::Pause;
            }
            // Not sent at all: the action's failure mode decides, right now.
            Err(e) => {
                let decision = request.on_reservation(Err(e), now);
                match self.carry_out(&request, decision, redis, now, io) {
                    Ok(()) => Flow::Continue,
                    Err(response) => {
                        io.respond(stream, &response);
                        Flow::Pause
                    }
                }
            }
        };
        self.streams.insert(
            stream,
            Stream {
                request,
                call: None,
            },
        );
        flow
    }

    /// Counts, logs and remembers what a reservation's answer decided; `Err` is the answer
    /// the client gets instead of the upstream's.
    fn carry_out(
        &mut self,
        request: &MeteredRequest,
        decision: Decision,
        redis: &RedisSettings,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> Result<(), LocalResponse> {
        match decision {
            Decision::Allowed => {
                io.count(Metric::Allowed, 1);
                Ok(())
            }
            Decision::Denied {
                response,
                final_refusal,
            } => {
                io.count(Metric::Denied, 1);
                if final_refusal {
                    self.denials
                        .remember(request, &response, now, redis.deny_cache_ms);
                }
                Err(response)
            }
            Decision::FailOpen(e) => {
                io.count(Metric::RedisErrors, 1);
                io.count(Metric::FailOpen, 1);
                io.log(
                    LogLevel::Warn,
                    format!(
                        "plan-limits: {} for user {:?} let through unchecked (fail_open): {e}",
                        request.action().key,
                        request.user()
                    ),
                );
                Ok(())
            }
            Decision::FailClosed(e, response) => {
                io.count(Metric::RedisErrors, 1);
                io.count(Metric::FailClosed, 1);
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
        let Some(call) = self.calls.remove(&token) else {
            return;
        };
        let reply = match reply {
            Ok(r) if call.form == Form::BySha && scripts::is_noscript(&r) => {
                match self.resend_with_source(call.waiter, io) {
                    // The answer comes under the new token.
                    Ok(()) => return,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match call.waiter {
            Waiter::Reservation(stream) => self.on_reservation(stream, reply, now, io),
            Waiter::Batch => self.on_batch_reply(reply, now, io),
        }
    }

    /// Sends the waiter's command again, naming its script by source (Redis restarted or was
    /// flushed and no longer knows it).
    fn resend_with_source(
        &mut self,
        waiter: Waiter,
        io: &mut dyn Io,
    ) -> Result<(), TransportError> {
        let plans = self
            .plans
            .clone()
            .ok_or_else(|| TransportError::NotSent("not configured".into()))?;
        let redis = &plans.redis;
        let command = match waiter {
            Waiter::Reservation(stream) => self.streams.get(&stream).and_then(|s| {
                s.request
                    .reserve_command(redis.reservation_ttl_ms, Form::WithSource)
            }),
            Waiter::Batch => Some(scripts::settle(
                self.settlements.in_flight(),
                &redis.events_stream,
                redis.events_max_len,
                Form::WithSource,
            )),
        }
        .ok_or_else(|| TransportError::NotSent("nothing to send again".into()))?;
        let token = io.send(redis, &command)?;
        self.calls.insert(
            token,
            Call {
                waiter,
                form: Form::WithSource,
            },
        );
        if let Waiter::Reservation(stream) = waiter {
            if let Some(s) = self.streams.get_mut(&stream) {
                s.call = Some(token);
            }
        }
        Ok(())
    }

    /// The paused `stream`'s reservation was answered: it goes on, or is answered here.
    fn on_reservation(
        &mut self,
        stream: StreamId,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let (Some(plans), Some(mut entry)) = (self.plans.clone(), self.streams.remove(&stream))
        else {
            return;
        };
        entry.call = None;
        let decision = entry.request.on_reservation(reply, now);
        match self.carry_out(&entry.request, decision, &plans.redis, now, io) {
            Ok(()) => io.resume(stream),
            Err(response) => io.respond(stream, &response),
        }
        self.streams.insert(stream, entry);
    }

    /// The upstream answered `stream` with `status` (a local reply of the filter's own passes
    /// here too: its request is already settled).
    pub fn on_response_headers(
        &mut self,
        stream: StreamId,
        status: u32,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let Some(plans) = self.plans.clone() else {
            return;
        };
        let settlement = self
            .streams
            .get_mut(&stream)
            .and_then(|s| s.request.on_response(status, now, &plans.redis));
        self.queue(settlement, io);
    }

    /// `stream` is gone (completed, reset, or the client left): a unit it still holds is
    /// released, and an answer still owed to it is no longer wanted.
    pub fn on_stream_end(&mut self, stream: StreamId, now: DateTime<Utc>, io: &mut dyn Io) {
        let Some(mut entry) = self.streams.remove(&stream) else {
            return;
        };
        if let Some(token) = entry.call {
            self.calls.remove(&token);
        }
        let Some(plans) = self.plans.clone() else {
            return;
        };
        let settlement = entry.request.on_end(now, &plans.redis);
        self.queue(settlement, io);
    }

    fn queue(&mut self, settlement: Option<Settlement>, io: &mut dyn Io) {
        let Some(settlement) = settlement else { return };
        if self.settlements.push(settlement).is_some() {
            io.count(Metric::SettlementsDropped, 1);
            io.log(
                LogLevel::Warn,
                "plan-limits: settlement queue full, oldest settlement dropped".into(),
            );
        }
    }

    /// The periodic tick (`flush_interval_ms`): send queued settlements.
    pub fn on_tick(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
        self.flush(now, io);
    }

    /// Sends the next batch if one is due and none is in flight.
    fn flush(&mut self, now: DateTime<Utc>, io: &mut dyn Io) {
        let Some(plans) = self.plans.clone() else {
            return;
        };
        let redis = &plans.redis;
        let Some(batch) = self.settlements.start_batch(unix_millis(now)) else {
            return;
        };
        let command = scripts::settle(
            batch,
            &redis.events_stream,
            redis.events_max_len,
            Form::BySha,
        );
        match io.send(redis, &command) {
            Ok(token) => {
                self.calls.insert(
                    token,
                    Call {
                        waiter: Waiter::Batch,
                        form: Form::BySha,
                    },
                );
            }
            Err(e) => self.on_batch_reply(Err(e), now, io),
        }
    }

    fn on_batch_reply(
        &mut self,
        reply: Result<RedisReply, TransportError>,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let report = self.settlements.on_batch_reply(reply, unix_millis(now));
        record(&report, io);
        // More may be waiting: keep the queue moving without waiting for the next tick (a
        // failed batch backs off first, so this ends).
        self.flush(now, io);
        if self.stopping && !self.settlements.batch_in_flight() {
            io.done();
        }
    }

    /// The host is stopping this worker: send what is queued. `true`: done now; otherwise
    /// `Io::done` follows once the last batch is answered.
    pub fn on_shutdown(&mut self, now: DateTime<Utc>, io: &mut dyn Io) -> bool {
        self.stopping = true;
        self.flush(now, io);
        !self.settlements.batch_in_flight()
    }

    /// Settlements waiting or on their way to Redis.
    pub fn queued_settlements(&self) -> usize {
        self.settlements.len()
    }
}

fn record(report: &BatchReport, io: &mut dyn Io) {
    io.count(Metric::Counted, report.counted);
    io.count(Metric::Released, report.released);
    io.count(Metric::CommitsUnmatched, report.commits_unmatched);
    io.count(Metric::SettlementsDropped, report.dropped_unknown);
    if let Some(e) = &report.error {
        io.count(Metric::SettleErrors, 1);
        io.log(
            LogLevel::Warn,
            format!(
                "plan-limits: settlement batch failed ({e}); {} to resend, {} dropped",
                report.requeued, report.dropped_unknown
            ),
        );
    } else if report.dropped_unknown > 0 {
        io.log(
            LogLevel::Warn,
            format!(
                "plan-limits: {} counts were not applied",
                report.dropped_unknown
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settlement::SettleMode;
    use crate::testing::{head, ints, now, plans_json_with, PLANS_JSON};

    /// The host as the core's tests see it: records every action, sends nothing.
    #[derive(Default)]
    struct Recorder {
        sent: Vec<(Token, RedisCommand)>,
        next_token: Token,
        /// Sends fail while set (no connection, unknown cluster).
        refuse_sends: bool,
        responded: Vec<(StreamId, LocalResponse)>,
        resumed: Vec<StreamId>,
        counts: HashMap<Metric, u64>,
        logs: Vec<(LogLevel, String)>,
        done: u32,
    }

    impl Io for Recorder {
        fn send(
            &mut self,
            _: &RedisSettings,
            command: &RedisCommand,
        ) -> Result<Token, TransportError> {
            if self.refuse_sends {
                return Err(TransportError::NotSent("no connection".into()));
            }
            self.next_token += 1;
            self.sent.push((self.next_token, command.clone()));
            Ok(self.next_token)
        }
        fn respond(&mut self, stream: StreamId, response: &LocalResponse) {
            self.responded.push((stream, response.clone()));
        }
        fn resume(&mut self, stream: StreamId) {
            self.resumed.push(stream);
        }
        fn count(&mut self, metric: Metric, by: u64) {
            *self.counts.entry(metric).or_default() += by;
        }
        fn log(&mut self, level: LogLevel, message: String) {
            self.logs.push((level, message));
        }
        fn done(&mut self) {
            self.done += 1;
        }
    }

    impl Recorder {
        fn count_of(&self, metric: Metric) -> u64 {
            self.counts.get(&metric).copied().unwrap_or(0)
        }

        fn last_sent(&self) -> (Token, &RedisCommand) {
            let (token, command) = self.sent.last().expect("a call was sent");
            (*token, command)
        }

        fn status_for(&self, stream: StreamId) -> Option<u32> {
            self.responded
                .iter()
                .find(|(s, _)| *s == stream)
                .map(|(_, r)| r.status)
        }
    }

    fn worker(io: &mut Recorder) -> Worker {
        let mut w = Worker::new(0xfeed);
        assert!(w.configure(PLANS_JSON.as_bytes(), io));
        w
    }

    /// An unlimited request (a procedure view) that succeeds and ends: one count queued.
    fn view_succeeds(w: &mut Worker, stream: StreamId, io: &mut Recorder) {
        let h = head("GET", "/api/procedures/1", "u", "free");
        assert_eq!(w.on_request_headers(stream, &h, now(), io), Flow::Continue);
        w.on_response_headers(stream, 200, now(), io);
        w.on_stream_end(stream, now(), io);
    }

    fn upload(user: &str) -> Vec<(String, Vec<u8>)> {
        head("POST", "/api/upload", user, "free")
    }

    fn noscript() -> Result<RedisReply, TransportError> {
        Ok(RedisReply::Error("NOSCRIPT No matching script.".into()))
    }

    fn name(command: &RedisCommand) -> &[u8] {
        &command.args[0]
    }

    #[test]
    fn unmetered_requests_go_on_untouched() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let flow = w.on_request_headers(1, &head("GET", "/health", "", ""), now(), &mut io);
        assert_eq!(flow, Flow::Continue);
        w.on_response_headers(1, 200, now(), &mut io);
        w.on_stream_end(1, now(), &mut io);
        w.on_tick(now(), &mut io);
        assert!(io.sent.is_empty() && io.counts.is_empty() && io.responded.is_empty());
    }

    #[test]
    fn a_refused_request_is_answered_and_counted() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let mut h = upload("");
        h.retain(|(n, _)| n != "x-user-id");
        assert_eq!(w.on_request_headers(1, &h, now(), &mut io), Flow::Pause);
        assert_eq!(io.status_for(1), Some(401));
        assert_eq!(io.count_of(Metric::Rejected), 1);
        // Envoy passes the local reply through the response path: nothing to settle.
        w.on_response_headers(1, 401, now(), &mut io);
        w.on_stream_end(1, now(), &mut io);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn an_unlimited_success_goes_on_at_once_and_is_counted_in_the_next_batch() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let h = head("GET", "/api/procedures/1", "u", "free");
        assert_eq!(w.on_request_headers(1, &h, now(), &mut io), Flow::Continue);
        assert!(io.sent.is_empty(), "no Redis call before the upstream");
        assert_eq!(io.count_of(Metric::Allowed), 1);
        w.on_response_headers(1, 200, now(), &mut io);
        w.on_stream_end(1, now(), &mut io);
        assert_eq!(w.queued_settlements(), 1);
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        assert_eq!(name(batch), b"EVALSHA");
        assert!(batch.args.iter().any(|a| a == b"count"));
        w.on_reply(token, ints(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 1);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn a_limited_request_waits_for_its_reservation_then_commits() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        assert_eq!(
            w.on_request_headers(7, &upload("u"), now(), &mut io),
            Flow::Pause
        );
        let (token, reserve) = io.last_sent();
        assert_eq!(name(reserve), b"EVALSHA");
        assert_eq!(reserve.args[3], b"plan-limits:{u}:2026-11");
        assert_eq!(
            reserve.args[7], b"000000000000feed-0",
            "the VM's reservation id"
        );
        w.on_reply(token, ints(&[1, 0, 1]), now(), &mut io);
        assert_eq!(io.resumed, [7]);
        assert_eq!(io.count_of(Metric::Allowed), 1);
        w.on_response_headers(7, 201, now(), &mut io);
        w.on_stream_end(7, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"commit"));
        assert!(batch.args.iter().any(|a| a == b"000000000000feed-0"));
        w.on_reply(token, ints(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 1);
    }

    #[test]
    fn a_final_refusal_is_answered_again_without_redis_until_it_expires() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_request_headers(1, &upload("u"), now(), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, ints(&[0, 5, 0]), now(), &mut io);
        assert_eq!(io.status_for(1), Some(429));
        assert!(io.resumed.is_empty());
        w.on_stream_end(1, now(), &mut io);
        let sends = io.sent.len();
        let later = now() + chrono::Duration::milliseconds(999);
        assert_eq!(
            w.on_request_headers(2, &upload("u"), later, &mut io),
            Flow::Pause
        );
        assert_eq!(io.sent.len(), sends, "answered from the refusal cache");
        assert_eq!(io.status_for(2), Some(429));
        assert_eq!(io.count_of(Metric::Denied), 2);
        // Another user, and the same user once deny_cache_ms (1 s) passed, ask Redis again.
        w.on_request_headers(3, &upload("v"), later, &mut io);
        w.on_request_headers(
            4,
            &upload("u"),
            now() + chrono::Duration::seconds(1),
            &mut io,
        );
        assert_eq!(io.sent.len(), sends + 2);
    }

    #[test]
    fn a_refusal_while_a_unit_is_in_flight_is_not_remembered() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_request_headers(1, &upload("u"), now(), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, ints(&[0, 4, 1]), now(), &mut io);
        let sends = io.sent.len();
        w.on_request_headers(2, &upload("u"), now(), &mut io);
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
        // upload is fail_open: on at once, counted on success once Redis is back.
        assert_eq!(
            w.on_request_headers(1, &upload("u"), now(), &mut io),
            Flow::Continue
        );
        assert_eq!(io.count_of(Metric::FailOpen), 1);
        assert_eq!(io.count_of(Metric::RedisErrors), 1);
        assert!(io
            .logs
            .iter()
            .any(|(l, m)| *l == LogLevel::Warn && m.contains("fail_open")));
        // api_call is fail_closed: 503.
        let api = head("GET", "/api/v1/x", "u", "enterprise");
        assert_eq!(w.on_request_headers(2, &api, now(), &mut io), Flow::Pause);
        assert_eq!(io.status_for(2), Some(503));
        assert_eq!(io.count_of(Metric::FailClosed), 1);
        w.on_response_headers(1, 200, now(), &mut io);
        w.on_stream_end(1, now(), &mut io);
        w.on_stream_end(2, now(), &mut io);
        io.refuse_sends = false;
        w.on_tick(now() + chrono::Duration::seconds(1), &mut io);
        let (_, batch) = io.last_sent();
        assert!(
            batch.args.iter().any(|a| a == b"count"),
            "the fail-open success is counted"
        );
    }

    #[test]
    fn a_reservation_answered_noscript_is_sent_again_with_the_source() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_request_headers(1, &upload("u"), now(), &mut io);
        let (first, by_sha) = io.last_sent();
        let by_sha = by_sha.clone();
        w.on_reply(first, noscript(), now(), &mut io);
        let (second, eval) = io.last_sent();
        assert_eq!(name(eval), b"EVAL");
        assert_eq!(eval.args[2..], by_sha.args[2..], "the same reservation");
        assert!(
            io.resumed.is_empty() && io.responded.is_empty(),
            "still waiting"
        );
        w.on_reply(first, ints(&[1, 0, 1]), now(), &mut io);
        assert!(
            io.resumed.is_empty(),
            "the first token was answered already"
        );
        w.on_reply(second, ints(&[1, 0, 1]), now(), &mut io);
        assert_eq!(io.resumed, [1]);
    }

    #[test]
    fn a_noscript_whose_resend_cannot_be_sent_still_answers_the_request() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_request_headers(1, &upload("u"), now(), &mut io);
        w.on_request_headers(
            2,
            &head("GET", "/api/v1/x", "u", "enterprise"),
            now(),
            &mut io,
        );
        let tokens: Vec<Token> = io.sent.iter().map(|(t, _)| *t).collect();
        io.refuse_sends = true;
        for token in tokens {
            w.on_reply(token, noscript(), now(), &mut io);
        }
        assert_eq!(io.resumed, [1], "fail_open: on, not left hanging");
        assert_eq!(io.status_for(2), Some(503), "fail_closed: answered");
    }

    #[test]
    fn a_noscript_to_the_source_form_is_a_failure_not_a_loop() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_request_headers(1, &upload("u"), now(), &mut io);
        let (first, _) = io.last_sent();
        w.on_reply(first, noscript(), now(), &mut io);
        let (second, _) = io.last_sent();
        w.on_reply(second, noscript(), now(), &mut io);
        assert_eq!(io.sent.len(), 2);
        assert_eq!(io.resumed, [1]);
        assert_eq!(io.count_of(Metric::FailOpen), 1);
    }

    #[test]
    fn a_settlement_batch_answered_noscript_goes_again_and_a_failed_resend_is_retried() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        view_succeeds(&mut w, 1, &mut io);
        w.on_tick(now(), &mut io);
        let (batch, _) = io.last_sent();
        io.refuse_sends = true;
        w.on_reply(batch, noscript(), now(), &mut io);
        assert_eq!(io.count_of(Metric::SettleErrors), 1);
        assert_eq!(w.queued_settlements(), 1, "kept: it certainly did not run");
        // The worker is not stuck: once Redis can be reached, the batch goes again.
        io.refuse_sends = false;
        w.on_tick(now() + chrono::Duration::seconds(1), &mut io);
        let (again, command) = io.last_sent();
        assert_eq!(name(command), b"EVALSHA");
        w.on_reply(again, noscript(), now(), &mut io);
        let (with_source, command) = io.last_sent();
        assert_eq!(name(command), b"EVAL");
        w.on_reply(with_source, ints(&[1]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Counted), 1);
        assert_eq!(w.queued_settlements(), 0);
    }

    #[test]
    fn a_stream_that_ends_while_waiting_releases_and_ignores_the_late_answer() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_request_headers(1, &upload("u"), now(), &mut io);
        let (token, _) = io.last_sent();
        w.on_stream_end(1, now(), &mut io);
        w.on_reply(token, ints(&[1, 0, 1]), now(), &mut io);
        assert!(io.resumed.is_empty() && io.responded.is_empty());
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"release"));
    }

    #[test]
    fn answers_to_unknown_calls_are_ignored() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_reply(99, ints(&[1, 0, 1]), now(), &mut io);
        assert!(io.resumed.is_empty() && io.responded.is_empty() && io.counts.is_empty());
    }

    #[test]
    fn upstream_failures_and_departures_release() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for (stream, status) in [(1, Some(500)), (2, None)] {
            w.on_request_headers(stream, &upload("u"), now(), &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(token, ints(&[1, 0, 1]), now(), &mut io);
            if let Some(status) = status {
                w.on_response_headers(stream, status, now(), &mut io);
            }
            w.on_stream_end(stream, now(), &mut io);
        }
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        let releases = batch.args.iter().filter(|a| *a == b"release").count();
        assert_eq!(releases, 2);
        w.on_reply(token, ints(&[0, 0]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Released), 2);
        assert_eq!(io.count_of(Metric::Counted), 0);
    }

    #[test]
    fn a_full_settlement_queue_drops_the_oldest_and_says_so() {
        let mut io = Recorder::default();
        let mut w = Worker::new(1);
        let json = plans_json_with(|p| p["redis"]["max_queued_settlements"] = 2.into());
        assert!(w.configure(json.as_bytes(), &mut io));
        for stream in 1..=3 {
            view_succeeds(&mut w, stream, &mut io);
        }
        assert_eq!(w.queued_settlements(), 2);
        assert_eq!(io.count_of(Metric::SettlementsDropped), 1);
    }

    #[test]
    fn a_stopping_worker_sends_what_is_queued_then_is_done() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        assert!(w.on_shutdown(now(), &mut io), "idle: done at once");
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        view_succeeds(&mut w, 1, &mut io);
        assert!(!w.on_shutdown(now(), &mut io), "a batch is on its way");
        let (token, _) = io.last_sent();
        assert_eq!(io.done, 0);
        w.on_reply(token, ints(&[1]), now(), &mut io);
        assert_eq!(io.done, 1);
        assert_eq!(io.count_of(Metric::Counted), 1);
    }

    #[test]
    fn a_bad_configuration_keeps_the_last_good_one() {
        let mut io = Recorder::default();
        let mut w = Worker::new(1);
        assert_eq!(
            w.on_request_headers(1, &upload("u"), now(), &mut io),
            Flow::Pause
        );
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
        w.on_request_headers(2, &upload("u"), now(), &mut io);
        let (_, reserve) = io.last_sent();
        assert_eq!(reserve.args[6], b"5", "still the last good limit");
    }

    #[test]
    fn a_request_in_flight_keeps_the_terms_it_was_admitted_under() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_request_headers(1, &upload("u"), now(), &mut io);
        let (token, _) = io.last_sent();
        let changed = plans_json_with(|p| p["plans"]["free"]["limits"]["upload"] = 3.into());
        assert!(w.configure(changed.as_bytes(), &mut io));
        w.on_reply(token, ints(&[0, 5, 0]), now(), &mut io);
        let (_, refusal) = io.responded.last().unwrap();
        assert!(refusal.body.contains("\"limit\":5"), "{}", refusal.body);
        w.on_request_headers(2, &upload("u"), now(), &mut io);
        let (_, reserve) = io.last_sent();
        assert_eq!(reserve.args[6], b"3", "new requests get the new limit");
    }

    #[test]
    fn reservation_ids_are_unique_per_worker() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for stream in 1..=3 {
            w.on_request_headers(stream, &upload("u"), now(), &mut io);
        }
        let mut ids: Vec<_> = io.sent.iter().map(|(_, c)| c.args[7].clone()).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn settlements_carry_the_request() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let mut h = head("POST", "/api/teammate?kind=vision", "u", "free");
        h.push(("x-request-id".into(), b"req-1".to_vec()));
        w.on_request_headers(1, &h, now(), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, ints(&[1, 0, 1]), now(), &mut io);
        w.on_response_headers(1, 200, now(), &mut io);
        let queued = w.settlements.len();
        assert_eq!(queued, 1);
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
    }
}
