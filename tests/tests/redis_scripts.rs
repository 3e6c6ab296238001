//! The two Lua scripts (reserve, settle) on a real redis-server: atomic limits, expiry of
//! unsettled reservations, idempotent commits, summaries and usage events.

use std::rc::Rc;

use plan_limits_core::keys::UsageKeys;
use plan_limits_core::redis::scripts::{self, Reservation, ReserveArgs};
use plan_limits_core::settlement::{SettleMode, Settlement};
use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_services::redis_exec::run_script;
use plan_limits_services::redis_server::RedisServer;
use plan_limits_services::usage;

const TTL: u64 = 60_000;
const NOW: u64 = 1_795_000_000_000;

fn redis() -> (RedisServer, redis::Connection) {
    let server = RedisServer::start_on(&scratch_dir("scripts"), free_port());
    let conn = server.connection();
    (server, conn)
}

fn keys(user: &str) -> UsageKeys {
    UsageKeys::new(&usage::prefix(), user, "2026-11", "upload")
}

fn reserve(
    conn: &mut redis::Connection,
    user: &str,
    id: &str,
    limit: u64,
    now: u64,
) -> Reservation {
    let keys = keys(user);
    let args = ReserveArgs {
        keys: &keys,
        action: "upload",
        limit,
        reservation_id: id,
        now_ms: now,
        ttl_ms: TTL,
    };
    let reply = run_script(conn, |form| scripts::reserve(args, form));
    scripts::parse_reservation(reply).unwrap()
}

fn settlement(mode: SettleMode, user: &str, id: &str) -> Settlement {
    Settlement {
        mode,
        keys: keys(user),
        reservation_id: id.into(),
        action: "upload".into(),
        user: user.into(),
        plan: "free".into(),
        limits_json: Rc::from(r#"{"upload":5}"#),
        kind: "vision".into(),
        bytes: 42,
        status: 201,
        at: "2026-11-27T12:00:00.000Z".into(),
        request_id: "req-1".into(),
        period_id: "2026-11".into(),
        keep_for_ms: 400 * 86_400_000,
    }
}

fn settle(conn: &mut redis::Connection, batch: &[Settlement]) -> Vec<i64> {
    run_script(conn, |form| {
        scripts::settle(batch, &usage::events_stream(), None, form)
    })
    .into_ints()
    .unwrap()
}

fn counter(conn: &mut redis::Connection, user: &str) -> Option<u64> {
    redis::cmd("HGET")
        .arg(keys(user).summary)
        .arg("upload")
        .query(conn)
        .unwrap()
}

#[test]
fn reservations_stop_at_the_limit_counting_those_in_flight() {
    let (_server, mut conn) = redis();
    for i in 0..3 {
        let r = reserve(&mut conn, "u", &format!("r{i}"), 3, NOW);
        assert!(r.granted);
        assert_eq!(r.pending, i + 1);
    }
    let r = reserve(&mut conn, "u", "r3", 3, NOW);
    assert_eq!(
        r,
        Reservation {
            granted: false,
            committed: 0,
            pending: 3
        }
    );
    assert_eq!(
        settle(&mut conn, &[settlement(SettleMode::Commit, "u", "r0")]),
        [1]
    );
    let r = reserve(&mut conn, "u", "r4", 3, NOW);
    assert_eq!(
        r,
        Reservation {
            granted: false,
            committed: 1,
            pending: 2
        }
    );
    // Another user's allowance is their own.
    assert!(reserve(&mut conn, "u2", "r5", 3, NOW).granted);
}

#[test]
fn a_release_gives_the_unit_back_and_counts_nothing() {
    let (_server, mut conn) = redis();
    assert!(reserve(&mut conn, "u", "r1", 1, NOW).granted);
    assert!(!reserve(&mut conn, "u", "r2", 1, NOW).granted);
    assert_eq!(
        settle(&mut conn, &[settlement(SettleMode::Release, "u", "r1")]),
        [0]
    );
    assert_eq!(counter(&mut conn, "u"), None);
    assert!(reserve(&mut conn, "u", "r3", 1, NOW).granted);
}

#[test]
fn an_unsettled_reservation_expires_and_is_never_counted() {
    let (_server, mut conn) = redis();
    assert!(reserve(&mut conn, "u", "lost", 1, NOW).granted);
    assert!(!reserve(&mut conn, "u", "r2", 1, NOW + TTL - 1).granted);
    // Past its expiry the unit is free again ...
    assert!(reserve(&mut conn, "u", "r3", 1, NOW + TTL + 1).granted);
    // ... and a late commit of the lost reservation counts nothing.
    assert_eq!(
        settle(&mut conn, &[settlement(SettleMode::Commit, "u", "lost")]),
        [0]
    );
    assert_eq!(counter(&mut conn, "u"), None);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys("u").pending)
        .query(&mut conn)
        .unwrap();
    assert!(pttl > 0, "the pending set expires with its reservations");
}

