//! `plans.json` as written: the document's types, read with serde so that a value of the wrong
//! type is refused with the JSON path of the value. `plans.rs` checks the document as a whole
//! and compiles it into the model requests use.

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
    pub(crate) fn at(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Monthly allowance for one action: `None` is unlimited (`null` in JSON).
pub type Limit = Option<u64>;

/// plans.json: the plans, their limits and features, the metered routes and how the gateway
/// meters them. Beyond this schema, `plan-limits validate` checks that the names it uses
/// (actions, features, plans) exist and that its paths agree with each other.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(title = "plans.json"))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The JSON Schema this file follows, for editors (`"./plans.schema.json"`); the filter
    /// ignores it.
    #[serde(rename = "$schema", default, skip_serializing_if = "String::is_empty")]
    pub schema: String,
    /// The plan of callers whose token (or billing's record) names none.
    pub default_plan: String,
    #[serde(default)]
    pub identity: Identity,
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// The feature flags a plan may have; actions and plans may only name these.
    pub features: Vec<String>,
    /// What is metered, by name (`upload`, `ai_analysis`): how it is named in messages and
    /// what a request of it needs.
    pub actions: BTreeMap<String, ActionSettings>,
    /// The metered paths, each naming its action; every spelling of a path is matched.
    pub routes: Vec<Route>,
    /// Paths no action meters: Envoy skips the filter on them. Every other path goes through
    /// the filter, so that no spelling of a metered route gets past it.
    #[serde(default)]
    pub unmetered: Vec<Unmetered>,
    /// Deny by default under these prefixes: a request that matches neither a route nor
    /// `unmetered` is refused (403).
    #[serde(default)]
    pub guarded_prefixes: Vec<String>,
    /// Paths the filter answers itself, for the caller (the product's dashboard).
    #[serde(default)]
    pub endpoints: Endpoints,
    /// Soft warnings before the hard block.
    #[serde(default)]
    pub warnings: Warnings,
    /// How storage is given back.
    #[serde(default)]
    pub storage: StorageSettings,
    /// How team seats are given back.
    #[serde(default)]
    pub team: TeamSettings,
    /// Where a user upgrades (the product's pricing or billing page): in every 429 and 403
    /// about a plan's limits or features, and behind the usage page's Upgrade button. A
    /// plan's own `upgrade_url` wins over it.
    #[serde(default)]
    pub upgrade_url: Option<String>,
    /// The plans by name (`free`, `professional`): limits, sizes and features.
    pub plans: BTreeMap<String, Plan>,
}

/// Storage is a running total per user (not per period): uploads of actions that
/// `adds_to_storage` add their bytes; a successful request on a delete route takes off what
/// the upstream says it freed, in `freed_bytes_header`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Routes whose success frees storage (the upstream says how much).
    pub delete_routes: Vec<Unmetered>,
    /// The upstream's response header saying how many bytes a delete freed.
    pub freed_bytes_header: String,
}

/// A team is a running count per user (the subscriber's team, not per period): successes of
/// actions that `adds_to` `team` (invites) add a member; a successful request on a remove
/// route takes off what the upstream says it removed. The subscriber counts as one of the plan's `team_members`.
/// The upstream says how many members a removal took off (absent: none), so that a removal
/// repeated (a 2xx for a member already gone) gives nothing back.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct TeamSettings {
    /// Routes whose success removes members (the upstream says how many).
    pub remove_routes: Vec<Unmetered>,
    /// The upstream's response header saying how many members a removal took off.
    pub removed_members_header: String,
}

impl Default for TeamSettings {
    fn default() -> Self {
        Self {
            remove_routes: Vec::new(),
            removed_members_header: "x-removed-members".into(),
        }
    }
}

/// A running total per user that actions add to and other routes give back, limited by a
/// plan's `storage_bytes` or `team_members`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Gauge {
    /// Bytes kept, added by uploads' bodies.
    Storage,
    /// Members invited, one per invite.
    Team,
}

impl Gauge {
    pub fn name(self) -> &'static str {
        match self {
            Gauge::Storage => "storage",
            Gauge::Team => "team",
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            delete_routes: Vec::new(),
            freed_bytes_header: "x-freed-bytes".into(),
        }
    }
}

