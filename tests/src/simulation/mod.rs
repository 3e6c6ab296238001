//! A deterministic simulation of the core, FoundationDB- and TigerBeetle-style: the real
//! `Worker`s (the filter's every decision, without I/O) in simulated Envoys, with simulated
//! clients, upstreams and network, against a real Redis running the real Lua library. One seed
//! decides everything: which requests, which clients leave and when, what each upstream does,
//! how late each Redis answer is (or whether it is lost after running, duplicated, or never
//! runs), when Redis stalls or webdis is unreachable, when an Envoy dies, how the clocks
//! drift. Time is simulated (an event queue), so thousands of seeds run natively in seconds,
//! and a failing seed replays exactly.
//!
//! After each seed the world is drained (faults stop, every call answered, every stream ended,
//! every queue flushed) and `check` holds the ledger invariant against what the simulated
//! upstreams did.

mod check;
mod host;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::rc::Rc;

use chrono::{DateTime, TimeZone, Utc};
use plan_limits_core::{
    BodyFlow, Claims, Flow, Metric, RedisReply, ResponseFlow, StreamId, TransportError, Worker,
};

pub use check::{Report, Violation};
use host::{SharedData, SimHost, StreamAction};

/// How much one seed does.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub requests: usize,
}

/// A small, fast, well-mixed generator (SplitMix64): the seed is the whole world.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True `per_mille` times in a thousand.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The plans every seed runs under: the repository's, with reservations that expire within a
/// run, and coalesced reservations and leases on or off by the seed.
fn plans_json(rng: &mut Rng, prefix: &str) -> String {
    let mut plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).expect("plans.json");
    let redis = &mut plans["redis"];
    redis["key_prefix"] = prefix.into();
    redis["events_stream"] = format!("{prefix}:events").into();
    redis["reservation_ttl_ms"] = 3000.into();
    redis["coalesce_reservations"] = rng.chance(300).into();
    // (Granted to enterprise API calls and professional AI analyses, whose limits are large.)
    if rng.chance(500) {
        redis["lease_units"] = 4.into();
        redis["lease_hold_ms"] = 500.into();
    }
    redis["max_queued_settlements"] = if rng.chance(200) { 8 } else { 10_000 }.into();
    plans.to_string()
}

/// What a request is: its route, and the body a client sends.
#[derive(Debug, Clone)]
struct Route {
    method: &'static str,
    path: String,
    /// The action it is metered as (`None`: a release or a report).
    action: Option<&'static str>,
    body: u64,
    /// Sent without a Content-Length (chunked).
    chunked: bool,
}

/// What the upstream will do with a request it gets whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Does it, answers 2xx.
    Success,
    /// Fails, answers 5xx.
    Failure,
    /// Slower than the route timeout: Envoy answers 504; the upstream finishes (or not).
    Timeout { does_it: bool },
    /// Closes the connection without answering, after doing it (or not).
    Reset { does_it: bool },
    /// Cannot be reached at all.
    Unreachable,
}

/// When a client leaves (if it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    Never,
    /// Before its head is answered or its body sent.
    AfterHead,
    /// After part of its body.
    MidBody,
    /// After its whole body, before the answer.
    BeforeAnswer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The filter holds its head (waiting for Redis).
    Paused,
    /// Going on to the upstream (its body follows).
    Forwarding,
    /// Held from the upstream by the hold filter: its body is read and discarded.
    Held,
    /// Answered by the filter or the upstream; its end follows.
    Answered,
    /// A success held until Redis has counted it (read-your-writes).
    AwaitingCommit,
    Ended,
}

/// One request's life, and what became of it at the upstream.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub user: String,
    pub plan: &'static str,
    pub action: Option<&'static str>,
    route: Route,
    fate: Fate,
    leave: Leave,
    envoy: usize,
    worker: usize,
    stream: StreamId,
    phase: Phase,
    body_sent: u64,
    /// The body that reached the upstream.
    forwarded: u64,
    /// The upstream has the whole request and works on it.
    pub at_upstream: bool,
    /// A connection to the upstream was made.
    reached: bool,
    /// The upstream did the work (its handler ran to a success).
    pub done: bool,
    /// Let through after Redis failed to answer its reservation.
    pub fail_open: bool,
    /// Its worker died before settling it.
    pub lost_with_worker: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Start(usize),
    Body(usize),
    UpstreamAnswers(usize),
    Leave(usize),
    Tick(usize, usize),
    Execute(usize),
    Reply(usize),
    Fault(FaultKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    /// Redis stops answering (paused) until the matching `RedisResumes`.
    RedisStalls,
    RedisResumes,
    /// webdis cannot be reached: sends fail at once.
    WebdisDown,
    WebdisUp,
    /// An Envoy is killed (its workers' state is lost) and a new one takes its place.
    EnvoyKilled(usize),
    /// Every clock moves forward.
    ClockJumps,
}

