//! plans.json compiled once into the model every request uses: routes point at their action,
//! each action holds every plan's terms for it (limit, whether the plan has its feature, the
//! upgrade offers), plans carry their limits snapshot and upgrade path. A request resolves
//! its route and plan once and then holds references: nothing is looked up by name again, and
//! nothing here can fail after `compile` succeeded.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use crate::config::{
    ActionSettings, Config, ConfigError, FailureMode, Gauge, Grace, Identity, KindSource, Limit,
    OnClientAbort, OtherMethods, RedisSettings, Variants,
};
use crate::metadata::MetadataSpec;
use crate::metrics::OutcomeMetrics;
use crate::routes::{self, PathPattern, Route};

/// The compiled plans.json.
#[derive(Debug)]
pub struct Plans {
    pub identity: Identity,
    pub redis: RedisSettings,
    /// The settings the read side's calls go with: `redis` on `read_cluster`.
    pub read_redis: RedisSettings,
    /// Envoy's whole-request timeout (ms): long enough for the largest allowed upload on the
    /// slowest link taken.
    pub request_timeout_ms: u64,
    /// The most body read and discarded from a refused request before answering it, and the
    /// longest (ms) it is read.
    pub max_drain_bytes: u64,
    pub max_drain_ms: u64,
    /// Whether answers to limited actions carry the IETF RateLimit fields.
    pub ratelimit_headers: bool,
    /// Whether a limited success waits for its commit (read-your-writes).
    pub read_your_writes: bool,
    pub warnings: crate::config::Warnings,
    /// The idempotency key's header (lower case) and how long a key is remembered.
    pub idempotency_header: String,
    pub idempotency_ttl_ms: u64,
    pub max_idempotency_keys: u64,
    pub features: Vec<String>,
    actions: Vec<Rc<Action>>,
    plans: Vec<Rc<Plan>>,
    default_plan: Rc<Plan>,
    routes: Vec<Route<Metered>>,
    unmetered: Vec<Route<()>>,
    /// Under these (in `routes::canonical` spelling), what no route names is refused.
    guarded: Vec<PathPattern>,
    /// Paths the filter answers itself.
    endpoints: Vec<(String, Endpoint)>,
    /// Routes whose success gives back to a running total what the upstream says in the
    /// gauge's header (storage: bytes freed; team: members removed).
    releases: Vec<Route<Gauge>>,
    freed_bytes_header: String,
    removed_members_header: String,
    /// Every plan's room in each running total (`None`: unlimited), as reservations send
    /// them to Redis.
    storage_rooms: Vec<(String, Option<u64>)>,
    team_rooms: Vec<(String, Option<u64>)>,
}

/// What a metered route leads to, and what its other spellings and methods get.
#[derive(Debug)]
pub struct Metered {
    pub action: Rc<Action>,
    pub variants: Variants,
    pub other_methods: OtherMethods,
}

/// What a request's method and path are, as plans.json sees them.
pub enum PathClass<'a> {
    /// A metered route, as spelt there.
    Metered(&'a Rc<Action>),
    /// Another spelling of a metered route's path, or another method on it.
    Variant {
        route: &'a Route<Metered>,
        method_matches: bool,
    },
    /// Listed as unmetered, or outside every guarded prefix.
    Unmetered,
    /// Under a guarded prefix, and named by no route.
    Guarded,
    /// A path the filter answers itself (`endpoints`), with the method it takes.
    Endpoint(Endpoint, bool),
    /// A route whose success gives back to a running total (a delete, a member removed).
    Release(Gauge),
}

/// The read side's paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Usage,
    History,
}

/// A metered action and every plan's terms for it.
#[derive(Debug)]
pub struct Action {
    /// Its name in plans.json, Redis counters and events: `upload`.
    pub key: String,
    /// Words for messages: "upload", "diagrams".
    pub label: String,
    pub unit: String,
    pub unit_singular: String,
    pub feature: Option<String>,
    pub enforce_max_file_size: bool,
    /// The running total a success adds to (the body's bytes to storage, a member to the
    /// team).
    pub adds_to: Option<Gauge>,
    pub on_redis_error: FailureMode,
    pub on_client_abort: OnClientAbort,
    pub kind: Option<KindSource>,
    /// What its usage events record of the request and the answer.
    pub metadata: MetadataSpec,
    terms: HashMap<String, Rc<Terms>>,
    default_terms: Rc<Terms>,
    /// Every plan's limit for the action as Redis enforces it (plus the plan's grace), as the
    /// reservation sends them.
    limits: Vec<(String, Limit)>,
}

/// One plan's terms for one action.
#[derive(Debug)]
pub struct Terms {
    pub plan: Rc<Plan>,
    /// The monthly allowance; `None` is unlimited.
    pub limit: Limit,
    /// Successes allowed past the limit before the 429 (counted, each with a warning).
    pub grace: u64,
    pub feature: FeatureAccess,
    /// The plan suggested in this action's 429, with its limit for the action.
    pub upgrade: Option<Upgrade>,
    /// Its labeled `requests` counters, one per outcome.
    pub metrics: OutcomeMetrics,
}

/// Whether a plan has the feature an action needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureAccess {
    /// The action needs no feature, or the plan has it.
    Included,
    /// The plan lacks `feature` (403); `offer` is the first plan up the upgrade path with it.
    Missing {
        feature: String,
        offer: Option<UpgradeStep>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub plan: String,
    pub name: String,
    pub limit: Limit,
}

