//! No way around the meter, through real Envoy: slow uploads keep their unit and are counted,
//! a client that leaves an analysis it sent does not get it free, fail-open is bounded, Redis
//! is locked down and keeps its counts across a crash, request ids are bounded, racing repeats
//! of one idempotency key are counted once.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use plan_limits_tests::*;

/// Sends an upload of `bytes` from `user` at about `bytes_per_second`, then reads the status.
fn slow_upload(port: u16, user: &str, bytes: usize, bytes_per_second: usize) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-length: {bytes}\r\n\r\n",
        token(user, "free")
    );
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = (bytes_per_second / 10).max(1);
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.min(bytes - sent);
        if stream.write_all(&vec![b'x'; n]).is_err() {
            break; // answered early (429)
        }
        sent += n;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_upload_slower_than_the_reservation_expiry_keeps_its_unit_and_is_counted_once() {
    // Reservations expire after 3 s unless extended; the uploads take about 5 s.
    let gw = envoy_with(|p| p["redis"]["reservation_ttl_ms"] = 3000.into());
    let port = gw.gateway_port;
    let started = Instant::now();
    let slow: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || slow_upload(port, "sam", 5_000, 1_000)))
        .collect();
    // Once the first reservations would have expired, the month's last units are still held.
    std::thread::sleep(Duration::from_millis(4_000));
    let late = upload("sam", "free").send(port);
    assert_eq!(late.status, 429, "the slow uploads still hold their units");
    let statuses: Vec<u16> = slow.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(started.elapsed() > Duration::from_secs(4), "they were slow");
    assert_eq!(statuses, [200; 5]);
    assert!(counts(&gw, "sam", "upload", 5));
    assert!(gw.metric("extended") >= 5);
    assert_eq!(gw.metric("commits_unmatched"), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&gw, "sam", "upload"), 5, "each counted once");
}

#[test]
fn a_reservation_expiry_too_short_to_be_extended_is_refused() {
    let plans = plans_with(|p| p["redis"]["reservation_ttl_ms"] = 100.into());
    let err = plan_limits_core::Plans::from_json(plans.as_bytes()).unwrap_err();
    assert_eq!(err.path, "redis.reservation_ttl_ms");
}

#[test]
fn a_client_that_leaves_a_request_it_sent_whole_is_counted_and_one_it_left_mid_body_is_not() {
    let gw = envoy();
    let port = gw.gateway_port;
    // Each client writes its head and `sent` of a `length`-byte body, then leaves after 500 ms
    // (the upstream takes 1.5 s).
    let leave_after_500ms = |request: Request, length: usize, sent: usize| {
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut head = format!(
                "{} {} HTTP/1.1\r\nhost: g\r\nx-demo-delay-ms: 1500\r\n",
                request.method, request.path
            );
            for (name, value) in &request.headers {
                head.push_str(&format!("{name}: {}\r\n", String::from_utf8_lossy(value)));
            }
            head.push_str(&format!("content-length: {length}\r\n\r\n"));
            head.push_str(&"x".repeat(sent));
            stream.write_all(head.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        })
    };
    let up = || Request::new("POST", "/api/upload").user("lena", "free");
    let leavers: Vec<_> = (0..3)
        .map(|_| leave_after_500ms(analysis("lena", "free"), 2, 2))
        .chain((0..2).map(|_| leave_after_500ms(up(), 2, 2)))
        .chain((0..2).map(|_| leave_after_500ms(up(), 100, 2)))
        .collect();
    for leaver in leavers {
        leaver.join().unwrap();
    }
    // The upstream did the analyses and the two whole uploads: they are counted; the uploads
    // whose body never came whole it never did, and they are not.
    assert!(counts(&gw, "lena", "ai_analysis", 3));
    assert!(counts(&gw, "lena", "upload", 2));
    assert!(eventually(|| pending(&gw, "lena", "upload") == 0));
    std::thread::sleep(Duration::from_millis(2_000));
    assert_eq!(counter(&gw, "lena", "ai_analysis"), 3);
    assert_eq!(counter(&gw, "lena", "upload"), 2);
    let ledger = gw.upstream.ledger();
    assert_eq!(ledger.done("lena", "POST /api/teammate"), 3);
    assert_eq!(ledger.done("lena", "POST /api/upload"), 2);
    // The analyses are used up.
    assert_eq!(gw_send(&gw, analysis("lena", "free")), 429);
}

