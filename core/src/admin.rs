//! The operator's writes, as data (`plan-limits set-plan`, `grant`, `reset`): each is one
//! MULTI/EXEC transaction that also appends an `admin` event to the event stream, so every
//! change of what a user may do is on record next to the usage it changes. Run as an admin:
//! the filter's Redis user may not write these. A running gateway sees them at its next
//! reservation for the user (a refusal it remembers lasts `deny_cache_ms` at most; a plan it
//! learnt for unlimited actions, `entitlement_cache_ms`).

use chrono::{DateTime, Utc};

use crate::keys::UserKeys;
use crate::period::{self, BillingPeriod};
use crate::plans::Plans;
use crate::redis::RedisCommand;

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOp {
    /// Billing's plan for the user (it wins over a token's claim), and the anchor day its
    /// periods run from (kept as it was when not given).
    SetPlan {
        plan: String,
        anchor_day: Option<u32>,
    },
    /// `units` more of `action` this period, on top of the plan's limit.
    Grant { action: String, units: u64 },
    /// The period's counts back to zero: one action's, or every action's. Grants stay.
    Reset { action: Option<String> },
}

impl AdminOp {
    fn name(&self) -> &'static str {
        match self {
            AdminOp::SetPlan { .. } => "set_plan",
            AdminOp::Grant { .. } => "grant",
            AdminOp::Reset { .. } => "reset",
        }
    }
}

/// The transaction for `op` on `user` now, by `operator`, in the period of the user's anchor
/// day (`anchor`, as billing recorded it; 0: the calendar month); an error names what
/// plans.json does not know.
pub fn transaction(
    plans: &Plans,
    user: &str,
    op: &AdminOp,
    operator: &str,
    anchor: u32,
    now: DateTime<Utc>,
) -> Result<Vec<RedisCommand>, String> {
    let keys = UserKeys::new(&plans.redis.key_prefix, user);
    let period = BillingPeriod::anchored(now, anchor);
    let summary = keys.summary(&period.id);
    let at = period::rfc3339(now, true);
    let known_action = |action: &str| {
        if plans.actions().iter().any(|a| a.key == action) {
            Ok(())
        } else {
            let known: Vec<&str> = plans.actions().iter().map(|a| a.key.as_str()).collect();
            Err(format!(
                "action {action:?} is not in plans.json: one of {}",
                known.join(", ")
            ))
        }
    };
    let mut event = vec![
        ("event", "admin".to_string()),
        ("op", op.name().to_string()),
        ("user", user.to_string()),
    ];
    let mut writes = Vec::new();
    match op {
        AdminOp::SetPlan { plan, anchor_day } => {
            if anchor_day.is_some_and(|day| !(1..=31).contains(&day)) {
                return Err("--anchor-day is a day of the month, 1 to 31".into());
            }
            if plans.plan(plan).is_none() {
                let known: Vec<&str> = plans.plans().iter().map(|p| p.key.as_str()).collect();
                return Err(format!(
                    "plan {plan:?} is not in plans.json: one of {}",
                    known.join(", ")
                ));
            }
            let mut hset = RedisCommand::new("HSET")
                .arg(keys.entitlement())
                .arg("plan")
                .arg(plan)
                .arg("updated_at")
                .arg(&at);
            event.push(("plan", plan.clone()));
            if let Some(day) = anchor_day {
                hset = hset.arg("anchor_day").arg(day.to_string());
                event.push(("anchor_day", day.to_string()));
            }
            writes.push(hset);
        }
        AdminOp::Grant { action, units } => {
            known_action(action)?;
            writes.push(
                RedisCommand::new("HINCRBY")
                    .arg(&summary)
                    .arg(format!("grant:{action}"))
                    .arg(units.to_string()),
            );
            // Kept as long as the period's summary would be.
            let keep_for = keep_summary_ms(plans, &period, now);
            writes.push(
                RedisCommand::new("PEXPIRE")
                    .arg(&summary)
                    .arg(keep_for.to_string())
                    .arg("NX"),
            );
            event.push(("action", action.clone()));
            event.push(("units", units.to_string()));
        }
        AdminOp::Reset { action } => {
            let actions: Vec<&str> = match action {
                Some(action) => {
                    known_action(action)?;
                    vec![action.as_str()]
                }
                None => plans.actions().iter().map(|a| a.key.as_str()).collect(),
            };
            let mut hdel = RedisCommand::new("HDEL").arg(&summary);
            for action in &actions {
                hdel = hdel.arg(action);
            }
            writes.push(hdel);
            event.push(("action", action.clone().unwrap_or_default()));
        }
    }
    event.push(("period", period.id.clone()));
    event.push(("at", at));
    event.push(("operator", operator.to_string()));
    // On a cluster, the stream of the user's slot: one transaction is one slot.
    let mut xadd = RedisCommand::new("XADD")
        .arg(crate::cluster::events_stream_of(
            &plans.redis,
            &keys.entitlement(),
        ))
        .arg("*");
    for (field, value) in &event {
        xadd = xadd.arg(field).arg(value);
    }
    writes.push(xadd);
    Ok(writes)
}

