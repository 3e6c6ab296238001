//! The Redis functions library (`plan_limits.lua`) on a real, locked-down redis-server: atomic
//! limits, billing's plan over the claimed one, expiry and extension of reservations, commits
//! counted once however late, summaries and usage events; and what the filter's Redis user
//! may not do.

use std::rc::Rc;

use plan_limits_core::functions::{
    self, EventsTrim, GaugeHold, IdempotencyMark, LeaseAsk, Reservation, ReserveArgs,
    ReserveStatus, SettleArgs, SettleReply, Settled,
};
use plan_limits_core::{
    encoded_user, entitlement_key, history_query, Gauge, Limit, Plans, RedisCommand, RedisReply,
    Report, ReportKind, SettleMode, Settlement, UsageKeys,
};
use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_services::redis_exec::run;
use plan_limits_services::redis_server::RedisServer;
use plan_limits_services::usage;

const TTL: u64 = 60_000;
const NOW: u64 = 1_795_000_000_000;
const REMEMBER: u64 = 3_600_000;
/// The events stream (the default one: `usage::events_stream()`).
const EVENTS: &str = "plan-limits:events";

fn redis() -> (RedisServer, redis::Connection) {
    let server = RedisServer::start_on(&scratch_dir("scripts"), free_port());
    let conn = server.connection();
    (server, conn)
}

fn keys(user: &str) -> UsageKeys {
    UsageKeys::new(&usage::prefix(), user, "2026-11", "upload")
}

/// Plans' limits for uploads: free 3, professional unlimited.
fn limits(free: u64) -> Vec<(String, Limit)> {
    vec![("free".into(), Some(free)), ("professional".into(), None)]
}

/// An upload reservation of `keys` under `id` at `now`, claiming `claimed`, with the tests'
/// fixed fallback and expiry; the caller sets what else it varies.
fn upload_args<'a>(
    keys: &'a UsageKeys,
    limits: &'a [(String, Limit)],
    id: &'a str,
    now: u64,
    claimed: &'a str,
) -> ReserveArgs<'a> {
    ReserveArgs {
        keys,
        action: "upload",
        claimed_plan: claimed,
        fallback_plan: Some("free"),
        reservation_id: id,
        now_ms: now,
        ttl_ms: TTL,
        limits,
        idempotency: None,
        gauge: None,
        lease: None,
        events_stream: EVENTS,
        user: "u",
        period_id: "2026-11",
    }
}

fn reserve_as(
    conn: &mut redis::Connection,
    user: &str,
    id: &str,
    limit: u64,
    now: u64,
    claimed: &str,
) -> Reservation {
    let keys = keys(user);
    let limits = limits(limit);
    let reply = run(
        conn,
        &functions::reserve(upload_args(&keys, &limits, id, now, claimed)),
    );
    functions::parse_reservation(reply).unwrap()
}

fn reserve(
    conn: &mut redis::Connection,
    user: &str,
    id: &str,
    limit: u64,
    now: u64,
) -> Reservation {
    reserve_as(conn, user, id, limit, now, "free")
}

fn granted(r: &Reservation) -> bool {
    r.status == ReserveStatus::Granted
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
        metadata: String::new(),
        in_grace: false,
        bytes: 42,
        status: 201,
        at: "2026-11-27T12:00:00.000Z".into(),
        day: "2026-11-27".into(),
        request_id: "req-1".into(),
        idempotency_key: String::new(),
        gauge: None,
        adds: None,
        held: None,
        period_id: "2026-11".into(),
        keep_for_ms: 400 * 86_400_000,
        made_at_ms: NOW,
        certain: true,
        waiter: None,
        fail_open: false,
    }
}

/// Each batch a test sends has the next number (tests in this process share the counter,
/// which only needs to grow).
fn next_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn settle_at(conn: &mut redis::Connection, batch: &[Settlement], now: u64) -> Vec<Settled> {
    match settle_numbered(conn, batch, now, next_seq()) {
        SettleReply::Applied(settled) => settled,
        SettleReply::AppliedBefore => panic!("a new batch was taken for one applied before"),
    }
}

/// The test worker's batch number `seq` of `batch`.
fn settle_command(batch: &[Settlement], now: u64, seq: u64) -> RedisCommand {
    let applied_key = format!("{}:applied:test-worker", usage::prefix());
    functions::settle(
        batch,
        SettleArgs {
            events_stream: &usage::events_stream(),
            events_trim: EventsTrim::KeepAll,
            now_ms: now,
            ttl_ms: TTL,
            remember_commits_ms: REMEMBER,
            keep_days_ms: 86_400_000,
            warning_thresholds: &[80, 90],
            applied_key: &applied_key,
            seq,
            applied_memory_ms: 86_400_000,
            queued: 0,
            stopping: false,
        },
    )
}

/// Sends `batch` as the test worker's batch number `seq`.
fn settle_numbered(
    conn: &mut redis::Connection,
    batch: &[Settlement],
    now: u64,
    seq: u64,
) -> SettleReply {
    let reply = run(conn, &settle_command(batch, now, seq));
    functions::parse_settled(reply, batch.len()).unwrap()
}

/// Whether each item was done (counted, extended).
fn settle(conn: &mut redis::Connection, batch: &[Settlement]) -> Vec<bool> {
    settle_at(conn, batch, NOW)
        .into_iter()
        .map(|s| s.done.expect("not refused"))
        .collect()
}

fn counter(conn: &mut redis::Connection, user: &str) -> Option<u64> {
    redis::cmd("HGET")
        .arg(keys(user).summary)
        .arg("upload")
        .query(conn)
        .unwrap()
}

fn set_plan(conn: &mut redis::Connection, user: &str, plan: &str) {
    redis::cmd("HSET")
        .arg(entitlement_key(&usage::prefix(), encoded_user(user)))
        .arg("plan")
        .arg(plan)
        .exec(conn)
        .unwrap();
}

