//! The hostile clients: each plan step carried out against the gateway's port over raw
//! sockets (HTTP/1.1 written byte by byte, HTTP/2 through `h2`), leaving exactly when the
//! plan says. Every failure of the connection is an outcome to tally, never a panic: the
//! gateway may be down (a fault) or may cut a client off, and both are part of the game.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::h2;
use super::plan::{Credential, Departure, PlannedRequest, Step, StreamFate};

/// How long a client waits for an answer it means to read: past the route timeout (2 s),
/// a hanging body, and a paused Redis.
const READ_TIMEOUT: Duration = Duration::from_secs(8);

/// What a client saw of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    Status(u16),
    /// An HTTP/2 answer whose status needs the dynamic table to read.
    Answered,
    /// The client left, as planned.
    Left,
    /// The connection ended (or broke) before the whole answer.
    Cut,
    /// Nobody listened (Envoy down).
    Refused,
    TimedOut,
    /// The gateway reset the HTTP/2 stream.
    StreamReset,
}

impl Seen {
    fn label(self) -> String {
        match self {
            Seen::Status(s) => s.to_string(),
            Seen::Answered => "answered (h2 status not decoded)".into(),
            Seen::Left => "left".into(),
            Seen::Cut => "cut off".into(),
            Seen::Refused => "connection refused".into(),
            Seen::TimedOut => "timed out".into(),
            Seen::StreamReset => "stream reset by the gateway".into(),
        }
    }

    fn of_error(e: &std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::ConnectionRefused => Seen::Refused,
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Seen::TimedOut,
            _ => Seen::Cut,
        }
    }
}

/// What a client saw of one request, and the start of a refusal's body (empty otherwise).
pub type Answer = (Seen, String);

/// What the clients did, for the report.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub seen: BTreeMap<String, usize>,
    pub behaviours: BTreeMap<&'static str, usize>,
    pub hostile: BTreeMap<&'static str, usize>,
    pub answers: BTreeMap<&'static str, usize>,
    pub requests: usize,
    /// One line per request: when, who, what, and what the client saw (written beside the
    /// gateway's logs, to read a violation against).
    pub trace: Vec<(Duration, String)>,
}

impl Tally {
    fn record(&mut self, step: &Step, seen: &[Answer], at: Duration, client: usize) {
        for (request, (seen, body)) in step.planned().into_iter().zip(seen) {
            let line = format!(
                "client {client}: {} {} {} as {}, {}, hostile {:?} -> {}{}",
                step.behaviours().join(" + "),
                request.method,
                request.path,
                request.credential.describe(),
                request.answer.name(),
                request.hostile,
                seen.label(),
                if body.is_empty() {
                    String::new()
                } else {
                    format!(" {body}")
                }
            );
            self.trace.push((at, line));
        }
        for behaviour in step.behaviours() {
            *self.behaviours.entry(behaviour).or_default() += 1;
        }
        for request in step.planned() {
            self.requests += 1;
            *self.answers.entry(request.answer.name()).or_default() += 1;
            for group in &request.hostile {
                *self.hostile.entry(group).or_default() += 1;
            }
        }
        for (s, _) in seen {
            *self.seen.entry(s.label()).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.seen {
            *self.seen.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.behaviours {
            *self.behaviours.entry(k).or_default() += v;
        }
        for (k, v) in &other.hostile {
            *self.hostile.entry(k).or_default() += v;
        }
        for (k, v) in &other.answers {
            *self.answers.entry(k).or_default() += v;
        }
        self.requests += other.requests;
        self.trace.extend(other.trace.iter().cloned());
        self.trace.sort_by_key(|(at, _)| *at);
    }
}

/// Where the clients send, and with which tokens.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub port: u16,
    /// The bearer token of each user (`plan::USERS` order).
    pub tokens: &'a [String],
    /// When the clients started.
    pub started: Instant,
}

/// Carries out `step` and tallies what the client saw (`at`: when it began, `client`: who).
pub fn run_step(step: &Step, ctx: Context, tally: &mut Tally, at: Duration, client: usize) {
    let seen = match step {
        Step::Single { request, departure } => vec![single(ctx, request, *departure)],
        Step::Pipeline { requests, read } => pipeline(ctx, requests, *read),
        Step::H2 {
            streams,
            drop_after_ms,
        } => h2_streams(ctx, streams, *drop_after_ms),
        Step::Burst { requests } => std::thread::scope(|s| {
            let handles: Vec<_> = requests
                .iter()
                .map(|request| s.spawn(move || single(ctx, request, Departure::Never)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or((Seen::Cut, String::new())))
                .collect()
        }),
        Step::ReadFlood { connections } => std::thread::scope(|s| {
            let handles: Vec<_> = connections
                .iter()
                .map(|requests| s.spawn(move || pipeline(ctx, requests, None)))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![(Seen::Cut, String::new())])
                })
                .collect()
        }),
    };
    tally.record(step, &seen, at, client);
}

