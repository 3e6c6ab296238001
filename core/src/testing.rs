//! Fixtures the core's unit tests share: the repository's plans, a fixed clock, request heads
//! and the host in memory (the benchmark's too, with the `testing` feature).
// Fixtures, never in the filter's .wasm: a broken one should fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::hint::black_box;
use std::rc::Rc;

use chrono::{DateTime, TimeZone, Utc};

use crate::admission::{admit, Admission, Claims, RequestHead};
use crate::config::RedisSettings;
use crate::metrics::{LabeledMetric, Metric};
use crate::plans::{Action, Plans};
use crate::redis::{webdis, RedisCommand, TransportError};
use crate::request::MeteredRequest;
use crate::responses::LocalResponse;
use crate::worker::{Io, LogLevel, StreamId, Token};

pub const PLANS_JSON: &str = include_str!("../../plans.json");

pub fn plans() -> Plans {
    Plans::from_json(PLANS_JSON.as_bytes()).unwrap()
}

/// The repository's plans.json with `edit` applied, as JSON.
pub fn plans_json_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut value: serde_json::Value = serde_json::from_str(PLANS_JSON).unwrap();
    edit(&mut value);
    value.to_string()
}

pub fn action(plans: &Plans, key: &str) -> Rc<Action> {
    plans
        .actions()
        .iter()
        .find(|a| a.key == key)
        .unwrap()
        .clone()
}

/// 2026-11-27T12:00:00Z, three and a half days before November ends.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
}

/// A request as the host hands it over: its headers and its verified token's claims.
#[derive(Debug, Clone)]
pub struct Req {
    pub headers: Vec<(String, Vec<u8>)>,
    pub claims: Claims,
}

impl Req {
    pub fn head(&self) -> RequestHead<'_> {
        RequestHead::new(&self.headers, &self.claims)
    }

    pub fn header(mut self, name: &str, value: &[u8]) -> Self {
        self.headers.push((name.into(), value.to_vec()));
        self
    }
}

/// A request of `user` whose token claims `plan`, with a 10-byte body.
pub fn head(method: &str, path: &str, user: &str, plan: &str) -> Req {
    Req {
        headers: vec![
            (":method".into(), method.into()),
            (":path".into(), path.into()),
            ("content-length".into(), b"10".to_vec()),
        ],
        claims: Claims {
            user: Some(user.into()),
            plan: Some(plan.into()),
            org: None,
            anchor: None,
        },
    }
}

/// The request `req` makes at `when`, which must be metered.
pub fn metered(plans: &Plans, req: &Req, when: DateTime<Utc>) -> MeteredRequest {
    match admit(plans, req.head(), when) {
        Admission::Metered(m) => m,
        Admission::Refused(r) => panic!("refused: {} {}", r.status, r.body),
        Admission::Unmetered => panic!("unmetered"),
        Admission::Report(_) => panic!("a report"),
        Admission::Release(_) => panic!("a release route"),
    }
}

/// The host in memory: what the core's tests and its benchmark drive a `Worker` with. It sends
/// nothing; by default it records every action for the tests to look at. A `lean` one (the
/// benchmark's) records only the streams it resumed, and encodes each call for webdis as the
/// shell does, so that its memory stays flat over millions of requests and its cost is the
/// shell's.
#[derive(Default)]
pub struct Recorder {
    pub sent: Vec<(Token, RedisCommand)>,
    /// The Envoy cluster each call went to.
    pub clusters: Vec<String>,
    /// The last call's token.
    pub next_token: Token,
    /// Sends fail while set (no connection, unknown cluster).
    pub refuse_sends: bool,
    pub responded: Vec<(StreamId, LocalResponse)>,
    pub resumed: Vec<StreamId>,
    pub responses_resumed: Vec<StreamId>,
    /// Whether a hold filter follows (Envoy as rendered: yes), and the streams it held.
    pub holds: bool,
    pub held: Vec<StreamId>,
    pub headers: Vec<(StreamId, String, String)>,
    pub response_headers: Vec<(StreamId, String, String)>,
    pub counts: HashMap<Metric, u64>,
    pub recorded: Vec<(LabeledMetric, i64)>,
    pub logs: Vec<(LogLevel, String)>,
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    pub done: u32,
    /// Records only `resumed` (see above); shared data is always empty.
    pub lean: bool,
}

