//! `plan-limits replay`: scenario lines in (JSON lines, one request each), one result line per
//! request out, from the real filter `.wasm` in our wasmtime host against a real Redis.

use std::collections::BTreeMap;

use plan_limits_core::{BillingPeriod, Plans};
use plan_limits_harness::Harness;
use plan_limits_services::gateway::Gateway;
use plan_limits_services::http::{Body, Request};
use plan_limits_services::jwt::TokenClaims;
use plan_limits_wasm_host::HostError;
use serde::Deserialize;
use serde_json::{json, Value};

/// One request of a scenario file.
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
    /// The subscription's anchor day the token names (its periods start on that day).
    #[serde(default)]
    pub anchor_day: Option<u32>,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub content_length: Option<u64>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// What the upstream answers if the request reaches it (200 when absent).
    #[serde(default)]
    pub upstream_status: Option<u16>,
    /// Its line in the scenario file (set by `parse_scenario`).
    #[serde(skip)]
    pub file_line: usize,
}

impl ScenarioLine {
    /// The line as the request every runner takes: its user and plan in a bearer token.
    pub fn request(&self) -> Request {
        let mut request = Request::new(&self.method, &self.path);
        if let Some(user) = &self.user {
            request = request.claims(&TokenClaims {
                user,
                plan: self.plan.as_deref(),
                org: None,
                anchor_day: self.anchor_day,
                ttl_secs: 3600,
            });
        }
        if let Some(n) = self.content_length {
            request = request.body(Body::ExpectContinue(n));
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        match self.upstream_status {
            Some(status) if status != 200 => request.upstream_status(status),
            _ => request,
        }
    }
}

/// Parses a scenario; errors name the line.
pub fn parse_scenario(text: &str) -> Result<Vec<ScenarioLine>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with("//"))
        .map(|(i, line)| {
            let mut parsed: ScenarioLine =
                serde_json::from_str(line).map_err(|e| format!("scenario line {}: {e}", i + 1))?;
            parsed.file_line = i + 1;
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
    plans: &Plans,
    lines: &[ScenarioLine],
) -> Result<Vec<Value>, HostError> {
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if let Some(at) = &line.at {
            harness.set_time(at);
        }
        let vm = i % harness.vms.len();
        let response = harness.send_on(vm, &line.request())?;
        let now = harness.now();
        let action = plans.route(&line.method, &line.path).map(|a| a.key.clone());
        let period = BillingPeriod::anchored(now, line.anchor_day.unwrap_or(0));
        let counter = match (&action, &line.user) {
            (Some(action), Some(user)) => {
                let summary = plan_limits_services::usage::summary_with_prefix(
                    &mut harness.connection(),
                    &plans.redis.key_prefix,
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
            "status": response.status,
            "reached_upstream": response.from_upstream(),
            "period": period.id,
            "counter": counter,
        });
        if !response.from_upstream() {
            result["body"] = serde_json::from_slice(&response.body)
                .unwrap_or_else(|_| Value::String(response.body_text()));
            if let Some(retry) = response.header("retry-after") {
                result["retry_after"] = json!(retry);
            }
        }
        out.push(result);
    }
    Ok(out)
}