#[test]
fn reservations_stop_at_the_limit_counting_those_in_flight() {
    let (_server, mut conn) = redis();
    for i in 0..3 {
        let r = reserve(&mut conn, "u", &format!("r{i}"), 3, NOW);
        assert!(granted(&r));
        assert_eq!(r.pending, i + 1);
    }
    let r = reserve(&mut conn, "u", "r3", 3, NOW);
    assert_eq!(
        (r.status, r.committed, r.pending, r.plan.as_str()),
        (ReserveStatus::Refused, 0, 3, "free")
    );
    assert_eq!(
        settle(&mut conn, &[settlement(SettleMode::Commit, "u", "r0")]),
        [true]
    );
    let r = reserve(&mut conn, "u", "r4", 3, NOW);
    assert_eq!(
        (r.status, r.committed, r.pending),
        (ReserveStatus::Refused, 1, 2)
    );
    // Another user's allowance is their own.
    assert!(granted(&reserve(&mut conn, "u2", "r5", 3, NOW)));
}

#[test]
fn billings_plan_wins_over_the_claimed_one_and_an_unknown_plan_falls_back() {
    let (_server, mut conn) = redis();
    // No record: the claim applies (professional: unlimited, nothing reserved).
    let r = reserve_as(&mut conn, "u", "r1", 3, NOW, "professional");
    assert_eq!(
        (r.status, r.plan.as_str()),
        (ReserveStatus::Unlimited, "professional")
    );
    // Billing downgraded the user: free's limit applies whatever the token says.
    set_plan(&mut conn, "u", "free");
    let r = reserve_as(&mut conn, "u", "r2", 1, NOW, "professional");
    assert_eq!(
        (r.status, r.plan.as_str()),
        (ReserveStatus::Granted, "free")
    );
    let r = reserve_as(&mut conn, "u", "r3", 1, NOW, "professional");
    assert_eq!(r.status, ReserveStatus::Refused);
    // A record naming a plan plans.json does not know: the fallback, named as such.
    set_plan(&mut conn, "v", "platinum");
    let r = reserve_as(&mut conn, "v", "r4", 2, NOW, "professional");
    assert_eq!(
        (r.status, r.plan.as_str(), r.named_plan.as_str()),
        (ReserveStatus::Granted, "free", "platinum")
    );
}

/// A reservation of `user`'s upload under `id` asking for a lease of `units` (room factor 10).
fn reserve_leasing(
    conn: &mut redis::Connection,
    user: &str,
    id: &str,
    limit: u64,
    units: u64,
) -> Reservation {
    let keys = keys(user);
    let limits = limits(limit);
    let mut args = upload_args(&keys, &limits, id, NOW, "free");
    args.lease = Some(LeaseAsk {
        units,
        room_factor: 10,
    });
    functions::parse_reservation(run(conn, &functions::reserve(args))).unwrap()
}

#[test]
fn a_lease_holds_its_units_like_reservations_and_only_while_ten_times_as_many_remain() {
    let (_server, mut conn) = redis();
    // 100 left: the request's unit and 4 more (its lease of 5), each held in pending.
    let r = reserve_leasing(&mut conn, "u", "a", 100, 5);
    assert_eq!(
        (r.status, r.leased, r.pending),
        (ReserveStatus::Granted, 4, 5)
    );
    // Each unit commits, or goes back, as a reservation of its own.
    let unit = |k| functions::leased_unit_id("a", k);
    let batch = [
        settlement(SettleMode::Commit, "u", "a"),
        settlement(SettleMode::Commit, "u", &unit(1)),
        settlement(SettleMode::Commit, "u", &unit(2)),
        settlement(SettleMode::Release, "u", &unit(3)),
        settlement(SettleMode::Release, "u", &unit(4)),
    ];
    assert_eq!(settle(&mut conn, &batch), [true, true, true, false, false]);
    assert_eq!(counter(&mut conn, "u"), Some(3));
    // Limit 53 with 3 counted: 49 left once its own unit is held, one under ten times a
    // lease of 5: its unit only.
    let r = reserve_leasing(&mut conn, "u", "b", 53, 5);
    assert_eq!(
        (r.status, r.leased, r.pending),
        (ReserveStatus::Granted, 0, 1)
    );
    // A lease's units count against the limit like any in flight: the last units are
    // refused while a lease holds them, never granted twice.
    let r = reserve_leasing(&mut conn, "v", "c", 100, 1);
    assert_eq!(
        (r.status, r.leased),
        (ReserveStatus::Granted, 0),
        "a lease of 1 is none"
    );
    let r = reserve_leasing(&mut conn, "w", "d", 51, 5);
    assert_eq!(r.leased, 4);
    for i in 0..46 {
        assert!(granted(&reserve(&mut conn, "w", &format!("w{i}"), 51, NOW)));
    }
    let r = reserve(&mut conn, "w", "over", 51, NOW);
    assert_eq!((r.status, r.pending), (ReserveStatus::Refused, 51));
}

#[test]
fn a_release_gives_the_unit_back_and_counts_nothing() {
    let (_server, mut conn) = redis();
    assert!(granted(&reserve(&mut conn, "u", "r1", 1, NOW)));
    assert!(!granted(&reserve(&mut conn, "u", "r2", 1, NOW)));
    assert_eq!(
        settle(&mut conn, &[settlement(SettleMode::Release, "u", "r1")]),
        [false]
    );
    assert_eq!(counter(&mut conn, "u"), None);
    assert!(granted(&reserve(&mut conn, "u", "r3", 1, NOW)));
}

