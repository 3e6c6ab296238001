//! The filter's core decision, natively: what one request costs before any host call.
//! `cargo bench -p plan-limits-filter --bench decision` (part of `make bench`).

use std::hint::black_box;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use plan_limits_core::config::Config;
use plan_limits_core::redis::{webdis, RedisReply};
use plan_limits_core::request::{Admission, Gate};
use plan_limits_core::settlements::SettlementQueue;

fn gate() -> Gate {
    Gate::new(Config::from_json(include_bytes!("../../plans.json")).unwrap())
}

fn headers<'a>(pairs: &'a [(&'a str, &'a [u8])]) -> impl Fn(&str) -> Vec<Vec<u8>> + 'a {
    move |name| {
        pairs
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.to_vec())
            .collect()
    }
}

fn decision(c: &mut Criterion) {
    let gate = gate();
    let now = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    let user: &[(&str, &[u8])] = &[
        ("x-user-id", b"user-42"),
        ("x-user-plan", b"free"),
        ("content-length", b"1024"),
    ];

    c.bench_function("unmetered route", |b| {
        let h = headers(&[]);
        b.iter(|| {
            gate.admit(
                black_box("GET"),
                black_box("/health"),
                &h,
                now,
                || unreachable!(),
            )
        })
    });

    c.bench_function("limited: admit + reservation reply + response", |b| {
        let h = headers(user);
        let granted = RedisReply::Array(vec![
            RedisReply::Int(1),
            RedisReply::Int(2),
            RedisReply::Int(1),
        ]);
        b.iter(|| {
            let Admission::Reserve(mut metered, command) =
                gate.admit("POST", black_box("/api/upload"), &h, now, || {
                    "0123456789abcdef-1".into()
                })
            else {
                unreachable!()
            };
            black_box(webdis::request_body(&command));
            metered.on_reservation(&gate, Ok(granted.clone()), now);
            metered.on_response(&gate, 200, now)
        })
    });

    c.bench_function("unlimited: admit + response", |b| {
        let h = headers(user);
        b.iter(|| {
            let Admission::Proceed(mut metered) = gate.admit(
                "GET",
                black_box("/api/procedures/7"),
                &h,
                now,
                || unreachable!(),
            ) else {
                unreachable!()
            };
            metered.on_response(&gate, 200, now)
        })
    });

    c.bench_function("settlement batch of 64 (command + webdis body)", |b| {
        let h = headers(user);
        let items: Vec<_> = (0..64)
            .map(|_| {
                let Admission::Proceed(mut metered) =
                    gate.admit("GET", "/api/procedures/7", &h, now, || unreachable!())
                else {
                    unreachable!()
                };
                metered.on_response(&gate, 200, now).unwrap()
            })
            .collect();
        b.iter(|| {
            let mut queue = SettlementQueue::new(1000, 64);
            for item in &items {
                queue.push(item.clone());
            }
            let command = queue.next_batch(0, "plan-limits:events", None).unwrap();
            black_box(webdis::request_body(&command))
        })
    });
}

criterion_group!(benches, decision);
criterion_main!(benches);
