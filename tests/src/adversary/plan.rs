//! The adversary's plan: which users send which requests, how each client behaves (when it
//! leaves, what it pipelines, which HTTP/2 streams it resets), what the upstream is told to
//! answer, which hostile headers ride along, and which faults strike when. It is a pure
//! function of the seed (and today's date, for history ranges), so a seed that finds a
//! violation finds it again; only the timings of real concurrency vary between runs.

use chrono::NaiveDate;

use super::rng::Rng;
use super::RESERVATION_TTL_MS;

/// The users of a run: two per plan, one with characters a Redis key must encode.
pub const USERS: [(&str, &str); 6] = [
    ("free-a", "free"),
    ("free:{b}", "free"),
    ("pro-a", "professional"),
    ("pro b", "professional"),
    ("ent-a", "enterprise"),
    ("ent-b", "enterprise"),
];

/// How a run is sized.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// HTTP requests (HTTP/2 streams included) the clients send.
    pub requests: usize,
    /// Faults injected while they do.
    pub faults: usize,
    /// Client threads.
    pub clients: usize,
    /// The kinds of fault the run may inject.
    pub fault_kinds: FaultKinds,
}

/// Where a request goes: a metered route, a release route, the read side, or paths around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Upload,
    Analysis,
    ProcedureView,
    PdfExport,
    DxfExport,
    ApiCall,
    TeamInvite,
    DeleteDiagram,
    RemoveMember,
    Usage,
    History,
    Unmetered,
    Guarded,
}

/// Whose credentials a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A valid token of `USERS[i]`.
    Token(usize),
    /// No token at all.
    Missing,
    /// A bearer token that is not one.
    Garbage,
}

impl Credential {
    /// Who the request claims to be, for the trace.
    pub fn describe(self) -> String {
        match self {
            Credential::Token(user) => {
                let (name, plan) = USERS.get(user).copied().unwrap_or(("?", "?"));
                format!("{name:?} ({plan})")
            }
            Credential::Missing => "no token".into(),
            Credential::Garbage => "a garbage token".into(),
        }
    }
}

/// What the demo upstream is told to answer (its test headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAnswer {
    Ok,
    Status(u16),
    /// Answers after this many ms, within the route timeout (2 s).
    Slow(u64),
    /// Answers after this many ms, past the route timeout: Envoy gives up first.
    PastTimeout(u64),
    /// Closes the connection without doing anything.
    ResetBefore,
    /// Does the work, then closes the connection without answering.
    ResetAfter,
    /// Does the work and answers 200 with a body that never ends.
    HangBody,
}

impl UpstreamAnswer {
    /// The longest the upstream may still be busy with it after it arrived.
    pub fn busy_ms(self) -> u64 {
        match self {
            UpstreamAnswer::Slow(ms) | UpstreamAnswer::PastTimeout(ms) => ms,
            UpstreamAnswer::HangBody => HANG_MS,
            _ => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            UpstreamAnswer::Ok => "upstream 200",
            UpstreamAnswer::Status(s) if (200..300).contains(&s) => "upstream other 2xx",
            UpstreamAnswer::Status(s) if (400..500).contains(&s) => "upstream 4xx",
            UpstreamAnswer::Status(_) => "upstream 5xx",
            UpstreamAnswer::Slow(_) => "upstream slow",
            UpstreamAnswer::PastTimeout(_) => "upstream past the route timeout",
            UpstreamAnswer::ResetBefore => "upstream reset before the work",
            UpstreamAnswer::ResetAfter => "upstream reset after the work",
            UpstreamAnswer::HangBody => "upstream 2xx whose body never ends",
        }
    }
}

/// How long a hanging body hangs (the demo upstream's `x-demo-hang-ms`).
pub const HANG_MS: u64 = 2_500;

/// One HTTP request as the plan wants it sent (HTTP/1.1 or as an HTTP/2 stream).
#[derive(Debug, Clone)]
pub struct PlannedRequest {
    pub credential: Credential,
    pub target: Target,
    pub method: String,
    pub path: String,
    /// Every header but `authorization` (added when sent, from `credential`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Sent `Transfer-Encoding: chunked` (HTTP/1.1) instead of with a Content-Length.
    pub chunked: bool,
    /// Sent with `Expect: 100-continue`, its body only after a `100 Continue`.
    pub expect_continue: bool,
    pub answer: UpstreamAnswer,
    /// The hostile header groups it carries (for the coverage report).
    pub hostile: Vec<&'static str>,
}

