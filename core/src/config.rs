//! The filter's configuration: `plans.json`, parsed once in `on_configure` and checked as a
//! whole, so that a bad edit is refused with one message naming the JSON path and the reason.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A refused configuration: `path` is the JSON path of the offending value (`plans.free.limits`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plans.json: {path}: {reason}")]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    fn at(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Monthly allowance for one action: `None` is unlimited (`null` in JSON).
pub type Limit = Option<u64>;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub default_plan: String,
    #[serde(default)]
    pub identity: Identity,
    #[serde(default)]
    pub redis: RedisSettings,
    /// The feature flags a plan may have; actions and plans may only name these.
    pub features: Vec<String>,
    pub actions: BTreeMap<String, ActionSettings>,
    pub routes: Vec<Route>,
    pub plans: BTreeMap<String, Plan>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Identity {
    pub user_header: String,
    pub plan_header: String,
    /// Longer user ids are refused with 400: they would only bloat keys and events.
    pub max_user_id_bytes: usize,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            user_header: "x-user-id".into(),
            plan_header: "x-user-plan".into(),
            max_user_id_bytes: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// Envoy cluster of the webdis front (stock Envoy reaches Redis over HTTP).
    pub cluster: String,
    pub authority: String,
    /// How long a request waits for its reservation before its action's failure mode applies.
    pub timeout_ms: u64,
    pub key_prefix: String,
    /// A reservation that is never settled (Envoy killed mid-request) stops holding quota after
    /// this; keep it longer than the upstream timeout so a slow success is still counted.
    pub reservation_ttl_ms: u64,
    /// Settlements (commit / release / count) are sent in batches from each worker this often.
    pub flush_interval_ms: u64,
    pub max_batch: usize,
    /// Settlements waiting while Redis is unreachable; beyond this the oldest are dropped (metric).
    pub max_queued_settlements: usize,
    /// Monthly summaries are kept this long after their period ends.
    pub summary_retention_days: u32,
    pub events_stream: String,
    /// Approximate cap on the usage-event stream; `None` keeps every event for billing.
    pub events_max_len: Option<u64>,
    /// A user refused because the month's count reached the limit is refused without asking
    /// Redis for this long (per worker); 0 asks Redis every time.
    pub deny_cache_ms: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            cluster: "plan_limits_redis".into(),
            authority: "webdis".into(),
            timeout_ms: 250,
            key_prefix: "plan-limits".into(),
            reservation_ttl_ms: 60_000,
            flush_interval_ms: 5,
            max_batch: 64,
            max_queued_settlements: 10_000,
            summary_retention_days: 400,
            events_stream: "plan-limits:events".into(),
            events_max_len: None,
            deny_cache_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Redis unreachable: let the request through (and count it on success if Redis is back).
    #[default]
    FailOpen,
    /// Redis unreachable: answer 503.
    FailClosed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSettings {
    /// Singular name used in messages: "upload", "AI analysis".
    pub label: String,
    /// Plural of what is counted, used in messages: "diagrams", "AI analyses".
    pub unit: String,
    /// The feature a plan needs for this action at all (403 without it).
    #[serde(default)]
    pub feature: Option<String>,
    /// Whether the request's Content-Length is checked against the plan's max file size.
    #[serde(default)]
    pub enforce_max_file_size: bool,
    #[serde(default)]
    pub on_redis_error: FailureMode,
    /// Where the analysis kind (recorded as metadata) is read from.
    #[serde(default)]
    pub kind: Option<KindSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSource {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub query: Option<String>,
    /// Values recorded as given; anything else is recorded as `other`.
    pub allowed: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Any method when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Exact path (a trailing slash is ignored).
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix, matched on whole segments: `/api/v1` matches `/api/v1` and `/api/v1/x`.
    #[serde(default)]
    pub prefix: Option<String>,
    pub action: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Display name: "Professional".
    pub name: String,
    /// The plan suggested in upgrade messages; `None` for the top plan.
    pub upgrade_to: Option<String>,
    pub limits: BTreeMap<String, Limit>,
    pub max_file_size_bytes: Option<u64>,
    pub storage_bytes: Option<u64>,
    pub team_members: Option<u64>,
    pub features: Vec<String>,
}

impl Config {
    /// Parses and validates `plans.json`; every error names the JSON path it is about.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { "(root)".into() } else { path };
            ConfigError::at(path, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let known_feature = |f: &str| self.features.iter().any(|k| k == f);
        if self.actions.is_empty() {
            return Err(ConfigError::at("actions", "at least one action is needed"));
        }
        if !self.plans.contains_key(&self.default_plan) {
            return Err(ConfigError::at(
                "default_plan",
                format!("names no plan: \"{}\"", self.default_plan),
            ));
        }
        for (i, feature) in self.features.iter().enumerate() {
            if self.features[..i].contains(feature) {
                return Err(ConfigError::at(
                    format!("features[{i}]"),
                    format!("\"{feature}\" is listed twice"),
                ));
            }
        }
        for (name, action) in &self.actions {
            let path = format!("actions.{name}");
            if !is_identifier(name) {
                return Err(ConfigError::at(
                    path,
                    "action names use only a-z, 0-9 and _",
                ));
            }
            if let Some(feature) = &action.feature {
                if !known_feature(feature) {
                    return Err(ConfigError::at(
                        format!("{path}.feature"),
                        format!("names no feature listed in `features`: \"{feature}\""),
                    ));
                }
            }
            if let Some(kind) = &action.kind {
                if kind.header.is_none() && kind.query.is_none() {
                    return Err(ConfigError::at(
                        format!("{path}.kind"),
                        "needs a `header` or a `query` parameter to read the kind from",
                    ));
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            if !self.actions.contains_key(&route.action) {
                return Err(ConfigError::at(
                    format!("{path}.action"),
                    format!("unknown action \"{}\"", route.action),
                ));
            }
            let pattern = match (&route.path, &route.prefix) {
                (Some(p), None) => p,
                (None, Some(p)) => p,
                _ => {
                    return Err(ConfigError::at(
                        path,
                        "needs exactly one of `path` and `prefix`",
                    ))
                }
            };
            if !pattern.starts_with('/') {
                return Err(ConfigError::at(
                    path,
                    format!("path patterns start with '/': \"{pattern}\""),
                ));
            }
        }
        for (plan_name, plan) in &self.plans {
            let path = format!("plans.{plan_name}");
            if let Some(upgrade) = &plan.upgrade_to {
                if !self.plans.contains_key(upgrade) {
                    return Err(ConfigError::at(
                        format!("{path}.upgrade_to"),
                        format!("names no plan: \"{upgrade}\""),
                    ));
                }
                if upgrade == plan_name {
                    return Err(ConfigError::at(
                        format!("{path}.upgrade_to"),
                        "a plan cannot upgrade to itself",
                    ));
                }
            }
            for action in plan.limits.keys() {
                if !self.actions.contains_key(action) {
                    return Err(ConfigError::at(
                        format!("{path}.limits.{action}"),
                        format!("unknown action \"{action}\""),
                    ));
                }
            }
            for action in self.actions.keys() {
                if !plan.limits.contains_key(action) {
                    return Err(ConfigError::at(
                        format!("{path}.limits"),
                        format!("no limit for action \"{action}\" (use null for unlimited)"),
                    ));
                }
            }
            for (i, feature) in plan.features.iter().enumerate() {
                if !known_feature(feature) {
                    return Err(ConfigError::at(
                        format!("{path}.features[{i}]"),
                        format!("names no feature listed in `features`: \"{feature}\""),
                    ));
                }
            }
        }
        self.check_upgrade_chains()?;
        Ok(())
    }

    /// Upgrade suggestions must end at a top plan, or a message could loop forever.
    fn check_upgrade_chains(&self) -> Result<(), ConfigError> {
        for start in self.plans.keys() {
            let mut current = start;
            for _ in 0..=self.plans.len() {
                match &self.plans[current].upgrade_to {
                    Some(next) => current = next,
                    None => break,
                }
            }
            if self.plans[current].upgrade_to.is_some() {
                return Err(ConfigError::at(
                    format!("plans.{start}.upgrade_to"),
                    "upgrade suggestions form a cycle",
                ));
            }
        }
        Ok(())
    }

    /// The caller's plan: the named one if it exists, else the default plan.
    pub fn plan_or_default<'a>(&'a self, name: Option<&str>) -> (&'a str, &'a Plan) {
        let key = name
            .and_then(|n| self.plans.get_key_value(n))
            .unwrap_or_else(|| {
                self.plans
                    .get_key_value(&self.default_plan)
                    .expect("validated: default plan exists")
            });
        (key.0.as_str(), key.1)
    }

    /// Plans suggested one after another from `plan` (its upgrade, that one's upgrade, ...).
    pub fn upgrade_path<'a>(
        &'a self,
        plan: &'a Plan,
    ) -> impl Iterator<Item = (&'a str, &'a Plan)> + 'a {
        let mut next = plan.upgrade_to.as_deref();
        std::iter::from_fn(move || {
            let (name, plan) = self.plans.get_key_value(next?)?;
            next = plan.upgrade_to.as_deref();
            Some((name.as_str(), plan))
        })
    }
}

impl Plan {
    pub fn limit(&self, action: &str) -> Limit {
        self.limits.get(action).copied().flatten()
    }

    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const PLANS_JSON: &str = include_str!("../../plans.json");

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Config, ConfigError> {
        let mut value: serde_json::Value = serde_json::from_str(PLANS_JSON).unwrap();
        edit(&mut value);
        Config::from_json(value.to_string().as_bytes())
    }

    #[test]
    fn the_repository_plans_json_holds_the_seed_plans() {
        let config = Config::from_json(PLANS_JSON.as_bytes()).unwrap();
        let limits = |plan: &str, action: &str| config.plans[plan].limit(action);
        assert_eq!(limits("free", "upload"), Some(5));
        assert_eq!(limits("free", "ai_analysis"), Some(3));
        assert_eq!(limits("free", "procedure_view"), None);
        assert_eq!(limits("professional", "upload"), None);
        assert_eq!(limits("professional", "ai_analysis"), Some(100));
        assert_eq!(limits("professional", "dxf_export"), Some(50));
        assert_eq!(limits("enterprise", "api_call"), Some(10_000));
        assert_eq!(limits("enterprise", "ai_analysis"), None);
        assert_eq!(config.features.len(), 10);
        assert!(config.plans["enterprise"]
            .features
            .iter()
            .all(|f| config.features.contains(f)));
        assert_eq!(config.plans["enterprise"].features.len(), 10);
        assert!(!config.plans["free"].has_feature("dxf_export"));
        assert!(config.plans["professional"].has_feature("dxf_export"));
        assert!(!config.plans["professional"].has_feature("api_access"));
        let mb = 1024 * 1024;
        assert_eq!(config.plans["free"].max_file_size_bytes, Some(10 * mb));
        assert_eq!(
            config.plans["professional"].max_file_size_bytes,
            Some(100 * mb)
        );
        assert_eq!(
            config.plans["enterprise"].max_file_size_bytes,
            Some(500 * mb)
        );
        assert_eq!(config.plans["free"].storage_bytes, Some(1024 * mb));
        assert_eq!(config.plans["enterprise"].storage_bytes, None);
        assert_eq!(config.plans["professional"].team_members, Some(5));
        assert_eq!(config.plans["enterprise"].team_members, None);
    }

    #[test]
    fn invalid_json_is_refused_with_its_position() {
        let err = Config::from_json(b"{\"default_plan\": ").unwrap_err();
        assert!(err.reason.contains("EOF"), "{err}");
    }

    #[test]
    fn a_negative_limit_names_its_path() {
        let err = with(|v| v["plans"]["free"]["limits"]["upload"] = (-1).into()).unwrap_err();
        assert_eq!(err.path, "plans.free.limits.upload");
        assert!(err.reason.contains("-1"), "{err}");
    }

    #[test]
    fn a_fractional_limit_names_its_path() {
        let err = with(|v| v["plans"]["free"]["limits"]["upload"] = 2.5.into()).unwrap_err();
        assert_eq!(err.path, "plans.free.limits.upload");
        assert!(err.reason.contains("floating point"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_refused() {
        let err = with(|v| v["plans"]["free"]["uploads_per_day"] = 3.into()).unwrap_err();
        assert_eq!(err.path, "plans.free.uploads_per_day");
        assert!(err.reason.contains("unknown field"), "{err}");
    }

    #[test]
    fn an_unknown_action_in_a_plan_is_refused() {
        let err = with(|v| v["plans"]["free"]["limits"]["print"] = 1.into()).unwrap_err();
        assert_eq!(err.path, "plans.free.limits.print");
        assert!(err.reason.contains("unknown action"));
    }

    #[test]
    fn an_unknown_action_in_a_route_is_refused() {
        let err = with(|v| v["routes"][0]["action"] = "print".into()).unwrap_err();
        assert_eq!(err.path, "routes[0].action");
    }

    #[test]
    fn a_plan_without_a_limit_for_an_action_is_refused() {
        let err = with(|v| {
            v["plans"]["professional"]["limits"]
                .as_object_mut()
                .unwrap()
                .remove("dxf_export");
        })
        .unwrap_err();
        assert_eq!(err.path, "plans.professional.limits");
        assert!(err.reason.contains("dxf_export"), "{err}");
    }

    #[test]
    fn an_upgrade_to_no_plan_is_refused() {
        let err = with(|v| v["plans"]["free"]["upgrade_to"] = "gold".into()).unwrap_err();
        assert_eq!(err.path, "plans.free.upgrade_to");
        assert!(err.reason.contains("gold"));
    }

    #[test]
    fn an_upgrade_cycle_is_refused() {
        let err = with(|v| v["plans"]["enterprise"]["upgrade_to"] = "free".into()).unwrap_err();
        assert!(err.reason.contains("cycle"), "{err}");
    }

    #[test]
    fn a_default_plan_that_does_not_exist_is_refused() {
        let err = with(|v| v["default_plan"] = "trial".into()).unwrap_err();
        assert_eq!(err.path, "default_plan");
    }

    #[test]
    fn an_undeclared_feature_is_refused() {
        let err =
            with(|v| v["plans"]["free"]["features"] = serde_json::json!(["teleport"])).unwrap_err();
        assert_eq!(err.path, "plans.free.features[0]");
    }

    #[test]
    fn a_route_needs_a_path_or_a_prefix() {
        let err = with(|v| v["routes"][0] = serde_json::json!({"action": "upload"})).unwrap_err();
        assert_eq!(err.path, "routes[0]");
    }

    #[test]
    fn unknown_plan_names_fall_back_to_the_default_plan() {
        let config = Config::from_json(PLANS_JSON.as_bytes()).unwrap();
        assert_eq!(config.plan_or_default(Some("platinum")).0, "free");
        assert_eq!(config.plan_or_default(None).0, "free");
        assert_eq!(config.plan_or_default(Some("enterprise")).0, "enterprise");
    }

    #[test]
    fn the_upgrade_path_walks_to_the_top_plan() {
        let config = Config::from_json(PLANS_JSON.as_bytes()).unwrap();
        let names: Vec<_> = config
            .upgrade_path(&config.plans["free"])
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["professional", "enterprise"]);
    }

    /// Every JSON pointer of a value, for the fuzzer to aim at.
    fn pointers(value: &serde_json::Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    pointers(v, format!("{at}/{k}"), out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    pointers(v, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "[a-z_ ]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Any single edit of plans.json is either accepted or refused with a path; it never
        /// panics. A longer run: `PROPTEST_CASES=100000 cargo test -p plan-limits-filter fuzz`.
        #[test]
        fn fuzz_config_edits(target in 0usize..1000, value in any_json()) {
            let mut doc: serde_json::Value = serde_json::from_str(PLANS_JSON).unwrap();
            let mut all = Vec::new();
            pointers(&doc, String::new(), &mut all);
            let pointer = &all[target % all.len()];
            if pointer.is_empty() {
                doc = value;
            } else {
                *doc.pointer_mut(pointer).unwrap() = value;
            }
            match Config::from_json(doc.to_string().as_bytes()) {
                Ok(config) => {
                    let gate = crate::request::Gate::new(config);
                    let _ = &gate;
                }
                Err(e) => proptest::prop_assert!(!e.path.is_empty() && !e.reason.is_empty()),
            }
        }

        #[test]
        fn fuzz_config_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Config::from_json(&bytes);
        }
    }
}
