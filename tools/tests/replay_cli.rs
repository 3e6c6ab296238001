//! The replay tool as a platform team uses it: the repository's scenario must produce exactly
//! the expected output (with either filter build), and bad input is refused by name.

use std::process::Command;

use plan_limits_services::repo_root;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_plan-limits"))
        .args(args)
        .current_dir(repo_root())
        .env_remove("REDIS_URL")
        .output()
        .expect("run plan-limits")
}

fn replay_matches_the_expected_output(build: &str) {
    let out = sim(&[
        "replay",
        "plans.json",
        "scenarios/month-end.jsonl",
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
        std::fs::read_to_string(repo_root().join("scenarios/month-end.expected.jsonl")).unwrap();
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
    replay_matches_the_expected_output("webdis");
}

#[test]
fn the_month_end_scenario_replays_as_expected_with_redis_hostcalls() {
    replay_matches_the_expected_output("redis-hostcalls");
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