/// When an HTTP/1.1 client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Reads the whole answer.
    Never,
    /// Sends only the first `bytes` of its head, waits `wait_ms`, leaves.
    MidHead { bytes: usize, wait_ms: u64 },
    /// Sends its head (a body announced), none of the body, waits `wait_ms`, leaves.
    AfterHeaders { wait_ms: u64 },
    /// Sends its head and `sent` bytes of the body, waits `wait_ms`, leaves.
    MidBody { sent: usize, wait_ms: u64 },
    /// Sends everything, leaves unless answered within `wait_ms`.
    AfterBody { wait_ms: u64 },
    /// Sends everything, reads `bytes` of the answer, leaves.
    MidResponse { bytes: usize },
    /// Sends its body in `pieces` pieces `interval_ms` apart (longer, in all, than a
    /// reservation lives unless extended), then reads the answer.
    Trickle { pieces: usize, interval_ms: u64 },
}

impl Departure {
    pub fn name(self) -> &'static str {
        match self {
            Departure::Never => "h1 reads the answer",
            Departure::MidHead { .. } => "h1 leaves mid-head",
            Departure::AfterHeaders { .. } => "h1 leaves after the headers",
            Departure::MidBody { .. } => "h1 leaves mid-body",
            Departure::AfterBody { .. } => "h1 leaves after the body, before the answer",
            Departure::MidResponse { .. } => "h1 leaves mid-response",
            Departure::Trickle { .. } => "h1 trickles its body past the reservation's expiry",
        }
    }
}

/// What an HTTP/2 client does with one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFate {
    /// Reads the whole answer.
    Complete,
    /// HEADERS (a body announced), then RST_STREAM.
    ResetAfterHeaders,
    /// HEADERS, part of the body, RST_STREAM.
    ResetMidBody,
    /// The whole request, then RST_STREAM after `wait_ms` unless answered.
    ResetAfterBody { wait_ms: u64 },
    /// RST_STREAM once the answer's HEADERS arrive.
    ResetAfterResponseHeaders,
}

impl StreamFate {
    pub fn name(self) -> &'static str {
        match self {
            StreamFate::Complete => "h2 stream read to its end",
            StreamFate::ResetAfterHeaders => "h2 stream reset after its headers",
            StreamFate::ResetMidBody => "h2 stream reset mid-body",
            StreamFate::ResetAfterBody { .. } => "h2 stream reset after its body",
            StreamFate::ResetAfterResponseHeaders => "h2 stream reset after the answer's headers",
        }
    }
}

/// One thing a client does.
#[derive(Debug, Clone)]
pub enum Step {
    /// One HTTP/1.1 request on its own connection.
    Single {
        request: PlannedRequest,
        departure: Departure,
    },
    /// Several HTTP/1.1 requests written at once on one connection; the client reads
    /// `read` answers (all when `None`) and leaves.
    Pipeline {
        requests: Vec<PlannedRequest>,
        read: Option<usize>,
    },
    /// An HTTP/2 connection (prior knowledge) with these streams; the client drops the
    /// connection after `drop_after_ms` if given.
    H2 {
        streams: Vec<(PlannedRequest, StreamFate)>,
        drop_after_ms: Option<u64>,
    },
    /// Requests of one user to one route sent at once, each on its own connection (racing
    /// for the last units).
    Burst { requests: Vec<PlannedRequest> },
    /// Read-side requests pipelined on a few connections at once.
    ReadFlood {
        connections: Vec<Vec<PlannedRequest>>,
    },
}

impl Step {
    /// HTTP requests it sends.
    pub fn requests(&self) -> usize {
        match self {
            Step::Single { .. } => 1,
            Step::Pipeline { requests, .. } => requests.len(),
            Step::H2 { streams, .. } => streams.len(),
            Step::Burst { requests } => requests.len(),
            Step::ReadFlood { connections } => connections.iter().map(Vec::len).sum(),
        }
    }

    /// Its requests, whatever the transport.
    pub fn planned(&self) -> Vec<&PlannedRequest> {
        match self {
            Step::Single { request, .. } => vec![request],
            Step::Pipeline { requests, .. } => requests.iter().collect(),
            Step::H2 { streams, .. } => streams.iter().map(|(r, _)| r).collect(),
            Step::Burst { requests } => requests.iter().collect(),
            Step::ReadFlood { connections } => connections.iter().flatten().collect(),
        }
    }

    /// How the client behaves, for the coverage report.
    pub fn behaviours(&self) -> Vec<&'static str> {
        match self {
            Step::Single { departure, request } => {
                let mut out = vec![departure.name()];
                if request.expect_continue {
                    out.push("h1 Expect: 100-continue");
                }
                if request.chunked {
                    out.push("h1 chunked body");
                }
                out
            }
            Step::Pipeline { read: None, .. } => vec!["h1 pipelined, every answer read"],
            Step::Pipeline { read: Some(_), .. } => vec!["h1 pipelined, left after some answers"],
            Step::H2 {
                streams,
                drop_after_ms,
            } => {
                let mut out: Vec<&'static str> = streams.iter().map(|(_, f)| f.name()).collect();
                if drop_after_ms.is_some() {
                    out.push("h2 connection dropped");
                }
                out
            }
            Step::Burst { .. } => vec!["h1 burst of one user's requests at once"],
            Step::ReadFlood { .. } => vec!["read-side flood"],
        }
    }
}