#[test]
fn an_unsettled_reservation_expires_and_an_extended_one_does_not() {
    let (_server, mut conn) = redis();
    assert!(granted(&reserve(&mut conn, "u", "lost", 1, NOW)));
    assert!(!granted(&reserve(&mut conn, "u", "r2", 1, NOW + TTL - 1)));
    // Past its expiry the unit is free again, and the expired one is on record: what an Envoy
    // that died with it in flight may have lost.
    assert!(granted(&reserve(&mut conn, "u", "r3", 1, NOW + TTL + 1)));
    let expired: Vec<_> = usage::events(&mut conn)
        .into_iter()
        .filter(|e| e["event"] == "reservation_expired")
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(
        (
            &*expired[0]["user"],
            &*expired[0]["action"],
            &*expired[0]["reservation"]
        ),
        ("u", "upload", "lost")
    );
    assert_eq!(expired[0]["period"], "2026-11");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys("u").pending)
        .query(&mut conn)
        .unwrap();
    let week = 7 * 86_400_000;
    assert!(
        pttl > week && pttl <= week + TTL as i64,
        "the pending set is kept a week past its last use, for the audit: {pttl}"
    );
    // A reservation extended before it expires keeps holding its unit.
    assert!(granted(&reserve(&mut conn, "w", "slow", 1, NOW)));
    let extended = settle_at(
        &mut conn,
        &[settlement(SettleMode::Extend, "w", "slow")],
        NOW + TTL / 2,
    );
    assert_eq!(extended[0].done, Some(true));
    assert!(!granted(&reserve(
        &mut conn,
        "w",
        "other",
        1,
        NOW + TTL + 1
    )));
    // Extending a reservation that is gone does nothing.
    let gone = settle(
        &mut conn,
        &[settlement(SettleMode::Extend, "w", "never-made")],
    );
    assert_eq!(gone, [false]);
}

#[test]
fn a_commit_counts_once_even_after_its_reservation_expired() {
    let (_server, mut conn) = redis();
    // The success happened after Redis expired the reservation (say Redis was unreachable for
    // longer): it still counts ...
    assert!(granted(&reserve(&mut conn, "u", "late", 1, NOW)));
    assert!(granted(&reserve(&mut conn, "u", "next", 1, NOW + TTL + 1)));
    let commit = [settlement(SettleMode::Commit, "u", "late")];
    assert_eq!(
        settle_at(&mut conn, &commit, NOW + TTL + 2)[0].done,
        Some(true)
    );
    // ... once: sent again (its first answer lost), it counts nothing.
    assert_eq!(
        settle_at(&mut conn, &commit, NOW + TTL + 3)[0].done,
        Some(false)
    );
    assert_eq!(counter(&mut conn, "u"), Some(1));
}

#[test]
fn a_commit_sent_twice_counts_once() {
    let (_server, mut conn) = redis();
    assert!(granted(&reserve(&mut conn, "u", "r1", 5, NOW)));
    let commit = settlement(SettleMode::Commit, "u", "r1");
    assert_eq!(settle(&mut conn, &[commit.clone(), commit]), [true, false]);
    assert_eq!(counter(&mut conn, "u"), Some(1));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys("u").commits)
        .query(&mut conn)
        .unwrap();
    assert!(
        pttl > 0 && pttl as u64 <= REMEMBER,
        "commit ids are forgotten in time"
    );
}

#[test]
fn a_batch_sent_again_is_applied_once_whatever_it_holds() {
    let (_server, mut conn) = redis();
    assert!(granted(&reserve(&mut conn, "u", "r1", 5, NOW)));
    // A commit and two counts (counts have no id Redis could remember them by): the batch's
    // number is what makes sending it again safe.
    let batch = [
        settlement(SettleMode::Commit, "u", "r1"),
        settlement(SettleMode::Count, "u", ""),
        settlement(SettleMode::Count, "u", ""),
    ];
    let seq = next_seq();
    assert!(matches!(
        settle_numbered(&mut conn, &batch, NOW, seq),
        SettleReply::Applied(_)
    ));
    // Its answer was lost: the worker sends it again, twice, and an older one turns up late.
    for again in [seq, seq, seq - 1] {
        assert_eq!(
            settle_numbered(&mut conn, &batch, NOW, again),
            SettleReply::AppliedBefore
        );
    }
    assert_eq!(counter(&mut conn, "u"), Some(3));
    assert_eq!(usage::events_of(&mut conn, "u").len(), 3);
    // The next batch is applied.
    let next = [settlement(SettleMode::Count, "u", "")];
    assert!(matches!(
        settle_numbered(&mut conn, &next, NOW, seq + 1),
        SettleReply::Applied(_)
    ));
    assert_eq!(counter(&mut conn, "u"), Some(4));
}

/// `v2`, a `plan_limits_settle_v2` call, as a filter older than it sends the batch
/// (`plan_limits_settle`): each item's eight keys in full, its limits in full, no positions.
fn as_v1(v2: &RedisCommand) -> RedisCommand {
    let numkeys: usize = String::from_utf8_lossy(&v2.args[2]).parse().unwrap();
    let keys = &v2.args[3..3 + numkeys];
    let head = &v2.args[3 + numkeys..3 + numkeys + 12];
    let items: Vec<&[Vec<u8>]> = v2.args[3 + numkeys + 12..].chunks(20).collect();
    let mut v1 = RedisCommand::new("FCALL")
        .arg("plan_limits_settle")
        .arg((2 + 8 * items.len()).to_string())
        .arg(&keys[0])
        .arg(&keys[1]);
    for item in &items {
        for position in String::from_utf8_lossy(&item[19]).split(' ') {
            v1 = v1.arg(&keys[position.parse::<usize>().unwrap() - 1]);
        }
    }
    for (i, arg) in head.iter().enumerate() {
        v1 = v1.arg(if i == 7 { &b"19"[..] } else { arg });
    }
    let mut limits = Vec::new();
    for item in items {
        if !item[5].is_empty() {
            limits.clone_from(&item[5]);
        }
        for (f, field) in item[..19].iter().enumerate() {
            v1 = v1.arg(if f == 5 { &limits } else { field });
        }
    }
    v1
}

