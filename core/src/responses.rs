//! Every answer the filter gives itself (401, 400, 403, 405, 413, 429, 503): status, headers
//! and the JSON body a client app can show to its user.

use serde_json::{json, Value};

use crate::config::Limit;
use crate::period::BillingPeriod;
use crate::plans::{Action, Plan, Terms, UpgradeStep};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl LocalResponse {
    fn json(status: u32, body: Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    /// A JSON answer about `plan`'s limits or features: it says where to upgrade, if
    /// plans.json does.
    fn about_plan(status: u32, mut body: Value, plan: &Plan) -> Self {
        if let (Some(url), Some(object)) = (&plan.upgrade_url, body.as_object_mut()) {
            object.insert("upgrade_url".into(), url.clone().into());
        }
        Self::json(status, body)
    }

    fn with_header(mut self, name: &str, value: String) -> Self {
        self.set_header(name, value);
        self
    }

    /// Sets `name` to `value`, replacing any value it had.
    pub fn set_header(&mut self, name: &str, value: String) {
        match self.headers.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value,
            None => self.headers.push((name.into(), value)),
        }
    }
}

/// The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-10) for `action`'s
/// allowance: its policy (`q`: the limit per period) and where it stands (`r`: what remains,
/// `t`: seconds until the period resets).
pub fn ratelimit_fields(
    action: &str,
    limit: u64,
    remaining: u64,
    reset_secs: u64,
) -> [(&'static str, String); 2] {
    let name = sf_string(action);
    [
        ("ratelimit-policy", format!("{name};q={limit}")),
        ("ratelimit", format!("{name};r={remaining};t={reset_secs}")),
    ]
}

/// The warning on a success past the limit, in the plan's grace:
/// `"<action>";grace;used=6;limit=5;grace_used=1;grace_units=1` (`in_grace` of `grace` taken).
pub fn grace_field(action: &str, used: u64, limit: u64, in_grace: u64, grace: u64) -> String {
    format!(
        "{};grace;used={used};limit={limit};grace_used={in_grace};grace_units={grace}",
        sf_string(action)
    )
}

/// The soft-warning header's value: `"<action>";threshold=80;used=4;limit=5` (`used`:
/// counted and in flight, this request included).
pub fn warning_field(action: &str, threshold: u8, used: u64, limit: u64) -> String {
    format!(
        "{};threshold={threshold};used={used};limit={limit}",
        sf_string(action)
    )
}

/// A structured-field string: quoted, `\` and `"` escaped, anything not printable ASCII
/// dropped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Where an exhausted allowance stands: `used` (counted successes) and `in_flight` (units
/// held by requests still running, which come back if they fail) of `limit`.
#[derive(Debug, Clone, Copy)]
pub struct Exhausted {
    pub used: u64,
    pub in_flight: u64,
    pub limit: u64,
    /// The plan's grace past the limit (units), all of it taken by now.
    pub grace: u64,
    pub retry_after_secs: u64,
}

/// 429: the month's allowance of `action` under `terms` is used up.
pub fn limit_reached(
    action: &Action,
    terms: &Terms,
    period: &BillingPeriod,
    usage: Exhausted,
) -> LocalResponse {
    let Exhausted {
        used,
        in_flight,
        limit,
        grace,
        retry_after_secs,
    } = usage;
    let pitch = match &terms.upgrade {
        Some(upgrade) => format!(
            " Upgrade to {} for {}.",
            upgrade.name,
            describe_allowance(upgrade.limit, action)
        ),
        None => format!(" Your limit resets on {}.", period.resets_on()),
    };
    let allowance = format!("{} limit of {limit} {}", action.label, action.units(limit));
    let message = if grace > 0 {
        // Past the limit, the grace is taken too (by successes, or requests still running).
        let still = match in_flight {
            0 => String::new(),
            n => format!(", {n} of them still in progress"),
        };
        format!(
            "You've reached your {allowance} this month, and the {grace} more your plan allows \
             in grace{still}.{pitch}"
        )
    } else if used >= limit {
        format!("You've reached your {allowance} this month.{pitch}")
    } else {
        // Not reached yet: requests still running hold the rest, and give it back if they fail.
        format!(
            "Your {allowance} this month is taken: {used} used, {in_flight} more in \
             progress. One that fails gives its unit back.{pitch}"
        )
    };
    let mut body = json!({
            "error": format!("{} limit reached", capitalized(&action.label)),
            "message": message,
            // What counts against the limit, as the seed's `current`.
            "current": used.saturating_add(in_flight),
            "used": used,
            "in_flight": in_flight,
            "limit": limit,
            // As the write-up has it: `current` of `limit`.
            "percentage": percentage(used.saturating_add(in_flight), limit),
            "action": action.key,
            "plan": terms.plan.key,
            "resets_at": period.resets_at(),
            "upgrade": terms.upgrade.as_ref().map(|upgrade| json!({
                "plan": upgrade.plan,
                "name": upgrade.name,
                "limit": upgrade.limit,
            })),
    });
    if let (true, Value::Object(fields)) = (grace > 0, &mut body) {
        let in_grace = used
            .saturating_add(in_flight)
            .saturating_sub(limit)
            .min(grace);
        fields.insert("grace".into(), json!({"units": grace, "used": in_grace}));
    }
    LocalResponse::about_plan(429, body, &terms.plan)
        .with_header("retry-after", retry_after_secs.to_string())
}

/// 403: `plan` lacks `feature`, which `action` needs; `offer` is the first plan up the
/// upgrade path that has it.
pub fn feature_unavailable(
    action: &Action,
    plan: &Plan,
    feature: &str,
    offer: Option<&UpgradeStep>,
) -> LocalResponse {
    let pitch = match offer {
        Some(with_it) => format!(" Upgrade to {} to use it.", with_it.name),
        None => String::new(),
    };
    LocalResponse::about_plan(
        403,
        json!({
            "error": "Feature not available",
            "message": format!(
                "{} is not included in the {} plan.{}",
                capitalized(&action.label), plan.name, pitch
            ),
            "feature": feature,
            "plan": plan.key,
            "upgrade": offer.map(|with_it| json!({"plan": with_it.key, "name": with_it.name})),
        }),
        plan,
    )
}

/// 413: a file of `size_bytes` (`None`: streamed, and already past `max_bytes`) is over
/// `plan`'s `max_bytes`.
pub fn file_too_large(plan: &Plan, size_bytes: Option<u64>, max_bytes: u64) -> LocalResponse {
    // The smallest size the upgrade must allow.
    let needed = size_bytes.unwrap_or(max_bytes.saturating_add(1));
    let offer = plan
        .upgrade_path
        .iter()
        .find(|bigger| bigger.max_file_size_bytes.is_none_or(|max| max >= needed));
    let pitch = match offer {
        Some(bigger) => format!(
            " Upgrade to {} for files up to {}.",
            bigger.name,
            bigger
                .max_file_size_bytes
                .map(megabytes)
                .unwrap_or_else(|| "any size".into())
        ),
        None => String::new(),
    };
    let size = match size_bytes {
        Some(size) => megabytes(size),
        None => format!("over {}", megabytes(max_bytes)),
    };
    LocalResponse::about_plan(
        413,
        json!({
            "error": "File too large",
            "message": format!(
                "This file is {size}; the {} plan allows files up to {}.{pitch}",
                plan.name, megabytes(max_bytes)
            ),
            "size_bytes": size_bytes,
            "max_bytes": max_bytes,
            "plan": plan.key,
            "upgrade": offer.map(|bigger| json!({
                "plan": bigger.key,
                "name": bigger.name,
                "max_bytes": bigger.max_file_size_bytes,
            })),
        }),
        plan,
    )
}

/// 403: an upload does not fit in `plan`'s storage: `stored` bytes are kept, `in_flight` held
/// by uploads still running; `size_bytes` is the upload's (`None`: streamed, and past the room
/// left).
pub fn storage_full(
    plan: &Plan,
    stored: u64,
    in_flight: u64,
    size_bytes: Option<u64>,
) -> LocalResponse {
    let limit_bytes = plan.storage_bytes.unwrap_or(0);
    let needed = stored
        .saturating_add(in_flight)
        .saturating_add(size_bytes.unwrap_or(1));
    let offer = plan
        .upgrade_path
        .iter()
        .find(|bigger| bigger.storage_bytes.is_none_or(|room| room >= needed));
    let pitch = match offer {
        Some(bigger) => format!(
            " Delete files, or upgrade to {} for {}.",
            bigger.name,
            bigger
                .storage_bytes
                .map(|bytes| format!("{} of storage", megabytes(bytes)))
                .unwrap_or_else(|| "unlimited storage".into())
        ),
        None => " Delete files to make room.".into(),
    };
    LocalResponse::about_plan(
        403,
        json!({
            "error": "Storage limit reached",
            "message": format!(
                "This file does not fit in your storage: {} of {} used.{pitch}",
                megabytes(stored.saturating_add(in_flight)),
                megabytes(limit_bytes)
            ),
            "used_bytes": stored,
            "in_flight_bytes": in_flight,
            "size_bytes": size_bytes,
            "limit_bytes": limit_bytes,
            "plan": plan.key,
            "upgrade": offer.map(|bigger| json!({
                "plan": bigger.key,
                "name": bigger.name,
                "storage_bytes": bigger.storage_bytes,
            })),
        }),
        plan,
    )
}

/// 403: `plan`'s team is full: the subscriber and `invited` members, `in_flight` invites
/// still running.
pub fn team_full(plan: &Plan, invited: u64, in_flight: u64) -> LocalResponse {
    let limit = plan.team_members.unwrap_or(0);
    let members = invited.saturating_add(1);
    let needed = members.saturating_add(in_flight).saturating_add(1);
    let offer = plan
        .upgrade_path
        .iter()
        .find(|bigger| bigger.team_members.is_none_or(|room| room >= needed));
    let pitch = match offer {
        Some(bigger) => format!(
            " Remove a member, or upgrade to {} for {}.",
            bigger.name,
            bigger
                .team_members
                .map(|n| count(n, "team member", "team members"))
                .unwrap_or_else(|| "an unlimited team".into())
        ),
        None => " Remove a member to make room.".into(),
    };
    LocalResponse::about_plan(
        403,
        json!({
            "error": "Team limit reached",
            "message": format!(
                "Your {} plan has room for {}, you included.{pitch}",
                plan.name,
                count(limit, "team member", "team members"),
            ),
            "members": members,
            "in_flight": in_flight,
            "limit": limit,
            "plan": plan.key,
            "upgrade": offer.map(|bigger| json!({
                "plan": bigger.key,
                "name": bigger.name,
                "team_members": bigger.team_members,
            })),
        }),
        plan,
    )
}

/// 401: a metered route without a valid bearer token (none, expired, or not ours).
pub fn missing_token() -> LocalResponse {
    LocalResponse::json(
        401,
        json!({
            "error": "Unauthorized",
            "message": "This route is metered per user; send a valid bearer token (Authorization: Bearer ...).",
        }),
    )
    .with_header("www-authenticate", "Bearer".into())
}

/// 401: a metered route without the user header (`trusted_headers` mode).
pub fn missing_user(header: &str) -> LocalResponse {
    LocalResponse::json(
        401,
        json!({
            "error": "Unauthorized",
            "message": format!("This route is metered per user; send the {header} header."),
        }),
    )
}

/// 403: the plan named (by the token or billing's record) is not one plans.json knows, and
/// `identity.unknown_plan` is `forbid`.
pub fn unknown_plan(plan: &str) -> LocalResponse {
    LocalResponse::json(
        403,
        json!({
            "error": "Unknown plan",
            "message": format!("The plan \"{plan}\" is not offered; please contact support."),
            "plan": plan,
        }),
    )
}

/// 405: another method on a metered path (the route names its method).
pub fn method_not_allowed(allowed: &str) -> LocalResponse {
    LocalResponse::json(
        405,
        json!({
            "error": "Method not allowed",
            "message": format!("This path is metered for {allowed} only."),
        }),
    )
    .with_header("allow", allowed.into())
}

/// 403: a path under a guarded prefix that plans.json neither meters nor lists as unmetered.
pub fn not_routed() -> LocalResponse {
    LocalResponse::json(
        403,
        json!({
            "error": "Route not allowed",
            "message": "This path is not served through the gateway.",
        }),
    )
}

pub fn bad_request(field: &str, reason: &str) -> LocalResponse {
    LocalResponse::json(
        400,
        json!({
            "error": "Bad request",
            "message": format!("{field}: {reason}"),
            "field": field,
        }),
    )
}

/// 409: a request with an idempotency key already used for `action`: in flight
/// (`pending:<id>`), or counted (`done:<time>`). Nothing is forwarded or counted.
pub fn duplicate(action: &Action, key: &str, first: &str) -> LocalResponse {
    let (state, at, message) = match first.strip_prefix("done:") {
        Some(at) => (
            "completed",
            Some(at),
            format!(
                "This {} was already done with this Idempotency-Key, at {at}; it is not done or counted again.",
                action.label
            ),
        ),
        None => (
            "in_progress",
            None,
            format!(
                "A {} with this Idempotency-Key is in progress; retry once it has finished.",
                action.label
            ),
        ),
    };
    LocalResponse::json(
        409,
        json!({
            "error": "Duplicate request",
            "message": message,
            "idempotency_key": key,
            "action": action.key,
            "state": state,
            "completed_at": at,
        }),
    )
}

/// 200: a report the filter answers itself (the usage endpoints); never cached.
pub fn report(body: Value) -> LocalResponse {
    LocalResponse::json(200, body).with_header("cache-control", "no-store".into())
}

pub fn usage_unavailable(action_key: &str) -> LocalResponse {
    LocalResponse::json(
        503,
        json!({
            "error": "Usage service unavailable",
            "message": "Your usage could not be checked right now; please retry in a moment.",
            "action": action_key,
        }),
    )
    .with_header("retry-after", "1".into())
}

/// 429 for a user whose requests come faster than the plan's `request_rate` (spike arrest).
pub fn too_many_requests(plan: &Plan, per_second: u32, retry_after_secs: u64) -> LocalResponse {
    LocalResponse::about_plan(
        429,
        json!({
            "error": "Too many requests",
            "message": format!(
                "Slow down: the {} plan takes at most {per_second} requests a second.",
                plan.name
            ),
            "plan": plan.key,
            "retry_after": retry_after_secs,
        }),
        plan,
    )
    .with_header("retry-after", retry_after_secs.to_string())
}

/// 429 for a request with an idempotency key from a user who has as many keys remembered as
/// it may (`gateway.max_idempotency_keys` within `idempotency_ttl_ms`).
pub fn too_many_idempotency_keys(action_key: &str) -> LocalResponse {
    LocalResponse::json(
        429,
        json!({
            "error": "Too many idempotency keys",
            "message": "You have sent as many requests with an Idempotency-Key as are remembered at once; send this one without the header, or later.",
            "action": action_key,
        }),
    )
    .with_header("retry-after", "60".into())
}

/// 503 for a usage read while this worker already waits on Redis for as many as it may.
pub fn reads_busy() -> LocalResponse {
    LocalResponse::json(
        503,
        json!({
            "error": "Usage service busy",
            "message": "Too many usage reads at once; please retry in a moment.",
        }),
    )
    .with_header("retry-after", "1".into())
}

/// 503 from a worker that has no plans yet (Envoy sends it no traffic; should any come, it is
/// not let past a limit unchecked).
pub fn not_configured() -> LocalResponse {
    LocalResponse::json(
        503,
        json!({
            "error": "Usage service unavailable",
            "message": "Usage limits are not configured yet; please retry in a moment.",
        }),
    )
    .with_header("retry-after", "1".into())
}

fn describe_allowance(limit: Limit, action: &Action) -> String {
    match limit {
        None => format!("unlimited {}", action.unit),
        Some(n) => format!("{n} {} a month", action.units(n)),
    }
}

/// Share of the allowance used, in whole percent rounded down, at most 100 (a count above its
/// limit, after a downgrade mid-period, shows 100; the count itself is reported as it is); 100
/// when the limit is 0.
pub fn percentage(used: u64, limit: u64) -> u64 {
    if limit == 0 {
        100
    } else {
        (u128::from(used) * 100 / u128::from(limit)).min(100) as u64
    }
}

/// "10 MB", "10.5 MB" (MB = 1024² bytes), in integers: float formatting would weigh on the
/// `.wasm`.
/// `n` and the noun that fits it: "1 team member", "5 team members".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn megabytes(bytes: u64) -> String {
    const MB: u64 = 1024 * 1024;
    let tenths = (u128::from(bytes) * 10 + u128::from(MB) / 2) / u128::from(MB);
    if tenths % 10 == 0 {
        format!("{} MB", tenths / 10)
    } else {
        format!("{}.{} MB", tenths / 10, tenths % 10)
    }
}

