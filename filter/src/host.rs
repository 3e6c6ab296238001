//! What the worker asks of the host, carried out with proxy-wasm host calls.
//!
//! Answers and resumptions of streams are carried out after the worker returns (`finish`),
//! never while it is borrowed: a host may call back into the filter from them.

use std::cell::RefCell;
use std::rc::Rc;

use chrono::{DateTime, Utc};
use log::{error, info, warn};
use plan_limits_core::{
    from_unix_nanos, Io, LabeledMetric, LocalResponse, LogLevel, Metric, RedisCommand,
    RedisSettings, StreamId, Token, TransportError, Worker,
};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

use crate::metrics::MetricIds;
use crate::transport;

/// What a root context shares with its HTTP contexts.
pub struct Shared {
    pub worker: RefCell<Worker>,
    pub metrics: MetricIds,
    /// The root context's id.
    pub root_id: u32,
}

impl Shared {
    /// Runs `event` (a callback of context `current`) on the worker with a host to act
    /// through, then carries out what it asked of the streams.
    pub fn handle<R>(
        self: &Rc<Self>,
        current: u32,
        event: impl FnOnce(&mut Worker, &mut Host) -> R,
    ) -> R {
        let mut host = Host {
            metrics: &self.metrics,
            streams: Vec::new(),
            current,
        };
        let result = event(&mut self.worker.borrow_mut(), &mut host);
        host.finish();
        result
    }

    /// An HTTP call answered (webdis build: a Redis answer): on the context that made it, or
    /// the root's if that one is gone (filter/vendor/proxy-wasm).
    pub fn on_http_call_response(
        self: &Rc<Self>,
        current: u32,
        token: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        if let Some(reply) = transport::http_call_reply(num_headers, body_size) {
            self.handle(current, |worker, host| {
                worker.on_reply(token, reply, now(), host)
            });
        }
    }
}

/// What the worker asked of a stream, carried out in the order asked.
enum StreamAction {
    Respond(StreamId, LocalResponse),
    SetHeader(StreamId, String, String),
    SetResponseHeader(StreamId, String, String),
    Resume(StreamId),
    ResumeResponse(StreamId),
}

pub struct Host<'a> {
    metrics: &'a MetricIds,
    streams: Vec<StreamAction>,
    /// The context whose callback runs.
    current: u32,
}

impl Host<'_> {
    fn finish(self) {
        // The host acts on the context whose callback runs: another stream's actions (those a
        // Redis answer on another context, or the root, releases) need a switch first.
        let mut effective = self.current;
        for action in self.streams {
            let stream = match &action {
                StreamAction::Respond(stream, _)
                | StreamAction::SetHeader(stream, _, _)
                | StreamAction::SetResponseHeader(stream, _, _)
                | StreamAction::Resume(stream)
                | StreamAction::ResumeResponse(stream) => *stream,
            };
            if stream != effective {
                if hostcalls::set_effective_context(stream).is_err() {
                    continue;
                }
                effective = stream;
            }
            match action {
                StreamAction::Respond(_, response) => {
                    let headers: Vec<(&str, &str)> = response
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let _ = hostcalls::send_http_response(
                        response.status,
                        headers,
                        Some(response.body.as_bytes()),
                    );
                }
                StreamAction::SetHeader(_, name, value) => {
                    let _ =
                        hostcalls::set_map_value(MapType::HttpRequestHeaders, &name, Some(&value));
                }
                StreamAction::SetResponseHeader(_, name, value) => {
                    let _ =
                        hostcalls::set_map_value(MapType::HttpResponseHeaders, &name, Some(&value));
                }
                StreamAction::Resume(_) => {
                    let _ = hostcalls::resume_http_request();
                }
                StreamAction::ResumeResponse(_) => {
                    let _ = hostcalls::resume_http_response();
                }
            }
        }
    }
}

impl Io for Host<'_> {
    fn send(
        &mut self,
        redis: &RedisSettings,
        command: &RedisCommand,
    ) -> Result<Token, TransportError> {
        transport::send(redis, command)
    }

    fn respond(&mut self, stream: StreamId, response: &LocalResponse) {
        self.streams
            .push(StreamAction::Respond(stream, response.clone()));
    }

    fn set_request_header(&mut self, stream: StreamId, name: &str, value: &str) {
        self.streams
            .push(StreamAction::SetHeader(stream, name.into(), value.into()));
    }

    fn set_response_header(&mut self, stream: StreamId, name: &str, value: &str) {
        self.streams.push(StreamAction::SetResponseHeader(
            stream,
            name.into(),
            value.into(),
        ));
    }

    fn resume(&mut self, stream: StreamId) {
        self.streams.push(StreamAction::Resume(stream));
    }

    fn resume_response(&mut self, stream: StreamId) {
        self.streams.push(StreamAction::ResumeResponse(stream));
    }

    fn hold(&mut self, stream: StreamId) -> bool {
        let Some((header, secret)) = crate::hold::marker() else {
            return false;
        };
        self.streams
            .push(StreamAction::SetHeader(stream, header.into(), secret));
        true
    }

    fn record(&mut self, metric: &LabeledMetric, value: i64) {
        self.metrics.record(metric, value);
    }

    fn count(&mut self, metric: Metric, by: u64) {
        self.metrics.increment(metric, by);
    }

    fn log(&mut self, level: LogLevel, message: String) {
        match level {
            LogLevel::Info => info!("{message}"),
            LogLevel::Warn => warn!("{message}"),
            LogLevel::Error => error!("{message}"),
        }
    }

    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn shared_set(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), version).is_ok()
    }

    fn done(&mut self) {
        let _ = hostcalls::done();
    }
}

/// The host's clock, as the core wants it.
pub fn now() -> DateTime<Utc> {
    let nanos = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    from_unix_nanos(nanos)
}