/// Soft warnings: when a counted request brings a user's count of an action to one of these
/// shares of its limit, the response says so (a hint, from the reservation's numbers) and the
/// event stream records it once per user, action, period and threshold (exact, from Redis).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct Warnings {
    /// Percent of the limit, each 1 to 100, ascending.
    pub thresholds: Vec<u8>,
    /// The response header that names the action and the threshold crossed; `null`: none.
    pub header: Option<String>,
}

impl Default for Warnings {
    fn default() -> Self {
        Self {
            thresholds: vec![80, 90],
            header: Some("x-usage-warning".into()),
        }
    }
}

/// The read side: paths answered by the filter from Redis, for the verified caller, never
/// forwarded and never counted (absent: not served).
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Endpoints {
    /// `GET`: the caller's usage this period, with limits and what an upgrade gives.
    #[serde(default)]
    pub usage: Option<String>,
    /// `GET ?from=YYYY-MM-DD&to=YYYY-MM-DD[&action=A]`: counts per day per action.
    #[serde(default)]
    pub history: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Unmetered {
    /// Any method when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Exact path (a trailing slash is ignored).
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix, matched on whole segments.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// What a spelling of a metered path other than its own (`/API/Upload`, `/api/upload;x`,
/// `/api/upload.`, `/api/%75pload`) gets: a web framework may route it to the same handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Variants {
    /// Metered as the route's action.
    #[default]
    Meter,
    /// 400.
    Refuse,
}

/// What another method on a route's path gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OtherMethods {
    /// 405.
    #[default]
    Refuse,
    /// Metered as the route's action.
    Meter,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct Identity {
    /// Where the caller's identity comes from.
    pub source: IdentitySource,
    pub jwt: JwtClaims,
    /// In `jwt` mode the filter sets these request headers for the upstream to the verified
    /// user, the plan in force and the organisation (Envoy removes client copies first); in
    /// `trusted_headers` mode it reads the user and the claimed plan from them.
    pub user_header: String,
    /// The plan in force (see `user_header`).
    pub plan_header: String,
    /// The organisation (see `user_header`).
    pub org_header: String,
    /// In `jwt` mode the filter sets this request header for the upstream to the plan in
    /// force's features, comma-separated (Envoy removes client copies first), so a service
    /// gates any feature without a lookup of its own.
    pub features_header: String,
    /// Longer user ids are refused with 400: they would only bloat keys and events.
    pub max_user_id_bytes: usize,
    /// A plan name plans.json does not know (in a claim or in billing's record).
    pub unknown_plan: UnknownPlan,
}

impl Identity {
    /// The request headers the filter sets for the upstream (`jwt`), whose client copies Envoy
    /// removes before any filter reads them.
    pub fn verified_headers(&self) -> [&str; 4] {
        [
            &self.user_header,
            &self.plan_header,
            &self.org_header,
            &self.features_header,
        ]
    }
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            source: IdentitySource::Jwt,
            jwt: JwtClaims::default(),
            user_header: "x-user-id".into(),
            plan_header: "x-user-plan".into(),
            org_header: "x-org-id".into(),
            features_header: "x-user-features".into(),
            max_user_id_bytes: 256,
            unknown_plan: UnknownPlan::DefaultPlan,
        }
    }
}

/// What Envoy is told about requests (rendered into its config).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// How slow an upload may be and still be taken: the whole-request timeout is the largest
    /// file a plan allows at this rate, plus a minute (at least 5 minutes).
    pub min_upload_bytes_per_second: u64,
    /// The whole-request timeout, if set, instead of the one derived above.
    pub request_timeout_ms: Option<u64>,
    /// The most body the filter reads and discards from a request it refused, so that a client
    /// that writes its whole body before reading gets the answer rather than a reset; beyond
    /// it (or a Content-Length over it) the answer goes at once.
    pub max_drain_bytes: u64,
    /// The longest the filter reads a refused request's body (a client at one byte a second
    /// holds a connection no longer): past it, the answer goes at once.
    pub max_drain_ms: u64,
    /// IETF RateLimit fields (`RateLimit-Policy`, `RateLimit`) on answers to limited actions.
    pub ratelimit_headers: bool,
    /// A limited action's success reaches its client once Redis has counted it (its response
    /// held for the commit's round trip), so the client's next request sees it used.
    pub read_your_writes: bool,
    /// The request header whose value makes repeats of a request one request (counted once).
    pub idempotency_header: String,
    /// How long a key is remembered.
    pub idempotency_ttl_ms: u64,
    /// How many keys one user may have remembered at once (each costs Redis memory for
    /// `idempotency_ttl_ms`); past it, a request with a new key is refused (429).
    pub max_idempotency_keys: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            min_upload_bytes_per_second: 64 * 1024,
            request_timeout_ms: None,
            max_drain_bytes: 64 << 20,
            max_drain_ms: 10_000,
            ratelimit_headers: true,
            read_your_writes: true,
            idempotency_header: "idempotency-key".into(),
            idempotency_ttl_ms: 86_400_000,
            max_idempotency_keys: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// A bearer token verified by Envoy's `jwt_authn`, its payload read from dynamic metadata.
    #[default]
    Jwt,
    /// The user and plan headers as they arrive: only behind an authenticator that sets them
    /// and removes any copy a client sent.
    TrustedHeaders,
}

