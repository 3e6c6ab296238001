//! `plan-limits diff OLD NEW`: what changing plans.json from OLD to NEW changes, one line per
//! change, in this order: plans added and removed; for each plan its terms for every action
//! (`free upload: 5 -> 3`), its features, file size, storage, team and upgrade; actions; routes;
//! the other path lists (unmetered, storage's and team's release routes); every other setting by
//! its JSON path. Both files are compared as the filter reads them, defaults filled in, so
//! writing out a default is no change. `answered_differently` compares two replays of a
//! scenario, one under each file.

use std::collections::{BTreeMap, BTreeSet};

use plan_limits_core::{Config, ConfigError, Plans, Unmetered};
use serde::Serialize;
use serde_json::Value;

use crate::plans_table::{bytes, count, terms_cell};

/// One side of a diff: plans.json as read (defaults filled in) and as compiled.
pub struct Side {
    pub config: Config,
    pub plans: Plans,
}

impl Side {
    /// Reads and compiles plans.json; an error names the JSON path, as `validate`'s do.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config = Config::from_json(bytes)?;
        let plans = Plans::compile(config.clone())?;
        Ok(Self { config, plans })
    }
}

/// Every change from `old` to `new`, one line each; empty when both configure the same.
pub fn changes(old: &Side, new: &Side) -> Vec<String> {
    let mut out = Vec::new();
    plans(old, new, &mut out);
    actions(&old.config, &new.config, &mut out);
    routes(&old.config, &new.config, &mut out);
    let (before, after) = (&old.config, &new.config);
    for (name, from, to) in [
        ("unmetered", &before.unmetered, &after.unmetered),
        (
            "storage.delete_routes",
            &before.storage.delete_routes,
            &after.storage.delete_routes,
        ),
        (
            "team.remove_routes",
            &before.team.remove_routes,
            &after.team.remove_routes,
        ),
    ] {
        added_and_removed(name, &patterns(from), &patterns(to), &mut out);
    }
    settings(old, new, &mut out);
    out
}

fn plans(old: &Side, new: &Side, out: &mut Vec<String>) {
    let (before, after) = (&old.config.plans, &new.config.plans);
    for key in before.keys().filter(|key| !after.contains_key(*key)) {
        out.push(format!("plan removed: {key}"));
    }
    for (key, plan) in after.iter().filter(|(key, _)| !before.contains_key(*key)) {
        out.push(format!("plan added: {key} ({})", plan.name));
    }
    let actions: BTreeSet<&String> = old
        .config
        .actions
        .keys()
        .chain(new.config.actions.keys())
        .collect();
    for (key, was) in before {
        let Some(is) = after.get(key) else { continue };
        if was.name != is.name {
            out.push(format!("{key} name: {} -> {}", was.name, is.name));
        }
        for action in &actions {
            // As `validate`'s table shows it: the limit, or "off" without the feature.
            let cell = |side: &Side| {
                side.plans
                    .actions()
                    .iter()
                    .find(|a| &a.key == *action)
                    .and_then(|a| a.terms_of(key))
                    .map_or_else(|| "absent".to_string(), |terms| terms_cell(terms))
            };
            let (from, to) = (cell(old), cell(new));
            if from != to {
                out.push(format!("{key} {action}: {from} -> {to}"));
            }
        }
        let what = format!("{key} feature");
        added_and_removed(&what, &was.features, &is.features, out);
        for (what, from, to) in [
            (
                "max file size",
                bytes(was.max_file_size_bytes),
                bytes(is.max_file_size_bytes),
            ),
            ("storage", bytes(was.storage_bytes), bytes(is.storage_bytes)),
            (
                "team members",
                count(was.team_members),
                count(is.team_members),
            ),
            (
                "upgrade to",
                upgrade(&was.upgrade_to),
                upgrade(&is.upgrade_to),
            ),
        ] {
            if from != to {
                out.push(format!("{key} {what}: {from} -> {to}"));
            }
        }
    }
}

fn upgrade(to: &Option<String>) -> String {
    to.clone().unwrap_or_else(|| "none".into())
}

