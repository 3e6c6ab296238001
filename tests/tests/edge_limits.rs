//! The edge limits, through real Envoy as envoy.yaml renders it (after Envoy's "Configuring
//! Envoy as an edge proxy"): what a client's headers may be, how long they may take, how many
//! streams and how much window an HTTP/2 client gets, a plan's request rate, how long a refused
//! body is read, and the overload manager watching the heap and the connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use plan_limits_tests::*;

#[test]
fn a_header_with_an_underscore_or_too_many_headers_are_refused_by_envoy() {
    let gw = envoy();
    // A proxy behind might read `x_user_id` as `x-user-id`: refused before anything reads it.
    let r = analysis("uma", "free")
        .header("x_user_id", "someone-else")
        .send(gw.gateway_port);
    assert_eq!(r.status, 400);
    let mut many = analysis("uma", "free");
    for i in 0..120 {
        many = many.header(&format!("x-filler-{i}"), "1");
    }
    assert_eq!(many.send(gw.gateway_port).status, 431);
    assert_eq!(gw.upstream.attempts(), 0);
}

#[test]
fn a_client_has_ten_seconds_to_send_its_headers() {
    let gw = envoy();
    let mut stream = TcpStream::connect(("127.0.0.1", gw.gateway_port)).unwrap();
    stream
        .write_all(b"POST /api/upload HTTP/1.1\r\nhost: g\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(15)).contains(&waited),
        "closed after {waited:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[test]
fn a_plans_request_rate_is_answered_429_with_retry_after_before_redis() {
    let gw = envoy();
    let port = gw.gateway_port;
    // Free: 10 a second after a burst of 50, per Envoy worker (two here).
    let statuses: Vec<(u16, Option<String>)> = (0..150)
        .map(|_| {
            let r = Request::new("GET", "/api/usage")
                .user("rapid", "free")
                .send(port);
            (r.status, r.header("retry-after").map(String::from))
        })
        .collect();
    let limited: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(!limited.is_empty(), "{statuses:?}");
    assert!(limited
        .iter()
        .all(|(_, retry)| retry.as_deref() == Some("1")));
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert!((50..=120).contains(&ok), "{ok} answered");
    assert!(gw.metric("rate_limited") as usize >= limited.len());
    // Another user is not held back.
    assert_eq!(
        Request::new("GET", "/api/usage")
            .user("calm", "free")
            .send(port)
            .status,
        200
    );
}

#[test]
fn a_refused_body_at_one_byte_a_second_is_read_for_max_drain_ms_at_most() {
    let gw = envoy_with(|p| p["gateway"]["max_drain_ms"] = 1500.into());
    let mut stream = TcpStream::connect(("127.0.0.1", gw.gateway_port)).unwrap();
    // No token: refused (401), but its body is read first, so a client writing it sees the
    // answer; at a byte a second, only for 1.5 s.
    stream
        .write_all(b"POST /api/upload HTTP/1.1\r\nhost: g\r\ncontent-length: 1000\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < Duration::from_secs(10) && answer.is_empty() {
        if stream.write_all(b"x").is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        if let Ok(n) = stream.read(&mut buf) {
            answer.extend_from_slice(&buf[..n]);
        }
        std::thread::sleep(Duration::from_millis(900));
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_http2_client_gets_a_hundred_streams_and_a_64_kb_window() {
    let gw = envoy();
    let mut stream = TcpStream::connect(("127.0.0.1", gw.gateway_port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The preface and an empty SETTINGS frame; Envoy answers with its own SETTINGS.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).unwrap();
    let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    assert_eq!(head[3], 0x4, "a SETTINGS frame first");
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS (3), SETTINGS_INITIAL_WINDOW_SIZE (4).
    assert!(settings.contains(&(3, 100)), "{settings:?}");
    assert!(settings.contains(&(4, 65536)), "{settings:?}");
}

#[test]
fn the_overload_manager_watches_the_heap_and_the_client_connections() {
    let gw = envoy();
    let stats =
        plan_limits_services::http::get(gw.admin_port, "/stats?filter=overload").body_text();
    for watched in [
        "overload.envoy.resource_monitors.fixed_heap.pressure",
        "overload.envoy.resource_monitors.global_downstream_max_connections.pressure",
        "overload.envoy.overload_actions.stop_accepting_requests.active",
    ] {
        assert!(stats.contains(watched), "{watched} in {stats}");
    }
}