/// How long a summary written now is kept: until its period ends plus the retention.
fn keep_summary_ms(plans: &Plans, period: &BillingPeriod, now: DateTime<Utc>) -> u64 {
    let retention = chrono::Duration::days(i64::from(plans.redis.summary_retention_days));
    let until = period
        .end
        .checked_add_signed(retention)
        .unwrap_or(period.end);
    u64::try_from((until - now).num_milliseconds()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{now, plans};

    fn texts(commands: &[RedisCommand]) -> Vec<Vec<String>> {
        commands
            .iter()
            .map(|c| {
                c.args
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_grant_adds_units_for_the_period_and_is_recorded() {
        let p = plans();
        let op = AdminOp::Grant {
            action: "upload".into(),
            units: 3,
        };
        let t = texts(&transaction(&p, "a b", &op, "ops", 0, now()).unwrap());
        assert_eq!(
            t[0],
            [
                "HINCRBY",
                "plan-limits:{a%20b}:2026-11",
                "grant:upload",
                "3"
            ]
        );
        assert_eq!(t[1][..2], ["PEXPIRE", "plan-limits:{a%20b}:2026-11"]);
        assert_eq!(
            t[2],
            [
                "XADD",
                "plan-limits:events",
                "*",
                "event",
                "admin",
                "op",
                "grant",
                "user",
                "a b",
                "action",
                "upload",
                "units",
                "3",
                "period",
                "2026-11",
                "at",
                "2026-11-27T12:00:00.000Z",
                "operator",
                "ops"
            ]
        );
    }

    #[test]
    fn on_a_cluster_the_admin_event_goes_to_the_users_slot() {
        let p = Plans::from_json(
            crate::testing::plans_json_with(|v| v["redis"]["cluster_mode"] = true.into())
                .as_bytes(),
        )
        .unwrap();
        let op = AdminOp::Reset { action: None };
        let commands = transaction(&p, "alice", &op, "ops", 0, now()).unwrap();
        let slots: Vec<u16> = commands
            .iter()
            .map(|c| crate::cluster::key_slot(&c.args[1]))
            .collect();
        assert_eq!(slots, [749, 749], "{:?}", texts(&commands));
        assert!(texts(&commands)[1][1].starts_with("plan-limits:events:749:{"));
    }

    #[test]
    fn a_reset_clears_the_periods_counts_and_unknown_names_are_refused() {
        let p = plans();
        let all = AdminOp::Reset { action: None };
        let t = texts(&transaction(&p, "u", &all, "ops", 0, now()).unwrap());
        assert_eq!(
            t[0].len(),
            2 + p.actions().len(),
            "every action: {:?}",
            t[0]
        );
        let bad = AdminOp::Grant {
            action: "teleport".into(),
            units: 1,
        };
        let err = transaction(&p, "u", &bad, "ops", 0, now()).unwrap_err();
        assert!(err.contains("\"teleport\" is not in plans.json"), "{err}");
        let out_of_range = AdminOp::SetPlan {
            plan: "free".into(),
            anchor_day: Some(32),
        };
        assert!(transaction(&p, "u", &out_of_range, "ops", 0, now()).is_err());
        // The period of the user's anchor day.
        let grant = AdminOp::Grant {
            action: "upload".into(),
            units: 1,
        };
        let t = texts(&transaction(&p, "u", &grant, "ops", 15, now()).unwrap());
        assert_eq!(t[0][1], "plan-limits:{u}:2026-11-15");
        let bad = AdminOp::SetPlan {
            plan: "gold".into(),
            anchor_day: None,
        };
        let err = transaction(&p, "u", &bad, "ops", 0, now()).unwrap_err();
        assert!(
            err.contains("one of enterprise, free, professional"),
            "{err}"
        );
    }
}