#[test]
fn a_commit_sent_twice_counts_once() {
    let (_server, mut conn) = redis();
    assert!(reserve(&mut conn, "u", "r1", 5, NOW).granted);
    let commit = settlement(SettleMode::Commit, "u", "r1");
    assert_eq!(settle(&mut conn, &[commit.clone(), commit]), [1, 0]);
    assert_eq!(counter(&mut conn, "u"), Some(1));
}

#[test]
fn a_count_updates_the_summary_and_records_an_event() {
    let (_server, mut conn) = redis();
    assert_eq!(
        settle(&mut conn, &[settlement(SettleMode::Count, "u", "c1")]),
        [1]
    );
    let summary: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys("u").summary)
        .query(&mut conn)
        .unwrap();
    assert_eq!(summary["upload"], "1");
    assert_eq!(summary["plan"], "free");
    assert_eq!(summary["limits"], r#"{"upload":5}"#);
    assert_eq!(summary["updated_at"], "2026-11-27T12:00:00.000Z");
    let pttl: u64 = redis::cmd("PTTL")
        .arg(keys("u").summary)
        .query(&mut conn)
        .unwrap();
    assert!(
        (399 * 86_400_000..=400 * 86_400_000).contains(&pttl),
        "{pttl}"
    );

    let events: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(usage::events_stream())
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].1,
        [
            "user",
            "u",
            "action",
            "upload",
            "kind",
            "vision",
            "bytes",
            "42",
            "status",
            "201",
            "at",
            "2026-11-27T12:00:00.000Z",
            "request_id",
            "req-1",
            "plan",
            "free",
            "period",
            "2026-11"
        ]
    );
}

#[test]
fn the_event_stream_can_be_capped() {
    let (_server, mut conn) = redis();
    let batch: Vec<_> = (0..300)
        .map(|i| settlement(SettleMode::Count, "u", &format!("c{i}")))
        .collect();
    for chunk in batch.chunks(50) {
        run_script(&mut conn, |form| {
            scripts::settle(chunk, &usage::events_stream(), Some(100), form)
        });
    }
    let len: u64 = redis::cmd("XLEN")
        .arg(usage::events_stream())
        .query(&mut conn)
        .unwrap();
    assert!((100..300).contains(&len), "approximately capped: {len}");
    assert_eq!(
        counter(&mut conn, "u"),
        Some(300),
        "the counter is never capped"
    );
}

#[test]
fn a_batch_of_one_users_settlements_counts_each_and_records_each_event() {
    let (_server, mut conn) = redis();
    assert!(reserve(&mut conn, "u", "r1", 5, NOW).granted);
    let mut batch: Vec<_> = (0..3)
        .map(|i| settlement(SettleMode::Count, "u", &format!("c{i}")))
        .collect();
    batch.push(settlement(SettleMode::Commit, "u", "r1"));
    batch.push(settlement(SettleMode::Release, "u", "gone"));
    let mut unreserved = settlement(SettleMode::Count, "u", "");
    unreserved.plan = "professional".into();
    batch.push(unreserved);
    assert_eq!(settle(&mut conn, &batch), [1, 1, 1, 1, 0, 1]);
    assert_eq!(counter(&mut conn, "u"), Some(5));
    let len: u64 = redis::cmd("XLEN")
        .arg(usage::events_stream())
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 5);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys("u").summary)
        .query(&mut conn)
        .unwrap();
    assert!(pttl > 0);
}
