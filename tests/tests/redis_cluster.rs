//! plan-limits on a real Redis Cluster: three masters of Debian's redis-server joined with
//! `redis-cli --cluster create`, locked down as one Redis is. Every call names one hash slot:
//! a reservation or a report is the user's slot, a settlement batch is split by slot, and the
//! usage events go to the stream of their slot; `plan-limits export` reads them all. Run
//! through the Redis host-call build in our wasmtime host (the `redis` crate's cluster
//! connection routes each call by its first key), and through real Envoy: webdis logs in to
//! Envoy's `redis_proxy`, which forwards `EVALSHA` (not `FCALL`) to the master of its slot.

use std::collections::BTreeMap;
use std::rc::Rc;

use plan_limits_core::functions::{self, EventsTrim, SettleArgs, SettleReply};
use plan_limits_core::{
    key_slot, slot_events_stream, slot_tag, Group, Plans, RedisCommand, RedisReply, SettleMode,
    Settlement, SettlementQueue, UsageKeys, CLUSTER_SLOTS,
};
use plan_limits_services::gateway::EnvoyClusterGateway;
use plan_limits_services::process::scratch_dir;
use plan_limits_services::redis_cluster::RedisCluster;
use plan_limits_services::redis_exec;
use plan_limits_tests::*;
use plan_limits_tools::operator::{self, Format, Redis};

/// The repository's plans on a cluster (the host-call build: `FCALL`, routed by the crate).
fn cluster_plans() -> String {
    plans_with(|p| p["redis"]["cluster_mode"] = true.into())
}

/// The repository's plans on a cluster behind Envoy's `redis_proxy`: the functions called as
/// scripts, since it does not forward `FCALL`.
fn cluster_plans_for_envoy() -> String {
    plans_with(|p| {
        p["redis"]["cluster_mode"] = true.into();
        p["redis"]["invoke"] = "evalsha".into();
    })
}

fn start_cluster(name: &str) -> RedisCluster {
    RedisCluster::start(&scratch_dir(name), 3, true)
}

fn on_cluster_harness(cluster: &RedisCluster) -> Harness {
    let h = Harness::try_start_on_cluster(Build::RedisHostCalls, &cluster_plans(), 2, cluster)
        .unwrap_or_else(|e| panic!("{e}"));
    h.set_time(HARNESS_START);
    h
}

/// Every event `plan-limits export` writes for today (stream ids are Redis's clock), as
/// field maps.
fn exported(cluster: &RedisCluster, plans_json: &str) -> Vec<BTreeMap<String, String>> {
    let plans = Plans::from_json(plans_json.as_bytes()).unwrap();
    let today = chrono::Utc::now().date_naive();
    let mut redis = Redis::connect(&cluster.node_url(0)).unwrap();
    let mut out = Vec::new();
    let n = operator::export(&mut redis, &plans, today, today, Format::Jsonl, &mut out).unwrap();
    let events: Vec<BTreeMap<String, String>> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(events.len() as u64, n);
    events
}

/// Usage events per user and action.
fn usage_by_user(events: &[BTreeMap<String, String>]) -> BTreeMap<(String, String), u64> {
    let mut counts = BTreeMap::new();
    for e in events.iter().filter(|e| e["event"] == "usage") {
        *counts
            .entry((e["user"].clone(), e["action"].clone()))
            .or_default() += 1;
    }
    counts
}

fn cluster_counter(cluster: &RedisCluster, user: &str, action: &str, period: &str) -> u64 {
    usage::counter(&mut cluster.connection(), user, action, period)
}

fn statuses_of(statuses: &[u16]) -> (usize, usize) {
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    (ok, limited)
}

#[test]
fn the_filters_key_slots_are_those_the_cluster_computes() {
    let cluster = start_cluster("cluster-slots");
    let mut conn = cluster.node_connection(0);
    let mut keys = Vec::new();
    for n in 0..300 {
        let user = format!("user {n}/é{{x}}");
        let k = UsageKeys::new("plan-limits", &user, "2026-11", "upload");
        keys.extend([
            k.summary.clone(),
            k.pending.clone(),
            k.user.day("2026-11-29"),
        ]);
    }
    keys.extend(
        (0..CLUSTER_SLOTS)
            .step_by(97)
            .map(|slot| slot_events_stream("plan-limits:events", slot)),
    );
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key);
    }
    let slots: Vec<u16> = pipe.query(&mut conn).unwrap();
    for (key, slot) in keys.iter().zip(slots) {
        assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
    }
}