#[derive(Debug)]
pub struct Plan {
    pub key: String,
    /// Display name: "Professional".
    pub name: String,
    pub max_file_size_bytes: Option<u64>,
    pub storage_bytes: Option<u64>,
    pub team_members: Option<u64>,
    pub features: Vec<String>,
    pub limits: BTreeMap<String, Limit>,
    /// `limits` as a JSON object, snapshotted into each monthly summary.
    pub limits_json: Rc<str>,
    /// Plans suggested one after another: its upgrade, that one's upgrade, ... (no cycles).
    pub upgrade_path: Vec<UpgradeStep>,
    /// How fast one user's requests may come (spike arrest).
    pub request_rate: Option<crate::spike::RequestRate>,
    /// Where its users upgrade (its own, or plans.json's).
    pub upgrade_url: Option<String>,
    /// `features`, comma-separated: the features header's value.
    pub features_header_value: String,
}

/// A plan on another plan's upgrade path, with what offers are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeStep {
    pub key: String,
    pub name: String,
    pub max_file_size_bytes: Option<u64>,
    pub storage_bytes: Option<u64>,
    pub team_members: Option<u64>,
}

impl Plans {
    /// Reads, checks and compiles plans.json; every error names the JSON path it is about.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::compile(Config::from_json(bytes)?)
    }

    pub fn compile(config: Config) -> Result<Self, ConfigError> {
        validate(&config)?;
        let plans = compile_plans(&config)?;
        let default_plan = find_plan(&plans, &config.default_plan)?;
        let actions: Vec<Rc<Action>> = config
            .actions
            .iter()
            .map(|(key, settings)| compile_action(&config, &plans, key, settings).map(Rc::new))
            .collect::<Result<_, _>>()?;
        let routes: Vec<Route<Metered>> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                let action = actions
                    .iter()
                    .find(|a| a.key == route.action)
                    .ok_or_else(|| ConfigError::at(format!("routes[{i}].action"), "unknown"))?;
                let path = pattern(&route.path, &route.prefix)
                    .ok_or_else(|| ConfigError::at(format!("routes[{i}]"), "no pattern"))?;
                let target = Metered {
                    action: action.clone(),
                    variants: route.variants,
                    other_methods: route.other_methods,
                };
                Ok(Route::new(route.method.clone(), path, target))
            })
            .collect::<Result<_, _>>()?;
        let unmetered: Vec<Route<()>> = config
            .unmetered
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let path = pattern(&entry.path, &entry.prefix)
                    .ok_or_else(|| ConfigError::at(format!("unmetered[{i}]"), "no pattern"))?;
                Ok(Route::new(entry.method.clone(), path, ()))
            })
            .collect::<Result<_, _>>()?;
        let guarded = config
            .guarded_prefixes
            .iter()
            .map(|prefix| PathPattern::prefix(prefix).loose())
            .collect();
        let request_timeout_ms = request_timeout_ms(&config);
        let endpoints = compile_endpoints(&config, &routes, &unmetered)?;
        let releases = [
            (
                "storage.delete_routes",
                &config.storage.delete_routes,
                Gauge::Storage,
            ),
            (
                "team.remove_routes",
                &config.team.remove_routes,
                Gauge::Team,
            ),
        ]
        .into_iter()
        .flat_map(|(field, entries, gauge)| {
            let (routes, unmetered) = (&routes, &unmetered);
            entries.iter().enumerate().map(move |(i, entry)| {
                let at = format!("{field}[{i}]");
                let path = pattern(&entry.path, &entry.prefix)
                    .ok_or_else(|| ConfigError::at(at.clone(), "no pattern"))?;
                // The filter must see a release, and it must not be an action's (a release
                // of any method meets every method of the path).
                let sample = routes::canonical(
                    entry
                        .path
                        .as_ref()
                        .or(entry.prefix.as_ref())
                        .map_or("/", |p| p),
                );
                let method = entry.method.as_deref().unwrap_or("DELETE");
                let meets = |method_matches: Option<bool>| {
                    method_matches.is_some_and(|m| m || entry.method.is_none())
                };
                if meets(routes::find_loose(routes, method, &sample).map(|(_, m)| m)) {
                    let reason = format!("\"{sample}\" is a metered route's path");
                    return Err(ConfigError::at(at, reason));
                }
                if meets(routes::find_loose(unmetered, method, &sample).map(|(_, m)| m)) {
                    let reason =
                        format!("\"{sample}\" is listed as unmetered: the filter would not see it");
                    return Err(ConfigError::at(at, reason));
                }
                Ok(Route::new(entry.method.clone(), path, gauge))
            })
        })
        .collect::<Result<_, _>>()?;
        let rooms = |gauge| {
            plans
                .iter()
                .map(|plan: &Rc<Plan>| (plan.key.clone(), plan.room(gauge)))
                .collect()
        };
        let (storage_rooms, team_rooms) = (rooms(Gauge::Storage), rooms(Gauge::Team));
        let read_redis = RedisSettings {
            cluster: config
                .redis
                .read_cluster
                .clone()
                .unwrap_or_else(|| config.redis.cluster.clone()),
            ..config.redis.clone()
        };
        Ok(Self {
            identity: config.identity,
            redis: config.redis,
            read_redis,
            request_timeout_ms,
            max_drain_bytes: config.gateway.max_drain_bytes,
            max_drain_ms: config.gateway.max_drain_ms,
            ratelimit_headers: config.gateway.ratelimit_headers,
            read_your_writes: config.gateway.read_your_writes,
            warnings: config.warnings.clone(),
            idempotency_header: config.gateway.idempotency_header.to_ascii_lowercase(),
            idempotency_ttl_ms: config.gateway.idempotency_ttl_ms,
            max_idempotency_keys: config.gateway.max_idempotency_keys,
            features: config.features,
            actions,
            plans,
            default_plan,
            routes,
            unmetered,
            guarded,
            endpoints,
            releases,
            freed_bytes_header: config.storage.freed_bytes_header.to_ascii_lowercase(),
            removed_members_header: config.team.removed_members_header.to_ascii_lowercase(),
            storage_rooms,
            team_rooms,
        })
    }

    /// The action of the first route matching the request as spelt; `None`: not metered as
    /// spelt (see `classify` for other spellings).
    pub fn route(&self, method: &str, path: &str) -> Option<&Rc<Action>> {
        routes::find(&self.routes, method, path).map(|route| &route.target.action)
    }

    /// What a request's method and path are: a metered route, another spelling of one, an
    /// unmetered path, or a guarded one no route names.
    pub fn classify(&self, method: &str, path: &str) -> PathClass<'_> {
        let bare = path.split(['?', '#']).next().unwrap_or(path);
        if let Some((_, endpoint)) = self.endpoints.iter().find(|(p, _)| p == bare) {
            return PathClass::Endpoint(*endpoint, method == "GET");
        }
        if let Some(action) = self.route(method, path) {
            return PathClass::Metered(action);
        }
        // (Any spelling: a release a client spells oddly still gives back.)
        let release = routes::find_loose(&self.releases, method, &routes::canonical(path));
        if let Some((route, true)) = release {
            return PathClass::Release(route.target);
        }
        let canonical = routes::canonical(path);
        let metered = routes::find_loose(&self.routes, method, &canonical);
        if let Some((route, true)) = metered {
            return PathClass::Variant {
                route,
                method_matches: true,
            };
        }
        // Another method on a metered path may be listed as unmetered (a GET beside a POST).
        let listed = routes::find_loose(&self.unmetered, method, &canonical)
            .is_some_and(|(_, method_matches)| method_matches);
        if listed {
            return PathClass::Unmetered;
        }
        if let Some((route, false)) = metered {
            return PathClass::Variant {
                route,
                method_matches: false,
            };
        }
        if self.guarded.iter().any(|g| g.matches(&canonical)) {
            PathClass::Guarded
        } else {
            PathClass::Unmetered
        }
    }

    /// The metered routes, in order, with their normalised patterns.
    pub fn routes(&self) -> &[Route<Metered>] {
        &self.routes
    }

    /// The plan a name plans.json does not know gets (`None`: refused).
    pub fn fallback_plan(&self) -> Option<&str> {
        match self.identity.unknown_plan {
            crate::config::UnknownPlan::DefaultPlan => Some(self.default_plan.key.as_str()),
            crate::config::UnknownPlan::Forbid => None,
        }
    }

    /// The response header in which the upstream says what a release route gave back.
    pub fn given_back_header(&self, gauge: Gauge) -> &str {
        match gauge {
            Gauge::Storage => &self.freed_bytes_header,
            Gauge::Team => &self.removed_members_header,
        }
    }

    /// Every plan's room in `gauge` (`None`: unlimited).
    pub fn rooms(&self, gauge: Gauge) -> &[(String, Option<u64>)] {
        match gauge {
            Gauge::Storage => &self.storage_rooms,
            Gauge::Team => &self.team_rooms,
        }
    }

    /// The unmetered paths (Envoy skips the filter on them).
    pub fn unmetered(&self) -> &[Route<()>] {
        &self.unmetered
    }

    pub fn actions(&self) -> &[Rc<Action>] {
        &self.actions
    }

    /// Every plan, in name order.
    pub fn plans(&self) -> &[Rc<Plan>] {
        &self.plans
    }

    pub fn plan(&self, key: &str) -> Option<&Rc<Plan>> {
        self.plans.iter().find(|plan| plan.key == key)
    }

    pub fn default_plan(&self) -> &Rc<Plan> {
        &self.default_plan
    }
}