/// A call on the simulated network.
struct Call {
    envoy: usize,
    worker: usize,
    generation: u32,
    token: u32,
    command: plan_limits_core::RedisCommand,
    sent_ms: u64,
    /// What Redis answered, once it ran the command.
    reply: Option<RedisReply>,
    /// The answer is lost (the worker hears of a timeout).
    lost: bool,
    /// The answer arrives twice.
    twice: bool,
    /// Redis refuses it without running it (`LOADING`, as while it reads its append-only file).
    refused: bool,
}

struct SimWorker {
    worker: Worker,
    host: SimHost,
    /// Its clock's offset from the world's (ms).
    skew_ms: i64,
    /// Responses it let go without their commit's answer, as last seen.
    not_awaited_seen: u64,
}

struct SimEnvoy {
    workers: Vec<SimWorker>,
    /// Bumped when the Envoy is killed and started again: answers to the dead one's calls
    /// go nowhere.
    generation: u32,
}

/// Everything one seed runs.
pub struct World<'r> {
    rng: Rng,
    /// The filter's Redis user (what webdis logs in as), and an admin's (the checks').
    redis: &'r mut redis::Connection,
    admin: &'r mut redis::Connection,
    /// The run starts a moment before a new month.
    crosses_a_period: bool,
    plans: String,
    timeout_ms: u64,
    now_ms: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    envoys: Vec<SimEnvoy>,
    pub requests: Vec<Request>,
    calls: Vec<Call>,
    redis_stalled: bool,
    /// Calls that reached a stalled Redis: run when it resumes.
    stalled_calls: Vec<usize>,
    next_stream: StreamId,
    next_nonce: u64,
    pub prefix: String,
    pub faults: Vec<String>,
    /// Successes whose response went on before Redis counted them, though the worker waited.
    read_your_writes_broken: Vec<String>,
    /// Successes held for their commit.
    awaited: u64,
    /// The workers of killed Envoys, by name.
    killed: Vec<String>,
}

const ROUTE_TIMEOUT_MS: u64 = 2000;
const TICK_MS: u64 = 5;

impl<'r> World<'r> {
    /// A world for `seed`: two or three Envoys of one or two workers each, against the Redis
    /// `redis` is a connection to (as the filter's Redis user).
    pub fn new(
        seed: u64,
        redis: &'r mut redis::Connection,
        admin: &'r mut redis::Connection,
    ) -> Self {
        let mut rng = Rng::new(seed);
        // (Under the filter's key prefix, which its Redis user may use: one prefix per seed.)
        let prefix = format!("plan-limits:sim{seed:x}");
        let plans = plans_json(&mut rng, &prefix);
        // Late in November, or a moment before December: some seeds cross into a new period.
        let crosses_a_period = rng.chance(300);
        let start = if crosses_a_period {
            "2026-11-30T23:59:58Z"
        } else {
            "2026-11-27T12:00:00Z"
        };
        let now_ms = DateTime::parse_from_rfc3339(start)
            .map(|t| t.timestamp_millis() as u64)
            .expect("start");
        let mut world = Self {
            rng,
            redis,
            admin,
            crosses_a_period,
            plans,
            timeout_ms: 250,
            now_ms,
            events: BinaryHeap::new(),
            seq: 0,
            envoys: Vec::new(),
            requests: Vec::new(),
            calls: Vec::new(),
            redis_stalled: false,
            stalled_calls: Vec::new(),
            next_stream: 1,
            next_nonce: seed.wrapping_mul(1_000_003),
            prefix,
            faults: Vec::new(),
            read_your_writes_broken: Vec::new(),
            awaited: 0,
            killed: Vec::new(),
        };
        let envoys = 2 + world.rng.below(2) as usize;
        for _ in 0..envoys {
            let workers = 1 + world.rng.below(2) as usize;
            let envoy = world.new_envoy(workers, 0);
            world.envoys.push(envoy);
        }
        world
    }

    fn new_envoy(&mut self, workers: usize, generation: u32) -> SimEnvoy {
        let shared: SharedData = Rc::default();
        let workers = (0..workers)
            .map(|_| {
                self.next_nonce = self.next_nonce.wrapping_add(1);
                let mut host = SimHost::new(shared.clone(), (generation + 1) * 1_000_000);
                let mut worker = Worker::new(self.next_nonce);
                assert!(
                    worker.configure(self.plans.as_bytes(), &mut host),
                    "the simulation's plans.json is refused"
                );
                SimWorker {
                    worker,
                    host,
                    skew_ms: self.rng.below(101) as i64 - 50,
                    not_awaited_seen: 0,
                }
            })
            .collect();
        SimEnvoy {
            workers,
            generation,
        }
    }