#[test]
fn fail_open_lets_a_user_through_at_most_what_remained_plus_the_allowance() {
    let gw = envoy();
    for _ in 0..3 {
        assert_eq!(gw_send(&gw, upload("rita", "free")), 200);
    }
    assert!(counts(&gw, "rita", "upload", 3));
    // Redis stops answering (paused); two uploads remain, and the allowance is 1.
    let redis_pid = gw.redis.service().pid() as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(redis_pid, libc::SIGSTOP) };
    let port = gw.gateway_port;
    let statuses = concurrent_uploads(&[port], "rita", "free", 10);
    unsafe { libc::kill(redis_pid, libc::SIGCONT) };
    let passed = statuses.iter().filter(|&&s| s == 200).count() as u64;
    assert!(passed <= 2 + 1, "{statuses:?}");
    assert!(
        passed >= 1,
        "fail-open still lets some through: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert_eq!(gw.metric("fail_open") + gw.metric("fail_open_refused"), 10);
    // Everything let through is counted once Redis is back.
    assert!(counts(&gw, "rita", "upload", 3 + passed));
    // The log says so without naming the user.
    let log = std::fs::read_to_string(&gw.envoy.as_ref().unwrap().log).unwrap();
    assert!(log.contains("let through unchecked"));
    assert!(!log.contains("rita"));
    // An outage again (a client that can stall Redis could cause one): the allowance is once a
    // period, so both outages together let through what remained plus it, no more.
    let answer = gw_send(&gw, upload("rita", "free"));
    assert!(answer == 429 || passed < 3, "{answer}");
    std::thread::sleep(Duration::from_millis(1100)); // past the refusal remembered
    unsafe { libc::kill(redis_pid, libc::SIGSTOP) };
    let again = concurrent_uploads(&[port], "rita", "free", 10);
    unsafe { libc::kill(redis_pid, libc::SIGCONT) };
    let answered = u64::from(answer == 200);
    let passed_again = again.iter().filter(|&&s| s == 200).count() as u64;
    assert!(
        passed + answered + passed_again <= 2 + 1,
        "{statuses:?} then {answer} then {again:?}"
    );
    assert!(counts(
        &gw,
        "rita",
        "upload",
        3 + passed + answered + passed_again
    ));
}

fn gw_send(gw: &EnvoyGateway, request: Request) -> u16 {
    request.send(gw.gateway_port).status
}

#[test]
fn webdis_runs_nothing_but_the_filters_functions() {
    let gw = envoy();
    for body in ["EVAL/return%201/0", "KEYS/*", "FLUSHALL", "FUNCTION/LOAD/x"] {
        let r = Request::new("POST", "/")
            .body(Body::Bytes(body.as_bytes().to_vec()))
            .send(gw.webdis.port);
        assert_eq!(r.status, 403, "{body}");
    }
    assert_eq!(
        gw_send(&gw, upload("una", "free")),
        200,
        "FCALL goes through"
    );
}

#[test]
fn a_crashed_redis_loses_no_committed_count() {
    let mut gw = EnvoyGateway::start(GatewayOptions {
        persistent_redis: true,
        ..GatewayOptions::default()
    });
    for _ in 0..3 {
        assert_eq!(gw_send(&gw, upload("vic", "free")), 200);
    }
    assert!(counts(&gw, "vic", "upload", 3));
    let port = gw.redis.port;
    gw.redis.stop(); // SIGKILL: no clean shutdown
    gw.redis = plan_limits_services::redis_server::RedisServer::start_with(&gw.dir, port, true);
    assert_eq!(
        counter(&gw, "vic", "upload"),
        3,
        "every acknowledged count survived"
    );
    // webdis reconnects on its next command: wait until Redis answers through it again (an
    // API call is fail_closed: 503 until then).
    let api = || Request::new("GET", "/api/v1/x").user("probe", "enterprise");
    assert!(eventually(|| gw_send(&gw, api()) == 200));
    assert_eq!(gw_send(&gw, upload("vic", "free")), 200);
    assert_eq!(gw_send(&gw, upload("vic", "free")), 200);
    assert_eq!(gw_send(&gw, upload("vic", "free")), 429);
}

#[test]
fn a_client_cannot_name_its_request_id() {
    // Envoy names every request (no client is internal): what a client sends as its id never
    // reaches the events. (The filter also keeps an id only if it is at most 128 plain
    // characters, for a deployment that trusts its clients' ids: admission::tests.)
    let gw = envoy();
    let ids = ["req-chosen-1", &"a".repeat(300), "a\"b"];
    for id in ids {
        assert_eq!(
            gw_send(
                &gw,
                analysis("wes", "professional").header("x-request-id", id)
            ),
            200
        );
    }
    assert!(eventually(|| usage::events_of(&mut gw.redis(), "wes")
        .len()
        == 3));
    let recorded: std::collections::BTreeSet<String> = usage::events_of(&mut gw.redis(), "wes")
        .into_iter()
        .map(|e| e["request_id"].clone())
        .collect();
    assert_eq!(recorded.len(), 3, "three ids: {recorded:?}");
    for id in &recorded {
        assert!(!ids.contains(&id.as_str()) && id.len() == 36, "{id}");
    }
}

/// How each spelling is to be answered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Metered as this action.
    Metered(&'static str),
    /// Refused with this status.
    Refused(u16),
}

