//! What the host keeps: per plugin (shared by its VMs, like Envoy's worker threads) and per VM.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::abi::Pairs;

/// Shared by every VM of one plugin.
#[derive(Default)]
pub struct PluginShared {
    pub clock: Clock,
    pub shared_data: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    pub queues: Mutex<Queues>,
    pub metrics: Mutex<Metrics>,
    pub logs: Mutex<Vec<LogLine>>,
}

/// The host clock the filter reads (`proxy_get_current_time_nanoseconds`), set by tests.
#[derive(Default)]
pub struct Clock(AtomicU64);

impl Clock {
    pub fn set_nanos(&self, nanos: u64) {
        self.0.store(nanos, Ordering::SeqCst);
    }

    pub fn nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn advance_millis(&self, ms: u64) {
        self.0.fetch_add(ms * 1_000_000, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct Queues {
    pub by_name: HashMap<String, u32>,
    pub items: HashMap<u32, VecDeque<Vec<u8>>>,
}

#[derive(Default)]
pub struct Metrics {
    pub by_name: BTreeMap<String, u32>,
    pub values: HashMap<u32, (i32, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub vm: usize,
    pub level: i32,
    pub message: String,
}

/// One HTTP stream (a request) as the host sees it.
#[derive(Debug, Default)]
pub struct Stream {
    pub request_headers: Pairs,
    pub request_body: Vec<u8>,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_body: Vec<u8>,
    pub response_trailers: Pairs,
    pub local_response: Option<LocalReply>,
    /// `proxy_continue_stream` was called while the request was paused.
    pub resumed: bool,
    /// The filter holds the response (its headers answered "pause") until it continues it.
    pub response_paused: bool,
    /// The request has no body (its headers ended the stream).
    pub end_of_stream: bool,
    /// The headers went on past the filter, to the hold filter (if any) and beyond.
    pub passed_on: bool,
    /// The hold filter stopped the request before the upstream.
    pub held: bool,
    /// Request body bytes that went on to the upstream.
    pub upstream_body_bytes: u64,
    pub closed: bool,
    /// `None`: Envoy has the value but cannot encode it for the filter (a null claim, say).
    pub properties: HashMap<String, Option<Vec<u8>>>,
}

/// An answer the filter gave itself (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub details: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
}

impl LocalReply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "local reply is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Where a Redis host-call cluster's calls go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisUpstream {
    /// One Redis: `redis://host:port/`.
    One(String),
    /// A Redis Cluster: its masters' URLs (any of them would do as seeds).
    Cluster(Vec<String>),
}

/// What `proxy_redis_init` set for a cluster; Higress keeps it per cluster and applies it to
/// every connection it opens there (AUTH, then SELECT, then the filter's commands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisInit {
    /// Empty: password-only AUTH (or none without a password).
    pub username: String,
    /// Empty: no AUTH.
    pub password: String,
    /// The options after `?` in the cluster name (`db=1`), as Higress parses them.
    pub options: BTreeMap<String, String>,
    /// Per-call timeout: a call that takes longer fails (status non-zero).
    pub timeout: Duration,
}

impl RedisInit {
    pub fn db(&self) -> Option<&str> {
        self.options.get("db").map(String::as_str)
    }
}

/// An outbound call made by the filter, waiting for the test to let it run.
#[derive(Debug, Clone)]
pub enum Callout {
    Http {
        cluster: String,
        headers: Pairs,
        body: Vec<u8>,
        timeout_ms: u32,
    },
    Redis {
        cluster: String,
        query: Vec<u8>,
    },
}

#[derive(Debug, Clone)]
pub struct PendingCall {
    pub token: u32,
    pub callout: Callout,
}

/// The answer of an HTTP call while its callback runs.
#[derive(Debug, Default, Clone)]
pub struct HttpCallResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

pub struct VmState {
    pub index: usize,
    pub shared: Arc<PluginShared>,
    pub plugin_configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    pub root_context_id: u32,
    pub effective_context: u32,
    pub streams: HashMap<u32, Stream>,
    pub tick_period_ms: u32,
    pub next_token: u32,
    pub pending: VecDeque<PendingCall>,
    pub http_call_response: Option<HttpCallResponse>,
    pub redis_call_response: Option<Vec<u8>>,
    /// Clusters the filter may call (`proxy_http_call`): name -> `host:port`.
    pub http_clusters: HashMap<String, String>,
    /// Clusters for Redis host calls: name -> one Redis or a Redis Cluster.
    pub redis_clusters: HashMap<String, RedisUpstream>,
    /// Clusters the filter called `proxy_redis_init` for, with what it passed.
    pub redis_initialized: HashMap<String, RedisInit>,
    pub plugin_properties: HashMap<String, Vec<u8>>,
    /// The hold filter's root context and its root id, if it runs in this VM.
    pub hold_root: Option<(u32, String)>,
    /// The hold filter's HTTP contexts: each is a second filter on a stream (its id here).
    pub aliases: HashMap<u32, u32>,
    pub random_state: u64,
    pub done_called: bool,
    /// Calls the filter made into this host (every import, WASI's too): what a change to the
    /// filter's host calls is measured by.
    pub host_calls: u64,
}

impl VmState {
    /// Holds an outbound call until the test lets it run and returns its token. Every call
    /// belongs to the root context and is answered there, as Envoy (and Higress, for Redis)
    /// does: it outlives the stream whose callback made it.
    pub fn push_call(&mut self, callout: Callout) -> u32 {
        self.next_token += 1;
        let token = self.next_token;
        self.pending.push_back(PendingCall { token, callout });
        token
    }

    pub fn stream(&mut self) -> Option<&mut Stream> {
        let id = self.effective_context;
        let id = self.aliases.get(&id).copied().unwrap_or(id);
        self.streams.get_mut(&id)
    }

    /// Whether the effective context belongs to the hold filter.
    pub fn in_hold_filter(&self) -> bool {
        let id = self.effective_context;
        self.hold_root.as_ref().is_some_and(|(root, _)| *root == id)
            || self.aliases.contains_key(&id)
    }

    pub fn log(&self, level: i32, message: String) {
        self.shared.logs.lock().unwrap().push(LogLine {
            vm: self.index,
            level,
            message,
        });
    }
}

pub fn nanos_to_datetime(nanos: u64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_nanos(nanos as i64)
}