#[test]
fn a_batch_from_a_filter_older_than_the_library_is_applied_alike() {
    // During a rolling upgrade, Envoys with the filter before plan_limits_settle_v2 still send
    // each item's keys and limits in full to plan_limits_settle.
    let (_server, mut conn) = redis();
    assert!(granted(&reserve(&mut conn, "u", "r1", 5, NOW)));
    let mut other = settlement(SettleMode::Count, "v", "");
    other.limits_json = Rc::from(r#"{"upload":2}"#);
    let batch = [
        settlement(SettleMode::Commit, "u", "r1"),
        settlement(SettleMode::Count, "u", ""),
        other.clone(),
        other,
    ];
    let v1 = as_v1(&settle_command(&batch, NOW, next_seq()));
    assert_eq!(v1.args[2], b"34");
    let reply = functions::parse_settled(run(&mut conn, &v1), batch.len()).unwrap();
    let SettleReply::Applied(settled) = reply else {
        panic!("not applied: {reply:?}")
    };
    assert!(settled.iter().all(|s| s.done == Some(true)), "{settled:?}");
    assert_eq!(counter(&mut conn, "u"), Some(2));
    assert_eq!(counter(&mut conn, "v"), Some(2));
    assert_eq!(usage::events_of(&mut conn, "u").len(), 2);
    // v's own limits, read from its items: its 2 of 2 crossed both thresholds.
    let crossed = usage::events(&mut conn)
        .iter()
        .filter(|e| e["event"] == "threshold_crossed" && e["user"] == "v")
        .count();
    assert_eq!(crossed, 2);
}

#[test]
fn a_workers_record_says_when_it_was_last_heard_of_and_whether_it_stopped() {
    let (_server, mut conn) = redis();
    let record = |conn: &mut redis::Connection| -> std::collections::BTreeMap<String, String> {
        let key = format!("{}:applied:test-worker", usage::prefix());
        redis::cmd("HGETALL").arg(key).query(conn).unwrap()
    };
    let seq = next_seq();
    settle_numbered(
        &mut conn,
        &[settlement(SettleMode::Count, "u", "")],
        NOW,
        seq,
    );
    let r = record(&mut conn);
    assert_eq!(
        (&*r["seq"], &*r["at"], &*r["stopped"]),
        (&*seq.to_string(), &*NOW.to_string(), "0")
    );
    // A heartbeat (no items) keeps the last batch's number and says it is alive at a later time.
    assert!(matches!(
        settle_numbered(&mut conn, &[], NOW + 30_000, 0),
        SettleReply::Applied(_)
    ));
    let r = record(&mut conn);
    assert_eq!(
        (&*r["seq"], &*r["at"]),
        (&*seq.to_string(), &*(NOW + 30_000).to_string())
    );
    assert_eq!(
        counter(&mut conn, "u"),
        Some(1),
        "a heartbeat counts nothing"
    );
}

#[test]
fn an_item_with_a_value_out_of_range_is_refused_on_record_and_the_others_are_applied() {
    let (_server, mut conn) = redis();
    // A delete whose upstream said it freed 2^64 - 1 bytes, between two other users' counts.
    let mut bad = given_back(Gauge::Storage, 1);
    bad.adds = Some(u64::MAX);
    let batch = [
        settlement(SettleMode::Count, "a", ""),
        bad,
        settlement(SettleMode::Count, "b", ""),
    ];
    let settled = settle_at(&mut conn, &batch, NOW);
    let done: Vec<_> = settled.iter().map(|s| s.done).collect();
    assert_eq!(done, [Some(true), None, Some(true)]);
    assert_eq!(
        (counter(&mut conn, "a"), counter(&mut conn, "b")),
        (Some(1), Some(1))
    );
    let refused: Vec<_> = usage::events(&mut conn)
        .into_iter()
        .filter(|e| e["event"] == "settle_refused")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (&*refused[0]["user"], &*refused[0]["mode"]),
        ("u", "give_back")
    );
    assert!(
        refused[0]["reason"].contains("out of range"),
        "{:?}",
        refused[0]
    );
}

#[test]
fn a_give_back_larger_than_what_is_stored_leaves_zero() {
    let (_server, mut conn) = redis();
    let commit = upload_settled(SettleMode::Count, "", 0, 100);
    settle(&mut conn, &[commit]);
    // The largest amount the filter lets through (2^53): exact in Lua, and never below 0.
    let mut freed = given_back(Gauge::Storage, 1);
    freed.adds = Some(1 << 53);
    assert_eq!(settle(&mut conn, &[freed]), [true]);
    assert_eq!(stored(&mut conn), 0);
}

#[test]
fn lost_settlements_are_on_record_per_user_and_action() {
    let (_server, mut conn) = redis();
    let mut lost = Settlement::lost(&settlement(SettleMode::Count, "u", ""), "queue_full");
    lost.adds = Some(7);
    assert_eq!(settle(&mut conn, &[lost]), [true]);
    let events = usage::events(&mut conn);
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(
        (
            &*e["event"],
            &*e["user"],
            &*e["action"],
            &*e["units"],
            &*e["reason"]
        ),
        ("lost", "u", "upload", "7", "queue_full")
    );
    let summary = usage::summary(&mut conn, "u", "2026-11");
    assert_eq!(summary.get("lost:upload").map(String::as_str), Some("7"));
    assert_eq!(counter(&mut conn, "u"), None, "not a count");
}

#[test]
fn settling_answers_each_users_recorded_plan() {
    let (_server, mut conn) = redis();
    set_plan(&mut conn, "b", "professional");
    let batch = [
        settlement(SettleMode::Count, "a", ""),
        settlement(SettleMode::Count, "b", ""),
    ];
    let settled = settle_at(&mut conn, &batch, NOW);
    assert_eq!(
        settled
            .iter()
            .map(|s| s.entitled_plan.clone())
            .collect::<Vec<_>>(),
        [None, Some("professional".to_string())]
    );
}

#[test]
fn a_count_updates_the_summary_and_records_an_event() {
    let (_server, mut conn) = redis();
    assert_eq!(
        settle(&mut conn, &[settlement(SettleMode::Count, "u", "c1")]),
        [true]
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
    let events = usage::events(&mut conn);
    assert_eq!(events.len(), 1);
    let fields: Vec<(&str, &str)> = events[0]
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("action", "upload"),
            ("at", "2026-11-27T12:00:00.000Z"),
            ("bytes", "42"),
            ("event", "usage"),
            ("idempotency_key", ""),
            ("kind", "vision"),
            ("outcome", "success"),
            ("period", "2026-11"),
            ("plan", "free"),
            ("request_id", "req-1"),
            ("reservation", "c1"),
            ("status", "201"),
            ("user", "u"),
        ]
    );
}