    fn at(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        self.events
            .push(Reverse((self.now_ms + delay_ms, self.seq, event)));
    }

    fn clock(&self, envoy: usize, worker: usize) -> DateTime<Utc> {
        let skew = self.envoys[envoy].workers[worker].skew_ms;
        let ms = (self.now_ms as i64 + skew).max(0);
        Utc.timestamp_millis_opt(ms).single().expect("time")
    }

    /// Plans the seed's traffic and faults, runs it, drains the world.
    pub fn run(&mut self, budget: Budget) {
        let users: Vec<(String, &'static str)> = (0..2 + self.rng.below(4))
            .map(|i| {
                let plan = *self
                    .rng
                    .pick(&["free", "free", "professional", "enterprise"]);
                (format!("u{i}"), plan)
            })
            .collect();
        let mut t = 0;
        for _ in 0..budget.requests {
            t += self.rng.below(12);
            let (user, plan) = self.rng.pick(&users).clone();
            let request = self.plan_request(user, plan);
            self.requests.push(request);
            let index = self.requests.len() - 1;
            self.at(t, Event::Start(index));
        }
        for envoy in 0..self.envoys.len() {
            for worker in 0..self.envoys[envoy].workers.len() {
                let first = self.rng.below(TICK_MS);
                self.at(first, Event::Tick(envoy, worker));
            }
        }
        self.plan_faults(t);
        self.drive(t + 4 * ROUTE_TIMEOUT_MS);
        self.drain();
    }

    fn plan_request(&mut self, user: String, plan: &'static str) -> Request {
        let route = self.pick_route();
        let fate = match self.rng.below(100) {
            0..=69 => Fate::Success,
            70..=79 => Fate::Failure,
            80..=86 => Fate::Timeout {
                does_it: self.rng.chance(600),
            },
            87..=93 => Fate::Reset {
                does_it: self.rng.chance(500),
            },
            _ => Fate::Unreachable,
        };
        let leave = match self.rng.below(100) {
            0..=74 => Leave::Never,
            75..=82 => Leave::AfterHead,
            83..=90 => Leave::MidBody,
            _ => Leave::BeforeAnswer,
        };
        let id = format!("{}-{}", self.prefix, self.requests.len());
        Request {
            id,
            user,
            plan,
            action: route.action,
            route,
            fate,
            leave,
            envoy: 0,
            worker: 0,
            stream: 0,
            phase: Phase::Paused,
            body_sent: 0,
            forwarded: 0,
            at_upstream: false,
            reached: false,
            done: false,
            fail_open: false,
            lost_with_worker: false,
        }
    }

    fn pick_route(&mut self) -> Route {
        let route = |method, path: &str, action, body| Route {
            method,
            path: path.to_string(),
            action,
            body,
            chunked: false,
        };
        match self.rng.below(20) {
            0..=5 => {
                let mut r = route(
                    "POST",
                    "/api/upload",
                    Some("upload"),
                    1 + self.rng.below(5000),
                );
                r.chunked = self.rng.chance(200);
                r
            }
            6..=10 => route("POST", "/api/teammate", Some("ai_analysis"), 20),
            11..=12 => route("GET", "/api/procedures/7", Some("procedure_view"), 0),
            13 => route("POST", "/api/export/pdf", Some("pdf_export"), 0),
            14 => route("POST", "/api/export/dxf", Some("dxf_export"), 0),
            15 => route("GET", "/api/v1/circuits", Some("api_call"), 0),
            16 => route("POST", "/api/team/invites", Some("team_invite"), 0),
            17 => route("DELETE", "/api/diagrams/d1", None, 0),
            _ => route("GET", "/api/usage", None, 0),
        }
    }

    fn plan_faults(&mut self, until: u64) {
        let n = self.rng.below(4);
        for _ in 0..n {
            let at = self.rng.below(until.max(1));
            match self.rng.below(4) {
                0 => {
                    let length = 100 + self.rng.below(900);
                    self.at(at, Event::Fault(FaultKind::RedisStalls));
                    self.at(at + length, Event::Fault(FaultKind::RedisResumes));
                }
                1 => {
                    let length = 50 + self.rng.below(500);
                    self.at(at, Event::Fault(FaultKind::WebdisDown));
                    self.at(at + length, Event::Fault(FaultKind::WebdisUp));
                }
                2 => {
                    let envoy = self.rng.below(self.envoys.len() as u64) as usize;
                    self.at(at, Event::Fault(FaultKind::EnvoyKilled(envoy)));
                }
                _ => self.at(at, Event::Fault(FaultKind::ClockJumps)),
            }
        }
    }

    /// Runs events until the queue is empty or time passes `until` (only what drains the
    /// world runs after that).
    fn drive(&mut self, until: u64) {
        let start = self.now_ms;
        while let Some(Reverse((at, _, event))) = self.events.pop() {
            self.now_ms = self.now_ms.max(at);
            if self.now_ms > start + until && matches!(event, Event::Tick(..)) {
                continue;
            }
            self.handle(event);
        }
    }

    /// Faults stop; every worker ticks until its queue is empty and nothing is in flight.
    fn drain(&mut self) {
        self.redis_stalled = false;
        self.run_stalled();
        for envoy in &mut self.envoys {
            for w in &mut envoy.workers {
                w.host.refuse_sends = false;
            }
        }
        for _ in 0..2000 {
            let busy = self
                .envoys
                .iter()
                .any(|e| e.workers.iter().any(|w| w.worker.queued_settlements() > 0));
            let calls = self.calls.iter().any(|c| c.reply.is_none());
            if !busy && !calls && self.events.is_empty() {
                return;
            }
            for envoy in 0..self.envoys.len() {
                for worker in 0..self.envoys[envoy].workers.len() {
                    self.tick(envoy, worker);
                }
            }
            let until = self.now_ms + 50;
            while let Some(Reverse((at, _, event))) = self.events.pop() {
                if at > until && matches!(event, Event::Tick(..)) {
                    continue;
                }
                self.now_ms = self.now_ms.max(at);
                self.handle(event);
            }
            self.now_ms += 50;
        }
        let queued: Vec<usize> = self
            .envoys
            .iter()
            .flat_map(|e| e.workers.iter().map(|w| w.worker.queued_settlements()))
            .collect();
        let unanswered = self.calls.iter().filter(|c| c.reply.is_none()).count();
        panic!(
            "the world did not drain: settlements queued {queued:?}, calls Redis never ran {unanswered}, events {}",
            self.events.len()
        );
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start(r) => self.start(r),
            Event::Body(r) => self.body(r),
            Event::UpstreamAnswers(r) => self.upstream_answers(r),
            Event::Leave(r) => self.leave(r),
            Event::Tick(envoy, worker) => {
                if worker < self.envoys[envoy].workers.len() {
                    self.tick(envoy, worker);
                    self.at(TICK_MS, Event::Tick(envoy, worker));
                }
            }
            Event::Execute(c) => self.execute(c),
            Event::Reply(c) => self.reply(c),
            Event::Fault(fault) => self.fault(fault),
        }
    }