/// A count of `user`'s upload, as the filter settles a success with nothing reserved.
fn count(user: &str, id: &str) -> Settlement {
    Settlement {
        mode: SettleMode::Count,
        keys: UsageKeys::new("plan-limits", user, "2026-11", "upload"),
        reservation_id: id.into(),
        action: "upload".into(),
        user: user.into(),
        plan: "professional".into(),
        limits_json: Rc::from(r#"{"upload":null}"#),
        kind: String::new(),
        metadata: String::new(),
        in_grace: false,
        bytes: 10,
        status: 200,
        at: "2026-11-27T12:00:00.000Z".into(),
        day: "2026-11-27".into(),
        request_id: format!("req-{id}"),
        idempotency_key: String::new(),
        gauge: None,
        adds: None,
        held: None,
        period_id: "2026-11".into(),
        keep_for_ms: 400 * 86_400_000,
        made_at_ms: 0,
        certain: true,
        waiter: None,
        fail_open: false,
    }
}

/// A batch's arguments: its events stream and the test worker's key of batches applied (on a
/// cluster, both of the batch's slot), numbered `seq`.
fn settle_args<'a>(events_stream: &'a str, applied_key: &'a str, seq: u64) -> SettleArgs<'a> {
    SettleArgs {
        events_stream,
        events_trim: EventsTrim::MaxAgeMs(35 * 86_400_000),
        now_ms: 1_795_000_000_000,
        ttl_ms: 60_000,
        remember_commits_ms: 3_600_000,
        keep_days_ms: 90 * 86_400_000,
        warning_thresholds: &[80, 90],
        applied_key,
        seq,
        applied_memory_ms: 86_400_000,
        queued: 0,
        stopping: false,
    }
}

/// The test worker's key of batches applied in `slot`.
fn applied_in(slot: u16) -> String {
    applied_by("test", slot)
}

/// The key of batches applied in `slot` by the worker named `worker`.
fn applied_by(worker: &str, slot: u16) -> String {
    plan_limits_core::applied_batches("plan-limits", worker, Some(slot_tag(slot)))
}

#[test]
fn a_single_redis_batch_is_refused_crossslot_and_the_slot_batches_are_counted() {
    let cluster = start_cluster("cluster-crossslot");
    let mut conn = cluster.connection();
    let users: Vec<String> = (0..12).map(|n| format!("u{n}")).collect();
    let batch: Vec<Settlement> = users
        .iter()
        .enumerate()
        .map(|(i, u)| count(u, &i.to_string()))
        .collect();
    // As on one Redis: everyone's keys and the one stream in one call.
    let single = functions::settle(
        &batch,
        settle_args("plan-limits:events", "plan-limits:applied:test", 1),
    );
    for invoke in [
        plan_limits_core::Invoke::Fcall,
        plan_limits_core::Invoke::Evalsha,
    ] {
        let reply = redis_exec::run(&mut conn, &functions::invoked(single.clone(), invoke));
        assert!(
            matches!(&reply, RedisReply::Error(e) if e.starts_with("CROSSSLOT")),
            "{invoke:?}: {reply:?}"
        );
    }
    for user in &users {
        assert_eq!(cluster_counter(&cluster, user, "upload", "2026-11"), 0);
    }
    // Split by slot, as the worker does on a cluster: every call is counted.
    let mut queue = SettlementQueue::new(1000, 64);
    queue.group_by_slot(true);
    for item in batch {
        queue.push(item);
    }
    let groups = queue.start_batches(0);
    assert!(
        groups.len() > 3,
        "twelve users over several slots: {groups:?}"
    );
    for group in groups {
        let Group::Slot(slot) = group else {
            panic!("{group:?}")
        };
        let stream = slot_events_stream("plan-limits:events", slot);
        let applied = applied_in(slot);
        let seq = queue.in_flight_seq(group);
        let command =
            functions::settle(queue.in_flight(group), settle_args(&stream, &applied, seq));
        let reply = redis_exec::run(&mut conn, &command);
        let report = queue.on_batch_reply(group, Ok(reply), 0);
        assert_eq!(report.error, None);
        assert_eq!(report.counted as usize, report.entitlements.len());
    }
    assert!(queue.is_empty());
    for user in &users {
        assert_eq!(
            cluster_counter(&cluster, user, "upload", "2026-11"),
            1,
            "{user}"
        );
    }
    let events = exported(&cluster, &cluster_plans());
    let by_user = usage_by_user(&events);
    for user in &users {
        assert_eq!(by_user[&(user.clone(), "upload".to_string())], 1, "{user}");
    }
    // Each event sits in its user's slot's stream.
    for e in &events {
        let keys = UsageKeys::new("plan-limits", &e["user"], "2026-11", "upload");
        assert_eq!(
            key_slot(e["stream"].as_bytes()),
            key_slot(keys.summary.as_bytes())
        );
    }
}

#[test]
fn host_calls_concurrent_uploads_of_one_free_user_count_exactly_five() {
    let cluster = start_cluster("cluster-exact");
    let mut h = on_cluster_harness(&cluster);
    let request = upload("zoe", "free");
    // Twelve uploads in flight at once over two workers: every reservation asked before any
    // is answered, then every request finished.
    let started: Vec<(usize, u32)> = (0..12)
        .map(|i| (i % 2, h.begin(i % 2, &request).unwrap()))
        .collect();
    for &(vm, id) in &started {
        h.settle_calls(vm, id).unwrap();
    }
    let statuses: Vec<u16> = started
        .iter()
        .map(|&(vm, id)| {
            h.send_body(vm, id, &request).unwrap();
            h.finish(vm, id, 200).unwrap().status
        })
        .collect();
    assert_eq!(statuses_of(&statuses), (5, 7), "{statuses:?}");
    assert_eq!(cluster_counter(&cluster, "zoe", "upload", "2026-11"), 5);
    let events = exported(&cluster, &cluster_plans());
    assert_eq!(usage_by_user(&events)[&("zoe".into(), "upload".into())], 5);
    assert_eq!(h.metric("counted"), 5);
    assert_eq!(h.metric("settle_errors"), 0);
    assert_eq!(h.metric("fail_open"), 0);
}

/// Users over many slots (and every master), each with its own mix: uploads of a free user
/// (5 allowed a month), procedure views (unlimited, counted on success), a failed upload.
fn many_users(gw: &mut dyn Gateway, users: usize) -> BTreeMap<(String, String), u64> {
    let mut expected = BTreeMap::new();
    for n in 0..users {
        let user = format!("member-{n}");
        // A failed upload first: released, never counted.
        let failed = gw.send(&upload(&user, "free").upstream_status(500));
        assert_eq!(failed.status, 500);
        // Its release reaches Redis with the next settlement batch (every 5 ms): until then
        // its unit is held, and a fifth upload would be told the limit is reached.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let uploads = n % 8;
        for _ in 0..uploads {
            gw.send(&upload(&user, "free"));
        }
        for _ in 0..n % 3 {
            let r = gw.send(&Request::new("GET", "/api/procedures/7").user(&user, "free"));
            assert_eq!(r.status, 200, "{}", r.body_text());
        }
        expected.insert((user.clone(), "upload".into()), uploads.min(5) as u64);
        expected.insert((user, "procedure_view".into()), (n % 3) as u64);
    }
    expected.retain(|_, n| *n > 0);
    expected
}

fn assert_counted(
    cluster: &RedisCluster,
    plans_json: &str,
    period: &str,
    expected: &BTreeMap<(String, String), u64>,
) {
    let mut conn = cluster.connection();
    for ((user, action), n) in expected {
        let counted = usage::counter(&mut conn, user, action, period);
        assert_eq!(counted, *n, "{user} {action}");
    }
    let found = usage_by_user(&exported(cluster, plans_json));
    assert_eq!(&found, expected, "every usage event, found by export");
    // Spread over the whole cluster: users of every master.
    let ranges = slot_ranges(cluster);
    let masters: std::collections::BTreeSet<u16> = expected
        .keys()
        .map(|(user, _)| {
            let key = UsageKeys::new("plan-limits", user, period, "upload").summary;
            let slot = key_slot(key.as_bytes());
            ranges
                .iter()
                .find(|(first, last, _)| (*first..=*last).contains(&slot))
                .map(|(_, _, port)| *port)
                .unwrap()
        })
        .collect();
    assert_eq!(masters.len(), 3, "users on every master");
}

/// The cluster's slot ranges and the port of the master serving each (`CLUSTER SLOTS`).
fn slot_ranges(cluster: &RedisCluster) -> Vec<(u16, u16, u16)> {
    use redis::Value;
    let ranges: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(&mut cluster.node_connection(0))
        .unwrap();
    ranges
        .into_iter()
        .map(|range| match range {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(first), Value::Int(last), Value::Array(node), ..] => {
                    match node.as_slice() {
                        [_, Value::Int(port), ..] => (*first as u16, *last as u16, *port as u16),
                        other => panic!("{other:?}"),
                    }
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn host_calls_many_users_over_many_slots_count_each_success_once() {
    let cluster = start_cluster("cluster-many");
    let mut h = on_cluster_harness(&cluster);
    let expected = many_users(&mut h, 40);
    assert_counted(&cluster, &cluster_plans(), "2026-11", &expected);
    // The read side is one slot too: the usage report of a user.
    let r = h.send(&Request::new("GET", "/api/usage").user("member-7", "free"));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["actions"]["upload"]["used"], 5);
    assert_eq!(h.metric("settle_errors"), 0);
}

#[test]
fn the_operator_loads_every_master_and_writes_in_the_users_slot() {
    let cluster = start_cluster("cluster-operator");
    for i in 0..cluster.masters.len() {
        let mut conn = cluster.node_connection(i);
        redis::cmd("FUNCTION").arg("FLUSH").exec(&mut conn).unwrap();
        redis::cmd("SCRIPT").arg("FLUSH").exec(&mut conn).unwrap();
    }
    let mut redis = Redis::connect(&cluster.node_url(0)).unwrap();
    assert_eq!(redis.load_library().unwrap(), 3);
    let shas: Vec<&str> = functions::FUNCTIONS
        .iter()
        .map(|f| functions::script_sha(f).unwrap())
        .collect();
    for i in 0..cluster.masters.len() {
        let mut conn = cluster.node_connection(i);
        let libraries: Vec<redis::Value> =
            redis::cmd("FUNCTION").arg("LIST").query(&mut conn).unwrap();
        assert_eq!(libraries.len(), 1, "master {i}");
        let loaded: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&shas)
            .query(&mut conn)
            .unwrap();
        assert!(loaded.iter().all(|&l| l), "master {i}: {loaded:?}");
    }
    let plans = Plans::from_json(cluster_plans().as_bytes()).unwrap();
    let now = chrono::Utc::now();
    for user in ["olga", "pete", "quinn"] {
        let set_plan = plan_limits_core::AdminOp::SetPlan {
            plan: "professional".into(),
            anchor_day: None,
        };
        operator::apply(&mut redis, &plans, user, &set_plan, "ops", now).unwrap();
        let grant = plan_limits_core::AdminOp::Grant {
            action: "ai_analysis".into(),
            units: 3,
        };
        operator::apply(&mut redis, &plans, user, &grant, "ops", now).unwrap();
        let json = operator::usage(redis.as_dyn(), &plans, user, None, now).unwrap();
        let usage: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(usage["plan"]["key"], "professional");
        assert_eq!(usage["actions"]["ai_analysis"]["limit"], 103);
    }
    let admin: Vec<_> = exported(&cluster, &cluster_plans())
        .into_iter()
        .filter(|e| e["event"] == "admin")
        .collect();
    assert_eq!(admin.len(), 6, "{admin:?}");
}

#[test]
fn envoy_redis_proxy_forwards_evalsha_but_not_fcall() {
    let gw = EnvoyClusterGateway::start(GatewayOptions {
        plans_json: cluster_plans_for_envoy(),
        ..GatewayOptions::default()
    });
    let mut conn = gw.redis_proxy_connection();
    let unsupported = "redis.plan_limits_redis_cluster.splitter.unsupported_command";
    let before = gw.envoy_stat(unsupported);
    let fcall: redis::RedisResult<redis::Value> = redis::cmd("FCALL")
        .arg("plan_limits_history")
        .arg(1)
        .arg("plan-limits:{x}:entitlement")
        .query(&mut conn);
    let err = fcall.unwrap_err().to_string();
    assert!(
        err.to_lowercase().contains("unknown command 'fcall'"),
        "{err}"
    );
    assert_eq!(
        gw.envoy_stat(unsupported),
        before + 1,
        "Envoy refused it itself"
    );
    let evalsha: Vec<redis::Value> = redis::cmd("EVALSHA")
        .arg(functions::script_sha("plan_limits_history").unwrap())
        .arg(1)
        .arg("plan-limits:{x}:entitlement")
        .query(&mut conn)
        .unwrap();
    assert_eq!(evalsha, [redis::Value::Nil], "no plan recorded for x");

    // Stopped with every process it started: three masters, Envoy, webdis, the upstream.
    let started = gw.processes();
    assert!(started.len() >= 6, "{started:?}");
    drop(conn);
    drop(gw);
    let alive = |pid: &u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !stat.is_empty() && state != Some("Z")
    };
    assert!(eventually(|| !started.iter().any(alive)), "{started:?}");
}

#[test]
fn envoy_concurrent_uploads_of_one_free_user_count_exactly_five() {
    let gw = EnvoyClusterGateway::start(GatewayOptions {
        plans_json: cluster_plans_for_envoy(),
        ..GatewayOptions::default()
    });
    let port = gw.gateway_port;
    let statuses = concurrent_uploads(&[port], "yan", "free", 60);
    assert_eq!(statuses_of(&statuses), (5, 55), "{statuses:?}");
    let period = gw.period();
    assert!(eventually(|| cluster_counter(
        &gw.cluster,
        "yan",
        "upload",
        &period
    ) == 5));
    assert!(eventually(|| {
        usage_by_user(&exported(&gw.cluster, &cluster_plans_for_envoy()))
            .get(&("yan".into(), "upload".into()))
            == Some(&5)
    }));
    assert_eq!(gw.upstream.successes("/api/upload"), 5);
    assert!(eventually(|| gw.metric("counted") == 5));
    assert_eq!(gw.metric("settle_errors"), 0);
    assert_eq!(gw.metric("fail_open"), 0);
    assert!(gw.envoy_stat("redis.plan_limits_redis_cluster.command.evalsha.success") > 5);
}

#[test]
fn envoy_many_users_over_many_slots_count_each_success_once() {
    let mut gw = EnvoyClusterGateway::start(GatewayOptions {
        plans_json: cluster_plans_for_envoy(),
        ..GatewayOptions::default()
    });
    let expected = many_users(&mut gw, 40);
    let period = gw.period();
    let total: u64 = expected.values().sum();
    assert!(eventually(|| gw.metric("counted") == total));
    assert_counted(&gw.cluster, &cluster_plans_for_envoy(), &period, &expected);
    assert_eq!(gw.metric("settle_errors"), 0);
    assert_eq!(gw.metric("fail_open"), 0);
}

/// Every plan's limit for an action, as the filter passes them (the claimed plan's is large,
/// so that a load never runs out).
fn limits() -> Vec<(String, Option<u64>)> {
    vec![
        ("free".into(), Some(5)),
        ("professional".into(), Some(1_000_000_000)),
        ("enterprise".into(), None),
    ]
}

fn reserve_command(user: &str, action: &str, id: &str, now_ms: u64) -> RedisCommand {
    let keys = UsageKeys::new("plan-limits", user, "2026-11", action);
    functions::reserve(functions::ReserveArgs {
        keys: &keys,
        action,
        claimed_plan: "professional",
        fallback_plan: Some("free"),
        reservation_id: id,
        now_ms,
        ttl_ms: 60_000,
        limits: &limits(),
        idempotency: None,
        gauge: None,
        lease: None,
        events_stream: &slot_events_stream("plan-limits:events", key_slot(keys.summary.as_bytes())),
        user,
        period_id: "2026-11",
    })
}

fn commit(user: &str, action: &str, id: &str, day: &str, now_ms: u64) -> Settlement {
    Settlement {
        mode: SettleMode::Commit,
        keys: UsageKeys::new("plan-limits", user, "2026-11", action),
        action: action.into(),
        plan: "professional".into(),
        limits_json: Rc::from(r#"{"upload":null,"ai_analysis":100,"procedure_view":null}"#),
        at: format!("{day}T12:00:00.000Z"),
        day: day.into(),
        made_at_ms: now_ms,
        ..count(user, id)
    }
}

#[test]
fn a_commit_sent_twice_counts_once_on_the_cluster() {
    let cluster = start_cluster("cluster-twice");
    let mut conn = cluster.connection();
    let now = 1_795_000_000_000;
    for (user, invoke) in [
        ("ana", plan_limits_core::Invoke::Fcall),
        ("ben", plan_limits_core::Invoke::Evalsha),
    ] {
        let reserve = functions::invoked(reserve_command(user, "upload", "r1", now), invoke);
        let reservation = functions::parse_reservation(redis_exec::run(&mut conn, &reserve));
        assert_eq!(
            reservation.unwrap().status,
            functions::ReserveStatus::Granted
        );
        let batch = [commit(user, "upload", "r1", "2026-11-27", now)];
        let slot = key_slot(batch[0].keys.summary.as_bytes());
        let stream = slot_events_stream("plan-limits:events", slot);
        let applied = applied_in(slot);
        let mut settle = |seq| {
            let command = functions::settle(&batch, settle_args(&stream, &applied, seq));
            let reply = redis_exec::run(&mut conn, &functions::invoked(command, invoke));
            functions::parse_settled(reply, 1).unwrap()
        };
        let done = |reply: SettleReply| match reply {
            SettleReply::Applied(settled) => settled[0].done,
            SettleReply::AppliedBefore => None,
        };
        // Counted; the same batch sent again is known; the commit in a later batch counts
        // nothing either.
        assert_eq!(done(settle(1)), Some(true), "{user}");
        assert_eq!(settle(1), SettleReply::AppliedBefore, "{user}");
        assert_eq!(done(settle(2)), Some(false), "{user}");
        assert_eq!(cluster_counter(&cluster, user, "upload", "2026-11"), 1);
    }
}

fn to_cmd(command: &RedisCommand) -> redis::Cmd {
    let mut cmd = redis::cmd(std::str::from_utf8(&command.args[0]).unwrap());
    for arg in &command.args[1..] {
        cmd.arg(&arg[..]);
    }
    cmd
}

/// Sends `commands` to one master over `connections` connections at once, each pipelining
/// `depth` at a time; returns the calls per second and checks none failed.
fn load(cluster: &RedisCluster, master: usize, commands: &[redis::Cmd], connections: usize) -> f64 {
    let depth = 64;
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for part in commands.chunks(commands.len().div_ceil(connections)) {
            let mut conn = cluster.node_connection(master);
            s.spawn(move || {
                for chunk in part.chunks(depth) {
                    let mut pipe = redis::pipe();
                    for cmd in chunk {
                        pipe.add_command(cmd.clone());
                    }
                    let replies: Vec<redis::Value> = pipe.query(&mut conn).unwrap();
                    for reply in replies {
                        assert!(!matches!(reply, redis::Value::ServerError(_)), "{reply:?}");
                    }
                }
            });
        }
    });
    commands.len() as f64 / started.elapsed().as_secs_f64()
}

