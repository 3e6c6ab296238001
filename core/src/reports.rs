//! The read side, for the product's dashboard: the caller's usage this period
//! (`endpoints.usage`) and its daily counts (`endpoints.history`), each answered by the
//! filter from one Redis call (a read-only function), never forwarded and never counted.
//!
//! Numbers follow the 429's: `used` counts successes, `in_flight` the units held by requests
//! not settled yet, `remaining` what is left of the limit after both, `percentage` is both (the
//! write-up's `current`) of the limit in whole percent, rounded down, at most 100.

use std::collections::BTreeMap;

use chrono::{DateTime, Days, NaiveDate, Utc};
use serde_json::{json, Map, Value};

use crate::config::Gauge;
use crate::keys::UserKeys;
use crate::period::{self, BillingPeriod};
use crate::plans::{FeatureAccess, Plan, Plans};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::responses::{self, LocalResponse};
use crate::routes;

const USAGE: &str = "plan_limits_usage";
const HISTORY: &str = "plan_limits_history";

/// What is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportKind {
    Usage,
    /// Days `from` to `to`, both included; one action's counts, or every action's; with
    /// `by_kind`, each action with a kind also by kind.
    History {
        from: NaiveDate,
        to: NaiveDate,
        action: Option<String>,
        by_kind: bool,
    },
}

/// A report asked for by a verified caller.
#[derive(Debug, Clone)]
pub struct Report {
    kind: ReportKind,
    user: String,
    /// The plan its token claims (billing's record, in Redis, wins over it).
    claimed_plan: Option<String>,
    /// The anchor day its token names, and the one the period was computed with.
    claimed_anchor: u32,
    anchor: u32,
    reanchored: bool,
    keys: UserKeys,
    period: BillingPeriod,
}

impl Report {
    /// `anchor`: the anchor day the token names (0: none).
    pub fn new(
        kind: ReportKind,
        user: String,
        claimed_plan: Option<String>,
        anchor: u32,
        plans: &Plans,
        now: DateTime<Utc>,
    ) -> Self {
        let keys = UserKeys::new(&plans.redis.key_prefix, &user);
        Self {
            kind,
            user,
            claimed_plan,
            claimed_anchor: anchor,
            anchor,
            reanchored: false,
            keys,
            period: BillingPeriod::anchored(now, anchor),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The plan its token claims, if any.
    pub fn claimed_plan(&self) -> Option<&str> {
        self.claimed_plan.as_deref()
    }

    pub fn anchor(&self) -> u32 {
        self.anchor
    }

    /// Computes the period from another anchor day (billing's record names one).
    pub fn reanchor(&mut self, anchor: u32, now: DateTime<Utc>) {
        self.anchor = anchor;
        self.period = BillingPeriod::anchored(now, anchor);
    }

    /// The anchor day in force, when Redis's answer says the period was computed from a stale
    /// one (asked again once).
    pub fn stale_anchor(&mut self, reply: &RedisReply) -> Option<u32> {
        if self.reanchored || self.kind != ReportKind::Usage {
            return None;
        }
        let RedisReply::Array(items) = reply else {
            return None;
        };
        let recorded = match items.get(1) {
            Some(RedisReply::Bulk(day)) => std::str::from_utf8(day).ok()?.parse().ok(),
            _ => None,
        };
        let in_force = recorded.unwrap_or(self.claimed_anchor);
        (in_force != self.anchor).then(|| {
            self.reanchored = true;
            in_force
        })
    }

    /// The one Redis call that answers it.
    pub fn command(&self, plans: &Plans, now_ms: u64) -> RedisCommand {
        match &self.kind {
            ReportKind::Usage => {
                let actions = plans.actions();
                let mut cmd = RedisCommand::new("FCALL")
                    .arg(USAGE)
                    .arg((6 + actions.len()).to_string())
                    .arg(self.keys.summary(&self.period.id))
                    .arg(self.keys.entitlement());
                for gauge in [Gauge::Storage, Gauge::Team] {
                    cmd = cmd
                        .arg(self.keys.gauge(gauge))
                        .arg(self.keys.gauge_held(gauge));
                }
                for action in actions {
                    cmd = cmd.arg(self.keys.pending(&self.period.id, &action.key));
                }
                cmd = cmd.arg(now_ms.to_string());
                for action in actions {
                    cmd = cmd.arg(&action.key);
                }
                cmd
            }
            ReportKind::History {
                from,
                to,
                action,
                by_kind,
            } => {
                let days = days(*from, *to);
                let mut cmd = RedisCommand::new("FCALL")
                    .arg(HISTORY)
                    .arg((1 + days.len()).to_string())
                    .arg(self.keys.entitlement());
                for day in &days {
                    cmd = cmd.arg(self.keys.day(&day.to_string()));
                }
                for field in history_fields(plans, action.as_deref(), *by_kind) {
                    cmd = cmd.arg(field.to_string());
                }
                cmd
            }
        }
    }

    /// The answer to the caller: the report (200), or 503 when Redis did not answer.
    pub fn answer(
        &self,
        reply: Result<RedisReply, TransportError>,
        plans: &Plans,
        now: DateTime<Utc>,
    ) -> LocalResponse {
        let body = match &self.kind {
            ReportKind::Usage => reply.and_then(|r| self.usage(r, plans, now)),
            ReportKind::History {
                from,
                to,
                action,
                by_kind,
            } => reply.and_then(|r| {
                let fields = history_fields(plans, action.as_deref(), *by_kind);
                self.history(r, *from, *to, &fields)
            }),
        };
        match body {
            Ok(body) => responses::report(body),
            Err(_) => responses::usage_unavailable("usage"),
        }
    }

    /// The plan in force: billing's record, else the token's claim, else the default plan
    /// (also for a name plans.json does not know).
    fn plan<'p>(&self, plans: &'p Plans, recorded: Option<String>) -> &'p Plan {
        recorded
            .as_deref()
            .and_then(|name| plans.plan(name))
            .or_else(|| self.claimed_plan.as_deref().and_then(|n| plans.plan(n)))
            .unwrap_or(plans.default_plan())
    }