fn actions(old: &Config, new: &Config, out: &mut Vec<String>) {
    for key in old
        .actions
        .keys()
        .filter(|key| !new.actions.contains_key(*key))
    {
        out.push(format!("action removed: {key}"));
    }
    for key in new
        .actions
        .keys()
        .filter(|key| !old.actions.contains_key(*key))
    {
        out.push(format!("action added: {key}"));
    }
    for (key, was) in &old.actions {
        if let Some(is) = new.actions.get(key) {
            value_diff(&format!("actions.{key}"), &json(was), &json(is), out);
        }
    }
}

/// Routes are told apart by method and path pattern; what one leads to may change.
fn routes(old: &Config, new: &Config, out: &mut Vec<String>) {
    // Each route's pattern, and what it leads to: its action, variants and other methods.
    let by_pattern = |config: &Config| -> BTreeMap<String, [(&str, String); 3]> {
        config
            .routes
            .iter()
            .map(|r| {
                let target = [
                    ("action", r.action.clone()),
                    ("variants", word(&r.variants)),
                    ("other_methods", word(&r.other_methods)),
                ];
                (pattern(&r.method, &r.path, &r.prefix), target)
            })
            .collect()
    };
    let (before, after) = (by_pattern(old), by_pattern(new));
    for (route, was) in &before {
        let Some(is) = after.get(route) else {
            out.push(format!("route removed: {route} -> {}", was[0].1));
            continue;
        };
        for ((what, from), (_, to)) in was.iter().zip(is) {
            if from != to {
                out.push(format!("route changed: {route}: {what} {from} -> {to}"));
            }
        }
    }
    for (route, is) in after
        .iter()
        .filter(|(route, _)| !before.contains_key(*route))
    {
        out.push(format!("route added: {route} -> {}", is[0].1));
    }
    // The first route that matches a request wins, so the order of overlapping ones matters.
    let order = |config: &Config, other: &BTreeMap<_, _>| -> Vec<String> {
        config
            .routes
            .iter()
            .map(|r| pattern(&r.method, &r.path, &r.prefix))
            .filter(|p| other.contains_key(p))
            .collect()
    };
    if order(old, &after) != order(new, &before) {
        out.push("routes reordered (the first route that matches wins)".into());
    }
}

/// `POST /api/upload`, `GET prefix /api/procedures`, `ANY prefix /api/v1`.
fn pattern(method: &Option<String>, path: &Option<String>, prefix: &Option<String>) -> String {
    let method = method.as_deref().unwrap_or("ANY");
    match (path, prefix) {
        (Some(path), _) => format!("{method} {path}"),
        (None, Some(prefix)) => format!("{method} prefix {prefix}"),
        (None, None) => format!("{method} (no path)"),
    }
}

fn patterns(list: &[Unmetered]) -> Vec<String> {
    list.iter()
        .map(|u| pattern(&u.method, &u.path, &u.prefix))
        .collect()
}

fn added_and_removed(what: &str, old: &[String], new: &[String], out: &mut Vec<String>) {
    for item in old.iter().filter(|item| !new.contains(item)) {
        out.push(format!("{what} removed: {item}"));
    }
    for item in new.iter().filter(|item| !old.contains(item)) {
        out.push(format!("{what} added: {item}"));
    }
}

/// Everything not compared above, by JSON path, as the filter reads it.
fn settings(old: &Side, new: &Side, out: &mut Vec<String>) {
    added_and_removed(
        "declared feature",
        &old.config.features,
        &new.config.features,
        out,
    );
    let rest = |config: &Config| {
        let mut value = json(config);
        if let Some(top) = value.as_object_mut() {
            for compared in [
                "$schema",
                "plans",
                "actions",
                "routes",
                "unmetered",
                "features",
            ] {
                top.remove(compared);
            }
        }
        for (section, list) in [("storage", "delete_routes"), ("team", "remove_routes")] {
            if let Some(section) = value.get_mut(section).and_then(Value::as_object_mut) {
                section.remove(list);
            }
        }
        value
    };
    value_diff("", &rest(&old.config), &rest(&new.config), out);
    let (from, to) = (old.plans.request_timeout_ms, new.plans.request_timeout_ms);
    if from != to && old.config.gateway.request_timeout_ms == new.config.gateway.request_timeout_ms
    {
        out.push(format!(
            "request timeout (from the largest file size): {from} ms -> {to} ms"
        ));
    }
}