    fn tick(&mut self, envoy: usize, worker: usize) {
        let now = self.clock(envoy, worker);
        let w = &mut self.envoys[envoy].workers[worker];
        let fail_open_before = w.host.count_of(Metric::FailOpen);
        w.worker.on_tick(now, &mut w.host);
        // (Waiting reservations whose call could not be sent go on fail-open.)
        if w.host.count_of(Metric::FailOpen) > fail_open_before {
            self.mark_resumed_fail_open(envoy, worker);
        }
        self.after_callback(envoy, worker);
    }

    /// The streams the worker's last callback resumed went on without a reservation.
    fn mark_resumed_fail_open(&mut self, envoy: usize, worker: usize) {
        let resumed: Vec<StreamId> = self.envoys[envoy].workers[worker]
            .host
            .actions
            .iter()
            .filter_map(|a| match a {
                StreamAction::Resume(s) => Some(*s),
                _ => None,
            })
            .collect();
        for s in resumed {
            if let Some(r) = self.request_of(s) {
                if self.requests[r].phase == Phase::Paused {
                    self.requests[r].fail_open = true;
                }
            }
        }
    }

    fn start(&mut self, r: usize) {
        let envoy = self.rng.below(self.envoys.len() as u64) as usize;
        let worker = self.rng.below(self.envoys[envoy].workers.len() as u64) as usize;
        let stream = self.next_stream;
        self.next_stream += 1;
        let req = &mut self.requests[r];
        req.envoy = envoy;
        req.worker = worker;
        req.stream = stream;
        let route = req.route.clone();
        let mut headers = vec![
            (":method".to_string(), route.method.as_bytes().to_vec()),
            (":path".to_string(), route.path.as_bytes().to_vec()),
            ("x-request-id".to_string(), req.id.as_bytes().to_vec()),
        ];
        if route.body > 0 && !route.chunked {
            headers.push(("content-length".into(), route.body.to_string().into_bytes()));
        }
        if route.body > 0 && route.chunked {
            headers.push(("transfer-encoding".into(), b"chunked".to_vec()));
        }
        if self.rng.chance(50) {
            let key = format!("k{}", self.rng.below(4));
            headers.push(("idempotency-key".into(), key.into_bytes()));
        }
        let claims = Claims {
            user: Some(req.user.as_bytes().to_vec()),
            plan: Some(req.plan.as_bytes().to_vec()),
            org: None,
            anchor: None,
        };
        let end_of_stream = route.body == 0;
        let now = self.clock(envoy, worker);
        let w = &mut self.envoys[envoy].workers[worker];
        let fail_open_before = w.host.count_of(Metric::FailOpen);
        let head = plan_limits_core::RequestHead::new(&headers, &claims);
        let flow = w
            .worker
            .on_request_headers(stream, head, end_of_stream, now, &mut w.host);
        // (Its reservation could not be sent: let through at once, fail-open.)
        self.requests[r].fail_open = w.host.count_of(Metric::FailOpen) > fail_open_before;
        self.requests[r].phase = match flow {
            Flow::Continue => Phase::Forwarding,
            Flow::Pause => Phase::Paused,
        };
        self.after_callback(envoy, worker);
        if self.requests[r].leave == Leave::AfterHead {
            let after = self.rng.below(40);
            self.at(after, Event::Leave(r));
        }
        self.go_on(r);
    }

