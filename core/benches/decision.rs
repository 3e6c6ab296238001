//! The filter's core decisions, natively: what one request costs the worker before any host
//! call. `cargo bench -p plan-limits-core --features testing --bench decision` (part of
//! `make bench`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use chrono::{DateTime, TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use plan_limits_core::{
    testing::Recorder, Claims, RedisReply, RequestHead, TransportError, Worker,
};

/// A request's headers and its verified token's claims.
fn head(method: &str, path: &str, plan: &str) -> (Vec<(String, Vec<u8>)>, Claims) {
    let headers = vec![
        (":method".into(), method.into()),
        (":path".into(), path.into()),
        ("content-length".into(), b"1024".to_vec()),
    ];
    let claims = Claims {
        user: Some(b"user-42".to_vec()),
        plan: Some(plan.into()),
        org: None,
        anchor: None,
    };
    (headers, claims)
}

/// plan_limits_settle's answer to `n` items: the batch applied, all done, no plan or anchor
/// recorded.
fn settled(n: usize) -> Result<RedisReply, TransportError> {
    let items = (0..n).flat_map(|_| [RedisReply::Int(1), RedisReply::Nil, RedisReply::Nil]);
    Ok(RedisReply::Array(
        std::iter::once(RedisReply::Int(1)).chain(items).collect(),
    ))
}

/// Keeps the queue from filling: a batch of 64 sent and answered, as the tick would.
fn settle_every_64(worker: &mut Worker, host: &mut Recorder, now: DateTime<Utc>) {
    if worker.queued_settlements() >= 64 {
        settle(worker, host, now);
    }
}

/// Sends the queued settlements and answers them. Panics when the worker did not take the
/// answer (a reply whose format went stale would otherwise leave the batch queued, and the
/// benchmark would time a queue that only grows: `make bench-smoke` runs it once).
fn settle(worker: &mut Worker, host: &mut Recorder, now: DateTime<Utc>) {
    let max_batch = worker.plans().map_or(1, |p| p.redis.max_batch);
    while worker.queued_settlements() > 0 {
        let queued = worker.queued_settlements();
        worker.on_tick(now, host);
        worker.on_reply(host.next_token, settled(queued.min(max_batch)), now, host);
        assert!(
            worker.queued_settlements() < queued,
            "the settlement answer was refused"
        );
    }
}

fn decision(c: &mut Criterion) {
    // The host does nothing but encode what would be sent for webdis (as the shell does).
    let mut host = Recorder::lean();
    let mut worker = Worker::new(1);
    // The repository's plans without spike arrest: the benchmark is one user at full speed.
    let mut plans: serde_json::Value =
        serde_json::from_slice(include_bytes!("../../plans.json")).unwrap();
    for plan in plans["plans"].as_object_mut().unwrap().values_mut() {
        plan["request_rate"] = serde_json::Value::Null;
    }
    assert!(worker.configure(plans.to_string().as_bytes(), &mut host));
    let now: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    let granted = || {
        Ok(RedisReply::Array(vec![
            RedisReply::Int(1),
            RedisReply::Int(2),
            RedisReply::Int(1),
            RedisReply::Bulk(b"free".to_vec()),
            RedisReply::Bulk(b"free".to_vec()),
            RedisReply::Int(0),
        ]))
    };

    c.bench_function("unmetered route", |b| {
        let h = head("GET", "/health", "free");
        b.iter(|| {
            worker.on_request_headers(
                1,
                RequestHead::new(black_box(&h.0), &h.1),
                false,
                now,
                &mut host,
            )
        })
    });

    c.bench_function(
        "limited: headers + reservation (webdis body) + reply + response + end",
        |b| {
            let h = head("POST", "/api/upload", "free");
            b.iter(|| {
                worker.on_request_headers(
                    1,
                    RequestHead::new(black_box(&h.0), &h.1),
                    false,
                    now,
                    &mut host,
                );
                host.resumed.clear();
                worker.on_reply(host.next_token, granted(), now, &mut host);
                assert_eq!(host.resumed, [1], "the reservation was not granted");
                // Its success's commit goes at once, and its answer lets the held response go.
                worker.on_response_headers(1, 200, None, now, &mut host);
                worker.on_reply(host.next_token, settled(1), now, &mut host);
                assert_eq!(
                    worker.queued_settlements(),
                    0,
                    "the commit was sent at once and applied"
                );
                worker.on_stream_end(1, true, now, &mut host);
                settle_every_64(&mut worker, &mut host, now);
            })
        },
    );

    c.bench_function("unlimited: headers + response + end", |b| {
        let h = head("GET", "/api/procedures/7", "free");
        b.iter(|| {
            worker.on_request_headers(
                1,
                RequestHead::new(black_box(&h.0), &h.1),
                false,
                now,
                &mut host,
            );
            worker.on_response_headers(1, 200, None, now, &mut host);
            worker.on_stream_end(1, true, now, &mut host);
            settle_every_64(&mut worker, &mut host, now);
        })
    });

    c.bench_function("settlement batch of 64 (command + webdis body)", |b| {
        let h = head("GET", "/api/procedures/7", "free");
        b.iter(|| {
            for _ in 0..64 {
                worker.on_request_headers(1, RequestHead::new(&h.0, &h.1), false, now, &mut host);
                worker.on_response_headers(1, 200, None, now, &mut host);
                worker.on_stream_end(1, true, now, &mut host);
            }
            settle(&mut worker, &mut host, now);
        })
    });
}

criterion_group!(benches, decision);
criterion_main!(benches);