/// A fault the adversary injects into the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Redis stopped (SIGSTOP) for a while, then continued.
    RedisPause,
    /// Redis killed (SIGKILL) and started again from its append-only file.
    RedisRestart,
    /// webdis killed and started again on its port.
    WebdisRestart,
    /// Envoy killed (SIGKILL) and started again on the same ports.
    EnvoyKill,
    /// The upstream stopped past the route timeout, then continued (its work finishes late).
    UpstreamPause,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::RedisPause,
        FaultKind::RedisRestart,
        FaultKind::WebdisRestart,
        FaultKind::EnvoyKill,
        FaultKind::UpstreamPause,
    ];

    /// Its name in `ADVERSARY_FAULT_KINDS`.
    pub fn key(self) -> &'static str {
        match self {
            FaultKind::RedisPause => "redis-pause",
            FaultKind::RedisRestart => "redis-restart",
            FaultKind::WebdisRestart => "webdis-restart",
            FaultKind::EnvoyKill => "envoy-kill",
            FaultKind::UpstreamPause => "upstream-pause",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RedisPause => "Redis paused (SIGSTOP/SIGCONT)",
            FaultKind::RedisRestart => "Redis killed and restarted (append-only file)",
            FaultKind::WebdisRestart => "webdis killed and restarted",
            FaultKind::EnvoyKill => "Envoy kill -9 and restarted",
            FaultKind::UpstreamPause => "upstream paused past the route timeout",
        }
    }
}

/// A set of fault kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultKinds(u8);

impl FaultKinds {
    pub const ALL: FaultKinds = FaultKinds((1 << FaultKind::ALL.len()) - 1);
    /// Every kind but Envoy's kill (`redis-pause,redis-restart,webdis-restart,upstream-pause`).
    pub const WITHOUT_ENVOY_KILL: FaultKinds = FaultKinds(Self::ALL.0 & !(1 << 3));

    fn bit(kind: FaultKind) -> u8 {
        let index = FaultKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        1 << index
    }

    pub fn contains(self, kind: FaultKind) -> bool {
        self.0 & Self::bit(kind) != 0
    }

    pub fn list(self) -> Vec<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .collect()
    }

    /// `redis-pause,envoy-kill` (the kinds' keys, comma-separated; `all` for every kind).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut set = 0;
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if word == "all" {
                return Ok(Self::ALL);
            }
            let kind = FaultKind::ALL
                .into_iter()
                .find(|k| k.key() == word)
                .ok_or_else(|| {
                    let keys: Vec<&str> = FaultKind::ALL.iter().map(|k| k.key()).collect();
                    format!("unknown fault kind {word:?} (known: {})", keys.join(", "))
                })?;
            set |= Self::bit(kind);
        }
        Ok(Self(set))
    }

    /// As `parse` reads it.
    pub fn keys(self) -> String {
        if self == Self::ALL {
            return "all".into();
        }
        let keys: Vec<&str> = self.list().iter().map(|k| k.key()).collect();
        keys.join(",")
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub kind: FaultKind,
    /// Strikes once the clients have begun this many steps.
    pub at_step: usize,
    /// How long the fault lasts (paused, or down before the restart).
    pub duration_ms: u64,
}

/// The whole run, decided by the seed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    /// Each client's steps, in order.
    pub clients: Vec<Vec<Step>>,
    pub faults: Vec<Fault>,
}

impl Plan {
    pub fn generate(seed: u64, budget: Budget, today: NaiveDate) -> Self {
        let mut rng = Rng::new(seed);
        let mut faults_rng = rng.fork(1);
        let mut steps_rng = rng.fork(2);
        let mut builder = StepBuilder {
            rng: &mut steps_rng,
            today,
            seed,
            next_request: 0,
        };
        let clients = budget.clients.max(1);
        let mut per_client: Vec<Vec<Step>> = vec![Vec::new(); clients];
        let mut sent = 0;
        while sent < budget.requests {
            let step = builder.step(budget.requests - sent);
            sent += step.requests();
            let client = builder.rng.below(clients);
            per_client[client].push(step);
        }
        let steps: usize = per_client.iter().map(Vec::len).sum();
        Self {
            seed,
            clients: per_client,
            faults: plan_faults(&mut faults_rng, budget, steps),
        }
    }

    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.clients.iter().flatten()
    }

    pub fn requests(&self) -> usize {
        self.steps().map(Step::requests).sum()
    }

    /// The longest the upstream may stay busy with one of its requests.
    pub fn longest_upstream_ms(&self) -> u64 {
        self.steps()
            .flat_map(|s| s.planned())
            .map(|r| r.answer.busy_ms())
            .max()
            .unwrap_or(0)
    }
}