    fn usage(
        &self,
        reply: RedisReply,
        plans: &Plans,
        now: DateTime<Utc>,
    ) -> Result<Value, TransportError> {
        let (recorded, numbers) = split(reply, 2, 4 + 3 * plans.actions().len())
            .ok_or_else(|| TransportError::BadReply("plan_limits_usage".into()))?;
        let plan = self.plan(plans, recorded.into_iter().next().flatten());
        let (gauges, numbers) = numbers.split_at(4);
        let (stored, held, invited, inviting) = match gauges {
            [stored, held, invited, inviting] => (*stored, *held, *invited, *inviting),
            _ => (0, 0, 0, 0),
        };
        // The subscriber is one of the team's members.
        let members = invited.saturating_add(1);
        let mut actions = Map::new();
        for (action, counts) in plans.actions().iter().zip(numbers.chunks(3)) {
            let (used, in_flight, granted) = match counts {
                [used, in_flight, granted] => (*used, *in_flight, *granted),
                _ => (0, 0, 0),
            };
            let terms = action.terms(Some(&plan.key));
            // The plan's limit plus what an operator granted this period.
            let limit = terms.limit.map(|l| l.saturating_add(granted));
            let mut entry = json!({
                    "label": action.label,
                    "unit": action.unit,
                    "available": terms.feature == FeatureAccess::Included,
                    "used": used,
                    "in_flight": in_flight,
                    "limit": limit,
                    "granted": granted,
                    "remaining": limit.map(|l| l.saturating_sub(used.saturating_add(in_flight))),
                    "percentage": limit.map(|l| responses::percentage(used.saturating_add(in_flight), l)),
            });
            // Successes the plan allows past the limit, and how many of them are taken.
            if let (Some(limit), Value::Object(fields)) =
                (limit.filter(|_| terms.grace > 0), &mut entry)
            {
                let taken = used.saturating_add(in_flight).saturating_sub(limit);
                fields.insert(
                    "grace".into(),
                    json!({"units": terms.grace, "used": taken.min(terms.grace)}),
                );
            }
            actions.insert(action.key.clone(), entry);
        }
        let upgrade = plan
            .upgrade_path
            .first()
            .and_then(|step| plans.plan(&step.key))
            .map(|next| offer(next));
        Ok(json!({
            "user": self.user,
            "plan": {"key": plan.key, "name": plan.name},
            "period": {
                "id": self.period.id,
                "start": period::rfc3339(self.period.start, false),
                "end": period::rfc3339(self.period.end, false),
                "resets_at": self.period.resets_at(),
                "seconds_to_reset": self.period.seconds_until_end(now),
            },
            "actions": actions,
            "files": {"max_file_size_bytes": plan.max_file_size_bytes},
            "storage": {
                "used_bytes": stored,
                "in_flight_bytes": held,
                "limit_bytes": plan.storage_bytes,
                "remaining_bytes": plan
                    .storage_bytes
                    .map(|room| room.saturating_sub(stored.saturating_add(held))),
            },
            "team": {
                "members": members,
                "in_flight": inviting,
                "limit": plan.team_members,
                "remaining": plan
                    .team_members
                    .map(|room| room.saturating_sub(members.saturating_add(inviting))),
            },
            "features": plan.features,
            "upgrade": upgrade,
            "upgrade_url": plan.upgrade_url,
        }))
    }

