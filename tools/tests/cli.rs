//! `plan-limits` as a platform team uses it: the repository's scenario replays to exactly the
//! expected output (with either filter build), bad input is refused by name, tokens verify
//! with the dev key, and billing's plan is recorded where the filter reads it.

use std::process::Command;

use plan_limits_core::{encoded_user, entitlement_key, JwtClaims, UsageKeys};
use plan_limits_services::jwt::DevKey;
use plan_limits_services::process::{free_port, scratch_dir};
use plan_limits_services::redis_server::RedisServer;
use plan_limits_services::repo_root;

fn plan_limits(args: &[&str], redis_url: Option<&str>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_plan-limits"));
    command
        .args(args)
        .current_dir(repo_root())
        .env_remove("REDIS_URL");
    if let Some(url) = redis_url {
        command.env("REDIS_URL", url);
    }
    command.output().expect("run plan-limits")
}

fn sim(args: &[&str]) -> std::process::Output {
    plan_limits(args, None)
}

#[test]
fn a_token_is_signed_with_the_dev_key_and_claims_what_it_was_asked() {
    let dir = scratch_dir("cli-token");
    let key_dir = dir.join("jwt");
    let out = sim(&[
        "token",
        "alice",
        "--plan",
        "professional",
        "--org",
        "acme",
        "--key-dir",
        key_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let key = DevKey::load_or_create(&key_dir);
    let payload = key.verify(&JwtClaims::default(), token.trim()).unwrap();
    assert_eq!(
        (&payload["sub"], &payload["plan"], &payload["org"]),
        (&"alice".into(), &"professional".into(), &"acme".into())
    );
    assert!(
        key_dir.join("jwks.json").exists(),
        "Envoy's JWKS beside the key"
    );
}

#[test]
fn set_plan_records_billings_plan_and_refuses_an_unknown_one() {
    let redis = RedisServer::start_on(&scratch_dir("cli-set-plan"), free_port());
    let url = redis.url();
    let out = plan_limits(&["set-plan", "a b", "professional"], Some(&url));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = entitlement_key("plan-limits", encoded_user("a b"));
    let plan: String = redis::cmd("HGET")
        .arg(&key)
        .arg("plan")
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(plan, "professional");
    let out = plan_limits(&["set-plan", "a b", "platinum"], Some(&url));
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("platinum") && err.contains("free"), "{err}");
    let out = plan_limits(&["set-plan", "a", "free"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("REDIS_URL"));
}

#[test]
fn functions_load_installs_the_library() {
    let redis = RedisServer::start_on(&scratch_dir("cli-functions"), free_port());
    redis::cmd("FUNCTION")
        .arg("FLUSH")
        .exec(&mut redis.connection())
        .unwrap();
    let out = plan_limits(&["functions", "load"], Some(&redis.url()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(libraries.len(), 1);
}

fn replay_matches_the_expected_output(scenario: &str, build: &str) {
    let out = sim(&[
        "replay",
        "plans.json",
        &format!("scenarios/{scenario}.jsonl"),
        "--build",
        build,
        "--vms",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected =
        std::fs::read_to_string(repo_root().join(format!("scenarios/{scenario}.expected.jsonl")))
            .unwrap();
    let actual = String::from_utf8(out.stdout).unwrap();
    for (i, (a, e)) in actual.lines().zip(expected.lines()).enumerate() {
        let (a, e): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(a).unwrap(),
            serde_json::from_str(e).unwrap(),
        );
        assert_eq!(a, e, "line {}", i + 1);
    }
    assert_eq!(actual.lines().count(), expected.lines().count());
}

#[test]
fn the_month_end_scenario_replays_as_expected_with_webdis() {
    replay_matches_the_expected_output("month-end", "webdis");
}

#[test]
fn the_month_end_scenario_replays_as_expected_with_redis_hostcalls() {
    replay_matches_the_expected_output("month-end", "redis-hostcalls");
}

/// Anchor day 31 across February (2027, and 2028 a leap year), an anchor changed mid-period,
/// the UTC midnight edge of an anchored period.
#[test]
fn the_anchors_scenario_replays_as_expected_with_webdis() {
    replay_matches_the_expected_output("anchors", "webdis");
}

#[test]
fn the_anchors_scenario_replays_as_expected_with_redis_hostcalls() {
    replay_matches_the_expected_output("anchors", "redis-hostcalls");
}

#[test]
fn validate_prints_the_plans() {
    let out = sim(&["validate", "plans.json"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let upload = table
        .lines()
        .find(|l| l.starts_with("upload / month"))
        .unwrap();
    assert_eq!(
        upload.split_whitespace().collect::<Vec<_>>(),
        ["upload", "/", "month", "unlimited", "5", "unlimited"]
    );
}

#[test]
fn validate_names_the_field_of_an_error() {
    let dir = plan_limits_services::process::scratch_dir("sim");
    let mut plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    plans["plans"]["professional"]["limits"]["ai_analysis"] = 1.5.into();
    let path = dir.join("plans.json");
    std::fs::write(&path, plans.to_string()).unwrap();
    let out = sim(&["validate", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("plans.professional.limits.ai_analysis"),
        "{err}"
    );
    assert!(err.contains("floating point"), "{err}");
}

#[test]
fn a_bad_scenario_line_is_named() {
    let dir = plan_limits_services::process::scratch_dir("sim");
    let path = dir.join("s.jsonl");
    std::fs::write(
        &path,
        "{\"method\":\"GET\",\"path\":\"/\"}\n{\"usr\":\"u1\",\"method\":\"GET\",\"path\":\"/\"}\n",
    )
    .unwrap();
    let out = sim(&["replay", "plans.json", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("scenario line 2: unknown field `usr`"),
        "{err}"
    );
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_operators_changes_reach_a_running_gateway_and_are_on_record() {
    use plan_limits_services::gateway::{EnvoyGateway, GatewayOptions};
    use plan_limits_services::http::{Body, Request};

    let gw = EnvoyGateway::start(GatewayOptions::default());
    let url = gw.redis.url();
    let upload = || {
        Request::new("POST", "/api/upload")
            .user("gia", "free")
            .body(Body::Bytes(b"<diagram/>".to_vec()))
            .send(gw.gateway_port)
    };
    for _ in 0..5 {
        assert_eq!(upload().status, 200);
    }
    assert_eq!(upload().status, 429);
    let cli = |args: &[&str]| ok(plan_limits(args, Some(&url)));
    let grant = cli(&["grant", "gia", "upload", "2", "--operator", "ops-1"]);
    assert!(grant.contains("gia: 2 more upload this period"), "{grant}");
    // The refusal the gateway remembered lasts deny_cache_ms (1 s) at most.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(upload().status, 200);
    assert_eq!(upload().status, 200);
    let r = upload();
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["limit"], 7);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // `usage` prints what GET /api/usage answers.
    let usage: serde_json::Value = serde_json::from_str(&cli(&["usage", "gia"])).unwrap();
    let uploads = &usage["actions"]["upload"];
    assert_eq!(
        (&uploads["used"], &uploads["limit"], &uploads["granted"]),
        (&7.into(), &7.into(), &2.into())
    );
    cli(&["reset", "gia", "upload", "--operator", "ops-2"]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(upload().status, 200, "counts start again");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The history keeps what happened; the reset touched only the period's count.
    let today = chrono::Utc::now().date_naive().to_string();
    let history: serde_json::Value =
        serde_json::from_str(&cli(&["history", "gia", "--action", "upload"])).unwrap();
    let last = history["days"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (&last["date"], &last["counts"]["upload"]),
        (&today.clone().into(), &8.into())
    );
    let err = plan_limits(&["history", "gia", "--from", "2026-02-30"], Some(&url));
    assert!(String::from_utf8_lossy(&err.stderr).contains("from: not a date"));
    // Every use and every change, for billing.
    let csv = cli(&[
        "export", "--from", &today, "--to", &today, "--format", "csv",
    ]);
    let mut rows = csv::Reader::from_reader(csv.as_bytes());
    let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    let of = |event: &str| rows.iter().filter(|r| &r[1] == event).count();
    assert_eq!(
        (of("usage"), of("admin"), of("threshold_crossed")),
        (8, 2, 2),
        "{csv}"
    );
    let admin: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| &r[1] == "admin")
        .map(|r| (&r[2], &r[13]))
        .collect();
    assert_eq!(admin, [("grant", "ops-1"), ("reset", "ops-2")]);
    let jsonl = cli(&["export", "--from", &today, "--to", &today]);
    assert_eq!(jsonl.lines().count(), 12);
    for line in jsonl.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(event["id"].is_string() && event["user"] == "gia", "{line}");
    }
    // Billing's plan: unlimited uploads from the next request on.
    cli(&["set-plan", "gia", "professional"]);
    assert_eq!(upload().status, 200);
    // The audit recomputes every counter and total from the events, the grant and the reset
    // included: no drift.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let audit = cli(&["audit"]);
    assert!(audit.contains("no drift"), "{audit}");
    let period = plan_limits_services::usage::this_period();
    assert!(cli(&["audit", "--period", &period]).contains("no drift"));
    // A counter changed behind the gateway's back is drift, and the audit fails on it.
    let mut redis = gw.redis.connection();
    let summary = UsageKeys::new("plan-limits", "gia", &period, "upload").summary;
    let counted: u64 = redis::cmd("HGET")
        .arg(&summary)
        .arg("upload")
        .query(&mut redis)
        .unwrap();
    redis::cmd("HINCRBY")
        .arg(&summary)
        .arg("upload")
        .arg(3)
        .exec(&mut redis)
        .unwrap();
    let out = plan_limits(&["audit"], Some(&url));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = format!(
        "\"gia\" upload in period {period}: Redis holds {}, the events say {counted} (+3)",
        counted + 3
    );
    assert!(text.contains(&line), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 counters differ"));
}

#[test]
fn reload_swaps_plans_into_a_running_envoy_and_refuses_what_it_cannot_apply() {
    use plan_limits_services::gateway::{EnvoyGateway, GatewayOptions};
    use plan_limits_services::http::{Body, Request};

    let mut gw = EnvoyGateway::start(GatewayOptions::default());
    let pid = gw.envoy().pid();
    let upload = |user: &str| {
        Request::new("POST", "/api/upload")
            .user(user, "free")
            .body(Body::Bytes(b"<diagram/>".to_vec()))
            .send(gw.gateway_port)
            .status
    };
    let dir = scratch_dir("reload");
    let edited = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut plans: serde_json::Value =
            serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
        edit(&mut plans);
        let path = dir.join(name);
        std::fs::write(&path, plans.to_string()).unwrap();
        path.display().to_string()
    };
    let ecds = gw.ecds_dir("envoy").display().to_string();
    let wasm = plan_limits_services::filter_wasm().display().to_string();
    let admin = gw.admin_port.to_string();
    let reload = |plans: &str| {
        sim(&[
            "reload",
            plans,
            "--ecds-dir",
            &ecds,
            "--wasm",
            &wasm,
            "--admin-port",
            &admin,
        ])
    };

    let three = edited("three.json", &|p| {
        p["plans"]["free"]["limits"]["upload"] = 3.into()
    });
    let out = ok(reload(&three));
    assert!(out.contains("loaded by Envoy, no restart"), "{out}");
    let statuses: Vec<u16> = (0..4).map(|_| upload("rio")).collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert!(ok(reload(&three)).contains("already running"));

    // Refused before anything is swapped: a bad value (named by its JSON path, by the .wasm
    // itself too), and a change Envoy's own config holds (a path no longer unmetered would
    // still skip the filter).
    let bad = edited("bad.json", &|p| {
        p["plans"]["free"]["limits"]["upload"] = (-1).into()
    });
    let out = reload(&bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("plans.free.limits.upload"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fewer_unmetered = edited("unmetered.json", &|p| {
        p["unmetered"] = serde_json::json!([{"prefix": "/health"}]);
        p["plans"]["free"]["limits"]["upload"] = 3.into();
    });
    let out = reload(&fewer_unmetered);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("changes unmetered") && err.contains("restart"),
        "{err}"
    );
    // The last good plans still serve, in the same process.
    assert_eq!(upload("rio"), 429);
    let statuses: Vec<u16> = (0..4).map(|_| upload("sam")).collect();
    assert_eq!(statuses, [200, 200, 200, 429]);

    // Beside a gateway `make run` started (its record), `reload` without a file reloads the
    // one it was started with, and the Redis commands find its Redis, each saying so.
    let two = edited("two.json", &|p| {
        p["plans"]["free"]["limits"]["upload"] = 2.into()
    });
    let record = dir.join("run.json");
    plan_limits_tools::run_record::RunRecord {
        plans: two.clone().into(),
        redis_url: gw.redis.url(),
        admin_port: gw.admin_port,
    }
    .write(&record)
    .unwrap();
    let beside_make_run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_plan-limits"))
            .args(args)
            .current_dir(repo_root())
            .env_remove("REDIS_URL")
            .env("PLAN_LIMITS_RUN_RECORD", &record)
            .output()
            .unwrap()
    };
    let out = beside_make_run(&["reload", "--ecds-dir", &ecds, "--wasm", &wasm]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("reloading {two}")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("loaded by Envoy"));
    let statuses: Vec<u16> = (0..3).map(|_| upload("tim")).collect();
    assert_eq!(statuses, [200, 200, 429]);
    let out = beside_make_run(&["usage", "tim"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("using the Redis of the gateway make run started"),
        "{err}"
    );
    assert!(
        !err.contains(
            gw.redis
                .url()
                .split('@')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
        ),
        "no password shown"
    );
    let usage: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(usage["actions"]["upload"]["used"], 2);
    assert_eq!(gw.envoy().pid(), pid, "the same Envoy all along");
}

/// `committed` (a file in the repository) is what `plan-limits ARGS` prints, or the test says
/// where they first differ and how to write it again.
fn assert_committed(args: &[&str], file: &str) {
    let printed = ok(sim(args));
    let committed = std::fs::read_to_string(repo_root().join(file)).unwrap_or_default();
    let stale = format!(
        "{file} is not what `plan-limits {}` prints: run `make schema` and commit it",
        args.join(" ")
    );
    if let Some((n, (p, c))) = printed
        .lines()
        .zip(committed.lines())
        .enumerate()
        .find(|(_, (p, c))| p != c)
    {
        panic!(
            "{stale}\nfirst difference, line {}:\n  committed: {c}\n  printed:   {p}",
            n + 1
        );
    }
    assert!(printed == committed, "{stale}");
}

#[test]
fn the_committed_schema_is_what_plan_limits_schema_prints() {
    assert_committed(&["schema"], "plans.schema.json");
}

#[test]
fn the_configuration_reference_is_what_plan_limits_schema_markdown_prints() {
    assert_committed(&["schema", "--markdown"], "docs/configuration.md");
}

/// What an editor does with plans.json's `"$schema"`: the repository's file passes, and
/// mistakes the filter refuses are flagged where they are.
#[test]
fn plans_json_validates_against_the_committed_schema() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("plans.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    assert_eq!(plans["$schema"], "./plans.schema.json");
    let errors: Vec<String> = validator
        .iter_errors(&plans)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    for (pointer, value) in [
        ("/plans/free/uploads_per_day", serde_json::json!(3)),
        ("/plans/free/limits/upload", serde_json::json!(-1)),
        ("/plans/free/limits/upload", serde_json::json!(2.5)),
        ("/actions/upload/on_redis_error", serde_json::json!("retry")),
        ("/redis/timeout_ms", serde_json::json!("250")),
        ("/routes/0/verb", serde_json::json!("POST")),
    ] {
        let mut bad = plans.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        bad.pointer_mut(parent).unwrap()[key] = value.clone();
        let flagged: Vec<String> = validator
            .iter_errors(&bad)
            .map(|e| e.instance_path().to_string())
            .collect();
        assert!(
            flagged
                .iter()
                .any(|at| !at.is_empty() && pointer.starts_with(at.as_str())),
            "{pointer} = {value}: flagged at {flagged:?}"
        );
    }
}

/// The repository's plans.json with `edit` applied, written to a scratch file.
fn plans_file_with(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    edit(&mut plans);
    let path = scratch_dir(name).join("plans.json");
    std::fs::write(&path, serde_json::to_string_pretty(&plans).unwrap()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn diff_prints_what_changes_for_which_plan_and_action() {
    let fewer_uploads = plans_file_with("cli-diff", |v| {
        v["plans"]["free"]["limits"]["upload"] = 3.into();
        v["plans"]["free"]["features"] = serde_json::json!(["priority_support"]);
    });
    let out = ok(sim(&["diff", "plans.json", &fewer_uploads]));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "free upload: 5 -> 3",
            "free feature added: priority_support"
        ]
    );
    assert_eq!(
        ok(sim(&["diff", "plans.json", "plans.json"])),
        "no changes\n"
    );
    let bad = plans_file_with("cli-diff-bad", |v| {
        v["plans"]["free"]["limits"]["upload"] = (-3).into()
    });
    let out = sim(&["diff", "plans.json", &bad]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&bad) && err.contains("plans.free.limits.upload"),
        "{err}"
    );
}

/// The month-end scenario's free user uploads five times before the month ends (one failing
/// upstream, not counted): with three uploads a month, the fourth and fifth counted ones are
/// refused.
#[test]
fn diff_with_a_scenario_names_the_requests_answered_differently() {
    let fewer_uploads = plans_file_with("cli-diff-scenario", |v| {
        v["plans"]["free"]["limits"]["upload"] = 3.into()
    });
    let out = ok(sim(&[
        "diff",
        "plans.json",
        &fewer_uploads,
        "--scenario",
        "scenarios/month-end.jsonl",
    ]));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "free upload: 5 -> 3",
            "",
            "answered differently in scenarios/month-end.jsonl:",
            "request 5 (line 8): POST /api/upload as u1 at 2026-11-30T11:00:00.000Z: \
             200 -> 429 (Upload limit reached)",
            "request 6 (line 9): POST /api/upload as u1 at 2026-11-30T23:59:59.999Z: \
             200 -> 429 (Upload limit reached)",
        ],
        "{out}"
    );
}

/// Every document of a YAML stream.
fn yaml_documents(yaml: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .collect()
}

#[test]
fn render_envoy_prints_the_config_make_run_uses_and_envoy_accepts_it() {
    let dir = scratch_dir("render-envoy");
    let key = DevKey::load_or_create(&dir.join("jwt"));
    let ecds = dir.join("ecds");
    let wasm = plan_limits_services::filter_wasm();
    let out = ok(sim(&[
        "render",
        "envoy",
        "plans.json",
        "--jwks",
        key.jwks_path().to_str().unwrap(),
        "--ecds-dir",
        ecds.to_str().unwrap(),
        "--write-ecds",
        "--wasm",
        wasm.to_str().unwrap(),
    ]));
    let config = &yaml_documents(&out)[0];
    let listener = &config["static_resources"]["listeners"][0];
    assert_eq!(listener["address"]["socket_address"]["port_value"], 10000);
    assert!(out.contains("plan_limits_hold") && out.contains("envoy.filters.http.jwt_authn"));
    for file in ["plan_limits.json", "plan_limits_hold.json"] {
        assert!(ecds.join(file).exists(), "{file}");
    }
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, &out).unwrap();
    let validated = Command::new(plan_limits_services::envoy::envoy_bin())
        .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "{}",
        String::from_utf8_lossy(&validated.stderr)
    );
}

/// `render envoy` prints the builder's config; with its defaults (`make run`'s ports and
/// paths), the repository's envoy.yaml, which `make envoy-yaml` writes from it (the services'
/// test fails when the committed file is stale).
#[test]
fn render_envoy_with_its_defaults_prints_the_repository_envoy_yaml() {
    let printed = ok(sim(&["render", "envoy"]));
    assert!(
        printed == plan_limits_services::envoy::repository_envoy_yaml().unwrap(),
        "`plan-limits render envoy` does not print what the builder renders for make run"
    );
}

/// The issue's check: `envoy --mode validate -c envoy.yaml` from the root, once the files it
/// names exist (`make build` writes them with `plan-limits-gateway --prepare`, `make run` at
/// start). Here in a copy of the root, so the repository's `.gateway/` is left alone.
#[test]
fn envoy_accepts_the_repository_envoy_yaml_from_the_root() {
    let root = scratch_dir("repository-envoy-yaml");
    std::fs::copy(repo_root().join("envoy.yaml"), root.join("envoy.yaml")).unwrap();
    let validate = || {
        Command::new(plan_limits_services::envoy::envoy_bin())
            .current_dir(&root)
            .args(["--mode", "validate", "-c", "envoy.yaml"])
            .output()
            .unwrap()
    };
    // Without them Envoy refuses it, naming what is missing.
    let refused = validate();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(".gateway/"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    plan_limits_services::gateway::prepare_files(
        &root.join(".gateway"),
        &plan_limits_services::plans_json(),
        &plan_limits_services::filter_wasm(),
    )
    .unwrap();
    let validated = validate();
    assert!(
        validated.status.success(),
        "{}",
        String::from_utf8_lossy(&validated.stderr)
    );
}

#[test]
fn render_prints_every_platforms_manifests_with_their_required_fields() {
    let dir = scratch_dir("render-kubernetes");
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
    for (platform, image, expected_kinds) in [
        (
            "istio",
            "oci://registry.example/plan-limits-filter:0.1.0",
            &[
                "WasmPlugin",
                "WasmPlugin",
                "RequestAuthentication",
                "EnvoyFilter",
                "DestinationRule",
            ][..],
        ),
        (
            "envoy-gateway",
            "oci://registry.example/plan-limits-filter:0.1.0",
            &[
                "EnvoyExtensionPolicy",
                "SecurityPolicy",
                "ClientTrafficPolicy",
                "EnvoyPatchPolicy",
            ][..],
        ),
        (
            "higress",
            "oci://registry.example/plan-limits-filter-redis-hostcalls:0.1.0",
            &["WasmPlugin", "WasmPlugin", "WasmPlugin", "EnvoyFilter"][..],
        ),
    ] {
        let out = ok(sim(&[
            "render",
            platform,
            "plans.json",
            "--image",
            image,
            "--jwks-uri",
            "https://auth.example/.well-known/jwks.json",
            "--jwks-file",
            jwks.to_str().unwrap(),
        ]));
        let docs = yaml_documents(&out);
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, expected_kinds, "{platform}");
        for doc in &docs {
            let api = doc["apiVersion"].as_str().unwrap();
            assert!(
                api.contains('/') && api.contains(".io/"),
                "{platform}: {api}"
            );
            assert!(doc["metadata"]["name"].is_string(), "{platform}: {doc}");
            assert!(
                doc["metadata"]["namespace"].is_string(),
                "{platform}: {doc}"
            );
            assert!(doc["spec"].is_object(), "{platform}: {doc}");
        }
        // The filter's configuration is plans.json: its plans, routes and actions as written.
        let filter = &docs[0]["spec"];
        let config = match platform {
            "istio" => &filter["pluginConfig"],
            "envoy-gateway" => &filter["wasm"][0]["config"],
            _ => &filter["defaultConfig"],
        };
        for part in ["plans", "routes", "actions", "unmetered"] {
            assert_eq!(config[part], plans[part], "{platform}: {part}");
        }
        let url = filter["url"]
            .as_str()
            .or(filter["wasm"][0]["code"]["image"]["url"].as_str())
            .unwrap();
        assert!(image.ends_with(url), "{platform}: {url}");
        // Stock Envoy's build runs on Istio and Envoy Gateway: the very .wasm accepts its
        // configuration there.
        if platform != "higress" {
            plan_limits_services::envoy::validate_with_envoy(
                &config.to_string(),
                &plan_limits_services::filter_wasm(),
                &dir,
            )
            .unwrap_or_else(|e| panic!("{platform}: {e}"));
        }
    }
    // Without flags: a complete manifest, what only the deployment knows a placeholder that
    // says so, each named on stderr.
    for platform in ["istio", "envoy-gateway", "higress"] {
        let out = sim(&["render", platform]);
        assert!(
            out.status.success(),
            "{platform}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = yaml_documents(&String::from_utf8(out.stdout).unwrap());
        assert!(docs.len() >= 4, "{platform}");
        let text = serde_json::to_string(&docs).unwrap();
        assert!(text.contains("PLACEHOLDER"), "{platform}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("placeholders") && err.contains("--image"),
            "{platform}: {err}"
        );
    }
}