/// The budget's faults spread over the run, their kinds cycling through a seeded order of the
/// kinds it allows (so several faults in one run are of different kinds).
fn plan_faults(rng: &mut Rng, budget: Budget, steps: usize) -> Vec<Fault> {
    let mut kinds = budget.fault_kinds.list();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i + 1));
    }
    let count = if kinds.is_empty() { 0 } else { budget.faults };
    (0..count)
        .map(|i| {
            let kind = kinds[i % kinds.len()];
            let slot = steps / (count + 1);
            let jitter = rng.range(0, (slot / 2).max(1) as u64) as usize;
            let duration_ms = match kind {
                FaultKind::RedisPause => rng.range(600, 3_000),
                FaultKind::RedisRestart => rng.range(0, 1_000),
                FaultKind::WebdisRestart => rng.range(100, 1_500),
                FaultKind::EnvoyKill => rng.range(0, 500),
                FaultKind::UpstreamPause => rng.range(2_100, 3_000),
            };
            Fault {
                kind,
                at_step: slot * (i + 1) + jitter,
                duration_ms,
            }
        })
        .collect()
}

/// Draws steps and their requests.
struct StepBuilder<'a> {
    rng: &'a mut Rng,
    today: NaiveDate,
    seed: u64,
    next_request: u64,
}

/// Hostile header groups: the name in the report, and how likely each is when a request
/// carries any.
const HOSTILE_GROUPS: [&str; 12] = [
    "x-envoy timeouts",
    "x-envoy retries",
    "x-envoy internal and forwarding",
    "x-envoy other",
    "hop-by-hop and Connection",
    "TE",
    "Upgrade",
    "method override",
    "identity headers of another user",
    "client x-request-id",
    "header with an underscore",
    "Keep-Alive and Proxy-Connection",
];