    fn history(
        &self,
        reply: RedisReply,
        from: NaiveDate,
        to: NaiveDate,
        fields: &[HistoryField],
    ) -> Result<Value, TransportError> {
        let dates = days(from, to);
        let (_, numbers) = split(reply, 1, dates.len() * fields.len())
            .ok_or_else(|| TransportError::BadReply("plan_limits_history".into()))?;
        let actions: Vec<&str> = fields
            .iter()
            .filter(|f| f.kind.is_none())
            .map(|f| f.action)
            .collect();
        let mut totals: BTreeMap<&str, u64> = actions.iter().map(|a| (*a, 0)).collect();
        let mut kind_totals: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
        let mut out = Vec::with_capacity(dates.len());
        for (date, counts) in dates.iter().zip(numbers.chunks(fields.len().max(1))) {
            let mut day = Map::new();
            let mut kinds: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            let mut total = 0u64;
            for (field, n) in fields.iter().zip(counts) {
                match field.kind {
                    None => {
                        total = total.saturating_add(*n);
                        if let Some(sum) = totals.get_mut(field.action) {
                            *sum = sum.saturating_add(*n);
                        }
                        day.insert(field.action.to_string(), (*n).into());
                    }
                    Some(kind) => {
                        kinds.entry(field.action).or_default().insert(kind, *n);
                        let sum = kind_totals.entry(field.action).or_default();
                        *sum.entry(kind).or_default() += *n;
                    }
                }
            }
            let mut entry = Map::new();
            entry.insert("date".into(), date.to_string().into());
            entry.insert("counts".into(), day.into());
            entry.insert("total".into(), total.into());
            if !kinds.is_empty() {
                entry.insert("by_kind".into(), json!(kinds));
            }
            out.push(Value::Object(entry));
        }
        let mut answer = Map::new();
        answer.insert("user".into(), self.user.clone().into());
        answer.insert("from".into(), from.to_string().into());
        answer.insert("to".into(), to.to_string().into());
        answer.insert("actions".into(), json!(actions));
        answer.insert("days".into(), out.into());
        answer.insert("totals".into(), json!(totals));
        if !kind_totals.is_empty() {
            answer.insert("totals_by_kind".into(), json!(kind_totals));
        }
        Ok(Value::Object(answer))
    }
}

/// What the next plan up gives.
fn offer(plan: &Plan) -> Value {
    json!({
        "plan": plan.key,
        "name": plan.name,
        "limits": plan.limits,
        "max_file_size_bytes": plan.max_file_size_bytes,
        "storage_bytes": plan.storage_bytes,
        "team_members": plan.team_members,
        "features": plan.features,
    })
}

/// Every day from `from` to `to`, both included.
fn days(from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
    from.iter_days().take_while(|d| *d <= to).collect()
}

/// One counter of a day a history reads: an action's, or an action's of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HistoryField<'p> {
    action: &'p str,
    kind: Option<&'p str>,
}