impl Action {
    /// What is counted, for `n` of it: "1 diagram", "5 diagrams".
    pub fn units(&self, n: u64) -> &str {
        if n == 1 {
            &self.unit_singular
        } else {
            &self.unit
        }
    }

    /// The terms of the plan named `plan`; the default plan's when it names no plan.
    pub fn terms(&self, plan: Option<&str>) -> &Rc<Terms> {
        plan.and_then(|name| self.terms_of(name))
            .unwrap_or(&self.default_terms)
    }

    /// The terms of the plan named `plan`, if plans.json has it.
    pub fn terms_of(&self, plan: &str) -> Option<&Rc<Terms>> {
        self.terms.get(plan)
    }

    /// Every plan's limit for this action, plus its grace: what Redis enforces.
    pub fn limits(&self) -> &[(String, Limit)] {
        &self.limits
    }
}

impl Plan {
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// What `gauge` may hold under this plan (`None`: unlimited). The subscriber is one of
    /// the team's members: the team holds that many fewer invited.
    pub fn room(&self, gauge: Gauge) -> Option<u64> {
        match gauge {
            Gauge::Storage => self.storage_bytes,
            Gauge::Team => self.team_members.map(|n| n.saturating_sub(1)),
        }
    }
}

/// The configured whole-request timeout, or the largest file any plan allows at the slowest
/// rate taken, plus a minute, and at least 5 minutes.
fn request_timeout_ms(config: &Config) -> u64 {
    const MINUTE_MS: u64 = 60_000;
    if let Some(ms) = config.gateway.request_timeout_ms {
        return ms;
    }
    let rate = config.gateway.min_upload_bytes_per_second.max(1);
    let largest = config
        .plans
        .values()
        .filter_map(|plan| plan.max_file_size_bytes)
        .max()
        .unwrap_or(0);
    (largest.saturating_mul(1000) / rate)
        .saturating_add(MINUTE_MS)
        .max(5 * MINUTE_MS)
}