#[test]
fn a_count_records_the_requests_metadata_and_its_kind_in_the_days_counters() {
    let (_server, mut conn) = redis();
    let with_metadata = Settlement {
        metadata: r#"{"file_name":"pump.pdf"}"#.into(),
        ..settlement(SettleMode::Count, "u", "c1")
    };
    let other_kind = Settlement {
        kind: "chat".into(),
        ..settlement(SettleMode::Count, "u", "c2")
    };
    assert_eq!(
        settle(&mut conn, &[with_metadata, other_kind]),
        [true, true]
    );
    let events = usage::events(&mut conn);
    assert_eq!(
        events[0].get("metadata").map(String::as_str),
        Some(r#"{"file_name":"pump.pdf"}"#)
    );
    assert_eq!(events[1].get("metadata"), None, "none recorded: no field");
    let day: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(keys("u").user.day("2026-11-27"))
        .query(&mut conn)
        .unwrap();
    let day: Vec<(&str, &str)> = day.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        day,
        [
            ("upload", "2"),
            ("upload:chat", "1"),
            ("upload:vision", "1")
        ]
    );
}

#[test]
fn the_periods_last_uses_with_metadata_are_kept_newest_first_and_read_with_its_usage() {
    let (server, mut conn) = redis();
    let uses: Vec<Settlement> = (0..12)
        .map(|i| Settlement {
            metadata: format!(r#"{{"file_name":"d{i}.pdf"}}"#),
            request_id: format!("req-{i}"),
            ..settlement(SettleMode::Count, "u", &format!("c{i}"))
        })
        .chain([settlement(SettleMode::Count, "u", "plain")])
        .collect();
    settle(&mut conn, &uses);
    let plans = Plans::from_json(plan_limits_services::plans_json().as_bytes()).unwrap();
    let now = chrono::DateTime::from_timestamp_millis(NOW as i64).unwrap();
    let mut filter = redis::Client::open(server.filter_url())
        .and_then(|c| c.get_connection())
        .unwrap();
    let usage = Report::new(ReportKind::Usage, "u".into(), None, 0, &plans, now);
    let reply = run(&mut filter, &usage.command(&plans, NOW));
    let answer = usage.answer(Ok(reply), &plans, now);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    let names: Vec<&str> = body["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metadata"]["file_name"].as_str().unwrap())
        .collect();
    // The ten newest, newest first; a use without metadata is not among them.
    assert_eq!(
        names,
        [
            "d11.pdf", "d10.pdf", "d9.pdf", "d8.pdf", "d7.pdf", "d6.pdf", "d5.pdf", "d4.pdf",
            "d3.pdf", "d2.pdf"
        ]
    );
    assert_eq!(body["recent"][0]["action"], "upload");
    assert_eq!(body["recent"][0]["kind"], "vision");
    assert_eq!(body["actions"]["upload"]["used"], 13);
}

#[test]
fn the_read_side_functions_answer_the_filters_user_in_one_flat_reply() {
    let (server, mut conn) = redis();
    let counts = [
        settlement(SettleMode::Count, "u", "c1"),
        settlement(SettleMode::Count, "u", "c2"),
    ];
    assert_eq!(settle(&mut conn, &counts), [true, true]);
    assert!(granted(&reserve(&mut conn, "u", "r1", 5, NOW)));
    set_plan(&mut conn, "u", "professional");
    // The day's counter, kept as long as asked.
    let day = keys("u").user.day("2026-11-27");
    let uploads: String = redis::cmd("HGET")
        .arg(&day)
        .arg("upload")
        .query(&mut conn)
        .unwrap();
    assert_eq!(uploads, "2");
    let pttl: u64 = redis::cmd("PTTL").arg(&day).query(&mut conn).unwrap();
    assert!((1..=86_400_000).contains(&pttl), "{pttl}");

    let plans = Plans::from_json(plan_limits_services::plans_json().as_bytes()).unwrap();
    let now = chrono::DateTime::from_timestamp_millis(NOW as i64).unwrap();
    let mut filter = redis::Client::open(server.filter_url())
        .and_then(|c| c.get_connection())
        .unwrap();
    let usage = Report::new(
        ReportKind::Usage,
        "u".into(),
        Some("free".into()),
        0,
        &plans,
        now,
    );
    let reply = run(&mut filter, &usage.command(&plans, NOW));
    let answer = usage.answer(Ok(reply), &plans, now);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["plan"]["key"], "professional", "billing's plan");
    assert_eq!(
        (
            &body["actions"]["upload"]["used"],
            &body["actions"]["upload"]["in_flight"]
        ),
        (&2.into(), &1.into())
    );
    let history = Report::new(
        history_query(&plans, "/h?from=2026-11-26&to=2026-11-27", now).unwrap(),
        "u".into(),
        None,
        0,
        &plans,
        now,
    );
    let reply = run(&mut filter, &history.command(&plans, NOW));
    let answer = history.answer(Ok(reply), &plans, now);
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["days"][0]["total"], 0);
    assert_eq!(body["days"][1]["counts"]["upload"], 2);
    assert_eq!(body["totals"]["upload"], 2);
}

/// A reservation of an upload sent with idempotency key `key`.
fn reserve_once(conn: &mut redis::Connection, id: &str, key: &str) -> Reservation {
    reserve_with_key(conn, id, key, 1000, NOW)
}

/// A reservation of an upload sent with idempotency key `key`, at `now`, by a user who may
/// have `max_keys` keys remembered at once (for a day).
fn reserve_with_key(
    conn: &mut redis::Connection,
    id: &str,
    key: &str,
    max_keys: u64,
    now: u64,
) -> Reservation {
    let keys = keys("u");
    let limits = limits(1000);
    let marker = keys.user.idempotency("upload", key);
    let index = keys.user.idempotency_index();
    let reply = run(
        conn,
        &functions::reserve(ReserveArgs {
            idempotency: Some(IdempotencyMark {
                marker: &marker,
                ttl_ms: 86_400_000,
                index: &index,
                max_keys,
            }),
            gauge: None,
            ..upload_args(&keys, &limits, id, now, "free")
        }),
    );
    functions::parse_reservation(reply).unwrap()
}