impl StepBuilder<'_> {
    fn step(&mut self, left: usize) -> Step {
        #[derive(Clone, Copy)]
        enum Kind {
            Single,
            Pipeline,
            H2,
            Burst,
            Flood,
        }
        let kind = *self.rng.weighted(&[
            (60, Kind::Single),
            (12, Kind::Pipeline),
            (20, Kind::H2),
            (3, Kind::Burst),
            (4, Kind::Flood),
        ]);
        match kind {
            Kind::Single => self.single(),
            Kind::Pipeline if left >= 2 => self.pipeline(left),
            Kind::H2 => self.h2(left),
            Kind::Burst if left >= 4 => self.burst(left),
            Kind::Flood if left >= 6 => self.flood(left),
            _ => self.single(),
        }
    }

    fn single(&mut self) -> Step {
        let mut request = self.request();
        let departure = self.departure(&mut request);
        Step::Single { request, departure }
    }

    /// When the client leaves, and the upstream answer that makes it meaningful (an answer
    /// slow enough to leave before).
    fn departure(&mut self, request: &mut PlannedRequest) -> Departure {
        #[derive(Clone, Copy)]
        enum Kind {
            Never,
            MidHead,
            AfterHeaders,
            MidBody,
            AfterBody,
            MidResponse,
            Trickle,
        }
        let kind = *self.rng.weighted(&[
            (48, Kind::Never),
            (4, Kind::MidHead),
            (8, Kind::AfterHeaders),
            (8, Kind::MidBody),
            (22, Kind::AfterBody),
            (10, Kind::MidResponse),
            (2, Kind::Trickle),
        ]);
        let wait_ms = self.rng.range(20, 400);
        match kind {
            Kind::Never => Departure::Never,
            Kind::MidHead => Departure::MidHead {
                bytes: self.rng.range(5, 120) as usize,
                wait_ms,
            },
            Kind::AfterHeaders | Kind::MidBody => {
                if request.body.len() < 2 {
                    // A body to leave in: announced, never (or partly) sent.
                    request.body = vec![b'x'; self.rng.range(200, 40_000) as usize];
                }
                if matches!(kind, Kind::MidBody) {
                    Departure::MidBody {
                        sent: self.rng.range(1, request.body.len() as u64) as usize,
                        wait_ms,
                    }
                } else {
                    Departure::AfterHeaders { wait_ms }
                }
            }
            Kind::AfterBody => {
                if request.answer == UpstreamAnswer::Ok {
                    request.set_answer(UpstreamAnswer::Slow(self.rng.range(300, 1_500)));
                }
                let busy = request.answer.busy_ms().max(100);
                Departure::AfterBody {
                    wait_ms: self.rng.range(10, busy),
                }
            }
            Kind::MidResponse => Departure::MidResponse {
                bytes: self.rng.range(1, 200) as usize,
            },
            Kind::Trickle => {
                let pieces = self.rng.range(6, 10) as usize;
                if request.body.len() < pieces {
                    request.body = vec![b't'; self.rng.range(pieces as u64, 4_000) as usize];
                }
                request.chunked = false;
                request.expect_continue = false;
                Departure::Trickle {
                    pieces,
                    interval_ms: RESERVATION_TTL_MS / 5,
                }
            }
        }
    }

    fn pipeline(&mut self, left: usize) -> Step {
        let n = self.rng.range(2, 6).min(left as u64) as usize;
        let requests: Vec<PlannedRequest> = (0..n).map(|_| self.request()).collect();
        let read = if self.rng.chance(30) {
            Some(self.rng.below(n))
        } else {
            None
        };
        Step::Pipeline { requests, read }
    }

    fn h2(&mut self, left: usize) -> Step {
        let n = self.rng.range(1, 5).min(left as u64) as usize;
        let streams = (0..n)
            .map(|_| {
                let mut request = self.request();
                request.chunked = false;
                request.expect_continue = false;
                let fate = self.stream_fate(&mut request);
                (request, fate)
            })
            .collect();
        let drop_after_ms = if self.rng.chance(10) {
            Some(self.rng.range(10, 800))
        } else {
            None
        };
        Step::H2 {
            streams,
            drop_after_ms,
        }
    }

    fn stream_fate(&mut self, request: &mut PlannedRequest) -> StreamFate {
        #[derive(Clone, Copy)]
        enum Kind {
            Complete,
            AfterHeaders,
            MidBody,
            AfterBody,
            AfterResponseHeaders,
        }
        let kind = *self.rng.weighted(&[
            (45, Kind::Complete),
            (10, Kind::AfterHeaders),
            (10, Kind::MidBody),
            (25, Kind::AfterBody),
            (10, Kind::AfterResponseHeaders),
        ]);
        match kind {
            Kind::Complete => StreamFate::Complete,
            Kind::AfterHeaders | Kind::MidBody => {
                if request.body.len() < 2 {
                    request.body = vec![b'y'; self.rng.range(100, 16_000) as usize];
                }
                if matches!(kind, Kind::MidBody) {
                    StreamFate::ResetMidBody
                } else {
                    StreamFate::ResetAfterHeaders
                }
            }
            Kind::AfterBody => {
                if request.answer == UpstreamAnswer::Ok {
                    request.set_answer(UpstreamAnswer::Slow(self.rng.range(300, 1_500)));
                }
                let busy = request.answer.busy_ms().max(100);
                StreamFate::ResetAfterBody {
                    wait_ms: self.rng.range(10, busy),
                }
            }
            Kind::AfterResponseHeaders => StreamFate::ResetAfterResponseHeaders,
        }
    }

    fn burst(&mut self, left: usize) -> Step {
        let n = self.rng.range(4, 11).min(left as u64) as usize;
        let first = self.request();
        let requests = (0..n)
            .map(|_| {
                let mut request = self.request_to(first.target, first.credential, true);
                request.method.clone_from(&first.method);
                request.path.clone_from(&first.path);
                request
            })
            .collect();
        Step::Burst { requests }
    }

    fn flood(&mut self, left: usize) -> Step {
        let total = self.rng.range(6, 25).min(left as u64) as usize;
        let connections = self.rng.range(1, 4) as usize;
        let user = self.rng.below(USERS.len());
        let mut out: Vec<Vec<PlannedRequest>> = vec![Vec::new(); connections];
        for i in 0..total {
            let target = if self.rng.chance(50) {
                Target::Usage
            } else {
                Target::History
            };
            let request = self.request_to(target, Credential::Token(user), false);
            out[i % connections].push(request);
        }
        out.retain(|c| !c.is_empty());
        Step::ReadFlood { connections: out }
    }

    fn request(&mut self) -> PlannedRequest {
        let target = *self.rng.weighted(&[
            (20, Target::Upload),
            (18, Target::Analysis),
            (8, Target::ProcedureView),
            (6, Target::PdfExport),
            (6, Target::DxfExport),
            (8, Target::ApiCall),
            (5, Target::TeamInvite),
            (7, Target::DeleteDiagram),
            (3, Target::RemoveMember),
            (3, Target::Usage),
            (3, Target::History),
            (4, Target::Unmetered),
            (2, Target::Guarded),
        ]);
        let credential = *self.rng.weighted(&[
            (92, Credential::Token(usize::MAX)),
            (4, Credential::Missing),
            (4, Credential::Garbage),
        ]);
        let credential = match credential {
            Credential::Token(_) => Credential::Token(self.user_for(target)),
            other => other,
        };
        self.request_to(target, credential, true)
    }

    /// Free users more often: their limits are the ones a run reaches.
    fn user_for(&mut self, target: Target) -> usize {
        let by_plan = match target {
            Target::ApiCall => &[(1, 0), (1, 1), (2, 2), (2, 3), (6, 4), (6, 5)],
            Target::DxfExport | Target::TeamInvite => {
                &[(1, 0), (1, 1), (5, 2), (5, 3), (3, 4), (3, 5)]
            }
            _ => &[(5, 0), (5, 1), (4, 2), (4, 3), (2, 4), (2, 5)],
        };
        *self.rng.weighted(by_plan)
    }

    /// A request to `target` with `credential`: its method, path, body, the upstream's answer,
    /// and (if `hostile`) now and then hostile headers.
    fn request_to(
        &mut self,
        target: Target,
        credential: Credential,
        hostile: bool,
    ) -> PlannedRequest {
        let (method, path) = self.method_and_path(target);
        let mut request = PlannedRequest {
            credential,
            target,
            method,
            path,
            headers: Vec::new(),
            body: self.body(target),
            chunked: false,
            expect_continue: false,
            answer: UpstreamAnswer::Ok,
            hostile: Vec::new(),
        };
        if !request.body.is_empty() {
            request.chunked = self.rng.chance(10);
            request.expect_continue = !request.chunked && self.rng.chance(8);
        }
        self.next_request += 1;
        if target == Target::Analysis && self.rng.chance(40) {
            let kind = *self
                .rng
                .pick(&["chat", "vision", "photo", "explain", "nope"]);
            request.header("x-analysis-kind", kind);
        }
        if is_metered(target) && self.rng.chance(20) {
            let key = format!("idem-{}", self.rng.below(3));
            request.header("idempotency-key", &key);
        }
        if target == Target::DeleteDiagram && self.rng.chance(40) {
            let freed = *self.rng.pick(&[
                "-5",
                "lots",
                "18446744073709551615",
                "9223372036854775808",
                "9007199254740993",
                "1e3",
                "",
                "100",
                "0",
            ]);
            request.header("x-demo-freed-bytes", freed);
        }
        if target == Target::RemoveMember && self.rng.chance(40) {
            let removed = *self
                .rng
                .pick(&["-1", "2", "many", "18446744073709551615", "1"]);
            request.header("x-demo-removed-members", removed);
        }
        let answer = self.answer();
        request.set_answer(answer);
        if hostile && self.rng.chance(30) {
            for _ in 0..self.rng.range(1, 4) {
                let group = *self.rng.pick(&HOSTILE_GROUPS);
                self.add_hostile(&mut request, group);
            }
        }
        request
    }

    fn method_and_path(&mut self, target: Target) -> (String, String) {
        let n = self.rng.range(1, 40);
        let (method, path) = match target {
            Target::Upload => (
                "POST",
                self.spelling(&[
                    "/api/upload",
                    "/API/upload",
                    "/api/upload;x=1",
                    "/api//upload",
                    "/api/./upload",
                    "/api/upload?x=1",
                    "/api/Upload.",
                ]),
            ),
            Target::Analysis => (
                "POST",
                self.spelling(&["/api/teammate", "/api/TEAMMATE", "/api/teammate?kind=chat"]),
            ),
            Target::ProcedureView => ("GET", format!("/api/procedures/{n}")),
            Target::PdfExport => ("POST", "/api/export/pdf".into()),
            Target::DxfExport => ("POST", "/api/export/dxf".into()),
            Target::ApiCall => (
                *self.rng.pick(&["GET", "POST", "DELETE"]),
                format!("/api/v1/items/{n}"),
            ),
            Target::TeamInvite => ("POST", "/api/team/invites".into()),
            Target::DeleteDiagram => ("DELETE", format!("/api/diagrams/d{n}")),
            Target::RemoveMember => ("DELETE", format!("/api/team/members/m{}", n % 8)),
            Target::Usage => ("GET", "/api/usage".into()),
            Target::History => ("GET", self.history_path()),
            Target::Unmetered => (
                "GET",
                self.spelling(&["/api/upload", "/health", "/health/ready"]),
            ),
            Target::Guarded => (
                *self.rng.pick(&["GET", "POST"]),
                self.spelling(&["/api/anything", "/api/uploads", "/api/teammate/chat"]),
            ),
        };
        (method.to_string(), path)
    }

    /// The canonical spelling mostly, another now and then.
    fn spelling(&mut self, spellings: &[&str]) -> String {
        if self.rng.chance(80) {
            spellings[0].to_string()
        } else {
            self.rng.pick(spellings).to_string()
        }
    }

    /// A history range: the longest allowed (90 days), a short one, one too long, or a
    /// malformed one.
    fn history_path(&mut self) -> String {
        let day = |days_back: u64| self.today - chrono::Days::new(days_back);
        let (from, to) = match self.rng.below(5) {
            0 => (day(89), day(0)),
            1 => (day(self.rng.range(0, 10)), day(0)),
            2 => (day(120), day(0)),
            3 => (day(0), day(5)),
            _ => return "/api/usage/history?from=yesterday&to=%FF".into(),
        };
        let action = if self.rng.chance(30) {
            "&action=upload"
        } else {
            ""
        };
        format!("/api/usage/history?from={from}&to={to}{action}")
    }

    fn body(&mut self, target: Target) -> Vec<u8> {
        match target {
            Target::Upload => {
                let size = if self.rng.chance(15) {
                    self.rng.range(16_000, 60_000)
                } else {
                    self.rng.range(1, 2_000)
                };
                vec![b'd'; size as usize]
            }
            Target::Analysis => br#"{"question":"is this diagram sound?"}"#.to_vec(),
            Target::PdfExport | Target::DxfExport | Target::TeamInvite => b"{}".to_vec(),
            Target::ApiCall if self.rng.chance(50) => b"{\"q\":1}".to_vec(),
            _ => Vec::new(),
        }
    }

    fn answer(&mut self) -> UpstreamAnswer {
        #[derive(Clone, Copy)]
        enum Kind {
            Ok,
            Other2xx,
            Client4xx,
            Server5xx,
            Slow,
            PastTimeout,
            ResetBefore,
            ResetAfter,
            HangBody,
        }
        let kind = *self.rng.weighted(&[
            (52, Kind::Ok),
            (5, Kind::Other2xx),
            (8, Kind::Client4xx),
            (8, Kind::Server5xx),
            (10, Kind::Slow),
            (5, Kind::PastTimeout),
            (4, Kind::ResetBefore),
            (4, Kind::ResetAfter),
            (4, Kind::HangBody),
        ]);
        match kind {
            Kind::Ok => UpstreamAnswer::Ok,
            Kind::Other2xx => UpstreamAnswer::Status(*self.rng.pick(&[201, 202, 204, 299])),
            Kind::Client4xx => UpstreamAnswer::Status(*self.rng.pick(&[400, 403, 404, 409, 429])),
            Kind::Server5xx => UpstreamAnswer::Status(*self.rng.pick(&[500, 502, 503, 504])),
            Kind::Slow => UpstreamAnswer::Slow(self.rng.range(100, 1_500)),
            Kind::PastTimeout => UpstreamAnswer::PastTimeout(self.rng.range(2_100, 2_900)),
            Kind::ResetBefore => UpstreamAnswer::ResetBefore,
            Kind::ResetAfter => UpstreamAnswer::ResetAfter,
            Kind::HangBody => UpstreamAnswer::HangBody,
        }
    }

    fn add_hostile(&mut self, request: &mut PlannedRequest, group: &'static str) {
        if request.hostile.contains(&group) {
            return;
        }
        request.hostile.push(group);
        let other_user = USERS[self.rng.below(USERS.len())].0;
        let pairs: Vec<(&str, String)> = match group {
            "x-envoy timeouts" => vec![
                (
                    "x-envoy-upstream-rq-timeout-ms",
                    self.rng.pick(&["1", "50"]).to_string(),
                ),
                ("x-envoy-upstream-rq-per-try-timeout-ms", "5".into()),
                ("x-envoy-expected-rq-timeout-ms", "1".into()),
            ],
            "x-envoy retries" => vec![
                (
                    "x-envoy-retry-on",
                    "5xx,reset,gateway-error,retriable-status-codes".into(),
                ),
                ("x-envoy-retriable-status-codes", "200,201,204,503".into()),
                ("x-envoy-max-retries", "5".into()),
                ("x-demo-fail-times", "1".into()),
            ],
            "x-envoy internal and forwarding" => vec![
                ("x-envoy-internal", "true".into()),
                ("x-forwarded-for", "10.0.0.7, 127.0.0.1".into()),
                ("forwarded", "for=10.0.0.7;proto=https".into()),
                ("x-envoy-original-path", "/api/usage".into()),
            ],
            "x-envoy other" => vec![
                ("x-envoy-force-trace", "true".into()),
                ("x-envoy-hedge-on-per-try-timeout", "true".into()),
                ("x-envoy-downstream-service-cluster", "internal".into()),
                ("x-envoy-max-retries", "3".into()),
            ],
            "hop-by-hop and Connection" => vec![(
                "connection",
                self.rng
                    .pick(&[
                        "keep-alive, x-request-id",
                        "keep-alive, idempotency-key",
                        "keep-alive, x-demo-status",
                        "keep-alive, content-length",
                        "keep-alive, authorization",
                    ])
                    .to_string(),
            )],
            "TE" => vec![(
                "te",
                self.rng.pick(&["trailers", "gzip, chunked"]).to_string(),
            )],
            "Upgrade" => vec![
                ("connection", "upgrade".into()),
                ("upgrade", self.rng.pick(&["websocket", "h2c"]).to_string()),
            ],
            "method override" => {
                let method = self.rng.pick(&["POST", "GET", "DELETE", "PUT"]).to_string();
                let name = *self.rng.pick(&[
                    "x-http-method-override",
                    "x-http-method",
                    "x-method-override",
                ]);
                vec![(name, method)]
            }
            "identity headers of another user" => vec![
                ("x-user-id", other_user.into()),
                ("x-user-plan", "enterprise".into()),
                ("x-org-id", "someone-else".into()),
            ],
            "client x-request-id" => {
                let id = if self.rng.chance(30) {
                    format!("adv-{}-same", self.seed)
                } else {
                    format!("adv-{}-{}", self.seed, self.next_request)
                };
                vec![("x-request-id", id)]
            }
            "header with an underscore" => vec![("x_demo_status", "200".into())],
            _ => vec![
                ("keep-alive", "timeout=1, max=1".into()),
                ("proxy-connection", "keep-alive".into()),
            ],
        };
        for (name, value) in pairs {
            request.header(name, &value);
        }
    }
}