/// The `authorization` header's value, if any.
fn authorization(ctx: Context, credential: Credential) -> Option<String> {
    match credential {
        Credential::Token(user) => Some(format!("Bearer {}", ctx.tokens[user])),
        Credential::Garbage => Some("Bearer not.a.token".into()),
        Credential::Missing => None,
    }
}

/// The request's head as HTTP/1.1 bytes (`connection: close` unless `keep_alive`).
fn head(ctx: Context, request: &PlannedRequest, keep_alive: bool) -> Vec<u8> {
    let mut out = format!(
        "{} {} HTTP/1.1\r\nhost: gateway\r\n",
        request.method, request.path
    );
    if !keep_alive {
        out.push_str("connection: close\r\n");
    }
    for (name, value) in &request.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(auth) = authorization(ctx, request.credential) {
        out.push_str(&format!("authorization: {auth}\r\n"));
    }
    if request.chunked {
        out.push_str("transfer-encoding: chunked\r\n");
    } else if !request.body.is_empty() || request.method != "GET" {
        out.push_str(&format!("content-length: {}\r\n", request.body.len()));
    }
    if request.expect_continue {
        out.push_str("expect: 100-continue\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The body as it goes on the wire (in chunks when chunked).
fn framed_body(request: &PlannedRequest) -> Vec<u8> {
    if !request.chunked {
        return request.body.clone();
    }
    let mut out = Vec::new();
    for chunk in request.body.chunks(8_192) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Connects, trying again for a while if nobody listens (Envoy killed and starting again):
/// a real client retries, and a step wasted on a refused connection tests nothing.
pub fn connect_patiently(port: u16) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn connect(ctx: Context) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = connect_patiently(ctx.port)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let reader = BufReader::new(stream.try_clone()?);
    Ok((stream, reader))
}

/// One HTTP/1.1 request on its own connection, the client leaving as planned.
fn single(ctx: Context, request: &PlannedRequest, departure: Departure) -> Answer {
    match single_io(ctx, request, departure) {
        Ok(answer) => answer,
        Err(e) => (Seen::of_error(&e), String::new()),
    }
}

fn single_io(
    ctx: Context,
    request: &PlannedRequest,
    departure: Departure,
) -> std::io::Result<Answer> {
    let (mut stream, mut reader) = connect(ctx)?;
    let head = head(ctx, request, false);
    let body = framed_body(request);
    match departure {
        Departure::MidHead { bytes, wait_ms } => {
            stream.write_all(&head[..bytes.min(head.len().saturating_sub(1))])?;
            std::thread::sleep(Duration::from_millis(wait_ms));
            Ok((Seen::Left, String::new()))
        }
        Departure::AfterHeaders { wait_ms } => {
            stream.write_all(&head)?;
            leave_unless_answered(&mut stream, &mut reader, wait_ms)
        }
        Departure::MidBody { sent, wait_ms } => {
            stream.write_all(&head)?;
            stream.write_all(&body[..sent.min(body.len().saturating_sub(1))])?;
            leave_unless_answered(&mut stream, &mut reader, wait_ms)
        }
        Departure::AfterBody { wait_ms } => {
            if let Some(early) = send_whole(&mut stream, &mut reader, &head, &body, request)? {
                return Ok(early);
            }
            leave_unless_answered(&mut stream, &mut reader, wait_ms)
        }
        Departure::MidResponse { bytes } => {
            if let Some(early) = send_whole(&mut stream, &mut reader, &head, &body, request)? {
                return Ok(early);
            }
            let mut first = vec![0u8; bytes.max(1)];
            let n = read_up_to(&mut reader, &mut first)?;
            let seen = status_in(&first[..n]).map_or(Seen::Left, Seen::Status);
            Ok((seen, String::new()))
        }
        Departure::Trickle {
            pieces,
            interval_ms,
        } => {
            stream.write_all(&head)?;
            let size = body.len().div_ceil(pieces.max(1)).max(1);
            for piece in body.chunks(size) {
                std::thread::sleep(Duration::from_millis(interval_ms));
                if stream.write_all(piece).is_err() {
                    break; // answered early (a refusal)
                }
            }
            read_response(&mut reader)
        }
        Departure::Never => {
            if let Some(early) = send_whole(&mut stream, &mut reader, &head, &body, request)? {
                return Ok(early);
            }
            read_response(&mut reader)
        }
    }
}

/// Writes the head and the body; with `Expect: 100-continue` the body only after a `100`.
/// Returns the final status if the gateway answered before the body was asked for (the body
/// is then not sent: the answer was read whole).
fn send_whole(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    head: &[u8],
    body: &[u8],
    request: &PlannedRequest,
) -> std::io::Result<Option<Answer>> {
    if !request.expect_continue {
        let mut all = head.to_vec();
        all.extend_from_slice(body);
        stream.write_all(&all)?;
        return Ok(None);
    }
    stream.write_all(head)?;
    let (status, headers) = read_head(reader)?;
    if status != 100 {
        let body = read_body(reader, status, &headers)?;
        return Ok(Some((Seen::Status(status), body)));
    }
    stream.write_all(body)?;
    Ok(None)
}

/// Waits up to `wait_ms` for an answer's status line; leaves either way.
fn leave_unless_answered(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    wait_ms: u64,
) -> std::io::Result<Answer> {
    stream.set_read_timeout(Some(Duration::from_millis(wait_ms.max(1))))?;
    let seen = match read_head(reader) {
        Ok((status, _)) => Seen::Status(status),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Seen::Left,
        Err(_) => Seen::Cut,
    };
    Ok((seen, String::new()))
}

/// Requests written at once on one keep-alive connection (the last asks to close it), then
/// `read` answers read (all when `None`) before the client leaves.
fn pipeline(ctx: Context, requests: &[PlannedRequest], read: Option<usize>) -> Vec<Answer> {
    let mut seen = Vec::with_capacity(requests.len());
    let connected = connect(ctx);
    let (mut stream, mut reader) = match connected {
        Ok(pair) => pair,
        Err(e) => return vec![(Seen::of_error(&e), String::new()); requests.len()],
    };
    let mut all = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        all.extend(head(ctx, request, i + 1 < requests.len()));
        all.extend(framed_body(request));
    }
    if let Err(e) = stream.write_all(&all) {
        return vec![(Seen::of_error(&e), String::new()); requests.len()];
    }
    let wanted = read.unwrap_or(requests.len()).min(requests.len());
    for _ in 0..wanted {
        match read_response(&mut reader) {
            Ok(answer) => seen.push(answer),
            Err(_) => break,
        }
    }
    let cut = if seen.len() < wanted {
        Seen::Cut
    } else {
        Seen::Left
    };
    seen.resize(requests.len(), (cut, String::new()));
    seen
}

/// What the HTTP/2 client knows of one of its streams.
struct StreamState {
    id: u32,
    fate: StreamFate,
    /// When the client resets it, if it is to.
    reset_at: Option<Instant>,
    seen: Option<Seen>,
    done: bool,
}

/// One HTTP/2 connection with the planned streams, each reset when its fate says.
fn h2_streams(
    ctx: Context,
    streams: &[(PlannedRequest, StreamFate)],
    drop_after_ms: Option<u64>,
) -> Vec<Answer> {
    let mut states: Vec<StreamState> = Vec::with_capacity(streams.len());
    if let Err(e) = h2_io(ctx, streams, drop_after_ms, &mut states) {
        let seen = Seen::of_error(&e);
        for state in states.iter_mut().filter(|s| !s.done) {
            state.seen.get_or_insert(seen);
        }
        if states.is_empty() {
            return vec![(seen, String::new()); streams.len()];
        }
    }
    let mut out: Vec<Answer> = states
        .iter()
        .map(|s| (s.seen.unwrap_or(Seen::Left), String::new()))
        .collect();
    out.resize(streams.len(), (Seen::Cut, String::new()));
    out
}

fn h2_io(
    ctx: Context,
    streams: &[(PlannedRequest, StreamFate)],
    drop_after_ms: Option<u64>,
    states: &mut Vec<StreamState>,
) -> std::io::Result<()> {
    let started = Instant::now();
    let mut conn = h2::Connection::open(ctx.port)?;
    for (request, fate) in streams {
        let id = conn.new_stream();
        states.push(open_stream(ctx, &mut conn, id, request, *fate, started)?);
    }
    let deadline = started + READ_TIMEOUT;
    let drop_at = drop_after_ms.map(|ms| started + Duration::from_millis(ms));
    while states.iter().any(|s| !s.done) {
        let now = Instant::now();
        if now >= deadline || drop_at.is_some_and(|at| now >= at) {
            for state in states.iter_mut().filter(|s| !s.done) {
                state.seen.get_or_insert(if now >= deadline {
                    Seen::TimedOut
                } else {
                    Seen::Left
                });
                state.done = true;
            }
            break;
        }
        for state in states.iter_mut().filter(|s| !s.done) {
            if state.reset_at.is_some_and(|at| now >= at) {
                conn.reset(state.id)?;
                state.seen.get_or_insert(Seen::Left);
                state.done = true;
            }
        }
        let Some(frame) = conn.read_frame(Duration::from_millis(10))? else {
            continue;
        };
        if frame.kind == h2::GOAWAY {
            for state in states.iter_mut().filter(|s| !s.done) {
                state.seen.get_or_insert(Seen::Cut);
                state.done = true;
            }
            break;
        }
        let Some(state) = states.iter_mut().find(|s| s.id == frame.stream) else {
            continue;
        };
        on_stream_frame(&mut conn, state, &frame)?;
    }
    Ok(())
}

/// Sends a stream's request as far as its fate lets it go.
fn open_stream(
    ctx: Context,
    conn: &mut h2::Connection,
    id: u32,
    request: &PlannedRequest,
    fate: StreamFate,
    started: Instant,
) -> std::io::Result<StreamState> {
    let mut fields = vec![
        (":method".to_string(), request.method.clone()),
        (":scheme".to_string(), "http".to_string()),
        (":path".to_string(), request.path.clone()),
        (":authority".to_string(), "gateway".to_string()),
    ];
    fields.extend(request.headers.iter().cloned());
    if let Some(auth) = authorization(ctx, request.credential) {
        fields.push(("authorization".into(), auth));
    }
    if !request.body.is_empty() {
        fields.push(("content-length".into(), request.body.len().to_string()));
    }
    let body = &request.body;
    let mut reset_at = None;
    match fate {
        StreamFate::ResetAfterHeaders => {
            conn.headers(id, &fields, false)?;
            reset_at = Some(Instant::now() + Duration::from_millis(30));
        }
        StreamFate::ResetMidBody => {
            conn.headers(id, &fields, false)?;
            conn.data(id, &body[..body.len() / 2], false)?;
            reset_at = Some(Instant::now() + Duration::from_millis(30));
        }
        StreamFate::Complete
        | StreamFate::ResetAfterResponseHeaders
        | StreamFate::ResetAfterBody { .. } => {
            conn.headers(id, &fields, body.is_empty())?;
            if !body.is_empty() {
                conn.data(id, body, true)?;
            }
            if let StreamFate::ResetAfterBody { wait_ms } = fate {
                reset_at = Some(started + Duration::from_millis(wait_ms));
            }
        }
    }
    Ok(StreamState {
        id,
        fate,
        reset_at,
        seen: None,
        done: false,
    })
}

fn on_stream_frame(
    conn: &mut h2::Connection,
    state: &mut StreamState,
    frame: &h2::Frame,
) -> std::io::Result<()> {
    match frame.kind {
        h2::HEADERS => {
            let status = h2::status_of(h2::header_block(frame));
            // (Trailers come as a second HEADERS: the first said the status.)
            state
                .seen
                .get_or_insert(status.map_or(Seen::Answered, Seen::Status));
            if state.fate == StreamFate::ResetAfterResponseHeaders {
                conn.reset(state.id)?;
                state.done = true;
            }
        }
        h2::RST_STREAM => {
            state.seen.get_or_insert(Seen::StreamReset);
            state.done = true;
        }
        _ => {}
    }
    if frame.flags & h2::END_STREAM != 0 && matches!(frame.kind, h2::HEADERS | h2::DATA) {
        state.done = true;
    }
    Ok(())
}

/// A status line and headers (names lower-cased).
fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    let status = status_in(line.as_bytes())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            return Ok((status, headers));
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
}

/// The status of an HTTP/1.1 status line (`HTTP/1.1 200 OK`), if these bytes hold one.
fn status_in(bytes: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A whole final answer (1xx skipped).
fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<Answer> {
    loop {
        let (status, headers) = read_head(reader)?;
        if (100..200).contains(&status) {
            continue;
        }
        let body = read_body(reader, status, &headers)?;
        return Ok((Seen::Status(status), body));
    }
}

/// Reads an answer's body (by its Content-Length, its chunks, or to the end); for a status
/// of 400 or more from the gateway (not the upstream), the body's start (or its headers if
/// it has none), else nothing.
fn read_body(
    reader: &mut BufReader<TcpStream>,
    status: u16,
    headers: &[(String, String)],
) -> std::io::Result<String> {
    let from_upstream = headers.iter().any(|(n, _)| n == "x-upstream");
    let keep = status >= 400 && !from_upstream;
    let mut kept = Vec::new();
    let mut sink = Keep {
        kept: &mut kept,
        keep: if keep { 160 } else { 0 },
    };
    discard_body(reader, status, headers, &mut sink)?;
    if status >= 400 && kept.is_empty() {
        let from = if from_upstream { "upstream" } else { "gateway" };
        return Ok(format!("(from the {from}, no body: {headers:?})"));
    }
    Ok(String::from_utf8_lossy(&kept).replace(['\r', '\n'], " "))
}

/// A writer that keeps the first `keep` bytes written to it.
struct Keep<'a> {
    kept: &'a mut Vec<u8>,
    keep: usize,
}

impl Write for Keep<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.keep.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&buf[..room.min(buf.len())]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn discard_body(
    reader: &mut BufReader<TcpStream>,
    status: u16,
    headers: &[(String, String)],
    sink: &mut Keep,
) -> std::io::Result<()> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if status == 204 || status == 304 {
        return Ok(());
    }
    if let Some(length) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
        let copied = std::io::copy(&mut reader.take(length), sink)?;
        return if copied == length {
            Ok(())
        } else {
            Err(ErrorKind::UnexpectedEof.into())
        };
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return read_chunks(reader, sink);
    }
    std::io::copy(reader, sink).map(|_| ())
}

fn read_chunks(reader: &mut BufReader<TcpStream>, sink: &mut Keep) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let size_text = line.trim().split(';').next().unwrap_or("");
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        let copied = std::io::copy(&mut reader.take(size + 2), sink)?;
        if copied < size + 2 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Reads what arrives into `buf` until it is full or the connection ends; how much came.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if filled > 0 => {
                let _ = e;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