#[test]
fn a_user_has_at_most_so_many_idempotency_keys_remembered() {
    let (_server, mut conn) = redis();
    for i in 0..3 {
        let r = reserve_with_key(&mut conn, &format!("r{i}"), &format!("k{i}"), 3, NOW);
        assert!(granted(&r));
    }
    // A fourth key is refused, nothing reserved; a repeat of a known one is still told so.
    let r = reserve_with_key(&mut conn, "r3", "k3", 3, NOW);
    assert_eq!((r.status, r.pending), (ReserveStatus::TooManyKeys, 3));
    let again = reserve_with_key(&mut conn, "r4", "k0", 3, NOW);
    assert_eq!(again.status, ReserveStatus::Duplicate);
    // A day later the first ones are forgotten, and a new key is taken again.
    let r = reserve_with_key(&mut conn, "r5", "k5", 3, NOW + 86_400_001);
    assert!(granted(&r));
}

#[test]
fn an_idempotency_key_is_one_request_however_often_it_is_sent() {
    let (_server, mut conn) = redis();
    assert!(granted(&reserve_once(&mut conn, "r1", "k1")));
    // While the first is in flight, and once it was counted: a duplicate, nothing reserved.
    let again = reserve_once(&mut conn, "r2", "k1");
    assert_eq!(
        (again.status, again.first.as_str()),
        (ReserveStatus::Duplicate, "pending:r1")
    );
    let mut commit = settlement(SettleMode::Commit, "u", "r1");
    commit.idempotency_key = "k1".into();
    assert_eq!(settle(&mut conn, &[commit]), [true]);
    let again = reserve_once(&mut conn, "r3", "k1");
    assert_eq!(again.status, ReserveStatus::Duplicate);
    assert_eq!(again.first, "done:2026-11-27T12:00:00.000Z");
    assert_eq!((again.committed, again.pending), (1, 0));
    let marker = keys("u").user.idempotency("upload", "k1");
    let pttl: i64 = redis::cmd("PTTL").arg(&marker).query(&mut conn).unwrap();
    assert!((1..=86_400_000).contains(&pttl), "kept a day: {pttl}");
    // A failed one is forgotten: its retry is a new request.
    assert!(granted(&reserve_once(&mut conn, "r4", "k2")));
    let mut release = settlement(SettleMode::Release, "u", "r4");
    release.idempotency_key = "k2".into();
    settle(&mut conn, &[release]);
    assert!(granted(&reserve_once(&mut conn, "r5", "k2")));
    assert_eq!(usage::events(&mut conn)[0]["idempotency_key"], "k1");
}