    /// A request that goes on: its body follows, or (without one) the upstream gets it. Going
    /// on, its head reaches an upstream's connection (as Envoy's `upstream.local_address`
    /// tells), unless none can be reached.
    fn go_on(&mut self, r: usize) {
        let req = &mut self.requests[r];
        if req.phase == Phase::Forwarding && req.fate != Fate::Unreachable {
            req.reached = true;
        }
        let req = &self.requests[r];
        match req.phase {
            Phase::Forwarding | Phase::Held if req.body_sent < req.route.body => {
                let after = self.rng.below(5);
                self.at(after, Event::Body(r));
            }
            Phase::Forwarding if req.route.body == 0 => self.reach_upstream(r),
            _ => {}
        }
    }

    fn body(&mut self, r: usize) {
        let req = &self.requests[r];
        if !matches!(req.phase, Phase::Forwarding | Phase::Held) || req.body_sent >= req.route.body
        {
            return;
        }
        let left = req.route.body - req.body_sent;
        let piece = if self.rng.chance(500) {
            left
        } else {
            1 + self.rng.below(left)
        };
        let (envoy, worker, stream) = (req.envoy, req.worker, req.stream);
        let end = piece == left;
        let now = self.clock(envoy, worker);
        let w = &mut self.envoys[envoy].workers[worker];
        let flow = w
            .worker
            .on_request_body(stream, piece, end, now, &mut w.host);
        let req = &mut self.requests[r];
        req.body_sent += piece;
        if flow == BodyFlow::Continue && req.phase == Phase::Forwarding {
            req.forwarded += piece;
        }
        self.after_callback(envoy, worker);
        let req = &self.requests[r];
        if req.leave == Leave::MidBody && !end {
            self.at(0, Event::Leave(r));
            return;
        }
        if end && req.phase == Phase::Forwarding && req.forwarded == req.route.body {
            self.reach_upstream(r);
        } else if !end {
            self.go_on(r);
        }
    }

    /// The whole request reached the upstream: it works on it, and answers (or Envoy does).
    fn reach_upstream(&mut self, r: usize) {
        let req = &mut self.requests[r];
        if req.at_upstream || req.phase != Phase::Forwarding {
            return;
        }
        if req.fate == Fate::Unreachable {
            self.at(1, Event::UpstreamAnswers(r));
            return;
        }
        req.at_upstream = true;
        let leave = req.leave;
        let took = match req.fate {
            Fate::Timeout { .. } => ROUTE_TIMEOUT_MS,
            _ => 1 + self.rng.below(60),
        };
        if leave == Leave::BeforeAnswer {
            let after = self.rng.below(took);
            self.at(after, Event::Leave(r));
        }
        // The upstream's handler ends (or fails) on its own, whoever still waits.
        let req = &mut self.requests[r];
        req.done = match req.fate {
            Fate::Success => true,
            Fate::Timeout { does_it } | Fate::Reset { does_it } => does_it,
            Fate::Failure | Fate::Unreachable => false,
        };
        self.at(took, Event::UpstreamAnswers(r));
    }