impl std::fmt::Display for HistoryField<'_> {
    /// Its field in the day's hash (`plan_limits_settle` names them so).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            None => f.write_str(self.action),
            Some(kind) => write!(f, "{}:{kind}", self.action),
        }
    }
}

/// The counters a history covers: the action asked for, or all; with `by_kind`, then each
/// kind (and `other`) of the actions that record one.
fn history_fields<'p>(
    plans: &'p Plans,
    only: Option<&str>,
    by_kind: bool,
) -> Vec<HistoryField<'p>> {
    let actions = plans
        .actions()
        .iter()
        .filter(|a| only.is_none_or(|o| o == a.key));
    let mut fields: Vec<HistoryField> = actions
        .clone()
        .map(|a| HistoryField {
            action: &a.key,
            kind: None,
        })
        .collect();
    if by_kind {
        for action in actions {
            let kinds = action.kind.iter().flat_map(|k| k.allowed.iter());
            for kind in kinds
                .map(String::as_str)
                .chain(action.kind.as_ref().map(|_| "other"))
            {
                fields.push(HistoryField {
                    action: &action.key,
                    kind: Some(kind),
                });
            }
        }
    }
    fields
}

/// A read-side reply: `texts` of billing's record (each nil when absent), then exactly `n`
/// counts.
fn split(reply: RedisReply, texts: usize, n: usize) -> Option<(Vec<Option<String>>, Vec<u64>)> {
    let RedisReply::Array(items) = reply else {
        return None;
    };
    if items.len() != texts + n {
        return None;
    }
    let (head, rest) = items.split_at(texts);
    let head = head
        .iter()
        .map(|item| match item {
            RedisReply::Bulk(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        })
        .collect();
    let counts = rest
        .iter()
        .map(|item| match item {
            RedisReply::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        })
        .collect::<Option<Vec<u64>>>()?;
    Some((head, counts))
}

/// The history's query (`?from=YYYY-MM-DD&to=YYYY-MM-DD[&action=A][&by=kind]`): by default the 30
/// to today; at most `history_retention_days` days; 400 naming the parameter otherwise.
pub fn history_query(
    plans: &Plans,
    path: &str,
    now: DateTime<Utc>,
) -> Result<ReportKind, LocalResponse> {
    let param = |name: &str| routes::query_param(path, name);
    let date = |name: &str| -> Result<Option<NaiveDate>, LocalResponse> {
        match param(name) {
            None => Ok(None),
            Some(raw) => parse_date(&raw)
                .map(Some)
                .ok_or_else(|| responses::bad_request(name, "not a date (YYYY-MM-DD)")),
        }
    };
    let retention = u64::from(plans.redis.history_retention_days.max(1));
    let to = date("to")?.unwrap_or_else(|| now.date_naive());
    let from = match date("from")? {
        Some(from) => from,
        None => to
            .checked_sub_days(Days::new(29.min(retention - 1)))
            .unwrap_or(to),
    };
    if from > to {
        return Err(responses::bad_request("from", "is after to"));
    }
    let span = u64::try_from((to - from).num_days())
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    if span > retention {
        return Err(responses::bad_request(
            "from",
            &format!("the range is {span} days; at most {retention} (history_retention_days)"),
        ));
    }
    let action = param("action");
    if let Some(name) = &action {
        if !plans.actions().iter().any(|a| &a.key == name) {
            return Err(responses::bad_request("action", "no such action"));
        }
    }
    let by_kind = match param("by").as_deref() {
        None => false,
        Some("kind") => true,
        Some(_) => return Err(responses::bad_request("by", "only `kind` is known")),
    };
    Ok(ReportKind::History {
        from,
        to,
        action,
        by_kind,
    })
}

/// `YYYY-MM-DD`, digits only.
fn parse_date(raw: &str) -> Option<NaiveDate> {
    let bytes = raw.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = bytes.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if bytes.len() != 10 || bytes.get(4) != Some(&b'-') || bytes.get(7) != Some(&b'-') {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(5..7)?, digits(8..10)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{now, plans};

    fn bulk(s: &str) -> RedisReply {
        RedisReply::Bulk(s.as_bytes().to_vec())
    }

    fn status_of(r: &Result<ReportKind, LocalResponse>) -> Option<(u32, Value)> {
        r.as_ref()
            .err()
            .map(|e| (e.status, serde_json::from_str(&e.body).unwrap()))
    }

    #[test]
    fn dates_are_strict() {
        assert_eq!(
            parse_date("2026-11-29"),
            NaiveDate::from_ymd_opt(2026, 11, 29)
        );
        for bad in [
            "2026-11-31",
            "2026-1-29",
            "26-11-29",
            "2026-11-29x",
            "",
            "2026/11/29",
            "+026-11-29",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_history_query_is_checked_and_names_the_parameter() {
        let p = plans();
        let ok = history_query(&p, "/h?from=2026-11-01&to=2026-11-29&action=upload", now());
        assert_eq!(
            ok.unwrap(),
            ReportKind::History {
                from: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
                to: NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(),
                action: Some("upload".into()),
                by_kind: false,
            }
        );
        // By default the 30 days to today.
        let Ok(ReportKind::History { from, to, .. }) = history_query(&p, "/h", now()) else {
            panic!()
        };
        assert_eq!(
            (from.to_string(), to.to_string()),
            ("2026-10-29".into(), "2026-11-27".into())
        );
        for (query, field) in [
            ("?from=2026-13-01", "from"),
            ("?to=yesterday", "to"),
            ("?from=2026-11-29&to=2026-11-01", "from"),
            ("?from=2026-01-01&to=2026-11-01", "from"),
            ("?action=teleport", "action"),
            ("?by=plan", "by"),
        ] {
            let r = history_query(&p, &format!("/h{query}"), now());
            let (status, body) = status_of(&r).unwrap_or_else(|| panic!("{query} accepted"));
            assert_eq!(
                (status, body["field"].as_str()),
                (400, Some(field)),
                "{query}"
            );
        }
        // 90 days is the longest range.
        assert!(history_query(&p, "/h?from=2026-08-30&to=2026-11-27", now()).is_ok());
        assert!(history_query(&p, "/h?from=2026-08-29&to=2026-11-27", now()).is_err());
    }

    #[test]
    fn usage_reads_one_call_and_prefers_billings_plan() {
        let p = plans();
        let report = Report::new(
            ReportKind::Usage,
            "u".into(),
            Some("free".into()),
            0,
            &p,
            now(),
        );
        let text: Vec<String> = report
            .command(&p, 1000)
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into())
            .collect();
        assert_eq!(
            &text[..5],
            [
                "FCALL",
                "plan_limits_usage",
                "13",
                "plan-limits:{u}:2026-11",
                "plan-limits:{u}:entitlement"
            ]
        );
        // Actions in plans.json's order: ai_analysis, api_call, dxf_export, pdf_export,
        // procedure_view, team_invite, upload.
        assert_eq!(
            &text[text.len() - 8..text.len() - 6],
            ["1000", "ai_analysis"]
        );
        // Billing's plan and anchor, stored and held bytes, members invited and invites in
        // flight, then per action its count, what is in flight and what was granted.
        let reply = |plan: RedisReply| {
            let mut items = vec![plan, RedisReply::Nil];
            items.extend([1024, 0, 0, 0].map(RedisReply::Int));
            items.extend([0; 18].map(RedisReply::Int));
            items.extend([2, 2, 1].map(RedisReply::Int));
            RedisReply::Array(items)
        };
        let r = report.answer(Ok(reply(RedisReply::Nil)), &p, now());
        assert_eq!(r.status, 200);
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["plan"]["key"], "free");
        assert_eq!(
            body["actions"]["upload"],
            json!({"label": "upload", "unit": "diagrams", "available": true, "used": 2,
                   "in_flight": 2, "limit": 6, "granted": 1, "remaining": 2, "percentage": 66})
        );
        assert_eq!(body["actions"]["dxf_export"]["available"], false);
        assert_eq!(body["actions"]["procedure_view"]["limit"], Value::Null);
        assert_eq!(body["actions"]["procedure_view"]["percentage"], Value::Null);
        assert_eq!(body["upgrade"]["plan"], "professional");
        assert_eq!(body["upgrade"]["limits"]["upload"], Value::Null);
        assert_eq!(body["period"]["resets_at"], "2026-12-01T00:00:00Z");
        assert_eq!(body["files"]["max_file_size_bytes"], 10 * 1024 * 1024);
        assert_eq!(body["storage"]["used_bytes"], 1024);
        assert_eq!(body["storage"]["remaining_bytes"], (1u64 << 30) - 1024);
        assert_eq!(
            body["team"],
            json!({"members": 1, "in_flight": 0, "limit": 1, "remaining": 0}),
            "the subscriber is the team's one member"
        );
        // Billing's record wins over the claim.
        let r = report.answer(Ok(reply(bulk("enterprise"))), &p, now());
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["plan"]["key"], "enterprise");
        assert_eq!(body["upgrade"], Value::Null);
        // Redis did not answer (or not as the function does): 503.
        let r = report.answer(Err(TransportError::Unknown("timeout".into())), &p, now());
        assert_eq!(r.status, 503);
        let short = RedisReply::Array(vec![RedisReply::Nil, RedisReply::Int(1)]);
        assert_eq!(report.answer(Ok(short), &p, now()).status, 503);
    }

    #[test]
    fn history_has_every_day_and_totals() {
        let p = plans();
        let query = "/h?from=2026-11-25&to=2026-11-27&action=upload";
        let kind = history_query(&p, query, now()).unwrap();
        let report = Report::new(kind, "u".into(), None, 0, &p, now());
        let text: Vec<String> = report
            .command(&p, 0)
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into())
            .collect();
        assert_eq!(
            text,
            [
                "FCALL",
                "plan_limits_history",
                "4",
                "plan-limits:{u}:entitlement",
                "plan-limits:{u}:day:2026-11-25",
                "plan-limits:{u}:day:2026-11-26",
                "plan-limits:{u}:day:2026-11-27",
                "upload"
            ]
        );
        let reply = RedisReply::Array(vec![
            RedisReply::Nil,
            RedisReply::Int(1),
            RedisReply::Int(0),
            RedisReply::Int(2),
        ]);
        let body: Value = serde_json::from_str(&report.answer(Ok(reply), &p, now()).body).unwrap();
        assert_eq!(body["actions"], json!(["upload"]));
        assert_eq!(
            body["days"][1],
            json!({"date": "2026-11-26", "counts": {"upload": 0}, "total": 0})
        );
        assert_eq!(body["totals"], json!({"upload": 3}));
    }

    #[test]
    fn history_by_kind_reads_each_kind_and_other_and_keeps_the_total_whole() {
        let p = plans();
        let query = "/h?from=2026-11-27&to=2026-11-27&action=ai_analysis&by=kind";
        let kind = history_query(&p, query, now()).unwrap();
        let report = Report::new(kind, "u".into(), None, 0, &p, now());
        let fields: Vec<String> = report.command(&p, 0).args[5..]
            .iter()
            .map(|a| String::from_utf8_lossy(a).into())
            .collect();
        assert_eq!(
            fields,
            [
                "ai_analysis",
                "ai_analysis:chat",
                "ai_analysis:vision",
                "ai_analysis:photo",
                "ai_analysis:explain",
                "ai_analysis:reassess",
                "ai_analysis:other"
            ]
        );
        let counts = [3, 1, 2, 0, 0, 0, 0].map(RedisReply::Int);
        let reply = RedisReply::Array([vec![RedisReply::Nil], counts.to_vec()].concat());
        let body: Value = serde_json::from_str(&report.answer(Ok(reply), &p, now()).body).unwrap();
        assert_eq!(body["days"][0]["total"], 3);
        assert_eq!(body["days"][0]["by_kind"]["ai_analysis"]["vision"], 2);
        assert_eq!(
            body["totals_by_kind"]["ai_analysis"],
            json!({"chat": 1, "vision": 2, "photo": 0, "explain": 0, "reassess": 0, "other": 0})
        );
    }
}