/// The read side's paths: each exact, not one a route meters or Envoy skips the filter on.
fn compile_endpoints(
    config: &Config,
    routes: &[Route<Metered>],
    unmetered: &[Route<()>],
) -> Result<Vec<(String, Endpoint)>, ConfigError> {
    let named = [
        ("usage", &config.endpoints.usage, Endpoint::Usage),
        ("history", &config.endpoints.history, Endpoint::History),
    ];
    let mut out: Vec<(String, Endpoint)> = Vec::new();
    for (name, path, endpoint) in named {
        let Some(path) = path else { continue };
        let at = format!("endpoints.{name}");
        if !path.starts_with('/') || path.contains(['?', '#']) {
            return Err(ConfigError::at(
                at,
                format!("a path, without a query: \"{path}\""),
            ));
        }
        let canonical = routes::canonical(path);
        if routes::find_loose(routes, "GET", &canonical).is_some() {
            return Err(ConfigError::at(
                at,
                format!("\"{path}\" is a metered route's path"),
            ));
        }
        let skipped = routes::find_loose(unmetered, "GET", &canonical);
        if skipped.is_some_and(|(_, method_matches)| method_matches) {
            return Err(ConfigError::at(
                at,
                format!("\"{path}\" is listed as unmetered: the filter would not see it"),
            ));
        }
        if out.iter().any(|(p, _)| p == path) {
            return Err(ConfigError::at(at, format!("\"{path}\" is named twice")));
        }
        out.push((path.clone(), endpoint));
    }
    Ok(out)
}

fn pattern(path: &Option<String>, prefix: &Option<String>) -> Option<PathPattern> {
    match (path, prefix) {
        (Some(exact), None) => Some(PathPattern::exact(exact)),
        (None, Some(prefix)) => Some(PathPattern::prefix(prefix)),
        _ => None,
    }
}

fn find_plan(plans: &[Rc<Plan>], key: &str) -> Result<Rc<Plan>, ConfigError> {
    plans
        .iter()
        .find(|plan| plan.key == key)
        .cloned()
        .ok_or_else(|| ConfigError::at("default_plan", format!("names no plan: \"{key}\"")))
}

fn compile_plans(config: &Config) -> Result<Vec<Rc<Plan>>, ConfigError> {
    config
        .plans
        .iter()
        .map(|(key, plan)| {
            let limits_json = serde_json::to_string(&plan.limits)
                .map_err(|e| ConfigError::at(format!("plans.{key}.limits"), e.to_string()))?;
            Ok(Rc::new(Plan {
                key: key.clone(),
                name: plan.name.clone(),
                max_file_size_bytes: plan.max_file_size_bytes,
                storage_bytes: plan.storage_bytes,
                team_members: plan.team_members,
                features: plan.features.clone(),
                limits: plan.limits.clone(),
                limits_json: Rc::from(limits_json),
                upgrade_path: upgrade_path(config, key),
                request_rate: plan.request_rate,
                upgrade_url: plan.upgrade_url.clone().or(config.upgrade_url.clone()),
                features_header_value: plan.features.join(","),
            }))
        })
        .collect()
}

/// The upgrade chain from `start` (validated to end at a top plan).
fn upgrade_path(config: &Config, start: &str) -> Vec<UpgradeStep> {
    let mut path = Vec::new();
    let mut next = config
        .plans
        .get(start)
        .and_then(|p| p.upgrade_to.as_deref());
    while let Some((key, plan)) = next.and_then(|key| config.plans.get_key_value(key)) {
        if path.len() >= config.plans.len() {
            break;
        }
        path.push(UpgradeStep {
            key: key.clone(),
            name: plan.name.clone(),
            max_file_size_bytes: plan.max_file_size_bytes,
            storage_bytes: plan.storage_bytes,
            team_members: plan.team_members,
        });
        next = plan.upgrade_to.as_deref();
    }
    path
}

fn compile_action(
    config: &Config,
    plans: &[Rc<Plan>],
    key: &str,
    settings: &ActionSettings,
) -> Result<Action, ConfigError> {
    let terms: HashMap<String, Rc<Terms>> = plans
        .iter()
        .map(|plan| {
            let terms = compile_terms(config, plan, key, settings);
            (plan.key.clone(), Rc::new(terms))
        })
        .collect();
    let default_terms = terms
        .get(&config.default_plan)
        .cloned()
        .ok_or_else(|| ConfigError::at("default_plan", "names no plan"))?;
    Ok(Action {
        key: key.to_string(),
        label: settings.label.clone(),
        unit: settings.unit.clone(),
        unit_singular: settings
            .unit_singular
            .clone()
            .unwrap_or_else(|| settings.unit.clone()),
        feature: settings.feature.clone(),
        enforce_max_file_size: settings.enforce_max_file_size,
        adds_to: settings.adds_to,
        on_redis_error: settings.on_redis_error,
        on_client_abort: settings.on_client_abort,
        kind: settings.kind.clone(),
        metadata: MetadataSpec::compile(&settings.metadata, &format!("actions.{key}.metadata"))?,
        limits: plans
            .iter()
            .map(|plan| {
                let enforced = terms
                    .get(&plan.key)
                    .and_then(|t| t.limit.map(|limit| limit.saturating_add(t.grace)));
                (plan.key.clone(), enforced)
            })
            .collect(),
        terms,
        default_terms,
    })
}

fn compile_terms(
    config: &Config,
    plan: &Rc<Plan>,
    action: &str,
    settings: &ActionSettings,
) -> Terms {
    let limit_in = |key: &str| {
        config
            .plans
            .get(key)
            .and_then(|p| p.limits.get(action))
            .copied()
            .flatten()
    };
    let feature = match settings.feature.as_deref() {
        Some(feature) if !plan.has_feature(feature) => FeatureAccess::Missing {
            feature: feature.to_string(),
            offer: plan
                .upgrade_path
                .iter()
                .find(|step| {
                    config
                        .plans
                        .get(&step.key)
                        .is_some_and(|p| p.features.iter().any(|f| f == feature))
                })
                .cloned(),
        },
        _ => FeatureAccess::Included,
    };
    let limit = limit_in(&plan.key);
    let grace = config
        .plans
        .get(&plan.key)
        .and_then(|p| p.grace.get(action))
        .zip(limit)
        .map_or(0, |(grace, limit)| grace.units(limit));
    Terms {
        plan: plan.clone(),
        limit,
        grace,
        feature,
        upgrade: plan.upgrade_path.first().map(|step| Upgrade {
            plan: step.key.clone(),
            name: step.name.clone(),
            limit: limit_in(&step.key),
        }),
        metrics: OutcomeMetrics::new(action, &plan.key),
    }
}

