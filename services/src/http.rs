//! Requests and responses, the one vocabulary of every runner (the harness and real Envoy),
//! and a small HTTP/1.1 client over a raw socket, so tests can send exactly the bytes they
//! mean (duplicate headers, non-UTF-8 values, bodies written whole before reading, chunked,
//! or held back for a `100 Continue`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use plan_limits_core::JwtClaims;

use crate::jwt::TokenClaims;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body_text()))
    }

    /// The answer came from the upstream (the demo upstream marks its answers), not from the
    /// filter or Envoy.
    pub fn from_upstream(&self) -> bool {
        self.header(UPSTREAM_MARK) == Some("demo")
    }
}

/// The response header the demo upstream (and the harness's stand-in for it) marks its
/// answers with.
pub const UPSTREAM_MARK: &str = "x-upstream";
/// The request header that makes the demo upstream answer with another status.
pub const DEMO_STATUS: &str = "x-demo-status";
/// The request header that makes the demo upstream say a delete freed that many bytes (in
/// `x-freed-bytes`), whatever it stored.
pub const DEMO_FREED_BYTES: &str = "x-demo-freed-bytes";
/// The request header that makes the demo upstream say a removal took off that many members
/// (in `x-removed-members`).
pub const DEMO_REMOVED_MEMBERS: &str = "x-demo-removed-members";

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Body,
}

#[derive(Debug, Clone, Default)]
pub enum Body {
    #[default]
    Empty,
    Bytes(Vec<u8>),
    /// `n` zero bytes with their Content-Length, all written before the answer is read (as
    /// most HTTP libraries do).
    Zeros(u64),
    /// `n` zero bytes without a Content-Length (`Transfer-Encoding: chunked`), in 1 MiB
    /// chunks, all written before the answer is read.
    Chunked(u64),
    /// `n` zero bytes with their Content-Length and `Expect: 100-continue`: sent only once the
    /// gateway says to go on (a `100 Continue`), else answered without being sent.
    ExpectContinue(u64),
}

