//! `plan-limits reload`: a new plans.json (and the current .wasm) swapped into a running
//! Envoy through the files it watches (Extension Config Discovery), after the very .wasm
//! accepted it in `envoy --mode validate`. What Envoy's own config holds from plans.json
//! (unmetered routes, identity) cannot change this way: a plans.json that changes them is
//! refused, naming what needs a restart, since a path newly metered would otherwise still
//! skip the filter.

use std::path::Path;
use std::time::{Duration, Instant};

use plan_limits_core::Plans;
use plan_limits_services::envoy;

/// What `reload` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The files were replaced; Envoy (if asked) loaded them.
    Swapped { confirmed: bool },
    /// The plans and the module are what Envoy already runs.
    Unchanged,
}

/// The plans.json the Envoy watching `ecds_dir` was last given, if any.
pub fn current_plans(ecds_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(ecds_dir.join("plan_limits.json")).ok()?;
    let response: serde_json::Value = serde_json::from_str(&text).ok()?;
    response["resources"][0]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .map(String::from)
}

/// What differs between `old` and `new` in the parts rendered into Envoy's own config (a
/// restart applies those), if anything.
pub fn needs_restart(old: &Plans, new: &Plans) -> Vec<&'static str> {
    let mut parts = Vec::new();
    if envoy::unmetered_routes(old, "") != envoy::unmetered_routes(new, "") {
        parts.push("unmetered");
    }
    let jwks = Path::new("");
    if envoy::identity_filters(old, jwks) != envoy::identity_filters(new, jwks) {
        parts.push("identity");
    }
    parts
}

/// Checks `plans_json` (compiled here, then by `wasm` in `envoy --mode validate`) and swaps
/// it into `ecds_dir`. With `admin_port`, waits for Envoy to report the swap (or its refusal).
pub fn reload(
    plans_json: &str,
    wasm: &Path,
    ecds_dir: &Path,
    admin_port: Option<u16>,
) -> Result<Outcome, String> {
    let plans = Plans::from_json(plans_json.as_bytes()).map_err(|e| e.to_string())?;
    let running = current_plans(ecds_dir).ok_or_else(|| {
        format!(
            "{}: no running gateway's filter config here (start one with `make run`)",
            ecds_dir.display()
        )
    })?;
    if let Ok(old) = Plans::from_json(running.as_bytes()) {
        let parts = needs_restart(&old, &plans);
        if !parts.is_empty() {
            return Err(format!(
                "this plans.json changes {} (rendered into Envoy's own config): restart the \
                 gateway to apply it; nothing was swapped",
                parts.join(" and ")
            ));
        }
    }
    envoy::validate_with_envoy(plans_json, wasm, &std::env::temp_dir())?;
    let before = std::fs::read_to_string(ecds_dir.join("plan_limits.json")).ok();
    let (loaded, refused) = counters(admin_port);
    envoy::write_filter_configs(ecds_dir, plans_json, wasm)?;
    let after = std::fs::read_to_string(ecds_dir.join("plan_limits.json")).ok();
    if before == after {
        return Ok(Outcome::Unchanged);
    }
    let Some(port) = admin_port else {
        return Ok(Outcome::Swapped { confirmed: false });
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let (now_loaded, now_refused) = counters(Some(port));
        if now_refused > refused {
            return Err(format!(
                "Envoy refused the new config and keeps the last good one; its log says why \
                 (admin http://127.0.0.1:{port})"
            ));
        }
        if now_loaded > loaded {
            return Ok(Outcome::Swapped { confirmed: true });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "Envoy (admin port {port}) did not report the new config within 10 s"
    ))
}

/// The plan filter's ECDS counters: configs loaded, configs refused.
fn counters(admin_port: Option<u16>) -> (u64, u64) {
    let Some(port) = admin_port else {
        return (0, 0);
    };
    let stat = |name: &str| {
        envoy::admin_stat(
            port,
            &format!("extension_config_discovery.http_filter.plan_limits.{name}"),
        )
    };
    (stat("config_reload"), stat("config_fail"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plans(edit: impl FnOnce(&mut serde_json::Value)) -> Plans {
        let mut json: serde_json::Value =
            serde_json::from_str(&plan_limits_services::plans_json()).unwrap();
        edit(&mut json);
        Plans::from_json(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn limits_change_in_place_but_unmetered_paths_and_identity_need_a_restart() {
        let old = plans(|_| {});
        let limits = plans(|p| p["plans"]["free"]["limits"]["upload"] = 3.into());
        assert!(needs_restart(&old, &limits).is_empty());
        let unmetered = plans(|p| p["unmetered"] = serde_json::json!([{"prefix": "/health"}]));
        assert_eq!(needs_restart(&old, &unmetered), ["unmetered"]);
        let identity = plans(|p| p["identity"]["jwt"]["issuer"] = "another".into());
        assert_eq!(needs_restart(&old, &identity), ["identity"]);
    }
}