#[test]
fn every_spelling_of_a_metered_path_is_metered_or_refused() {
    use Expect::*;
    let spellings: Vec<(&str, &str, Expect)> = vec![
        ("POST", "/api/upload", Metered("upload")),
        ("POST", "/API/upload", Metered("upload")),
        ("POST", "/Api/Upload", Metered("upload")),
        ("POST", "/api/UPLOAD", Metered("upload")),
        ("POST", "/api/upload;x", Metered("upload")),
        ("POST", "/api/upload;jsessionid=1", Metered("upload")),
        ("POST", "/api/upload.", Metered("upload")),
        ("POST", "/api/upload..", Metered("upload")),
        ("POST", "/api/%75pload", Metered("upload")),
        ("POST", "/api/%55PLOAD", Metered("upload")),
        ("POST", "/api/upload/", Metered("upload")),
        ("POST", "/api//upload", Metered("upload")),
        ("POST", "/api/./upload", Metered("upload")),
        ("POST", "/api/x/../upload", Metered("upload")),
        ("POST", "/api/upload?x=1", Metered("upload")),
        ("post", "/api/upload", Refused(400)),
        ("PUT", "/api/upload", Refused(405)),
        ("PATCH", "/api/upload", Refused(405)),
        ("DELETE", "/api/upload", Refused(405)),
        ("POST", "/api/TEAMMATE", Metered("ai_analysis")),
        ("POST", "/api/teammate;a=b", Metered("ai_analysis")),
        ("POST", "/api/Teammate.", Metered("ai_analysis")),
        ("POST", "/api/teammate/chat", Refused(403)),
        ("GET", "/API/Procedures/7", Metered("procedure_view")),
        ("GET", "/api/procedures;x/7", Metered("procedure_view")),
        ("GET", "/api/procedures/7.", Metered("procedure_view")),
        ("POST", "/api/procedures/7", Refused(405)),
        ("GET", "/api/V1/items", Metered("api_call")),
        ("GET", "/api/v1;x/d", Metered("api_call")),
        ("DELETE", "/API/v1", Metered("api_call")),
        ("POST", "/api/export/PDF", Metered("pdf_export")),
        ("POST", "/api/Export/pdf;", Metered("pdf_export")),
        ("POST", "/api/uploads", Refused(403)),
        ("GET", "/api/anything-else", Refused(403)),
    ];
    assert!(spellings.len() >= 30);
    let gw = EnvoyGateway::start(GatewayOptions {
        lenient_upstream: true,
        ..GatewayOptions::default()
    });
    let send = |method: &str, path: &str, user: Option<&str>| {
        let mut request = Request::new(method, path).body(Body::Bytes(b"x".to_vec()));
        if let Some(user) = user {
            request = request.user(user, "enterprise");
        }
        request.send(gw.gateway_port).status
    };
    // Without a token, nothing metered reaches the upstream: 401, or refused.
    for (method, path, expect) in &spellings {
        let status = send(method, path, None);
        let wanted = match expect {
            Metered(_) => 401,
            Refused(status) => *status,
        };
        assert_eq!(status, wanted, "{method} {path} without a token");
    }
    assert_eq!(gw.upstream.attempts(), 0, "nothing reached the upstream");
    // With one, each spelling is metered as its route's action (or refused again).
    let mut expected: std::collections::BTreeMap<&str, u64> = Default::default();
    for (method, path, expect) in &spellings {
        let status = send(method, path, Some("tom"));
        match expect {
            Metered(action) => {
                assert_eq!(status, 200, "{method} {path}");
                *expected.entry(action).or_default() += 1;
            }
            Refused(wanted) => assert_eq!(status, *wanted, "{method} {path}"),
        }
    }
    for (action, n) in &expected {
        assert!(counts(&gw, "tom", action, *n), "{action}: {n}");
    }
    // What the lenient upstream's handlers did is exactly what was counted.
    let done = gw.upstream.success_map();
    let handled = |path: &str| done[path].as_u64().unwrap_or(0);
    assert_eq!(handled("/api/upload"), expected["upload"]);
    assert_eq!(handled("/api/teammate"), expected["ai_analysis"]);
    assert_eq!(handled("/api/export/pdf"), expected["pdf_export"]);
}

#[test]
fn racing_repeats_of_one_idempotency_key_are_counted_once() {
    let gw = envoy();
    let port = gw.gateway_port;
    // Ten at once, each taking 300 ms upstream: one goes, nine are told it is in progress.
    let racing: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                upload("rex", "free")
                    .header("idempotency-key", "same")
                    .header("x-demo-delay-ms", "300")
                    .send(port)
            })
        })
        .collect();
    let answers: Vec<Response> = racing.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let duplicates: Vec<&Response> = answers.iter().filter(|r| r.status == 409).collect();
    assert_eq!((ok, duplicates.len()), (1, 9));
    assert!(duplicates
        .iter()
        .all(|r| r.json()["state"] == "in_progress"));
    assert!(counts(&gw, "rex", "upload", 1));
    assert_eq!(
        gw.upstream.attempts(),
        1,
        "the repeats never reached the upstream"
    );
    // And after: completed.
    let r = upload("rex", "free")
        .header("idempotency-key", "same")
        .send(port);
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (409, Some("completed"))
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counter(&gw, "rex", "upload"), 1);
}