    fn upstream_answers(&mut self, r: usize) {
        let req = &self.requests[r];
        if req.phase != Phase::Forwarding || req.lost_with_worker {
            return;
        }
        let (envoy, worker, stream) = (req.envoy, req.worker, req.stream);
        let (status, details) = match req.fate {
            Fate::Success => (200, None),
            Fate::Failure => (503, Some("via_upstream")),
            Fate::Timeout { .. } => (504, Some("response_timeout")),
            Fate::Reset { .. } => (
                503,
                Some("upstream_reset_before_response_started{connection_termination}"),
            ),
            Fate::Unreachable => (
                503,
                Some("upstream_reset_before_response_started{remote_connection_failure}"),
            ),
        };
        let freed = *self.rng.pick(&[
            "10",
            "0",
            "-5",
            "lots",
            "18446744073709551615",
            "9007199254740993",
        ]);
        let now = self.clock(envoy, worker);
        let w = &mut self.envoys[envoy].workers[worker];
        if w.worker.response_header_wanted(stream).is_some() {
            w.worker
                .on_response_header(stream, Some(freed.as_bytes()), &mut w.host);
        }
        let details = details.filter(|_| w.worker.wants_answer_details(stream, status));
        let flow = w
            .worker
            .on_response_headers(stream, status, details, now, &mut w.host);
        self.requests[r].phase = Phase::Answered;
        if flow == ResponseFlow::AwaitCommit {
            // Held until Redis counts it: its end comes when the worker lets it go.
            self.requests[r].phase = Phase::AwaitingCommit;
            self.awaited += 1;
            self.after_callback(envoy, worker);
            return;
        }
        self.after_callback(envoy, worker);
        self.end(r);
    }

    fn leave(&mut self, r: usize) {
        if matches!(self.requests[r].phase, Phase::Ended) {
            return;
        }
        self.end(r);
    }

    /// A success held for its commit is let go: Redis must have counted it (unless the
    /// worker gave up waiting, which it counts).
    fn response_goes_on(&mut self, r: usize, waited_out: bool) {
        if self.requests[r].phase != Phase::AwaitingCommit {
            return;
        }
        if !waited_out {
            let counted = check::counted_request_ids(self.admin, &self.prefix);
            if !counted.contains(&self.requests[r].id) {
                self.read_your_writes_broken.push(format!(
                    "{} went on before its count: {:?}",
                    self.requests[r].id, self.requests[r]
                ));
            }
        }
        self.requests[r].phase = Phase::Answered;
        self.at(0, Event::Leave(r));
    }

    /// The stream ends: completed, or its client gone.
    fn end(&mut self, r: usize) {
        let req = &mut self.requests[r];
        if req.phase == Phase::Ended || req.lost_with_worker {
            return;
        }
        req.phase = Phase::Ended;
        let (envoy, worker, stream, reached) = (req.envoy, req.worker, req.stream, req.reached);
        let now = self.clock(envoy, worker);
        let w = &mut self.envoys[envoy].workers[worker];
        let reached = reached || !w.worker.wants_upstream_reached(stream);
        w.worker.on_stream_end(stream, reached, now, &mut w.host);
        self.after_callback(envoy, worker);
    }

    /// Carries out what a worker's callback asked: calls go on the network, streams are
    /// answered, resumed or held.
    fn after_callback(&mut self, envoy: usize, worker: usize) {
        let generation = self.envoys[envoy].generation;
        let w = &mut self.envoys[envoy].workers[worker];
        let sent = std::mem::take(&mut w.host.sent);
        let actions = std::mem::take(&mut w.host.actions);
        let not_awaited = w.host.count_of(Metric::CommitsNotAwaited);
        let waited_out = not_awaited > w.not_awaited_seen;
        w.not_awaited_seen = not_awaited;
        for s in sent {
            self.calls.push(Call {
                envoy,
                worker,
                generation,
                token: s.token,
                command: s.command,
                sent_ms: self.now_ms,
                reply: None,
                lost: self.rng.chance(20),
                twice: self.rng.chance(20),
                refused: self.rng.chance(10),
            });
            let c = self.calls.len() - 1;
            // Mostly quick; sometimes later than the worker waits.
            let latency = if self.rng.chance(30) {
                self.timeout_ms + self.rng.below(300)
            } else {
                self.rng.below(4)
            };
            self.at(latency, Event::Execute(c));
        }
        for action in actions {
            let (stream, what) = match action {
                StreamAction::Respond(s, status) => (s, Some(status)),
                StreamAction::Resume(s) => (s, None),
                StreamAction::ResumeResponse(s) => {
                    if let Some(r) = self.request_of(s) {
                        self.response_goes_on(r, waited_out);
                    }
                    continue;
                }
                StreamAction::Hold(s) => {
                    if let Some(r) = self.request_of(s) {
                        if self.requests[r].phase != Phase::Ended {
                            self.requests[r].phase = Phase::Held;
                        }
                    }
                    continue;
                }
            };
            let Some(r) = self.request_of(stream) else {
                continue;
            };
            if matches!(
                self.requests[r].phase,
                Phase::Ended | Phase::Answered | Phase::AwaitingCommit
            ) {
                continue;
            }
            match what {
                Some(status) => {
                    // The filter's own answer passes the response path, then the stream ends.
                    self.requests[r].phase = Phase::Answered;
                    let now = self.clock(envoy, worker);
                    let w = &mut self.envoys[envoy].workers[worker];
                    w.worker
                        .on_response_headers(stream, status, None, now, &mut w.host);
                    self.at(0, Event::Leave(r));
                }
                None => {
                    if self.requests[r].phase == Phase::Paused {
                        self.requests[r].phase = Phase::Forwarding;
                    }
                    self.go_on(r);
                }
            }
        }
    }