#[test]
fn crossing_a_warning_threshold_is_recorded_once() {
    let (_server, mut conn) = redis();
    // The plan allows 5: the 4th count reaches 80 %, the 5th 90 % (and 100 %).
    let mut counted = Vec::new();
    for i in 0..7 {
        let mut item = settlement(SettleMode::Count, "u", &format!("c{i}"));
        item.limits_json = Rc::from(r#"{"upload":5}"#);
        counted.push(item);
    }
    // In two batches, the second past the limit (counts of successes always count).
    settle(&mut conn, &counted[..4]);
    settle(&mut conn, &counted[4..]);
    let crossed: Vec<(String, String)> = usage::events(&mut conn)
        .into_iter()
        .filter(|e| e["event"] == "threshold_crossed")
        .map(|e| (e["threshold"].clone(), e["used"].clone()))
        .collect();
    assert_eq!(
        crossed,
        [
            ("80".to_string(), "4".to_string()),
            ("90".into(), "5".into())
        ]
    );
    // Unlimited plans have no thresholds.
    let mut unlimited = settlement(SettleMode::Count, "w", "c1");
    unlimited.limits_json = Rc::from(r#"{"upload":null}"#);
    settle(&mut conn, &[unlimited]);
    let all = usage::events(&mut conn);
    assert_eq!(
        all.iter()
            .filter(|e| e["event"] == "threshold_crossed")
            .count(),
        2
    );
}

#[test]
fn events_older_than_the_retention_are_trimmed() {
    let (_server, mut conn) = redis();
    // 300 events recorded long ago (ids are milliseconds since 1970).
    for i in 1..=300 {
        redis::cmd("XADD")
            .arg(usage::events_stream())
            .arg(format!("{i}-0"))
            .arg("event")
            .arg("usage")
            .exec(&mut conn)
            .unwrap();
    }
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap();
    let command = functions::settle(
        &[settlement(SettleMode::Count, "u", "c1")],
        SettleArgs {
            events_stream: &usage::events_stream(),
            events_trim: EventsTrim::MaxAgeMs(35 * 86_400_000),
            now_ms: now,
            ttl_ms: TTL,
            remember_commits_ms: REMEMBER,
            keep_days_ms: 86_400_000,
            warning_thresholds: &[80, 90],
            applied_key: &format!("{}:applied:test-worker", usage::prefix()),
            seq: next_seq(),
            applied_memory_ms: 86_400_000,
            queued: 0,
            stopping: false,
        },
    );
    assert!(matches!(run(&mut conn, &command), RedisReply::Array(_)));
    let len: u64 = redis::cmd("XLEN")
        .arg(usage::events_stream())
        .query(&mut conn)
        .unwrap();
    // Trimmed by whole nodes of the stream (100 entries each), so about.
    assert!(len <= 101, "old events trimmed: {len} left");
    assert_eq!(usage::events(&mut conn).last().unwrap()["user"], "u");
}

#[test]
fn the_event_stream_can_be_capped() {
    let (_server, mut conn) = redis();
    let batch: Vec<_> = (0..300)
        .map(|i| settlement(SettleMode::Count, "u", &format!("c{i}")))
        .collect();
    for chunk in batch.chunks(50) {
        let command = functions::settle(
            chunk,
            SettleArgs {
                events_stream: &usage::events_stream(),
                events_trim: EventsTrim::MaxLen(100),
                now_ms: NOW,
                ttl_ms: TTL,
                remember_commits_ms: REMEMBER,
                keep_days_ms: 86_400_000,
                warning_thresholds: &[80, 90],
                applied_key: &format!("{}:applied:test-worker", usage::prefix()),
                seq: next_seq(),
                applied_memory_ms: 86_400_000,
                queued: 0,
                stopping: false,
            },
        );
        assert!(matches!(run(&mut conn, &command), RedisReply::Array(_)));
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
    assert!(granted(&reserve(&mut conn, "u", "r1", 5, NOW)));
    let mut batch: Vec<_> = (0..3)
        .map(|i| settlement(SettleMode::Count, "u", &format!("c{i}")))
        .collect();
    batch.push(settlement(SettleMode::Commit, "u", "r1"));
    batch.push(settlement(SettleMode::Release, "u", "gone"));
    let mut unreserved = settlement(SettleMode::Count, "u", "");
    unreserved.plan = "professional".into();
    batch.push(unreserved);
    assert_eq!(
        settle(&mut conn, &batch),
        [true, true, true, true, false, true]
    );
    assert_eq!(counter(&mut conn, "u"), Some(5));
    assert_eq!(usage::events_of(&mut conn, "u").len(), 5);
}

#[test]
fn the_filters_redis_user_may_call_the_functions_and_nothing_else() {
    let (server, _admin) = redis();
    let mut filter = redis::Client::open(server.filter_url())
        .unwrap()
        .get_connection()
        .unwrap();
    // The functions work for it.
    assert!(granted(&reserve(&mut filter, "u", "r1", 1, NOW)));
    let refused = |conn: &mut redis::Connection, cmd: &mut redis::Cmd| {
        let err = cmd.exec(conn).unwrap_err();
        assert!(err.to_string().contains("no permissions"), "{err}");
    };
    refused(&mut filter, redis::cmd("EVAL").arg("return 1").arg(0));
    refused(&mut filter, redis::cmd("KEYS").arg("*"));
    refused(&mut filter, &mut redis::cmd("FLUSHALL"));
    refused(&mut filter, redis::cmd("CONFIG").arg("GET").arg("*"));
    refused(
        &mut filter,
        redis::cmd("FUNCTION").arg("LOAD").arg("#!lua name=x\n"),
    );
    refused(
        &mut filter,
        redis::cmd("HSET").arg("othertenant:x").arg("a").arg(1),
    );
    // Keys outside the prefix are refused even through the functions.
    let outside = UsageKeys::new("othertenant", "u", "2026-11", "upload");
    let limits = limits(5);
    let reply = run(
        &mut filter,
        &functions::reserve(ReserveArgs {
            keys: &outside,
            action: "upload",
            claimed_plan: "free",
            fallback_plan: None,
            reservation_id: "r",
            now_ms: NOW,
            ttl_ms: TTL,
            limits: &limits,
            idempotency: None,
            gauge: None,
            lease: None,
            events_stream: "othertenant:events",
            user: "u",
            period_id: "2026-11",
        }),
    );
    assert!(
        matches!(reply, RedisReply::Error(ref e) if e.contains("no permissions")),
        "{reply:?}"
    );
}

/// A reservation of `action` that holds `amount` of `gauge`, whose room is `room` (free).
fn reserve_in(
    conn: &mut redis::Connection,
    gauge: Gauge,
    id: &str,
    amount: u64,
    room: u64,
    now: u64,
) -> Reservation {
    let keys = keys("u");
    let limits = limits(100);
    let rooms = [
        ("free".to_string(), Some(room)),
        ("professional".into(), None),
    ];
    let reply = run(
        conn,
        &functions::reserve(ReserveArgs {
            idempotency: None,
            gauge: Some(GaugeHold {
                gauge,
                amount,
                rooms: &rooms,
            }),
            ..upload_args(&keys, &limits, id, now, "free")
        }),
    );
    functions::parse_reservation(reply).unwrap()
}

/// An upload holding `bytes` in a storage of 100 bytes.
fn reserve_bytes(conn: &mut redis::Connection, id: &str, bytes: u64, now: u64) -> Reservation {
    reserve_in(conn, Gauge::Storage, id, bytes, 100, now)
}

fn total(conn: &mut redis::Connection, gauge: Gauge) -> u64 {
    redis::cmd("GET")
        .arg(keys("u").user.gauge(gauge))
        .query::<Option<u64>>(conn)
        .unwrap()
        .unwrap_or(0)
}

fn stored(conn: &mut redis::Connection) -> u64 {
    total(conn, Gauge::Storage)
}

/// Settlement `mode` of a request reserved as `id` holding `held` of `gauge`, adding `adds`.
fn gauge_settled(gauge: Gauge, mode: SettleMode, id: &str, held: u64, adds: u64) -> Settlement {
    let mut item = settlement(mode, "u", id);
    item.gauge = Some(gauge);
    item.held = Some(held);
    item.adds = matches!(mode, SettleMode::Commit | SettleMode::Count).then_some(adds);
    item
}

fn upload_settled(mode: SettleMode, id: &str, held: u64, bytes: u64) -> Settlement {
    gauge_settled(Gauge::Storage, mode, id, held, bytes)
}

fn given_back(gauge: Gauge, amount: u64) -> Settlement {
    let now = chrono::DateTime::from_timestamp_millis(NOW as i64).unwrap();
    Settlement::give_back(gauge, keys("u"), "u", amount, 200, now, "req-d")
}

#[test]
fn storage_counts_stored_bytes_and_those_in_flight_and_a_delete_gives_them_back() {
    let (_server, mut conn) = redis();
    // 60 bytes in flight leave room for 40, not 50.
    assert!(granted(&reserve_bytes(&mut conn, "r1", 60, NOW)));
    let full = reserve_bytes(&mut conn, "r2", 50, NOW);
    assert_eq!(full.status, ReserveStatus::Full);
    assert_eq!((full.total, full.total_held), (0, 60));
    assert_eq!(full.pending, 1, "nothing reserved for it");
    // Committed with the 55 bytes its body had: stored, no longer held.
    let commit = upload_settled(SettleMode::Commit, "r1", 60, 55);
    assert_eq!(settle(&mut conn, &[commit]), [true]);
    assert_eq!(stored(&mut conn), 55);
    let r = reserve_bytes(&mut conn, "r3", 45, NOW);
    assert!(granted(&r));
    assert_eq!((r.total, r.total_held), (55, 0));
    // Released: its 45 bytes are let go and nothing is stored.
    let release = upload_settled(SettleMode::Release, "r3", 45, 0);
    settle(&mut conn, &[release]);
    assert!(granted(&reserve_bytes(&mut conn, "r4", 45, NOW)));
    // A held upload whose filter died expires with its reservation.
    let later = NOW + TTL + 1;
    let r = reserve_bytes(&mut conn, "r5", 45, later);
    assert!(granted(&r));
    assert_eq!(r.total_held, 0, "r4's hold expired");
    // A delete gives its bytes back, never below zero.
    assert_eq!(settle(&mut conn, &[given_back(Gauge::Storage, 50)]), [true]);
    assert_eq!(stored(&mut conn), 5);
    settle(&mut conn, &[given_back(Gauge::Storage, 50)]);
    assert_eq!(stored(&mut conn), 0);
    let events = usage::events(&mut conn);
    let freed: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "given_back")
        .collect();
    assert_eq!(freed.len(), 2);
    assert_eq!(
        (&*freed[0]["gauge"], &*freed[0]["amount"]),
        ("storage", "50")
    );
}

#[test]
fn a_team_holds_its_room_in_members_counting_invites_in_flight() {
    let (_server, mut conn) = redis();
    // Room for two invited members: one accepted, one in flight, the third is refused.
    assert!(granted(&reserve_in(
        &mut conn,
        Gauge::Team,
        "i1",
        1,
        2,
        NOW
    )));
    let commit = gauge_settled(Gauge::Team, SettleMode::Commit, "i1", 1, 1);
    settle(&mut conn, &[commit]);
    assert!(granted(&reserve_in(
        &mut conn,
        Gauge::Team,
        "i2",
        1,
        2,
        NOW
    )));
    let full = reserve_in(&mut conn, Gauge::Team, "i3", 1, 2, NOW);
    assert_eq!(full.status, ReserveStatus::Full);
    assert_eq!((full.total, full.total_held), (1, 1));
    // The storage is another total.
    assert_eq!(stored(&mut conn), 0);
    // A member removed makes room again.
    settle(&mut conn, &[given_back(Gauge::Team, 1)]);
    assert_eq!(total(&mut conn, Gauge::Team), 0);
    assert!(granted(&reserve_in(
        &mut conn,
        Gauge::Team,
        "i4",
        1,
        2,
        NOW
    )));
}

#[test]
fn reservations_sent_together_are_made_one_after_the_other_as_if_sent_alone() {
    let (_server, mut conn) = redis();
    let limits = limits(3);
    let singles: Vec<_> = (0..5)
        .map(|i| {
            let user = if i == 4 { "other" } else { "u" };
            let keys = keys(user);
            functions::reserve(upload_args(&keys, &limits, &format!("r{i}"), NOW, "free"))
        })
        .collect();
    let refs: Vec<_> = singles.iter().collect();
    let reply = run(&mut conn, &functions::reserve_many(&refs));
    let answers: Vec<Reservation> = functions::split_reservations(Ok(reply), 5)
        .into_iter()
        .map(|r| functions::parse_reservation(r.unwrap()).unwrap())
        .collect();
    let statuses: Vec<_> = answers.iter().map(|a| a.status).collect();
    use ReserveStatus::{Granted, Refused};
    // u's limit of 3 holds across the call; another user's is its own.
    assert_eq!(statuses, [Granted, Granted, Granted, Refused, Granted]);
    assert_eq!(answers[2].pending, 3);
    let held: u64 = redis::cmd("ZCARD")
        .arg(keys("u").pending)
        .query(&mut conn)
        .unwrap();
    assert_eq!(held, 3);
}

/// What the filter writes for webdis reaches Redis byte for byte: every argument the filter
/// sends (keys, users, request and idempotency ids from headers, plan limits as JSON) is
/// escaped only where webdis would read it otherwise (`/`, `%`, `+`, `?`, `.`, controls).
#[test]
fn every_argument_reaches_redis_through_webdis_as_written() {
    use plan_limits_core::{webdis, RedisCommand};
    use plan_limits_services::http::{Body, Request};
    use plan_limits_services::redis_server::RedisOptions;
    use plan_limits_services::webdis::Webdis;

    let dir = scratch_dir("webdis-args");
    let options = RedisOptions {
        password: None,
        persistent: false,
    };
    let redis = RedisServer::start_with_options(&dir, free_port(), options);
    let webdis = Webdis::start_with_commands(&dir, "127.0.0.1", redis.port, None, None, &["ECHO"]);
    let printable: String = (0x20u8..0x7f).map(char::from).collect();
    let arguments = [
        printable.as_str(),
        "plan-limits:{u%2F1}:summary:2026-11",
        "{\"upload\":5,\"ai_message\":null}",
        "a/b?c=d+e#f%20g",
        "ends.json",
        "tab\tnew\nline\r",
        "ünïcødé ✓",
        "..",
        "+",
    ];
    for argument in arguments {
        let body = webdis::request_body(&RedisCommand::new("ECHO").arg(argument));
        let response = Request::new("POST", "/")
            .body(Body::Bytes(body))
            .try_send(webdis.port)
            .unwrap();
        let reply = webdis::parse_response(
            Some(u32::from(response.status)),
            response.body_text().as_bytes(),
        );
        assert_eq!(
            reply.unwrap(),
            RedisReply::Bulk(argument.as_bytes().to_vec()),
            "{argument:?}"
        );
    }
}