/// Whether requests to `target` are metered (counted on success).
pub fn is_metered(target: Target) -> bool {
    matches!(
        target,
        Target::Upload
            | Target::Analysis
            | Target::ProcedureView
            | Target::PdfExport
            | Target::DxfExport
            | Target::ApiCall
            | Target::TeamInvite
    )
}

impl PlannedRequest {
    pub fn header(&mut self, name: &str, value: &str) {
        self.headers.push((name.to_string(), value.to_string()));
    }

    /// Tells the upstream how to answer (replacing what it was told before).
    pub fn set_answer(&mut self, answer: UpstreamAnswer) {
        self.answer = answer;
        self.headers.retain(|(n, _)| {
            !matches!(
                n.as_str(),
                "x-demo-status"
                    | "x-demo-delay-ms"
                    | "x-demo-reset"
                    | "x-demo-hang-body"
                    | "x-demo-hang-ms"
            )
        });
        match answer {
            UpstreamAnswer::Ok => {}
            UpstreamAnswer::Status(s) => self.header("x-demo-status", &s.to_string()),
            UpstreamAnswer::Slow(ms) | UpstreamAnswer::PastTimeout(ms) => {
                self.header("x-demo-delay-ms", &ms.to_string())
            }
            UpstreamAnswer::ResetBefore => self.header("x-demo-reset", "before"),
            UpstreamAnswer::ResetAfter => self.header("x-demo-reset", "after"),
            UpstreamAnswer::HangBody => {
                self.header("x-demo-hang-body", "1");
                self.header("x-demo-hang-ms", &HANG_MS.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            requests: 300,
            faults: 3,
            clients: 6,
            fault_kinds: FaultKinds::ALL,
        }
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 12, 6).unwrap()
    }

    #[test]
    fn a_seed_decides_the_plan() {
        let a = format!("{:?}", Plan::generate(42, budget(), today()));
        let b = format!("{:?}", Plan::generate(42, budget(), today()));
        let c = format!("{:?}", Plan::generate(43, budget(), today()));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn a_plan_sends_its_budget_and_its_faults_are_of_different_kinds() {
        let plan = Plan::generate(7, budget(), today());
        assert_eq!(plan.requests(), 300);
        let mut kinds: Vec<FaultKind> = plan.faults.iter().map(|f| f.kind).collect();
        kinds.dedup();
        assert_eq!(kinds.len(), 3);
    }

    #[test]
    fn fault_kinds_are_named_by_their_keys() {
        let kinds = FaultKinds::parse("redis-pause, envoy-kill").unwrap();
        assert_eq!(kinds.list(), [FaultKind::RedisPause, FaultKind::EnvoyKill]);
        assert_eq!(kinds.keys(), "redis-pause,envoy-kill");
        assert_eq!(FaultKinds::parse("all").unwrap(), FaultKinds::ALL);
        assert!(FaultKinds::parse("meteor").is_err());
    }
}
