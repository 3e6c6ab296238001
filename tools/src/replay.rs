//! The replay tool's logic: scenario lines in, one result line per request out.

use std::collections::BTreeMap;

use plan_limits_core::config::Config;
use plan_limits_core::period::BillingPeriod;
use plan_limits_core::routes;
use serde::Deserialize;
use serde_json::{json, Value};

use plan_limits_wasm_host::harness::{Call, Harness};
use plan_limits_wasm_host::HostError;

/// One request of a scenario file (JSON lines).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioLine {
    /// RFC 3339; the previous line's time when absent (the current time for the first line).
    #[serde(default)]
    pub at: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub content_length: Option<u64>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// What the upstream answers if the request reaches it (200 when absent).
    #[serde(default)]
    pub upstream_status: Option<u16>,
}

/// Parses a scenario; errors name the line.
pub fn parse_scenario(text: &str) -> Result<Vec<ScenarioLine>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with("//"))
        .map(|(i, line)| {
            let parsed: ScenarioLine =
                serde_json::from_str(line).map_err(|e| format!("scenario line {}: {e}", i + 1))?;
            if let Some(at) = &parsed.at {
                chrono::DateTime::parse_from_rfc3339(at)
                    .map_err(|e| format!("scenario line {}: at: {e}", i + 1))?;
            }
            Ok(parsed)
        })
        .collect()
}

/// Runs every line through the harness, round-robin over its VMs; one JSON value per line.
pub fn run(
    harness: &mut Harness,
    config: &Config,
    lines: &[ScenarioLine],
) -> Result<Vec<Value>, HostError> {
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if let Some(at) = &line.at {
            harness.set_time(at);
        }
        let mut call =
            Call::new(&line.method, &line.path).upstream(line.upstream_status.unwrap_or(200));
        call.user = line.user.clone();
        call.plan = line.plan.clone();
        call.content_length = line.content_length;
        for (k, v) in &line.headers {
            call = call.header(k, v);
        }
        let vm = i % harness.vms.len();
        let outcome = harness.send(vm, &call)?;

        let now = plan_limits_wasm_host::state::nanos_to_datetime(harness.plugin.clock().nanos());
        let action = routes::match_action(&config.routes, &line.method, &line.path);
        let counter = match (action, &line.user) {
            (Some(action), Some(user)) => {
                let period = BillingPeriod::calendar_month(now);
                let summary = plan_limits_services::usage::summary_with_prefix(
                    &mut harness.connection(),
                    &config.redis.key_prefix,
                    user,
                    &period.id,
                );
                json!(summary
                    .get(action)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0))
            }
            _ => Value::Null,
        };
        let mut result = json!({
            "line": i + 1,
            "at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "method": line.method,
            "path": line.path,
            "user": line.user,
            "action": action,
            "status": outcome.status,
            "reached_upstream": outcome.reached_upstream,
            "counter": counter,
        });
        if let Some(reply) = &outcome.reply {
            result["body"] = serde_json::from_slice(&reply.body).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&reply.body).into_owned())
            });
            if let Some(retry) = reply.header("retry-after") {
                result["retry_after"] = json!(retry);
            }
        }
        out.push(result);
    }
    Ok(out)
}

/// `validate`: the plans as a table (actions and limits per plan).
pub fn plans_table(config: &Config) -> String {
    let plans: Vec<_> = config.plans.iter().collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["".to_string()];
    header.extend(
        plans
            .iter()
            .map(|(key, plan)| format!("{} ({key})", plan.name)),
    );
    rows.push(header);
    let limit = |v: Option<u64>| {
        v.map(|n| n.to_string())
            .unwrap_or_else(|| "unlimited".into())
    };
    for (action_key, action) in &config.actions {
        let mut row = vec![format!("{action_key} / month")];
        for (_, plan) in &plans {
            row.push(match &action.feature {
                Some(f) if !plan.has_feature(f) => format!("off (needs {f})"),
                _ => limit(plan.limit(action_key)),
            });
        }
        rows.push(row);
    }
    let bytes = |v: Option<u64>| match v {
        None => "unlimited".to_string(),
        Some(b) if b % (1 << 30) == 0 => format!("{} GB", b >> 30),
        Some(b) => format!("{} MB", b as f64 / (1 << 20) as f64),
    };
    let mut push = |name: &str, f: &dyn Fn(&plan_limits_core::config::Plan) -> String| {
        let mut row = vec![name.to_string()];
        row.extend(plans.iter().map(|(_, p)| f(p)));
        rows.push(row);
    };
    push("max file size", &|p| bytes(p.max_file_size_bytes));
    push("storage", &|p| bytes(p.storage_bytes));
    push("team members", &|p| limit(p.team_members));
    push("features", &|p| p.features.len().to_string());
    push("upgrade to", &|p| {
        p.upgrade_to.clone().unwrap_or_else(|| "-".into())
    });
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}