/// MEMORY USAGE (all samples) of `key` on master `master`.
fn memory_usage(conn: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query::<Option<u64>>(conn)
        .unwrap()
        .unwrap_or(0)
}

/// docs/operating.md's scale figures, measured on a local three-master cluster (AOF with
/// `appendfsync always`, as `RedisCluster` runs it): keys and bytes per active user, bytes per
/// event in the slots' streams, and calls per second one master takes for the reserve and
/// settle paths (the functions pipelined by the redis crate from 4 connections on the same
/// machine). `make scale`, or:
/// `cargo test -p plan-limits-tests --test redis_cluster scale_figures -- --ignored --nocapture`
#[test]
#[ignore]
fn scale_figures() {
    let cluster = start_cluster("cluster-scale");
    let ranges = slot_ranges(&cluster);
    let master_of = |user: &str| {
        let slot = key_slot(
            UsageKeys::new("plan-limits", user, "x", "y")
                .summary
                .as_bytes(),
        );
        let port = ranges
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, port)| *port)
            .unwrap();
        cluster.masters.iter().position(|m| m.port == port).unwrap()
    };
    let mut conn = cluster.connection();

    // 1. Active users: 1000 users, each with 5 counted requests (an upload, two AI analyses,
    // two procedure views) on each of 20 days of a month: 100 counted requests, each reserved
    // then committed, in batches of the user's day (one slot); billing's plan recorded.
    let users: Vec<String> = (0..1000).map(|n| format!("active-{n}")).collect();
    let actions = [
        "upload",
        "ai_analysis",
        "ai_analysis",
        "procedure_view",
        "procedure_view",
    ];
    let base_ms = 1_795_000_000_000u64;
    let mut reserves = Vec::new();
    let mut settles = Vec::new();
    for user in &users {
        usage::set_plan(&mut conn, user, "professional");
        for day in 1..=20u64 {
            let now = base_ms + day * 86_400_000;
            let date = format!("2026-11-{day:02}");
            let mut batch = Vec::new();
            for (i, action) in actions.iter().enumerate() {
                let id = format!("{user}-{day}-{i}");
                reserves.push(to_cmd(&reserve_command(user, action, &id, now)));
                batch.push(commit(user, action, &id, &date, now));
            }
            let slot = key_slot(batch[0].keys.summary.as_bytes());
            let stream = slot_events_stream("plan-limits:events", slot);
            // (Each call as the first batch of a worker of its own: none is taken for another.)
            let applied = applied_by(&format!("{user}-{day}"), slot);
            let mut args = settle_args(&stream, &applied, 1);
            args.now_ms = now;
            settles.push(to_cmd(&functions::settle(&batch, args)));
        }
    }
    let mut pipe = redis::cluster::cluster_pipe();
    for (i, cmd) in reserves.iter().enumerate() {
        pipe.add_command(cmd.clone());
        if i % 5 == 4 {
            pipe.add_command(settles[i / 5].clone());
        }
    }
    let _: Vec<redis::Value> = pipe.query(&mut conn).unwrap();
    let mut keys_per_user = 0u64;
    let mut bytes_per_user = 0u64;
    let mut by_kind: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for user in users.iter().take(100) {
        let mut node = cluster.node_connection(master_of(user));
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("plan-limits:{{{user}}}:*"))
            .query(&mut node)
            .unwrap();
        keys_per_user += keys.len() as u64;
        for key in keys {
            let bytes = memory_usage(&mut node, &key);
            bytes_per_user += bytes;
            let kind = key
                .split(':')
                .skip(2)
                .map(|part| {
                    if part.starts_with("2026-11-") {
                        "<date>"
                    } else {
                        part
                    }
                })
                .collect::<Vec<_>>()
                .join(":");
            let entry = by_kind.entry(kind).or_default();
            entry.0 += 1;
            entry.1 += bytes;
        }
    }
    println!("\n== an active user (100 counted requests on 20 days of a month), mean of 100 users");
    println!("keys per user: {:.1}", keys_per_user as f64 / 100.0);
    println!(
        "bytes per user (MEMORY USAGE of its keys): {:.0}",
        bytes_per_user as f64 / 100.0
    );
    for (kind, (n, bytes)) in &by_kind {
        println!(
            "  {kind}: {:.1} keys, {:.0} bytes",
            *n as f64 / 100.0,
            *bytes as f64 / 100.0
        );
    }

    // 2. Events: 100,000 usage events written above, in the streams of the users' slots.
    let mut streams = 0u64;
    let mut stream_bytes = 0u64;
    let mut events = 0u64;
    for i in 0..cluster.masters.len() {
        let mut node = cluster.node_connection(i);
        let names: Vec<String> = redis::cmd("KEYS")
            .arg("plan-limits:events:*")
            .query(&mut node)
            .unwrap();
        for name in names {
            streams += 1;
            stream_bytes += memory_usage(&mut node, &name);
            events += redis::cmd("XLEN")
                .arg(&name)
                .query::<u64>(&mut node)
                .unwrap();
        }
    }
    println!("\n== usage events in the slots' streams");
    println!(
        "{events} events in {streams} streams ({:.0} a stream): {stream_bytes} bytes, {:.0} bytes an event",
        events as f64 / streams as f64,
        stream_bytes as f64 / events as f64
    );
    let mut one = cluster.node_connection(0);
    let lone = "plan-limits:events:lone";
    redis::cmd("XADD")
        .arg(lone)
        .arg("*")
        .arg(&["event", "usage", "user", "u", "action", "upload"])
        .exec(&mut one)
        .unwrap();
    println!(
        "a stream holding one event: {} bytes",
        memory_usage(&mut one, lone)
    );

    // 3. Calls per second one master takes (master 0, 200,000 calls of users in its slots).
    let shard_users: Vec<String> = (0..)
        .map(|n| format!("load-{n}"))
        .filter(|u| master_of(u) == 0)
        .take(20_000)
        .collect();
    let n = 200_000;
    let now = base_ms + 25 * 86_400_000;
    let reserves: Vec<redis::Cmd> = (0..n)
        .map(|i| {
            to_cmd(&reserve_command(
                &shard_users[i % shard_users.len()],
                "ai_analysis",
                &format!("L{i}"),
                now,
            ))
        })
        .collect();
    let settle_one = |i: usize| {
        let user = &shard_users[i % shard_users.len()];
        let batch = [commit(
            user,
            "ai_analysis",
            &format!("L{i}"),
            "2026-11-26",
            now,
        )];
        let slot = key_slot(batch[0].keys.summary.as_bytes());
        let stream = slot_events_stream("plan-limits:events", slot);
        let applied = applied_by(&format!("one-{i}"), slot);
        let mut args = settle_args(&stream, &applied, 1);
        args.now_ms = now;
        to_cmd(&functions::settle(&batch, args))
    };
    println!("\n== one master (of three; Redis 7.0.15, appendonly yes, appendfsync always; the load from 4 connections on the same 2 cores, 64 calls pipelined)");
    let reserve_rate = load(&cluster, 0, &reserves, 4);
    println!("reserve (FCALL plan_limits_reserve, granted): {reserve_rate:.0} calls/s");
    let settles: Vec<redis::Cmd> = (0..n).map(settle_one).collect();
    let settle_rate = load(&cluster, 0, &settles, 4);
    println!("settle, a batch of 1 commit (+ its usage event): {settle_rate:.0} calls/s");
    // The same commits 64 to a call (a busy slot: one user's, as a worker batches them).
    let heavy = &shard_users[0];
    let mut big = Vec::new();
    for chunk in 0..(n / 64) {
        let batch: Vec<Settlement> = (0..64)
            .map(|j| {
                commit(
                    heavy,
                    "procedure_view",
                    &format!("B{chunk}-{j}"),
                    "2026-11-26",
                    now,
                )
            })
            .collect();
        let slot = key_slot(batch[0].keys.summary.as_bytes());
        let stream = slot_events_stream("plan-limits:events", slot);
        let applied = applied_by(&format!("big-{chunk}"), slot);
        let mut args = settle_args(&stream, &applied, 1);
        args.now_ms = now;
        big.push(to_cmd(&functions::settle(&batch, args)));
    }
    let batch_rate = load(&cluster, 0, &big, 4);
    println!(
        "settle, batches of 64 commits of one slot: {batch_rate:.0} calls/s = {:.0} settlements/s",
        batch_rate * 64.0
    );
    println!(
        "a limited request (a reserve, then its commit alone in its call): {:.0} requests/s",
        1.0 / (1.0 / reserve_rate + 1.0 / settle_rate)
    );
    let mut admin = cluster.node_connection(0);
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("everysec")
        .exec(&mut admin)
        .unwrap();
    let reserves: Vec<redis::Cmd> = (0..n)
        .map(|i| {
            to_cmd(&reserve_command(
                &shard_users[i % shard_users.len()],
                "ai_analysis",
                &format!("E{i}"),
                now,
            ))
        })
        .collect();
    let everysec = load(&cluster, 0, &reserves, 4);
    println!("reserve with appendfsync everysec: {everysec:.0} calls/s");
}

