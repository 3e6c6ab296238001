//! plan-limits on a real Redis Cluster: three masters of Debian's redis-server joined with
//! `redis-cli --cluster create`, locked down as one Redis is. Every call names one hash slot:
//! a reservation or a report is the user's slot, a settlement batch is split by slot, and the
//! usage events go to the stream of their slot; `plan-limits export` reads them all. Run
//! through the Redis host-call build in our wasmtime host (the `redis` crate's cluster
//! connection routes each call by its first key), and through real Envoy: webdis logs in to
//! Envoy's `redis_proxy`, which forwards `EVALSHA` (not `FCALL`) to the master of its slot.

use std::collections::BTreeMap;
use std::rc::Rc;

use plan_limits_core::cluster;
use plan_limits_core::keys::UsageKeys;
use plan_limits_core::plans::Plans;
use plan_limits_core::redis::functions::{self, EventsTrim, SettleArgs};
use plan_limits_core::redis::RedisReply;
use plan_limits_core::settlement::{SettleMode, Settlement};
use plan_limits_core::settlement_queue::{Group, SettlementQueue};
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
        (0..cluster::SLOTS)
            .step_by(97)
            .map(|slot| cluster::slot_events_stream("plan-limits:events", slot)),
    );
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key);
    }
    let slots: Vec<u16> = pipe.query(&mut conn).unwrap();
    for (key, slot) in keys.iter().zip(slots) {
        assert_eq!(cluster::key_slot(key.as_bytes()), slot, "{key}");
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
    }
}

fn settle_args(events_stream: &str) -> SettleArgs<'_> {
    SettleArgs {
        events_stream,
        events_trim: EventsTrim::MaxAgeMs(35 * 86_400_000),
        now_ms: 1_795_000_000_000,
        ttl_ms: 60_000,
        remember_commits_ms: 3_600_000,
        keep_days_ms: 90 * 86_400_000,
        warning_thresholds: &[80, 90],
    }
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
    let single = functions::settle(&batch, settle_args("plan-limits:events"));
    for invoke in [
        plan_limits_core::config::Invoke::Fcall,
        plan_limits_core::config::Invoke::Evalsha,
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
        let stream = cluster::slot_events_stream("plan-limits:events", slot);
        let command = functions::settle(queue.in_flight(group), settle_args(&stream));
        let reply = redis_exec::run(&mut conn, &command);
        let report = queue.on_batch_reply(group, Ok(reply), 0, 3_600_000);
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
            cluster::key_slot(e["stream"].as_bytes()),
            cluster::key_slot(keys.summary.as_bytes())
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
            let slot = cluster::key_slot(key.as_bytes());
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
        let set_plan = plan_limits_core::admin::AdminOp::SetPlan {
            plan: "professional".into(),
            anchor_day: None,
        };
        operator::apply(&mut redis, &plans, user, &set_plan, "ops", now).unwrap();
        let grant = plan_limits_core::admin::AdminOp::Grant {
            action: "ai_analysis".into(),
            units: 3,
        };
        operator::apply(&mut redis, &plans, user, &grant, "ops", now).unwrap();
        let json = operator::usage(redis.as_dyn(), &plans, user, now).unwrap();
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
    let url = format!(
        "redis://:{}@127.0.0.1:{}/",
        gw.cluster.filter_password(),
        gw.redis_proxy_port
    );
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .unwrap();
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
}

#[test]
fn envoy_concurrent_uploads_of_one_free_user_count_exactly_five() {
    let gw = EnvoyClusterGateway::start(GatewayOptions {
        plans_json: cluster_plans_for_envoy(),
        ..GatewayOptions::default()
    });
    let port = gw.gateway_port;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..60)
            .map(|_| s.spawn(move || upload("yan", "free").send(port).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
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
