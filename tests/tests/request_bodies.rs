//! Request bodies, on every gateway: a refusal reaches a client that writes its whole body
//! before reading (answered once the body is in, never sent upstream), a client that asks
//! first (`Expect: 100-continue`) is answered before it sends any, and a chunked upload is
//! measured as it streams: refused with the 413 JSON once past the plan's file size, counted
//! with the bytes its body had.

use plan_limits_tests::*;

on_every_gateway!(
    a_refusal_reaches_a_client_that_writes_its_whole_body_before_reading,
    |gw| {
        // 20 MB from a free user (10 MB files): the 413 JSON, not a reset.
        let too_large = Request::new("POST", "/api/upload")
            .user("pia", "free")
            .body(Body::Zeros(20 * MB));
        let r = gw.send(&too_large);
        assert_eq!(r.status, 413, "{}", r.body_text());
        assert!(!r.from_upstream());
        assert_eq!(r.json()["size_bytes"], 20 * MB);
        // No token: the 401 JSON.
        let anonymous = Request::new("POST", "/api/upload").body(Body::Zeros(2 * MB));
        let r = gw.send(&anonymous);
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"], "Unauthorized");
        // The month's uploads used: the 429 JSON, decided by Redis while the body came in, then
        // by the worker's memory of it.
        for _ in 0..5 {
            assert_eq!(gw.send(&upload("pia", "free")).status, 200);
        }
        let sixth = Request::new("POST", "/api/upload")
            .user("pia", "free")
            .body(Body::Zeros(5 * MB));
        for _ in 0..2 {
            let r = gw.send(&sixth);
            assert_eq!(r.status, 429, "{}", r.body_text());
            assert_eq!(r.json()["limit"], 5);
        }
        assert_eq!(gw.metric("answered_after_body"), 4);
        assert!(counts(gw, "pia", "upload", 5));
        assert_eq!(pending(gw, "pia", "upload"), 0);
    }
);

on_every_gateway!(
    a_client_that_asks_first_is_answered_before_it_sends_its_body,
    |gw| {
        let r = gw.send(
            &Request::new("POST", "/api/upload")
                .user("quinn", "free")
                .body(Body::ExpectContinue(20 * MB)),
        );
        assert_eq!(r.status, 413);
        assert_eq!(r.json()["max_bytes"], 10 * MB);
        assert_eq!(gw.metric("answered_after_body"), 0, "answered at once");
        // Let through, it gets the go-ahead and sends its body, all of which arrives.
        let r = gw.send(
            &Request::new("POST", "/api/upload")
                .user("quinn", "professional")
                .body(Body::ExpectContinue(5 * MB)),
        );
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert_eq!(r.json()["body_bytes"], 5 * MB);
    }
);

on_every_gateway!(a_chunked_upload_is_measured_as_it_streams, |gw| {
    let r = gw.send(
        &Request::new("POST", "/api/upload")
            .user("rue", "free")
            .body(Body::Chunked(3 * MB)),
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["body_bytes"], 3 * MB);
    // Past 10 MB: the 413 JSON once its body is in; the upstream never gets its end.
    let r = gw.send(
        &Request::new("POST", "/api/upload")
            .user("rue", "free")
            .body(Body::Chunked(11 * MB)),
    );
    assert_eq!(r.status, 413, "{}", r.body_text());
    assert!(!r.from_upstream());
    let body = r.json();
    assert_eq!(body["max_bytes"], 10 * MB);
    assert_eq!(body["upgrade"]["plan"], "professional");
    // One counted, with the bytes its body had; the refused one's unit given back.
    assert!(counts(gw, "rue", "upload", 1));
    let events = usage::events_of(&mut gw.redis(), "rue");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["bytes"], (3 * MB).to_string());
    assert!(eventually(|| pending(gw, "rue", "upload") == 0));
    assert_eq!(gw.metric("rejected"), 1);
});