#[test]
fn a_call_cut_off_by_a_stalled_master_behind_redis_proxy_is_of_unknown_outcome() {
    let gw = EnvoyClusterGateway::start(GatewayOptions {
        plans_json: cluster_plans_for_envoy(),
        ..GatewayOptions::default()
    });
    let key = "plan-limits:{stalled}:entitlement";
    let ranges = slot_ranges(&gw.cluster);
    let slot = key_slot(key.as_bytes());
    let port = ranges
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(_, _, port)| *port)
        .unwrap();
    let master = gw
        .cluster
        .masters
        .iter()
        .position(|m| m.port == port)
        .unwrap();
    let stall = stall_redis(gw.cluster.node_url(master), "1");
    let mut conn = gw.redis_proxy_connection();
    let command = functions::invoked(
        RedisCommand::new("FCALL")
            .arg("plan_limits_history")
            .arg("1")
            .arg(key),
        plan_limits_core::Invoke::Evalsha,
    );
    let reply = redis_exec::run(&mut conn, &command);
    stall.join().unwrap();
    // Envoy's op timeout (the filter's timeout_ms) passed with the call sent: it may have run.
    assert_eq!(reply, RedisReply::Error("upstream failure".into()));
    assert!(matches!(
        functions::parse_settled(reply, 1),
        Err(plan_limits_core::TransportError::Unknown(_))
    ));
}