/// Where the verified token's claims are, and which claims name the user, plan and org.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct JwtClaims {
    /// `jwt_authn`'s `payload_in_metadata` key.
    pub payload_key: String,
    /// The claims naming the user, the plan and the organisation.
    pub user_claim: String,
    /// (See `user_claim`.)
    pub plan_claim: String,
    /// (See `user_claim`.)
    pub org_claim: String,
    /// The subscription's anchor day (1 to 31): billing periods run from it (billing's record
    /// wins over it).
    pub anchor_claim: String,
    /// The issuer and audience Envoy's `jwt_authn` accepts (rendered into its config).
    pub issuer: String,
    /// (See `issuer`.)
    pub audience: String,
}

impl JwtClaims {
    /// The property path of the verified payload in the request's dynamic metadata, where
    /// `jwt_authn` put it.
    pub fn payload_path(&self) -> [&str; 4] {
        [
            "metadata",
            "filter_metadata",
            "envoy.filters.http.jwt_authn",
            &self.payload_key,
        ]
    }

    /// The property path of one `claim` of that payload.
    pub fn path<'a>(&'a self, claim: &'a str) -> [&'a str; 5] {
        let [a, b, c, d] = self.payload_path();
        [a, b, c, d, claim]
    }
}

impl Default for JwtClaims {
    fn default() -> Self {
        Self {
            payload_key: "jwt_payload".into(),
            user_claim: "sub".into(),
            plan_claim: "plan".into(),
            org_claim: "org".into(),
            anchor_claim: "anchor_day".into(),
            issuer: "plan-limits-dev".into(),
            audience: "plan-limits".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum UnknownPlan {
    /// Apply `default_plan` (metric `unknown_plan`, and a log line at most once a second).
    #[default]
    DefaultPlan,
    /// Refuse with 403.
    Forbid,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// Envoy cluster of the webdis front (stock Envoy reaches Redis over HTTP).
    pub cluster: String,
    /// The Envoy cluster the read side's calls (the usage endpoints) go to, with their own
    /// connections and circuit breakers, so a flood of reads never queues ahead of a
    /// reservation; `null`: `cluster`.
    pub read_cluster: Option<String>,
    /// Usage reads one worker has waiting for Redis at most; past it a read is answered 503
    /// with `Retry-After` at once.
    pub max_reads_in_flight: usize,
    /// `:authority` of the calls to webdis.
    pub authority: String,
    /// How long a request waits for its reservation before its action's failure mode applies.
    pub timeout_ms: u64,
    /// The prefix of every key (the filter's Redis user is limited to it).
    pub key_prefix: String,
    /// A reservation that is never settled (Envoy killed mid-request) stops holding quota after
    /// this; keep it longer than the upstream timeout so a slow success is still counted.
    pub reservation_ttl_ms: u64,
    /// Settlements (commit / release / count) are sent in batches from each worker this often,
    /// and its counters added to Envoy's.
    pub flush_interval_ms: u64,
    /// The most settlements in one call to Redis.
    pub max_batch: usize,
    /// Settlements waiting while Redis is unreachable; beyond this the oldest are dropped (metric).
    pub max_queued_settlements: usize,
    /// Monthly summaries are kept this long after their period ends.
    pub summary_retention_days: u32,
    /// Daily counts (the history endpoint's) are kept this long: the history pages back
    /// through them a page at a time.
    pub history_retention_days: u32,
    /// The stream of usage events (and of every loss) that billing reads.
    pub events_stream: String,
    /// Approximate cap on the event stream's length; when set, it replaces the age limit.
    pub events_max_len: Option<u64>,
    /// Events older than this are trimmed from the stream (approximately): billing must read
    /// them within it. `null` (with no `events_max_len`) keeps every event.
    pub events_retention_days: Option<u32>,
    /// A user refused because the month's count reached the limit is refused without asking
    /// Redis for this long (per worker); 0 asks Redis every time.
    pub deny_cache_ms: u64,
    /// How long a worker keeps a user's plan as billing recorded it (learnt from Redis's
    /// answers), for requests that do not wait on Redis (unlimited actions).
    pub entitlement_cache_ms: u64,
    /// How long Redis remembers a commit, so that one sent again counts once; a commit whose
    /// answer was lost is not sent again after this.
    pub commit_memory_ms: u64,
    /// While Redis is unreachable, a fail-open action lets a user through at most what this
    /// Envoy last knew remained, plus this many.
    pub fail_open_allowance: u64,
    /// Credentials of the filter's Redis user, for Higress's Redis host calls (webdis holds
    /// its own).
    pub username: Option<String>,
    /// (See `username`.)
    pub password: Option<String>,
    /// Redis is a Redis Cluster: settlement batches are split by hash slot, and usage events
    /// go to one stream per slot (`<events_stream>:<slot>:{<tag>}`).
    pub cluster_mode: bool,
    /// How the library's functions are called: `FCALL`, or `EVALSHA` of each function as a
    /// script (for Envoy's `redis_proxy`, which does not forward `FCALL`).
    pub invoke: Invoke,
    /// While four calls carrying a worker's reservations are in flight, the reservations that
    /// arrive wait for the next answer and go together in one call (a group commit), instead
    /// of each going at once: up to four requests at once never wait, and under load one call
    /// carries many (measured through Envoy: +17 % limited throughput at 32 connections, +30 %
    /// at 128, the same at 1 and 4). Ignored on a Redis Cluster (each reservation goes alone).
    pub coalesce_reservations: bool,
    /// Leases: a worker's reservation for a limited action (no idempotency key, adding to no
    /// running total) asks for this many units at once, granted only while the user has at
    /// least ten times as many left (else one, as without). The worker admits the user's next
    /// requests from the lease's units without a Redis call, commits those that succeed and
    /// gives the rest back after `lease_hold_ms`: counts stay exact, and near the limit every
    /// request asks Redis. 0 or 1: no leases.
    pub lease_units: u64,
    /// A lease's units still unused this long after it was granted are given back (so another
    /// worker or Envoy is refused for units a lease holds for at most this long).
    pub lease_hold_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Invoke {
    /// `FCALL <function>`: the Redis Functions library, loaded once, kept by Redis.
    #[default]
    Fcall,
    /// `EVALSHA <sha1 of the function as a script>`: the scripts are loaded by an admin on
    /// every master (`plan-limits functions load`) and again after a master restarts.
    Evalsha,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            cluster: crate::names::REDIS_CLUSTER.into(),
            read_cluster: None,
            max_reads_in_flight: 8,
            authority: "webdis".into(),
            timeout_ms: 250,
            key_prefix: "plan-limits".into(),
            reservation_ttl_ms: 60_000,
            flush_interval_ms: 5,
            max_batch: 64,
            max_queued_settlements: 10_000,
            summary_retention_days: 400,
            history_retention_days: 400,
            events_stream: "plan-limits:events".into(),
            events_max_len: None,
            events_retention_days: Some(35),
            deny_cache_ms: 1000,
            entitlement_cache_ms: 5000,
            commit_memory_ms: 3_600_000,
            fail_open_allowance: 1,
            username: None,
            password: None,
            cluster_mode: false,
            invoke: Invoke::Fcall,
            coalesce_reservations: true,
            lease_units: 0,
            lease_hold_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Redis unreachable: let the request through (and count it on success if Redis is back).
    #[default]
    FailOpen,
    /// Redis unreachable: answer 503.
    FailClosed,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ActionSettings {
    /// Singular name used in messages: "upload", "AI analysis".
    pub label: String,
    /// Plural of what is counted, used in messages: "diagrams", "AI analyses".
    pub unit: String,
    /// Its singular, for counts of one: "diagram", "AI analysis" (the plural when absent).
    #[serde(default)]
    pub unit_singular: Option<String>,
    /// The feature a plan needs for this action at all (403 without it).
    #[serde(default)]
    pub feature: Option<String>,
    /// Whether the request's Content-Length is checked against the plan's max file size.
    #[serde(default)]
    pub enforce_max_file_size: bool,
    /// A running total a success adds to: `storage` (the body's bytes, checked against the
    /// plan's `storage_bytes`) or `team` (one member, checked against `team_members`).
    #[serde(default)]
    pub adds_to: Option<Gauge>,
    #[serde(default)]
    pub on_redis_error: FailureMode,
    /// Where the analysis kind (recorded as metadata) is read from.
    #[serde(default)]
    pub kind: Option<KindSource>,
    /// What goes into its usage event's `metadata` (and nothing else): each field by name,
    /// from the first of its request headers the request has, else the first of its response
    /// headers the upstream's answer has, at most `max_len` characters.
    #[serde(default)]
    pub metadata: BTreeMap<String, MetadataField>,
    /// A request forwarded whole to the upstream whose answer never comes (its client left,
    /// or Envoy gave up waiting): `commit` (the default) counts it, as of unknown outcome,
    /// since an upstream usually finishes the work anyway; `release` gives the unit back, for
    /// an upstream that stops work when its client goes.
    #[serde(default)]
    pub on_client_abort: OnClientAbort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnClientAbort {
    Release,
    #[default]
    Commit,
}

/// One field of a usage event's metadata.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MetadataField {
    /// Request headers to take it from, the first present wins; `name:param` takes a
    /// parameter of the header (`content-disposition:filename`). Never credentials.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response headers to take it from when no request header gave it.
    #[serde(default)]
    pub response_headers: Vec<String>,
    /// Longer values are cut to this many characters (control characters are dropped).
    #[serde(default = "default_metadata_len")]
    pub max_len: usize,
}

fn default_metadata_len() -> usize {
    128
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
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
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
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
    /// The action (a key of `actions`) this route meters.
    pub action: String,
    #[serde(default)]
    pub variants: Variants,
    /// Only for a route with a `method`.
    #[serde(default)]
    pub other_methods: OtherMethods,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Display name: "Professional".
    pub name: String,
    /// The plan suggested in upgrade messages; `null` for the top plan.
    pub upgrade_to: Option<String>,
    /// Monthly limit per action; `null`: unlimited. Every action is named.
    pub limits: BTreeMap<String, Limit>,
    /// The largest upload (413 past it); `null`: none.
    pub max_file_size_bytes: Option<u64>,
    /// Bytes a user may keep stored (403 past it); `null`: unlimited.
    pub storage_bytes: Option<u64>,
    /// Members of a subscriber's team, the subscriber included (403 past it); `null`:
    /// unlimited.
    pub team_members: Option<u64>,
    /// The features (from `features`) the plan has.
    pub features: Vec<String>,
    /// How fast one user's requests may come (spike arrest: 429 past it, before any Redis
    /// call), per Envoy worker; none when absent.
    #[serde(default)]
    pub request_rate: Option<crate::spike::RequestRate>,
    /// Where this plan's users upgrade, instead of the top-level `upgrade_url`.
    #[serde(default)]
    pub upgrade_url: Option<String>,
    /// Per action, successes allowed past the limit (counted, each answered with a warning)
    /// before the 429.
    #[serde(default)]
    pub grace: BTreeMap<String, Grace>,
}

/// A grace beyond a limit: a number of units, or a share of the limit (rounded up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize, schemars::JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Grace {
    Units(u64),
    Percent(u8),
}

impl Grace {
    /// Its units beyond `limit`.
    pub fn units(self, limit: u64) -> u64 {
        match self {
            Grace::Units(n) => n,
            Grace::Percent(p) => limit.saturating_mul(u64::from(p)).div_ceil(100),
        }
    }
}

impl Config {
    /// Reads the document; a value of the wrong type or an unknown field names its JSON path.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        // Read as a JSON value first (the parser the read side uses anyway), then into the
        // types: their deserializers are built for one simple input (14 KB of the .wasm less).
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::at("(root)", e.to_string()))?;
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { "(root)".into() } else { path };
            ConfigError::at(path, e.into_inner().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::plans_json_with;

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Config, ConfigError> {
        Config::from_json(plans_json_with(edit).as_bytes())
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
    fn the_whole_document_is_named_root() {
        let err = Config::from_json(b"[]").unwrap_err();
        assert_eq!(err.path, "(root)");
    }

    proptest::proptest! {
        #[test]
        fn fuzz_config_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Config::from_json(&bytes);
        }
    }
}
