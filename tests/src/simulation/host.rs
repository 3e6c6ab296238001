//! One simulated Envoy worker's host: what `Io` asks of Envoy, kept as data for the world to
//! carry out at simulated times. Calls go on the simulated network; answers to streams,
//! resumptions and holds are read by the world; shared data is one Envoy's, shared by its
//! workers; metrics are counted.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use plan_limits_core::{
    Io, LabeledMetric, LocalResponse, LogLevel, Metric, RedisCommand, RedisSettings, StreamId,
    Token, TransportError,
};

/// One Envoy's shared data (proxy-wasm's): its workers see the same values and versions.
pub type SharedData = Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>;

/// A call the worker sent, for the network to carry.
#[derive(Debug, Clone)]
pub struct Sent {
    pub token: Token,
    pub command: RedisCommand,
}

/// What the worker asked of its streams, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAction {
    Respond(StreamId, u32),
    Resume(StreamId),
    Hold(StreamId),
    /// A response held for its commit goes on.
    ResumeResponse(StreamId),
}

pub struct SimHost {
    next_token: Token,
    pub sent: Vec<Sent>,
    pub actions: Vec<StreamAction>,
    /// Sends fail at once (webdis unreachable).
    pub refuse_sends: bool,
    pub shared: SharedData,
    pub counts: BTreeMap<&'static str, u64>,
}

impl SimHost {
    pub fn new(shared: SharedData, first_token: Token) -> Self {
        Self {
            next_token: first_token,
            sent: Vec::new(),
            actions: Vec::new(),
            refuse_sends: false,
            shared,
            counts: BTreeMap::new(),
        }
    }

    pub fn count_of(&self, metric: Metric) -> u64 {
        self.counts.get(metric.name()).copied().unwrap_or(0)
    }
}

impl Io for SimHost {
    fn send(&mut self, _: &RedisSettings, command: &RedisCommand) -> Result<Token, TransportError> {
        if self.refuse_sends {
            return Err(TransportError::NotSent("webdis unreachable".into()));
        }
        self.next_token += 1;
        self.sent.push(Sent {
            token: self.next_token,
            command: command.clone(),
        });
        Ok(self.next_token)
    }

    fn respond(&mut self, stream: StreamId, response: &LocalResponse) {
        self.actions
            .push(StreamAction::Respond(stream, response.status));
    }

    fn set_request_header(&mut self, _: StreamId, _: &str, _: &str) {}

    fn set_response_header(&mut self, _: StreamId, _: &str, _: &str) {}

    fn resume(&mut self, stream: StreamId) {
        self.actions.push(StreamAction::Resume(stream));
    }

    fn resume_response(&mut self, stream: StreamId) {
        self.actions.push(StreamAction::ResumeResponse(stream));
    }

    fn hold(&mut self, stream: StreamId) -> bool {
        self.actions.push(StreamAction::Hold(stream));
        true
    }

    fn count(&mut self, metric: Metric, by: u64) {
        *self.counts.entry(metric.name()).or_default() += by;
    }

    fn record(&mut self, _: &LabeledMetric, _: i64) {}

    fn log(&mut self, _: LogLevel, _: String) {}

    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.borrow().get(key) {
            Some((value, version)) => (Some(value.clone()), Some(*version)),
            None => (None, None),
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        let mut shared = self.shared.borrow_mut();
        let current = shared.get(key).map(|(_, v)| *v);
        if version.is_some() && version != current {
            return false;
        }
        let next = current.unwrap_or(0) + 1;
        shared.insert(key.into(), (value.to_vec(), next));
        true
    }

    /// (The simulation never stops a worker: nothing waits for this.)
    fn done(&mut self) {}
}