    fn request_of(&self, stream: StreamId) -> Option<usize> {
        self.requests.iter().position(|q| q.stream == stream)
    }

    /// Redis runs the call (unless it is stalled: then when it resumes).
    fn execute(&mut self, c: usize) {
        if self.redis_stalled {
            self.stalled_calls.push(c);
        } else {
            self.run_call(c);
        }
        // The worker hears by its timeout at the latest.
        let waited = self.now_ms.saturating_sub(self.calls[c].sent_ms);
        let answer_in = if self.calls[c].reply.is_some() && waited < self.timeout_ms {
            self.rng.below(3)
        } else {
            self.timeout_ms.saturating_sub(waited)
        };
        self.at(answer_in, Event::Reply(c));
    }

    fn run_call(&mut self, c: usize) {
        let reply = if self.calls[c].refused {
            RedisReply::Error("LOADING Redis is loading the dataset in memory".into())
        } else {
            plan_limits_services::redis_exec::run(self.redis, &self.calls[c].command)
        };
        self.calls[c].reply = Some(reply);
    }

    fn run_stalled(&mut self) {
        for c in std::mem::take(&mut self.stalled_calls) {
            self.run_call(c);
        }
    }

    /// The worker that sent call `c` hears its answer, or of its failure.
    fn reply(&mut self, c: usize) {
        let call = &self.calls[c];
        let (envoy, worker) = (call.envoy, call.worker);
        if self.envoys[envoy].generation != call.generation {
            return; // its Envoy died
        }
        let in_time = self.now_ms.saturating_sub(call.sent_ms) <= self.timeout_ms;
        let reply = match (&call.reply, call.lost || !in_time) {
            (Some(reply), false) => Ok(reply.clone()),
            _ => Err(TransportError::Unknown("timeout".into())),
        };
        let (token, twice) = (call.token, call.twice);
        let now = self.clock(envoy, worker);
        let w = &mut self.envoys[envoy].workers[worker];
        let fail_open_before = w.host.count_of(Metric::FailOpen);
        w.worker.on_reply(token, reply.clone(), now, &mut w.host);
        if twice {
            w.worker.on_reply(token, reply, now, &mut w.host);
        }
        // Paused streams resumed by a failed reservation call went on fail-open.
        if w.host.count_of(Metric::FailOpen) > fail_open_before {
            self.mark_resumed_fail_open(envoy, worker);
        }
        self.after_callback(envoy, worker);
    }

    fn fault(&mut self, fault: FaultKind) {
        self.faults.push(format!("{fault:?}"));
        match fault {
            FaultKind::RedisStalls => self.redis_stalled = true,
            FaultKind::RedisResumes => {
                self.redis_stalled = false;
                self.run_stalled();
            }
            FaultKind::WebdisDown | FaultKind::WebdisUp => {
                let down = fault == FaultKind::WebdisDown;
                for envoy in &mut self.envoys {
                    for w in &mut envoy.workers {
                        w.host.refuse_sends = down;
                    }
                }
            }
            FaultKind::EnvoyKilled(e) => {
                for r in 0..self.requests.len() {
                    let req = &mut self.requests[r];
                    if req.envoy == e && req.stream != 0 && req.phase != Phase::Ended {
                        req.lost_with_worker = true;
                        req.phase = Phase::Ended;
                    }
                }
                let workers = self.envoys[e].workers.len();
                let generation = self.envoys[e].generation + 1;
                let fresh = self.new_envoy(workers, generation);
                for w in &self.envoys[e].workers {
                    self.killed.push(w.worker.name());
                }
                // Requests that ended on it but whose settlements it still held are lost too.
                self.mark_unsettled_of_killed(e);
                self.envoys[e] = fresh;
            }
            FaultKind::ClockJumps => self.now_ms += 200 + self.rng.below(800),
        }
    }