/// The most units one lease may hold (each is a member of the user's pending set).
const MAX_LEASE_UNITS: u64 = 1000;

/// Checks the document as a whole; the first error names its JSON path.
fn validate(config: &Config) -> Result<(), ConfigError> {
    // A reservation is extended a third into its expiry while its request is in flight; the
    // extension has the other two thirds to land, through a timed-out attempt and a retry.
    let redis = &config.redis;
    let shortest = 2 * (redis.timeout_ms + redis.flush_interval_ms) + 1000;
    if redis.reservation_ttl_ms < shortest {
        return Err(ConfigError::at(
            "redis.reservation_ttl_ms",
            format!(
                "{} ms is too short to be extended while its request is in flight; at least {shortest} ms (2 × (timeout_ms + flush_interval_ms) + 1000)",
                redis.reservation_ttl_ms
            ),
        ));
    }
    // A lease's unused units are given back well before Redis would expire them (which the
    // audit would list as an Envoy's possible loss).
    if redis.lease_units > 1 && redis.lease_hold_ms.saturating_mul(2) > redis.reservation_ttl_ms {
        return Err(ConfigError::at(
            "redis.lease_hold_ms",
            format!(
                "{} ms: a lease's units must be given back within half of reservation_ttl_ms ({} ms), before Redis expires them",
                redis.lease_hold_ms, redis.reservation_ttl_ms
            ),
        ));
    }
    if redis.lease_units > MAX_LEASE_UNITS {
        return Err(ConfigError::at(
            "redis.lease_units",
            format!(
                "{}: at most {MAX_LEASE_UNITS} units a lease",
                redis.lease_units
            ),
        ));
    }
    if redis.cluster_mode {
        // On a cluster a key's slot is its first `{...}`: the user's tag must be it, and a
        // slot's stream tag must be its stream's.
        for (field, value) in [
            ("redis.key_prefix", &redis.key_prefix),
            ("redis.events_stream", &redis.events_stream),
        ] {
            if value.contains(['{', '}']) {
                return Err(ConfigError::at(
                    field,
                    format!("\"{value}\": with cluster_mode, no {{ or }}: Redis Cluster hashes a key by its first {{...}}"),
                ));
            }
        }
    }
    let thresholds = &config.warnings.thresholds;
    for (i, t) in thresholds.iter().enumerate() {
        let ascending = i == 0 || thresholds.get(i - 1).is_some_and(|before| before < t);
        if !(1..=100).contains(t) || !ascending {
            return Err(ConfigError::at(
                format!("warnings.thresholds[{i}]"),
                format!("{t}: thresholds are percentages from 1 to 100, ascending"),
            ));
        }
    }
    let known_feature = |f: &str| config.features.iter().any(|k| k == f);
    if config.actions.is_empty() {
        return Err(ConfigError::at("actions", "at least one action is needed"));
    }
    if !config.plans.contains_key(&config.default_plan) {
        return Err(ConfigError::at(
            "default_plan",
            format!("names no plan: \"{}\"", config.default_plan),
        ));
    }
    for (i, feature) in config.features.iter().enumerate() {
        if config.features.iter().take(i).any(|f| f == feature) {
            return Err(ConfigError::at(
                format!("features[{i}]"),
                format!("\"{feature}\" is listed twice"),
            ));
        }
    }
    for (name, action) in &config.actions {
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
    for (i, route) in config.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if !config.actions.contains_key(&route.action) {
            return Err(ConfigError::at(
                format!("{path}.action"),
                format!("unknown action \"{}\"", route.action),
            ));
        }
        let pattern = match (&route.path, &route.prefix) {
            (Some(p), None) | (None, Some(p)) => p,
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
    validate_unmetered(config)?;
    for (plan_name, plan) in &config.plans {
        let path = format!("plans.{plan_name}");
        if let Some(upgrade) = &plan.upgrade_to {
            if !config.plans.contains_key(upgrade) {
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
            if !config.actions.contains_key(action) {
                return Err(ConfigError::at(
                    format!("{path}.limits.{action}"),
                    format!("unknown action \"{action}\""),
                ));
            }
        }
        for (action, grace) in &plan.grace {
            let at = format!("{path}.grace.{action}");
            match plan.limits.get(action) {
                None => return Err(ConfigError::at(at, format!("unknown action \"{action}\""))),
                Some(None) => {
                    return Err(ConfigError::at(at, "the action is unlimited in this plan"))
                }
                Some(Some(_)) => {}
            }
            if matches!(grace, Grace::Units(0) | Grace::Percent(0))
                || matches!(grace, Grace::Percent(p) if *p > 100)
            {
                return Err(ConfigError::at(
                    at,
                    "`units` at least 1, or `percent` from 1 to 100",
                ));
            }
        }
        for action in config.actions.keys() {
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
    check_upgrade_chains(config)
}

/// Unmetered paths need one pattern, and may not cover a metered route (Envoy skips the filter
/// on them: a metered route inside one would never be metered).
fn validate_unmetered(config: &Config) -> Result<(), ConfigError> {
    for (i, prefix) in config.guarded_prefixes.iter().enumerate() {
        if !prefix.starts_with('/') {
            return Err(ConfigError::at(
                format!("guarded_prefixes[{i}]"),
                format!("path patterns start with '/': \"{prefix}\""),
            ));
        }
    }
    for (i, entry) in config.unmetered.iter().enumerate() {
        let path = format!("unmetered[{i}]");
        let Some(unmetered) = pattern(&entry.path, &entry.prefix) else {
            return Err(ConfigError::at(
                path,
                "needs exactly one of `path` and `prefix`",
            ));
        };
        let (PathPattern::Exact(text) | PathPattern::Prefix(text)) = &unmetered;
        if !text.starts_with('/') {
            return Err(ConfigError::at(
                path,
                format!("path patterns start with '/': \"{text}\""),
            ));
        }
        let unmetered = unmetered.loose();
        for (j, route) in config.routes.iter().enumerate() {
            let Some(metered) = pattern(&route.path, &route.prefix) else {
                continue;
            };
            let methods_meet = match (&entry.method, &route.method) {
                (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                _ => true,
            };
            let (PathPattern::Exact(metered) | PathPattern::Prefix(metered)) = metered.loose();
            if methods_meet && unmetered.matches(&metered) {
                return Err(ConfigError::at(
                    path,
                    format!("covers the metered route routes[{j}] ({metered}); Envoy would skip the filter on it"),
                ));
            }
        }
    }
    Ok(())
}

/// Upgrade suggestions must end at a top plan, or a message could loop forever.
fn check_upgrade_chains(config: &Config) -> Result<(), ConfigError> {
    for start in config.plans.keys() {
        let mut current = config.plans.get(start);
        for _ in 0..=config.plans.len() {
            current = current
                .and_then(|plan| plan.upgrade_to.as_ref())
                .and_then(|next| config.plans.get(next));
        }
        if current.is_some() {
            return Err(ConfigError::at(
                format!("plans.{start}.upgrade_to"),
                "upgrade suggestions form a cycle",
            ));
        }
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{action, plans, plans_json_with, PLANS_JSON};

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Plans, ConfigError> {
        Plans::from_json(plans_json_with(edit).as_bytes())
    }

    fn limit(plans: &Plans, plan: &str, key: &str) -> Limit {
        action(plans, key).terms(Some(plan)).limit
    }

    #[test]
    fn the_repository_plans_json_holds_the_seed_plans() {
        let p = plans();
        assert_eq!(limit(&p, "free", "upload"), Some(5));
        assert_eq!(limit(&p, "free", "ai_analysis"), Some(3));
        assert_eq!(limit(&p, "free", "procedure_view"), None);
        assert_eq!(limit(&p, "professional", "upload"), None);
        assert_eq!(limit(&p, "professional", "ai_analysis"), Some(100));
        assert_eq!(limit(&p, "professional", "dxf_export"), Some(50));
        assert_eq!(limit(&p, "enterprise", "api_call"), Some(10_000));
        assert_eq!(limit(&p, "enterprise", "ai_analysis"), None);
        assert_eq!(p.features.len(), 10);
        let enterprise = p.plan("enterprise").unwrap();
        assert_eq!(enterprise.features.len(), 10);
        assert!(enterprise.features.iter().all(|f| p.features.contains(f)));
        assert!(!p.plan("free").unwrap().has_feature("dxf_export"));
        assert!(p.plan("professional").unwrap().has_feature("dxf_export"));
        assert!(!p.plan("professional").unwrap().has_feature("api_access"));
        let mb = 1024 * 1024;
        let plan = |k: &str| p.plan(k).unwrap().clone();
        assert_eq!(plan("free").max_file_size_bytes, Some(10 * mb));
        assert_eq!(plan("professional").max_file_size_bytes, Some(100 * mb));
        assert_eq!(plan("enterprise").max_file_size_bytes, Some(500 * mb));
        assert_eq!(plan("free").storage_bytes, Some(1024 * mb));
        assert_eq!(plan("enterprise").storage_bytes, None);
        assert_eq!(plan("professional").team_members, Some(5));
        assert_eq!(plan("enterprise").team_members, None);
    }

    #[test]
    fn routes_point_at_their_action() {
        let p = plans();
        let key = |m: &str, path: &str| p.route(m, path).map(|a| a.key.clone());
        assert_eq!(key("POST", "/api/upload").as_deref(), Some("upload"));
        assert_eq!(
            key("POST", "/api/teammate?kind=vision").as_deref(),
            Some("ai_analysis")
        );
        assert_eq!(
            key("GET", "/api/procedures/42").as_deref(),
            Some("procedure_view")
        );
        assert_eq!(
            key("POST", "/api/export/pdf").as_deref(),
            Some("pdf_export")
        );
        assert_eq!(
            key("POST", "/api/export/dxf").as_deref(),
            Some("dxf_export")
        );
        assert_eq!(key("GET", "/api/v1/diagrams").as_deref(), Some("api_call"));
        assert_eq!(key("GET", "/api/upload"), None);
        assert_eq!(key("GET", "/health"), None);
    }

    fn class(p: &Plans, method: &str, path: &str) -> String {
        match p.classify(method, path) {
            PathClass::Metered(action) => format!("metered {}", action.key),
            PathClass::Variant {
                route,
                method_matches,
            } => format!("variant {} {method_matches}", route.target.action.key),
            PathClass::Unmetered => "unmetered".into(),
            PathClass::Guarded => "guarded".into(),
            PathClass::Endpoint(endpoint, method_ok) => format!("{endpoint:?} {method_ok}"),
            PathClass::Release(gauge) => format!("release {}", gauge.name()),
        }
    }

    #[test]
    fn every_spelling_of_a_metered_path_is_found() {
        let p = plans();
        assert_eq!(class(&p, "POST", "/api/upload"), "metered upload");
        assert_eq!(class(&p, "POST", "/API/Upload"), "variant upload true");
        assert_eq!(class(&p, "POST", "/api/upload;x"), "variant upload true");
        assert_eq!(class(&p, "POST", "/api/v1;x/d"), "variant api_call true");
        assert_eq!(class(&p, "PUT", "/api/upload"), "variant upload false");
        // Listed as unmetered for GET (a listing beside the upload).
        assert_eq!(class(&p, "GET", "/api/upload"), "unmetered");
        assert_eq!(class(&p, "GET", "/API/UPLOAD"), "unmetered");
        // Under the guarded /api, what no route names is refused; elsewhere it passes.
        assert_eq!(class(&p, "POST", "/api/uploads"), "guarded");
        assert_eq!(class(&p, "POST", "/API/teammate/chat"), "guarded");
        assert_eq!(class(&p, "GET", "/health"), "unmetered");
        assert_eq!(class(&p, "GET", "/docs"), "unmetered");
    }

    #[test]
    fn the_read_sides_paths_are_answered_by_the_filter() {
        let p = plans();
        assert_eq!(class(&p, "GET", "/api/usage"), "Usage true");
        assert_eq!(class(&p, "GET", "/api/usage?x=1"), "Usage true");
        assert_eq!(class(&p, "POST", "/api/usage"), "Usage false");
        assert_eq!(
            class(&p, "GET", "/api/usage/history?from=2026-11-01"),
            "History true"
        );
        // Other spellings are not the endpoint (and are refused under /api).
        assert_eq!(class(&p, "GET", "/API/usage"), "guarded");
        for (edit, reason) in [
            (
                serde_json::json!({"usage": "/api/upload"}),
                "is a metered route's path",
            ),
            (
                serde_json::json!({"usage": "/health/usage"}),
                "listed as unmetered",
            ),
            (
                serde_json::json!({"usage": "api/usage"}),
                "a path, without a query",
            ),
            (
                serde_json::json!({"usage": "/u", "history": "/u"}),
                "named twice",
            ),
        ] {
            let err = with(|v| v["endpoints"] = edit.clone()).unwrap_err();
            assert!(err.to_string().contains(reason), "{edit}: {err}");
            assert!(err.path.starts_with("endpoints."), "{err}");
        }
    }

    #[test]
    fn release_routes_are_seen_by_the_filter_and_are_no_actions() {
        let p = plans();
        assert_eq!(class(&p, "DELETE", "/api/diagrams/d1"), "release storage");
        assert_eq!(class(&p, "DELETE", "/API/Diagrams/d1"), "release storage");
        assert_eq!(class(&p, "DELETE", "/api/team/members/m1"), "release team");
        let err = with(|v| {
            v["unmetered"] = serde_json::json!([{"prefix": "/api/diagrams"}]);
        })
        .unwrap_err();
        assert_eq!(err.path, "storage.delete_routes[0]");
        assert!(err.reason.contains("unmetered"), "{err}");
        let err = with(|v| {
            v["team"]["remove_routes"] = serde_json::json!([{"path": "/api/upload"}]);
        })
        .unwrap_err();
        assert_eq!(err.path, "team.remove_routes[0]");
        assert!(err.reason.contains("metered route"), "{err}");
    }

    #[test]
    fn an_unmetered_path_may_not_cover_a_metered_route() {
        let err = with(|v| v["unmetered"] = serde_json::json!([{"prefix": "/API"}])).unwrap_err();
        assert_eq!(err.path, "unmetered[0]");
        assert!(err.reason.contains("routes[0]"), "{err}");
        let err = with(|v| {
            v["unmetered"] = serde_json::json!([{"method": "POST", "path": "/api/upload/"}])
        })
        .unwrap_err();
        assert_eq!(err.path, "unmetered[0]");
        // Another method on the same path is fine.
        assert!(with(
            |v| v["unmetered"] = serde_json::json!([{"method": "DELETE", "path": "/api/upload"}])
        )
        .is_ok());
        let err = with(|v| v["unmetered"] = serde_json::json!([{"path": "/a", "prefix": "/b"}]))
            .unwrap_err();
        assert_eq!(err.path, "unmetered[0]");
        let err = with(|v| v["guarded_prefixes"] = serde_json::json!(["api"])).unwrap_err();
        assert_eq!(err.path, "guarded_prefixes[0]");
    }

    #[test]
    fn unknown_plan_names_get_the_default_plans_terms() {
        let p = plans();
        let upload = action(&p, "upload");
        assert_eq!(upload.terms(Some("platinum")).plan.key, "free");
        assert_eq!(upload.terms(None).plan.key, "free");
        assert_eq!(upload.terms(Some("enterprise")).plan.key, "enterprise");
    }

    #[test]
    fn terms_carry_the_upgrade_offers() {
        let p = plans();
        let upload = action(&p, "upload");
        assert_eq!(
            upload.terms(Some("free")).upgrade,
            Some(Upgrade {
                plan: "professional".into(),
                name: "Professional".into(),
                limit: None
            })
        );
        assert_eq!(upload.terms(Some("enterprise")).upgrade, None);
        let dxf = action(&p, "dxf_export");
        let FeatureAccess::Missing { feature, offer } = &dxf.terms(Some("free")).feature else {
            panic!("free has no DXF export")
        };
        assert_eq!(feature, "dxf_export");
        assert_eq!(offer.as_ref().unwrap().key, "professional");
        assert_eq!(
            dxf.terms(Some("professional")).feature,
            FeatureAccess::Included
        );
        let api = action(&p, "api_call");
        let FeatureAccess::Missing { offer, .. } = &api.terms(Some("free")).feature else {
            panic!("free has no API access")
        };
        assert_eq!(
            offer.as_ref().unwrap().key,
            "enterprise",
            "the first plan that has it"
        );
    }

    #[test]
    fn the_upgrade_path_walks_to_the_top_plan() {
        let p = plans();
        let names: Vec<_> = p
            .plan("free")
            .unwrap()
            .upgrade_path
            .iter()
            .map(|s| s.key.as_str())
            .collect();
        assert_eq!(names, ["professional", "enterprise"]);
    }

    #[test]
    fn a_summary_snapshot_holds_the_plans_limits() {
        let p = plans();
        let limits: serde_json::Value =
            serde_json::from_str(&p.plan("free").unwrap().limits_json).unwrap();
        assert_eq!(limits["upload"], 5);
        assert_eq!(limits["pdf_export"], serde_json::Value::Null);
    }

    #[test]
    fn the_request_timeout_fits_the_largest_upload_on_a_slow_link() {
        // 500 MB at 64 KiB/s is 8000 s, plus a minute.
        assert_eq!(plans().request_timeout_ms, 8_060_000);
        let fixed =
            with(|v| v["gateway"] = serde_json::json!({"request_timeout_ms": 1000})).unwrap();
        assert_eq!(fixed.request_timeout_ms, 1000);
    }

    #[test]
    fn a_reservation_expiry_too_short_to_extend_is_refused() {
        let err = with(|v| v["redis"]["reservation_ttl_ms"] = 1000.into()).unwrap_err();
        assert_eq!(err.path, "redis.reservation_ttl_ms");
        assert!(err.reason.contains("at least 1510 ms"), "{err}");
        assert!(with(|v| v["redis"]["reservation_ttl_ms"] = 1510.into()).is_ok());
    }

    #[test]
    fn cluster_mode_is_off_by_default_and_refuses_braces_in_key_names() {
        assert!(!plans().redis.cluster_mode);
        let on = with(|v| v["redis"]["cluster_mode"] = true.into()).unwrap();
        assert!(on.redis.cluster_mode);
        let err = with(|v| v["redis"]["cluster_mode"] = "yes".into()).unwrap_err();
        assert_eq!(err.path, "redis.cluster_mode");
        for field in ["key_prefix", "events_stream"] {
            let err = with(|v| {
                v["redis"]["cluster_mode"] = true.into();
                v["redis"][field] = "pl:{x}".into();
            })
            .unwrap_err();
            assert_eq!(err.path, format!("redis.{field}"));
            assert!(err.reason.contains("no { or }"), "{err}");
            assert!(with(|v| v["redis"][field] = "pl:{x}".into()).is_ok());
        }
    }

    #[test]
    fn functions_are_called_with_fcall_unless_told_evalsha() {
        use crate::config::Invoke;
        assert_eq!(plans().redis.invoke, Invoke::Fcall);
        let evalsha = with(|v| v["redis"]["invoke"] = "evalsha".into()).unwrap();
        assert_eq!(evalsha.redis.invoke, Invoke::Evalsha);
        let err = with(|v| v["redis"]["invoke"] = "eval".into()).unwrap_err();
        assert_eq!(err.path, "redis.invoke");
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
        let err = with(|v| v["plans"]["free"]["upgrade_to"] = "free".into()).unwrap_err();
        assert!(err.reason.contains("itself"), "{err}");
    }

    #[test]
    fn a_default_plan_that_does_not_exist_is_refused() {
        let err = with(|v| v["default_plan"] = "trial".into()).unwrap_err();
        assert_eq!(err.path, "default_plan");
    }

    #[test]
    fn an_undeclared_or_repeated_feature_is_refused() {
        let err =
            with(|v| v["plans"]["free"]["features"] = serde_json::json!(["teleport"])).unwrap_err();
        assert_eq!(err.path, "plans.free.features[0]");
        let err = with(|v| v["features"][1] = "team_collaboration".into()).unwrap_err();
        assert_eq!(err.path, "features[1]");
        let err = with(|v| v["actions"]["upload"]["feature"] = "teleport".into()).unwrap_err();
        assert_eq!(err.path, "actions.upload.feature");
    }

    #[test]
    fn a_route_needs_one_pattern_starting_with_a_slash() {
        let err = with(|v| v["routes"][0] = serde_json::json!({"action": "upload"})).unwrap_err();
        assert_eq!(err.path, "routes[0]");
        let err = with(|v| {
            v["routes"][0] = serde_json::json!({"action": "upload", "path": "/a", "prefix": "/b"})
        })
        .unwrap_err();
        assert_eq!(err.path, "routes[0]");
        let err = with(|v| v["routes"][0] = serde_json::json!({"action": "upload", "path": "a"}))
            .unwrap_err();
        assert!(err.reason.contains("start with '/'"), "{err}");
    }

    #[test]
    fn action_names_and_kinds_are_checked() {
        let err = with(|v| {
            let upload = v["actions"]["upload"].clone();
            v["actions"]["Upload!"] = upload;
        })
        .unwrap_err();
        assert_eq!(err.path, "actions.Upload!");
        let err =
            with(|v| v["actions"]["ai_analysis"]["kind"] = serde_json::json!({"allowed": []}))
                .unwrap_err();
        assert_eq!(err.path, "actions.ai_analysis.kind");
        let err = with(|v| v["actions"] = serde_json::json!({})).unwrap_err();
        assert_eq!(err.path, "actions");
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
        /// Any single edit of plans.json is either compiled or refused with a path; it never
        /// panics, and what compiles resolves every route to terms for every plan. A longer
        /// run: `PROPTEST_CASES=100000 cargo test -p plan-limits-core fuzz`.
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
            match Plans::from_json(doc.to_string().as_bytes()) {
                Ok(plans) => {
                    for route in plans.routes() {
                        for plan in plans.plans() {
                            let terms = route.target.action.terms(Some(&plan.key));
                            proptest::prop_assert_eq!(&terms.plan.key, &plan.key);
                        }
                    }
                }
                Err(e) => proptest::prop_assert!(!e.path.is_empty() && !e.reason.is_empty()),
            }
        }
    }
}