impl Body {
    /// The Content-Length it goes with.
    fn length(&self) -> Option<u64> {
        match self {
            Body::Empty | Body::Chunked(_) => None,
            Body::Bytes(b) => Some(b.len() as u64),
            Body::Zeros(n) | Body::ExpectContinue(n) => Some(*n),
        }
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Zeros(n) | Body::Chunked(n) | Body::ExpectContinue(n) => *n,
        }
    }
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            ..Self::default()
        }
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// The request of `user` with a bearer token claiming `plan`, signed by the tests' key
    /// (`jwt::DevKey::for_tests`, the one every test gateway trusts).
    pub fn user(self, user: &str, plan: &str) -> Self {
        self.user_with(user, Some(plan))
    }

    /// As `user`, the token claiming `plan` only if given.
    pub fn user_with(self, user: &str, plan: Option<&str>) -> Self {
        self.claims(&TokenClaims {
            user,
            plan,
            org: None,
            anchor_day: None,
            ttl_secs: 3600,
        })
    }

    /// The request with a bearer token of `claims`, signed by the tests' key.
    pub fn claims(self, claims: &TokenClaims) -> Self {
        let token = crate::jwt::DevKey::for_tests().token(&JwtClaims::default(), claims);
        self.bearer(&token)
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    /// The user and plan as headers an authenticator in front would set (`trusted_headers`).
    pub fn trusted_identity(self, user: &str, plan: &str) -> Self {
        self.header("x-user-id", user).header("x-user-plan", plan)
    }

    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// The upstream answers `status` (the demo upstream, and the harness's stand-in for it).
    pub fn upstream_status(self, status: u16) -> Self {
        self.header(DEMO_STATUS, status.to_string())
    }

    /// The Content-Length the request is sent with, if any.
    pub fn content_length(&self) -> Option<u64> {
        let explicit = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        explicit.or(self.body.length())
    }

    /// Whether a body follows its head.
    pub fn has_body(&self) -> bool {
        self.body.size() > 0
    }

    pub fn send(&self, port: u16) -> Response {
        self.try_send(port)
            .unwrap_or_else(|e| panic!("{} {}: {e}", self.method, self.path))
    }

    pub fn try_send(&self, port: u16) -> std::io::Result<Response> {
        let (mut stream, mut reader) = self.connect(port, Duration::from_secs(30))?;
        match &self.body {
            Body::ExpectContinue(n) => {
                let (status, headers) = read_head(&mut reader)?;
                if status != 100 {
                    return read_body(reader, status, headers);
                }
                write_zeros(&mut stream, *n, false)?;
            }
            body => self.write_body(&mut stream, body)?,
        }
        read_response(reader)
    }

    /// Sends the whole request, then leaves (closes the connection) unless an answer's status
    /// arrives within `after`: the status if one did, `None` if the client left first.
    pub fn send_then_leave(&self, port: u16, after: Duration) -> std::io::Result<Option<u16>> {
        let (mut stream, mut reader) = self.connect(port, after)?;
        self.write_body(&mut stream, &self.body)?;
        match read_head(&mut reader) {
            Ok((status, _)) => Ok(Some(status)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Connects and writes the head (and a small body with it); answers are read with
    /// `read_timeout`.
    fn connect(
        &self,
        port: u16,
        read_timeout: Duration,
    ) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(read_timeout))?;
        stream.set_nodelay(true)?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n",
            self.method, self.path
        )
        .into_bytes();
        for (name, value) in &self.headers {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        let explicit_length = self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
        if let (Some(n), false) = (self.body.length(), explicit_length) {
            head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        match &self.body {
            Body::Chunked(_) => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Body::ExpectContinue(_) => head.extend_from_slice(b"expect: 100-continue\r\n"),
            _ => {}
        }
        head.extend_from_slice(b"\r\n");
        // A small body goes in the same write as the head (one segment: some servers, webdis
        // among them, do not wait for a body that arrives in a second one).
        if let Body::Bytes(b) = &self.body {
            head.extend_from_slice(b);
        }
        let reader = BufReader::new(stream.try_clone()?);
        stream.write_all(&head)?;
        Ok((stream, reader))
    }

    /// Writes what of `body` the head did not carry (a 100-continue body is written whole).
    fn write_body(&self, stream: &mut TcpStream, body: &Body) -> std::io::Result<()> {
        match body {
            Body::Empty | Body::Bytes(_) => Ok(()),
            Body::Zeros(n) | Body::ExpectContinue(n) => write_zeros(stream, *n, false),
            Body::Chunked(n) => write_zeros(stream, *n, true),
        }
    }
}

/// `n` zero bytes in 1 MiB writes (chunks, with `chunked`).
fn write_zeros(stream: &mut TcpStream, n: u64, chunked: bool) -> std::io::Result<()> {
    let piece = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(piece.len() as u64) as usize;
        if chunked {
            stream.write_all(format!("{k:x}\r\n").as_bytes())?;
        }
        stream.write_all(&piece[..k])?;
        if chunked {
            stream.write_all(b"\r\n")?;
        }
        left -= k as u64;
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n")?;
    }
    Ok(())
}

/// A status line and headers.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// The final response (interim 1xx ones skipped).
fn read_response(mut reader: BufReader<TcpStream>) -> std::io::Result<Response> {
    loop {
        let (status, headers) = read_head(&mut reader)?;
        if !(100..200).contains(&status) {
            return read_body(reader, status, headers);
        }
    }
}

fn read_body(
    mut reader: BufReader<TcpStream>,
    status: u16,
    headers: Vec<(String, String)>,
) -> std::io::Result<Response> {
    let mut body = Vec::new();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

pub fn get(port: u16, path: &str) -> Response {
    Request::new("GET", path).send(port)
}