    /// Requests of a killed Envoy whose settlement it had not had applied: their counts may be
    /// lost (the check looks for their record: an expired reservation).
    fn mark_unsettled_of_killed(&mut self, envoy: usize) {
        let applied: HashSet<String> = check::counted_request_ids(self.admin, &self.prefix);
        for req in &mut self.requests {
            if req.envoy == envoy && req.stream != 0 && !applied.contains(&req.id) {
                req.lost_with_worker = true;
            }
        }
    }

    /// What the world ran, for a report: requests, faults, counters of its workers.
    pub fn summary(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        out.insert("requests".into(), self.requests.len() as u64);
        out.insert("calls".into(), self.calls.len() as u64);
        out.insert("faults".into(), self.faults.len() as u64);
        for envoy in &self.envoys {
            for w in &envoy.workers {
                for metric in [Metric::FailOpen, Metric::SettlementsDropped, Metric::Leased] {
                    *out.entry(metric.name().to_string()).or_default() += w.host.count_of(metric);
                }
            }
        }
        out
    }

    /// `plan-limits audit` of the seed's keys and events (its prefix), as an operator runs it
    /// five minutes after the run (the live workers' heartbeats in, the killed ones' not).
    pub fn audit(&mut self, admin_url: &str) -> plan_limits_tools::audit::Audit {
        for _ in 0..10 {
            self.now_ms += plan_limits_core::HEARTBEAT_MS;
            for envoy in 0..self.envoys.len() {
                for worker in 0..self.envoys[envoy].workers.len() {
                    self.tick(envoy, worker);
                }
            }
            self.drain();
        }
        let plans = plan_limits_core::Plans::from_json(self.plans.as_bytes())
            .expect("the simulation's plans");
        let mut redis = plan_limits_tools::operator::Redis::connect(admin_url).expect("Redis");
        let scope = plan_limits_tools::audit::Scope::default();
        plan_limits_tools::audit::run(&mut redis, &plans, &scope, self.now_ms)
            .unwrap_or_else(|e| panic!("audit: {e}"))
    }

    /// Whether the audit took exactly the killed workers that had written a record for dead.
    pub fn audit_found_the_killed(
        &mut self,
        audit: &plan_limits_tools::audit::Audit,
    ) -> Result<(), String> {
        let silent: HashSet<&str> = audit.silent.iter().map(|w| w.worker.as_str()).collect();
        for name in &silent {
            if !self.killed.iter().any(|k| k == name) {
                return Err(format!("a live worker taken for killed: {name}"));
            }
        }
        for name in &self.killed {
            let key = plan_limits_core::applied_batches(&self.prefix, name, None);
            let recorded: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query(self.admin)
                .unwrap_or(false);
            if recorded && !silent.contains(name.as_str()) {
                return Err(format!("a killed worker not found by the audit: {name}"));
            }
        }
        Ok(())
    }

    /// Checks the ledger invariant (see `check`).
    pub fn check(&mut self) -> Result<Report, Vec<Violation>> {
        let mut broken: Vec<Violation> = self
            .read_your_writes_broken
            .iter()
            .map(|b| Violation(format!("read-your-writes: {b}")))
            .collect();
        match check::check(
            self.admin,
            &self.prefix,
            &self.requests,
            self.crosses_a_period,
        ) {
            Ok(mut report) if broken.is_empty() => {
                report.awaited_commits = self.awaited;
                report.leased = self
                    .summary()
                    .get(Metric::Leased.name())
                    .copied()
                    .unwrap_or(0);
                Ok(report)
            }
            Ok(_) => Err(broken),
            Err(mut v) => {
                v.append(&mut broken);
                Err(v)
            }
        }
    }
}

/// Runs `seed` against a Redis: `redis` as the filter's user, `admin` for the checks, and
/// `admin_url` for `plan-limits audit`, which must find no drift. The report, or the
/// violations with the faults the seed ran.
pub fn run_seed(
    redis: &mut redis::Connection,
    admin: &mut redis::Connection,
    admin_url: &str,
    seed: u64,
    budget: Budget,
) -> Result<Report, (Vec<Violation>, Vec<String>)> {
    let mut world = World::new(seed, redis, admin);
    world.run(budget);
    let faults = world.faults.clone();
    let mut report = world.check().map_err(|v| (v, faults.clone()))?;
    let audit = world.audit(admin_url);
    world
        .audit_found_the_killed(&audit)
        .map_err(|e| (vec![Violation(e)], faults.clone()))?;
    report.silent_workers = audit.silent.len() as u64;
    if !audit.drift.is_empty() {
        let drift = audit
            .drift
            .iter()
            .map(|d| Violation(format!("audit: {d:?}")))
            .collect();
        return Err((drift, faults));
    }
    report.audited_losses = audit.lost.iter().map(|l| l.units).sum();
    Ok(report)
}