/// `path: old -> new` for every leaf (or array) that differs, as compact JSON.
fn value_diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(before), Value::Object(after)) => {
            let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
            for key in keys {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (before.get(key), after.get(key)) {
                    (Some(from), Some(to)) => value_diff(&at, from, to, out),
                    (from, to) => out.push(format!(
                        "{at}: {} -> {}",
                        from.map_or("absent".into(), Value::to_string),
                        to.map_or("absent".into(), Value::to_string)
                    )),
                }
            }
        }
        _ if old != new => out.push(format!("{path}: {old} -> {new}")),
        _ => {}
    }
}

fn json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// A unit enum's JSON name: `meter`, `refuse`.
fn word(value: &impl Serialize) -> String {
    match json(value) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// The requests of a scenario replayed once under each file (`replay`'s result lines, in
/// order) that were answered differently: another status, or another `error` in the JSON the
/// filter answered with. `file_lines`: each request's line in the scenario file.
pub fn answered_differently(file_lines: &[usize], old: &[Value], new: &[Value]) -> Vec<String> {
    let answer = |result: &Value| match result["body"]["error"].as_str() {
        Some(error) => format!("{} ({error})", result["status"]),
        None => result["status"].to_string(),
    };
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (was, is))| answer(was) != answer(is))
        .map(|(i, (was, is))| {
            let line = file_lines
                .get(i)
                .map(|n| format!(" (line {n})"))
                .unwrap_or_default();
            let user = was["user"]
                .as_str()
                .map(|user| format!(" as {user}"))
                .unwrap_or_default();
            format!(
                "request {}{line}: {} {}{user} at {}: {} -> {}",
                i + 1,
                was["method"].as_str().unwrap_or("?"),
                was["path"].as_str().unwrap_or("?"),
                was["at"].as_str().unwrap_or("?"),
                answer(was),
                answer(is)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(edit: impl FnOnce(&mut Value)) -> Side {
        let mut value: Value = serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
        edit(&mut value);
        Side::from_json(value.to_string().as_bytes()).unwrap()
    }

    fn diff(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        changes(&side(|_| {}), &side(edit))
    }

    #[test]
    fn the_same_file_has_no_changes() {
        assert_eq!(diff(|_| {}), Vec::<String>::new());
    }

    #[test]
    fn defaults_written_out_and_the_schema_reference_are_no_changes() {
        let changes = diff(|v| {
            v["redis"]["history_retention_days"] = 400.into();
            v["actions"]["upload"]["on_client_abort"] = "commit".into();
            v.as_object_mut().unwrap().remove("$schema");
        });
        assert_eq!(changes, Vec::<String>::new());
    }

    #[test]
    fn a_limit_change_names_the_plan_and_action() {
        assert_eq!(
            diff(|v| v["plans"]["free"]["limits"]["upload"] = 3.into()),
            ["free upload: 5 -> 3"]
        );
        assert_eq!(
            diff(|v| v["plans"]["professional"]["limits"]["ai_analysis"] = Value::Null),
            ["professional ai_analysis: 100 -> unlimited"]
        );
    }

    #[test]
    fn a_feature_added_to_a_plan_opens_its_actions() {
        assert_eq!(
            diff(|v| {
                v["plans"]["free"]["features"] = serde_json::json!(["dxf_export"]);
                v["plans"]["free"]["limits"]["dxf_export"] = 2.into();
            }),
            [
                "free dxf_export: off (needs dxf_export) -> 2",
                "free feature added: dxf_export",
            ]
        );
    }

    #[test]
    fn an_actions_new_feature_closes_it_to_plans_without() {
        assert_eq!(
            diff(|v| v["actions"]["pdf_export"]["feature"] = "advanced_analytics".into()),
            [
                "free pdf_export: unlimited -> off (needs advanced_analytics)",
                "professional pdf_export: unlimited -> off (needs advanced_analytics)",
                "actions.pdf_export.feature: null -> \"advanced_analytics\"",
            ]
        );
    }

    #[test]
    fn routes_added_removed_and_changed() {
        let changes = diff(|v| {
            v["routes"][0]["action"] = "ai_analysis".into();
            v["routes"][3]["variants"] = "refuse".into();
            v["routes"].as_array_mut().unwrap().remove(4);
            v["routes"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"prefix": "/api/v2", "action": "api_call"}));
        });
        assert_eq!(
            changes,
            [
                "route removed: POST /api/export/dxf -> dxf_export",
                "route changed: POST /api/export/pdf: variants meter -> refuse",
                "route changed: POST /api/upload: action upload -> ai_analysis",
                "route added: ANY prefix /api/v2 -> api_call",
            ]
        );
        let reordered = diff(|v| v["routes"].as_array_mut().unwrap().swap(0, 1));
        assert_eq!(
            reordered,
            ["routes reordered (the first route that matches wins)"]
        );
    }

    #[test]
    fn a_plan_added_and_one_removed() {
        let changes = diff(|v| {
            let mut team = v["plans"]["professional"].clone();
            team["name"] = "Team".into();
            team["upgrade_to"] = Value::Null;
            v["plans"]["team"] = team;
            v["plans"]["enterprise"]["upgrade_to"] = "team".into();
        });
        assert_eq!(
            changes,
            [
                "plan added: team (Team)",
                "enterprise upgrade to: none -> team"
            ]
        );
        let changes = diff(|v| {
            v["plans"].as_object_mut().unwrap().remove("enterprise");
            v["plans"]["professional"]["upgrade_to"] = Value::Null;
        });
        // The largest file any plan allows was enterprise's: Envoy's timeout shrinks with it.
        assert_eq!(
            changes,
            [
                "plan removed: enterprise",
                "professional upgrade to: enterprise -> none",
                "request timeout (from the largest file size): 8060000 ms -> 1660000 ms",
            ]
        );
    }

    #[test]
    fn sizes_path_lists_and_other_settings_by_json_path() {
        let changes = diff(|v| {
            v["plans"]["free"]["max_file_size_bytes"] = (20u64 << 20).into();
            v["plans"]["free"]["storage_bytes"] = Value::Null;
            v["plans"]["free"]["team_members"] = 2.into();
            v["unmetered"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"prefix": "/docs"}));
            v["endpoints"]["history"] = Value::Null;
            v["redis"]["timeout_ms"] = 500.into();
            v["warnings"] = serde_json::json!({"thresholds": [75]});
        });
        assert_eq!(
            changes,
            [
                "free max file size: 10 MB -> 20 MB",
                "free storage: 1 GB -> unlimited",
                "free team members: 1 -> 2",
                "unmetered added: ANY prefix /docs",
                "endpoints.history: \"/api/usage/history\" -> null",
                "redis.timeout_ms: 250 -> 500",
                "warnings.thresholds: [80,90] -> [75]",
            ]
        );
    }

    #[test]
    fn the_derived_request_timeout_follows_the_largest_file() {
        let changes =
            diff(|v| v["plans"]["enterprise"]["max_file_size_bytes"] = (1u64 << 30).into());
        assert_eq!(
            changes,
            [
                "enterprise max file size: 500 MB -> 1 GB",
                "request timeout (from the largest file size): 8060000 ms -> 16444000 ms",
            ]
        );
    }

    #[test]
    fn requests_answered_differently_are_named_with_their_lines() {
        let result = |status: u16, error: Option<&str>| {
            let mut r = serde_json::json!({"line": 1, "at": "2026-11-30T09:00:00.000Z",
                "method": "POST", "path": "/api/upload", "user": "u1", "status": status});
            if let Some(error) = error {
                r["body"] = serde_json::json!({"error": error, "limit": 5});
            }
            r
        };
        let old = [result(200, None), result(429, Some("Upload limit reached"))];
        let mut new = [result(429, Some("Upload limit reached")), old[1].clone()];
        new[1]["body"]["limit"] = 3.into();
        assert_eq!(
            answered_differently(&[4, 6], &old, &new),
            [
                "request 1 (line 4): POST /api/upload as u1 at 2026-11-30T09:00:00.000Z: \
              200 -> 429 (Upload limit reached)"
            ]
        );
    }
}