impl Io for Recorder {
    fn send(
        &mut self,
        redis: &RedisSettings,
        command: &RedisCommand,
    ) -> Result<Token, TransportError> {
        if self.refuse_sends {
            return Err(TransportError::NotSent("no connection".into()));
        }
        self.next_token += 1;
        if self.lean {
            black_box(webdis::request_body(command));
        } else {
            self.clusters.push(redis.cluster.clone());
            self.sent.push((self.next_token, command.clone()));
        }
        Ok(self.next_token)
    }
    fn respond(&mut self, stream: StreamId, response: &LocalResponse) {
        if self.lean {
            black_box(response);
        } else {
            self.responded.push((stream, response.clone()));
        }
    }
    fn set_request_header(&mut self, stream: StreamId, name: &str, value: &str) {
        if self.lean {
            black_box((name, value));
        } else {
            self.headers.push((stream, name.into(), value.into()));
        }
    }
    fn set_response_header(&mut self, stream: StreamId, name: &str, value: &str) {
        if self.lean {
            black_box((name, value));
        } else {
            self.response_headers
                .push((stream, name.into(), value.into()));
        }
    }
    fn resume(&mut self, stream: StreamId) {
        self.resumed.push(stream);
    }
    fn resume_response(&mut self, stream: StreamId) {
        if !self.lean {
            self.responses_resumed.push(stream);
        }
    }
    fn hold(&mut self, stream: StreamId) -> bool {
        if self.holds && !self.lean {
            self.held.push(stream);
        }
        self.holds
    }
    fn count(&mut self, metric: Metric, by: u64) {
        if self.lean {
            black_box((metric, by));
        } else {
            *self.counts.entry(metric).or_default() += by;
        }
    }
    fn record(&mut self, metric: &LabeledMetric, value: i64) {
        if self.lean {
            black_box((metric, value));
        } else {
            self.recorded.push((metric.clone(), value));
        }
    }
    fn log(&mut self, level: LogLevel, message: String) {
        if self.lean {
            black_box(message);
        } else {
            self.logs.push((level, message));
        }
    }
    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.get(key) {
            Some((value, version)) if !self.lean => (Some(value.clone()), Some(*version)),
            _ => (None, None),
        }
    }
    fn shared_set(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        if self.lean {
            black_box((key, value));
            return true;
        }
        let current = self.shared.get(key).map(|(_, v)| *v);
        if version.is_some() && version != current {
            return false;
        }
        let next = current.unwrap_or(0) + 1;
        self.shared.insert(key.into(), (value.to_vec(), next));
        true
    }
    fn done(&mut self) {
        self.done += 1;
    }
}

impl Recorder {
    /// The benchmark's host: a hold filter following, as in Envoy as rendered.
    pub fn lean() -> Self {
        Self {
            lean: true,
            holds: true,
            ..Self::default()
        }
    }

    pub fn count_of(&self, metric: Metric) -> u64 {
        self.counts.get(&metric).copied().unwrap_or(0)
    }

    pub fn last_sent(&self) -> (Token, &RedisCommand) {
        let (token, command) = self.sent.last().expect("a call was sent");
        (*token, command)
    }

    pub fn status_for(&self, stream: StreamId) -> Option<u32> {
        self.responded
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, r)| r.status)
    }

    pub fn headers_of(&self, stream: StreamId) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .filter(|(s, _, _)| *s == stream)
            .map(|(_, n, v)| (n.as_str(), v.as_str()))
            .collect()
    }
}