/// The label with an upper-case first letter (ASCII: Unicode case tables would weigh on the
/// `.wasm`, and labels are the product's own words).
fn capitalized(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(first) = out.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{action, now, plans};

    fn body(response: &LocalResponse) -> Value {
        serde_json::from_str(&response.body).unwrap()
    }

    #[test]
    fn the_upload_429_matches_the_seed() {
        let p = plans();
        let now = now();
        let period = BillingPeriod::calendar_month(now);
        let usage = Exhausted {
            used: 5,
            in_flight: 0,
            limit: 5,
            grace: 0,
            retry_after_secs: period.seconds_until_end(now),
        };
        let upload = action(&p, "upload");
        let r = limit_reached(&upload, upload.terms(Some("free")), &period, usage);
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after".into(), "302400".into())));
        let b = body(&r);
        assert_eq!(b["error"], "Upload limit reached");
        assert_eq!(
            b["message"],
            "You've reached your upload limit of 5 diagrams this month. Upgrade to Professional for unlimited diagrams."
        );
        assert_eq!(b["current"], 5);
        assert_eq!(b["limit"], 5);
        assert_eq!(b["percentage"], 100);
        assert_eq!(b["action"], "upload");
        assert_eq!(b["plan"], "free");
        assert_eq!(b["resets_at"], "2026-12-01T00:00:00Z");
        assert_eq!(
            b["upgrade"],
            json!({"plan": "professional", "name": "Professional", "limit": null})
        );
        assert_eq!(b["upgrade_url"], "/pricing", "plans.json's");
    }

    #[test]
    fn every_refusal_about_a_plan_says_where_to_upgrade_a_plans_own_url_first() {
        let json = crate::testing::plans_json_with(|v| {
            v["plans"]["free"]["upgrade_url"] = "https://example.test/billing".into();
        });
        let p = crate::plans::Plans::from_json(json.as_bytes()).unwrap();
        let free = p.plan("free").unwrap();
        let pro = p.plan("professional").unwrap();
        let dxf = action(&p, "dxf_export");
        let refusals = [
            feature_unavailable(&dxf, free, "dxf_export", None),
            file_too_large(free, Some(1 << 30), 10),
            storage_full(free, 1, 0, Some(1)),
            team_full(free, 0, 0),
            too_many_requests(free, 10, 1),
        ];
        for r in refusals {
            assert_eq!(
                body(&r)["upgrade_url"],
                "https://example.test/billing",
                "{}",
                r.body
            );
        }
        assert_eq!(body(&team_full(pro, 4, 0))["upgrade_url"], "/pricing");
    }

    #[test]
    fn the_top_plan_is_told_when_it_resets() {
        let p = plans();
        let now = now();
        let period = BillingPeriod::calendar_month(now);
        let usage = Exhausted {
            used: 10_000,
            in_flight: 0,
            limit: 10_000,
            grace: 0,
            retry_after_secs: 1,
        };
        let api = action(&p, "api_call");
        let b = body(&limit_reached(
            &api,
            api.terms(Some("enterprise")),
            &period,
            usage,
        ));
        assert_eq!(b["error"], "API call limit reached");
        assert!(b["message"]
            .as_str()
            .unwrap()
            .ends_with("Your limit resets on December 1."));
        assert_eq!(b["upgrade"], Value::Null);
    }

    #[test]
    fn a_missing_feature_names_the_plan_that_has_it() {
        let p = plans();
        let api = action(&p, "api_call");
        let crate::plans::FeatureAccess::Missing { feature, offer } =
            &api.terms(Some("free")).feature
        else {
            panic!("free has no API access")
        };
        let r = feature_unavailable(&api, p.plan("free").unwrap(), feature, offer.as_ref());
        assert_eq!(r.status, 403);
        let b = body(&r);
        assert_eq!(b["feature"], "api_access");
        assert_eq!(b["upgrade"]["plan"], "enterprise");
        assert_eq!(
            b["message"],
            "API call is not included in the Free plan. Upgrade to Enterprise to use it."
        );
    }

    #[test]
    fn a_large_file_is_offered_a_plan_that_takes_it() {
        let p = plans();
        let free = p.plan("free").unwrap();
        let r = file_too_large(free, Some(11 * 1024 * 1024), 10 * 1024 * 1024);
        assert_eq!(r.status, 413);
        let b = body(&r);
        assert_eq!(
            b["message"],
            "This file is 11 MB; the Free plan allows files up to 10 MB. Upgrade to Professional for files up to 100 MB."
        );
        let r = file_too_large(free, Some(200 * 1024 * 1024), 10 * 1024 * 1024);
        assert_eq!(body(&r)["upgrade"]["plan"], "enterprise");
        // Streamed: its size is not known, only that it is past the limit.
        let r = file_too_large(free, None, 10 * 1024 * 1024);
        let b = body(&r);
        assert_eq!(b["size_bytes"], Value::Null);
        assert_eq!(
            b["message"],
            "This file is over 10 MB; the Free plan allows files up to 10 MB. Upgrade to Professional for files up to 100 MB."
        );
    }

    #[test]
    fn a_count_of_one_reads_in_the_singular() {
        let p = plans();
        let period = BillingPeriod::calendar_month(now());
        let usage = Exhausted {
            used: 1,
            in_flight: 0,
            limit: 1,
            grace: 0,
            retry_after_secs: 1,
        };
        let pdf = action(&p, "upload");
        let r = limit_reached(&pdf, pdf.terms(Some("free")), &period, usage);
        assert!(
            body(&r)["message"]
                .as_str()
                .unwrap()
                .starts_with("You've reached your upload limit of 1 diagram this month."),
            "{}",
            r.body
        );
    }

    #[test]
    fn ratelimit_fields_follow_the_draft() {
        assert_eq!(
            ratelimit_fields("upload", 5, 3, 3600),
            [
                ("ratelimit-policy", "\"upload\";q=5".to_string()),
                ("ratelimit", "\"upload\";r=3;t=3600".to_string()),
            ]
        );
        assert_eq!(sf_string("a\"b\\c\u{7f}é"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn sizes_read_in_megabytes() {
        assert_eq!(megabytes(10 * 1024 * 1024), "10 MB");
        assert_eq!(megabytes(11 * 1024 * 1024 + 512 * 1024), "11.5 MB");
        assert_eq!(megabytes(1), "0 MB");
        assert_eq!(megabytes(u64::MAX), "17592186044416 MB");
        assert_eq!(capitalized("upload"), "Upload");
        assert_eq!(capitalized("élan"), "élan");
        assert_eq!(capitalized(""), "");
    }

    #[test]
    fn percentages_are_whole_and_safe() {
        assert_eq!(percentage(0, 3), 0);
        assert_eq!(percentage(2, 3), 66);
        assert_eq!(percentage(3, 3), 100);
        assert_eq!(percentage(1, 0), 100);
        assert_eq!(percentage(u64::MAX, u64::MAX), 100);
        // Downgraded mid-month: 40 used of a new limit of 3.
        assert_eq!(percentage(40, 3), 100);
    }
}