#[test]
fn envoy_after_the_masters_lose_their_scripts_requests_follow_their_failure_mode_and_settlements_wait(
) {
    let mut gw = EnvoyClusterGateway::start(GatewayOptions {
        plans_json: cluster_plans_for_envoy(),
        ..GatewayOptions::default()
    });
    // As after a restart: Redis keeps functions, not scripts.
    for i in 0..gw.cluster.masters.len() {
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .exec(&mut gw.cluster.node_connection(i))
            .unwrap();
    }
    let view = Request::new("GET", "/api/procedures/7").user("nia", "free");
    assert_eq!(gw.send(&view).status, 200);
    // A limited action fails open (the allowance: nothing known of nia yet).
    assert_eq!(gw.send(&upload("nia", "free")).status, 200);
    assert!(eventually(|| gw.metric("settle_errors") > 0));
    assert!(gw.metric("fail_open") >= 1);
    let period = gw.period();
    assert_eq!(
        cluster_counter(&gw.cluster, "nia", "procedure_view", &period),
        0
    );
    // The operator loads them again: what waited is counted, once.
    Redis::connect(&gw.cluster.node_url(0))
        .unwrap()
        .load_library()
        .unwrap();
    assert!(eventually(|| {
        cluster_counter(&gw.cluster, "nia", "procedure_view", &period) == 1
            && cluster_counter(&gw.cluster, "nia", "upload", &period) == 1
    }));
    assert_eq!(gw.metric("settlements_dropped"), 0);
    let envoy_log = std::fs::read_to_string(gw.dir.join("envoy.log")).unwrap_or_default();
    assert!(
        envoy_log.contains("plan-limits functions load"),
        "the log says what to do"
    );
}
