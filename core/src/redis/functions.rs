//! The filter's Redis functions (`plan_limits.lua`, one Redis Functions library) and the
//! commands that call them. An admin loads the library once (`load_library`); the filter's
//! Redis user may run `FCALL` and nothing else, and no script travels with a request.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write;

use super::{RedisCommand, RedisReply, TransportError};
use crate::config::{Gauge, Invoke, Limit};
use crate::keys::UsageKeys;
use crate::settlement::Settlement;

/// The library's source.
pub const LIBRARY: &str = include_str!("plan_limits.lua");

const RESERVE: &str = "plan_limits_reserve";
const RESERVE_MANY: &str = "plan_limits_reserve_many";
/// Keys per reservation, and items per answer.
const RESERVE_KEYS: usize = 8;
const RESERVATION_ITEMS: usize = 12;
const SETTLE: &str = "plan_limits_settle_v2";
/// The settlement format of filters older than `SETTLE` (each item's keys named in full), which
/// the library still applies: a rolling upgrade loses nothing.
const SETTLE_V1: &str = "plan_limits_settle";
/// The read side's (`reports`).
pub const USAGE: &str = "plan_limits_usage";
pub const PERIOD: &str = "plan_limits_period";
pub const HISTORY: &str = "plan_limits_history";
/// Every function the library registers.
pub const FUNCTIONS: [&str; 7] = [
    RESERVE,
    RESERVE_MANY,
    SETTLE_V1,
    SETTLE,
    USAGE,
    PERIOD,
    HISTORY,
];

/// Loads (or replaces) the library: an admin's command, never the filter's.
pub fn load_library() -> RedisCommand {
    RedisCommand::new("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
}

// SCRIPT_SHAS and SCRIPT_SOURCES: each function as a script for `EVAL`/`EVALSHA` (Envoy's
// `redis_proxy` forwards those, not `FCALL`), made by build.rs from the library's own source:
// its functions registered into a local table instead of Redis's, then the one asked for
// called with the script's `KEYS` and `ARGV`.
include!(concat!(env!("OUT_DIR"), "/scripts.rs"));

/// `function`'s script; `None` for a function the library does not register.
pub fn script(function: &str) -> Option<&'static str> {
    SCRIPT_SOURCES
        .iter()
        .find(|(name, _)| *name == function)
        .map(|(_, source)| *source)
}

/// The SHA1 `EVALSHA` names `function`'s script by.
pub fn script_sha(function: &str) -> Option<&'static str> {
    SCRIPT_SHAS
        .iter()
        .find(|(name, _)| *name == function)
        .map(|(_, sha)| *sha)
}

/// Loads every function's script (`SCRIPT LOAD`): an admin's commands, on every master,
/// again after a master restarts (Redis does not keep scripts).
pub fn load_scripts() -> Vec<RedisCommand> {
    FUNCTIONS
        .iter()
        .filter_map(|name| script(name))
        .map(|source| RedisCommand::new("SCRIPT").arg("LOAD").arg(source))
        .collect()
}

/// `command` (an `FCALL` of the library) as `invoke` calls it: `EVALSHA <sha>` takes the
/// place of `FCALL <function>`; keys and arguments stay as they are.
pub fn invoked(mut command: RedisCommand, invoke: Invoke) -> RedisCommand {
    if invoke == Invoke::Evalsha && command.args.first().map(Vec::as_slice) == Some(b"FCALL") {
        let sha = command
            .args
            .get(1)
            .and_then(|name| std::str::from_utf8(name).ok())
            .and_then(script_sha);
        if let (Some(sha), [name, function, ..]) = (sha, command.args.as_mut_slice()) {
            *name = b"EVALSHA".to_vec();
            *function = sha.as_bytes().to_vec();
        }
    }
    command
}

/// The error a call gets when the library is not loaded, in words an operator can act on.
pub fn explain(error: TransportError) -> TransportError {
    match error {
        TransportError::NotSent(message) if message.contains("Function not found") => {
            TransportError::NotSent(format!(
                "{message}: the plan_limits library is not loaded in Redis, or is older than this filter (plan-limits functions load)"
            ))
        }
        TransportError::NotSent(message) if message.starts_with("NOSCRIPT") => {
            TransportError::NotSent(format!(
                "{message}: the plan_limits scripts are not loaded on this Redis master (plan-limits functions load)"
            ))
        }
        other => other,
    }
}

/// What `plan_limits_reserve` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub status: ReserveStatus,
    /// Units counted this period (successes already committed).
    pub committed: u64,
    /// Reservations in flight, this one included when granted.
    pub pending: u64,
    /// The plan applied: the entitlement record's, else the claimed, else the fallback.
    pub plan: String,
    /// The plan the record or the claim named (not `plan` when it is unknown).
    pub named_plan: String,
    /// Billing's record named it (rather than the caller's claim).
    pub recorded: bool,
    /// Extra units an operator granted for the period: the limit is the plan's plus these.
    pub granted: u64,
    /// For a duplicate: what the first request's marker says (`pending:<id>`, `done:<time>`).
    pub first: String,
    /// The subscription's anchor day billing recorded, if any.
    pub recorded_anchor: Option<u32>,
    /// The user's running total the action adds to, and what requests in flight hold of it
    /// (this one's not included), when it was checked.
    pub total: u64,
    pub total_held: u64,
    /// Units held besides this request's own, for its worker's lease (`<id>#1` ...).
    pub leased: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveStatus {
    Granted,
    /// The limit is reached.
    Refused,
    /// The plan has no limit for the action: nothing was reserved.
    Unlimited,
    /// The plan is not one of plans.json's: nothing was reserved.
    UnknownPlan,
    /// A request with the same idempotency key was made: nothing was reserved.
    Duplicate,
    /// The request does not fit in the running total it adds to (storage, team): nothing
    /// was reserved.
    Full,
    /// The user has as many idempotency keys remembered as it may: nothing was reserved.
    TooManyKeys,
}

/// One request's reservation.
#[derive(Debug, Clone, Copy)]
pub struct ReserveArgs<'a> {
    pub keys: &'a UsageKeys,
    pub action: &'a str,
    /// The plan the caller claims (its token's), used when billing recorded none.
    pub claimed_plan: &'a str,
    /// Applied when the named plan is unknown; `None` leaves it unknown (refused).
    pub fallback_plan: Option<&'a str>,
    pub reservation_id: &'a str,
    pub now_ms: u64,
    pub ttl_ms: u64,
    /// Every plan's limit for the action, so the entitlement's plan is known in the same call.
    pub limits: &'a [(String, Limit)],
    /// The idempotency key's marker, if the client sent a key.
    pub idempotency: Option<IdempotencyMark<'a>>,
    /// For a request that adds to a running total: what it holds there while in flight.
    pub gauge: Option<GaugeHold<'a>>,
    /// A lease asked for with it (its units, the room it needs: that many times as many).
    pub lease: Option<LeaseAsk>,
    /// Where a reservation found expired unsettled is recorded (the user's events stream),
    /// with the user and the period it is named by.
    pub events_stream: &'a str,
    pub user: &'a str,
    pub period_id: &'a str,
}

/// A request's idempotency key, as Redis remembers it.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyMark<'a> {
    /// The key's marker, and how long it is kept (ms).
    pub marker: &'a str,
    pub ttl_ms: u64,
    /// The user's index of the keys it has remembered, and how many it may have at once.
    pub index: &'a str,
    pub max_keys: u64,
}

/// The lease a reservation asks for: `units` in all (its own included), granted only while at
/// least `room_factor` times as many remain.
#[derive(Debug, Clone, Copy)]
pub struct LeaseAsk {
    pub units: u64,
    pub room_factor: u64,
}

/// The id of a lease's `k`-th unit besides the reservation `id` it came with.
pub fn leased_unit_id(id: &str, k: u64) -> String {
    format!("{id}#{k}")
}

/// What a request holds of a running total while in flight.
#[derive(Debug, Clone, Copy)]
pub struct GaugeHold<'a> {
    pub gauge: Gauge,
    pub amount: u64,
    /// Every plan's room in it (`None`: unlimited).
    pub rooms: &'a [(String, Option<u64>)],
}

pub fn reserve(args: ReserveArgs) -> RedisCommand {
    let user = &args.keys.user;
    // A key a call does not use is named anyway (any of the user's: cluster routing).
    let filler = args.keys.entitlement.as_str();
    let marker = args.idempotency.map_or(filler, |m| m.marker);
    let index = args.idempotency.map_or(filler, |m| m.index);
    let gauge_keys = args.gauge.map_or_else(
        || (filler.to_string(), filler.to_string()),
        |hold| (user.gauge(hold.gauge), user.gauge_held(hold.gauge)),
    );
    let mut cmd = RedisCommand::new("FCALL")
        .arg(RESERVE)
        .arg(RESERVE_KEYS.to_string())
        .arg(&args.keys.summary)
        .arg(&args.keys.pending)
        .arg(&args.keys.entitlement)
        .arg(marker)
        .arg(gauge_keys.0)
        .arg(gauge_keys.1)
        .arg(args.events_stream)
        .arg(index)
        .arg(args.action)
        .arg(args.claimed_plan)
        .arg(args.fallback_plan.unwrap_or_default())
        .arg(args.reservation_id)
        .arg(args.now_ms.to_string())
        .arg(args.now_ms.saturating_add(args.ttl_ms).to_string())
        .arg(args.ttl_ms.to_string())
        .arg(
            args.idempotency
                .map(|m| m.ttl_ms.to_string())
                .unwrap_or_default(),
        )
        .arg(
            args.gauge
                .map(|hold| hold.amount.to_string())
                .unwrap_or_default(),
        )
        .arg(args.user)
        .arg(args.period_id)
        .arg(
            args.idempotency
                .map(|m| m.max_keys.to_string())
                .unwrap_or_default(),
        )
        .arg(args.lease.map(|l| l.units.to_string()).unwrap_or_default())
        .arg(
            args.lease
                .map(|l| l.room_factor.to_string())
                .unwrap_or_default(),
        );
    let room_of = |plan: &str| {
        args.gauge
            .and_then(|hold| hold.rooms.iter().find(|(p, _)| p == plan))
            .and_then(|(_, room)| *room)
    };
    for (plan, limit) in args.limits {
        cmd = cmd
            .arg(plan)
            .arg(limit.map(|n| n.to_string()).unwrap_or_default())
            .arg(room_of(plan).map(|n| n.to_string()).unwrap_or_default());
    }
    cmd
}

/// A `plan_limits_reserve` call's arguments after its keys: action, claimed plan, fallback
/// plan, reservation id, ... (empty for another command).
pub fn reserve_args(command: &RedisCommand) -> &[Vec<u8>] {
    match command.args.get(1).map(Vec::as_slice) {
        Some(name) if name == RESERVE.as_bytes() => {
            command.args.get(3 + RESERVE_KEYS..).unwrap_or_default()
        }
        _ => &[],
    }
}

pub fn parse_reservation(reply: RedisReply) -> Result<Reservation, TransportError> {
    let bad = |what: &RedisReply| TransportError::BadReply(format!("reserve returned {what:?}"));
    let RedisReply::Array(items) = reply else {
        return Err(match reply {
            RedisReply::Error(message) => explain(refusal_or_failure(message)),
            other => bad(&other),
        });
    };
    let count = |item: Option<&RedisReply>| match item {
        Some(RedisReply::Int(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    let status = match items.first() {
        Some(RedisReply::Int(1)) => Some(ReserveStatus::Granted),
        Some(RedisReply::Int(0)) => Some(ReserveStatus::Refused),
        Some(RedisReply::Int(2)) => Some(ReserveStatus::Unlimited),
        Some(RedisReply::Int(3)) => Some(ReserveStatus::UnknownPlan),
        Some(RedisReply::Int(4)) => Some(ReserveStatus::Duplicate),
        Some(RedisReply::Int(5)) => Some(ReserveStatus::Full),
        Some(RedisReply::Int(6)) => Some(ReserveStatus::TooManyKeys),
        _ => None,
    };
    let text = |item: Option<&RedisReply>| match item {
        Some(RedisReply::Bulk(bytes)) => String::from_utf8(bytes.clone()).ok(),
        Some(RedisReply::Status(text)) => Some(text.clone()),
        _ => None,
    };
    let recorded = match items.get(5) {
        Some(RedisReply::Int(flag @ (0 | 1))) => Some(*flag == 1),
        _ => None,
    };
    let parts = (
        status,
        count(items.get(1)),
        count(items.get(2)),
        text(items.get(3)),
        text(items.get(4)),
        recorded,
    );
    match parts {
        (
            Some(status),
            Some(committed),
            Some(pending),
            Some(plan),
            Some(named_plan),
            Some(recorded),
        ) if matches!(items.len(), 6..=RESERVATION_ITEMS) => Ok(Reservation {
            status,
            committed,
            pending,
            plan,
            named_plan,
            recorded,
            granted: count(items.get(6)).unwrap_or(0),
            first: text(items.get(7)).unwrap_or_default(),
            recorded_anchor: text(items.get(8)).and_then(|day| day.parse().ok()),
            total: count(items.get(9)).unwrap_or(0),
            total_held: count(items.get(10)).unwrap_or(0),
            leased: count(items.get(11)).unwrap_or(0),
        }),
        _ => Err(bad(&RedisReply::Array(items))),
    }
}

/// What a settlement batch is sent with besides its items.
#[derive(Debug, Clone, Copy)]
pub struct SettleArgs<'a> {
    pub events_stream: &'a str,
    pub events_trim: EventsTrim,
    pub now_ms: u64,
    /// Extended reservations expire this long from now.
    pub ttl_ms: u64,
    /// How long commit ids are remembered, so that a commit sent again counts once.
    pub remember_commits_ms: u64,
    /// How long daily counters are kept.
    pub keep_days_ms: u64,
    /// Shares of the limit (percent) whose crossing is recorded once as an event.
    pub warning_thresholds: &'a [u8],
    /// The sending worker's key of the last batch applied (in the batch's slot), the batch's
    /// sequence number, and how long Redis remembers it: a batch is applied once.
    pub applied_key: &'a str,
    pub seq: u64,
    pub applied_memory_ms: u64,
    /// What the worker still has queued besides this batch, and whether it is stopping: kept
    /// in its record, so a worker that went silent without stopping is known killed.
    pub queued: usize,
    pub stopping: bool,
}

/// How the event stream is kept from growing without bound (approximately: Redis trims whole
/// nodes of the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsTrim {
    /// Every event is kept.
    KeepAll,
    /// About this many of the newest.
    MaxLen(u64),
    /// Those recorded in the last this many milliseconds.
    MaxAgeMs(u64),
}

/// One `plan_limits_reserve_many` call for several `reserve` commands (in their order).
pub fn reserve_many(reservations: &[&RedisCommand]) -> RedisCommand {
    // A `reserve` command is FCALL, its name, the key count, its keys, its args.
    let head = 3;
    let mut cmd = RedisCommand::new("FCALL")
        .arg(RESERVE_MANY)
        .arg((RESERVE_KEYS * reservations.len()).to_string());
    for one in reservations {
        for key in one.args.iter().skip(head).take(RESERVE_KEYS) {
            cmd = cmd.arg(key.as_slice());
        }
    }
    for one in reservations {
        let args = one.args.get(head + RESERVE_KEYS..).unwrap_or_default();
        cmd = cmd.arg(args.len().to_string());
        for arg in args {
            cmd = cmd.arg(arg.as_slice());
        }
    }
    cmd
}

/// `plan_limits_reserve_many`'s answer, one reply per reservation (each as
/// `plan_limits_reserve` would have answered it); an error answers each alike.
pub fn split_reservations(
    reply: Result<RedisReply, TransportError>,
    n: usize,
) -> Vec<Result<RedisReply, TransportError>> {
    match reply {
        Ok(RedisReply::Array(items)) if items.len() == n * RESERVATION_ITEMS => items
            .chunks(RESERVATION_ITEMS)
            .map(|chunk| Ok(RedisReply::Array(chunk.to_vec())))
            .collect(),
        Ok(RedisReply::Array(items)) => {
            let what = format!("reserve_many returned {} items for {n}", items.len());
            vec![Err(TransportError::BadReply(what)); n]
        }
        other => vec![other; n],
    }
}

/// Arguments of a `plan_limits_settle_v2` call before its items' fields.
pub(crate) const SETTLE_ARGS: usize = 12;
/// Fields per item in `plan_limits_settle_v2`'s args (its keys' positions last).
pub(crate) const SETTLE_FIELDS: usize = 20;

/// One `plan_limits_settle_v2` call for a batch. Each key is named once however many items
/// use it, and an item's limits only when they differ from the item before's: a batch of one
/// busy user's settlements is about a third of what it was with each item's keys and limits in
/// full (encoded here, sent, parsed by webdis and Redis).
pub fn settle(batch: &[Settlement], args: SettleArgs) -> RedisCommand {
    // (Most items name the keys the item before named, a busy user's: not made again.)
    let sets: Vec<Option<[Cow<str>; 8]>> = batch
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let before = i.checked_sub(1).and_then(|b| batch.get(b));
            let repeats = before.is_some_and(|before| same_keys(before, item));
            (!repeats).then(|| item_keys(item))
        })
        .collect();
    let mut keys: Vec<&str> = vec![args.events_stream, args.applied_key];
    let mut position: HashMap<&str, usize> = HashMap::new();
    // One positions argument per run of items naming the same keys, and each item's run.
    let mut positions: Vec<String> = Vec::new();
    let mut runs: Vec<usize> = Vec::with_capacity(batch.len());
    for set in &sets {
        let Some(set) = set else {
            runs.push(positions.len().saturating_sub(1));
            continue;
        };
        let mut named = String::new();
        for key in set {
            let at = *position.entry(key).or_insert_with(|| {
                keys.push(key);
                keys.len()
            });
            if !named.is_empty() {
                named.push(' ');
            }
            let _ = write!(named, "{at}");
        }
        runs.push(positions.len());
        positions.push(named);
    }
    let mut cmd = RedisCommand::new("FCALL")
        .arg(SETTLE)
        .arg(keys.len().to_string());
    for key in &keys {
        cmd = cmd.arg(key);
    }
    let (trim, threshold) = match args.events_trim {
        EventsTrim::KeepAll => ("", String::new()),
        EventsTrim::MaxLen(n) => ("MAXLEN", n.to_string()),
        // Redis names events by its own clock: it turns the age into an id itself.
        EventsTrim::MaxAgeMs(ms) => ("MINID", ms.to_string()),
    };
    cmd = cmd
        .arg(trim)
        .arg(threshold)
        .arg(args.now_ms.to_string())
        .arg(args.ttl_ms.to_string())
        .arg(args.remember_commits_ms.to_string())
        .arg(args.keep_days_ms.to_string())
        .arg(
            args.warning_thresholds
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .arg(SETTLE_FIELDS.to_string())
        .arg(args.seq.to_string())
        .arg(args.applied_memory_ms.to_string())
        .arg(args.queued.to_string())
        .arg(if args.stopping { "1" } else { "" });
    debug_assert_eq!(cmd.args.len(), 3 + keys.len() + SETTLE_ARGS);
    let mut limits_before: Option<&str> = None;
    for (item, run) in batch.iter().zip(runs) {
        let before = cmd.args.len();
        let limits = &*item.limits_json;
        let limits_arg = match limits_before.replace(limits) {
            Some(previous) if previous == limits => "",
            _ => limits,
        };
        cmd = cmd
            .arg(item.mode.as_str())
            .arg(&item.reservation_id)
            .arg(&item.action)
            .arg(&item.user)
            .arg(&item.plan)
            .arg(limits_arg)
            .arg(&item.kind)
            .arg(item.bytes.to_string())
            .arg(item.status.to_string())
            .arg(&item.at)
            .arg(&item.request_id)
            .arg(&item.period_id)
            .arg(item.keep_for_ms.to_string())
            .arg(&item.idempotency_key)
            .arg(item.adds.map(|n| n.to_string()).unwrap_or_default())
            .arg(item.held.map(|n| n.to_string()).unwrap_or_default())
            .arg(if item.certain { "success" } else { "unknown" })
            .arg(&item.metadata)
            .arg(if item.in_grace { "1" } else { "" })
            .arg(positions.get(run).map_or("", String::as_str));
        debug_assert_eq!(cmd.args.len() - before, SETTLE_FIELDS);
    }
    cmd
}

/// The eight keys `plan_limits_settle_v2` reads of an item, in its order.
fn item_keys(item: &Settlement) -> [Cow<'_, str>; 8] {
    let day = item.keys.user.day(&item.day);
    // Without a key, any key of the user's stands in (cluster routing needs a name).
    let marker = match item.idempotency_key.as_str() {
        "" => Cow::Owned(day.clone()),
        key => Cow::Owned(item.keys.user.idempotency(&item.action, key)),
    };
    let entitlement = Cow::Borrowed(item.keys.entitlement.as_str());
    let (gauge, gauge_held) = match item.gauge {
        Some(gauge) => (
            Cow::Owned(item.keys.user.gauge(gauge)),
            Cow::Owned(item.keys.user.gauge_held(gauge)),
        ),
        None => (entitlement.clone(), entitlement.clone()),
    };
    [
        Cow::Borrowed(item.keys.summary.as_str()),
        Cow::Borrowed(item.keys.pending.as_str()),
        Cow::Borrowed(item.keys.commits.as_str()),
        entitlement,
        Cow::Owned(day),
        marker,
        gauge,
        gauge_held,
    ]
}

/// Whether two items name the same keys (`item_keys`).
fn same_keys(a: &Settlement, b: &Settlement) -> bool {
    a.keys == b.keys
        && a.day == b.day
        && a.idempotency_key == b.idempotency_key
        && a.action == b.action
        && a.gauge == b.gauge
}

/// A Redis error answering a function call: refused before it ran (not found, no right to
/// call it, Redis loading or read-only: nothing happened), or raised while it ran (Redis
/// names the function's script in the message), when what it wrote before stays written.
/// Envoy's `redis_proxy` answers for Redis when the master failed or timed out after the
/// call was sent ("upstream failure", "upstream protocol error"): it may have run.
fn refusal_or_failure(message: String) -> TransportError {
    let raised = message.contains("script:") || message.contains("@user_function");
    let cut_off =
        message.starts_with("upstream failure") || message.starts_with("upstream protocol error");
    if raised || cut_off {
        TransportError::Unknown(message)
    } else {
        TransportError::NotSent(message)
    }
}

/// What `plan_limits_settle` answered for one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Counted (commit, count) or extended (extend); for a release, whether it was held;
    /// `None`: Redis refused the item (a value out of range) and recorded that as an event.
    pub done: Option<bool>,
    /// The user's plan as billing recorded it, if it did.
    pub entitled_plan: Option<String>,
    /// The anchor day billing recorded, if it did.
    pub entitled_anchor: Option<u32>,
}

/// What `plan_limits_settle` answered for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleReply {
    /// Applied now: each item's answer.
    Applied(Vec<Settled>),
    /// Applied by an earlier attempt (its answer was lost): nothing ran now.
    AppliedBefore,
}

/// The answer to a batch of `n` items.
pub fn parse_settled(reply: RedisReply, n: usize) -> Result<SettleReply, TransportError> {
    let items = match reply {
        RedisReply::Array(items) => items,
        RedisReply::Error(message) => return Err(explain(refusal_or_failure(message))),
        other => {
            return Err(TransportError::BadReply(format!(
                "settle returned {other:?}"
            )))
        }
    };
    let items = match items.split_first() {
        Some((RedisReply::Int(0), [])) => return Ok(SettleReply::AppliedBefore),
        Some((RedisReply::Int(1), items)) if items.len() == 3 * n => items,
        _ => {
            return Err(TransportError::BadReply(format!(
                "settle returned {} values for {n} items",
                items.len()
            )))
        }
    };
    let text = |reply: &RedisReply| match reply {
        RedisReply::Bulk(bytes) => String::from_utf8(bytes.clone()).ok(),
        _ => None,
    };
    items
        .chunks(3)
        .map(|triple| match triple {
            [RedisReply::Int(done @ (-1..=1)), plan, anchor] => Ok(Settled {
                done: (*done >= 0).then_some(*done == 1),
                entitled_plan: text(plan),
                entitled_anchor: text(anchor).and_then(|day| day.parse().ok()),
            }),
            other => Err(TransportError::BadReply(format!(
                "settle returned {other:?} for an item"
            ))),
        })
        .collect::<Result<_, _>>()
        .map(SettleReply::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Vec<(String, Limit)> {
        vec![("free".into(), Some(5)), ("pro".into(), None)]
    }

    #[test]
    fn reserve_passes_keys_then_arguments_then_every_plans_limit() {
        let keys = UsageKeys::new("p", "u", "2026-11", "upload");
        let limits = limits();
        let cmd = reserve(ReserveArgs {
            keys: &keys,
            action: "upload",
            claimed_plan: "free",
            fallback_plan: Some("free"),
            reservation_id: "r1",
            now_ms: 1000,
            ttl_ms: 60_000,
            limits: &limits,
            idempotency: None,
            gauge: None,
            lease: None,
            events_stream: "p:events",
            user: "u",
            period_id: "2026-11",
        });
        let text: Vec<_> = cmd
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(reserve_args(&cmd)[3], b"r1");
        assert_eq!(
            text,
            [
                "FCALL",
                "plan_limits_reserve",
                "8",
                "p:{u}:2026-11",
                "p:{u}:2026-11:pending:upload",
                "p:{u}:entitlement",
                "p:{u}:entitlement",
                "p:{u}:entitlement",
                "p:{u}:entitlement",
                "p:events",
                "p:{u}:entitlement",
                "upload",
                "free",
                "free",
                "r1",
                "1000",
                "61000",
                "60000",
                "",
                "",
                "u",
                "2026-11",
                "",
                "",
                "",
                "free",
                "5",
                "",
                "pro",
                "",
                ""
            ]
        );
    }

    #[test]
    fn the_library_registers_both_functions_and_loads_with_replace() {
        assert!(LIBRARY.starts_with("#!lua name=plan_limits\n"));
        for name in [RESERVE, SETTLE] {
            assert!(
                LIBRARY.contains(&format!("function_name = '{name}'")),
                "{name}"
            );
        }
        let load = load_library();
        assert_eq!(
            load.args[..3],
            [b"FUNCTION".to_vec(), b"LOAD".to_vec(), b"REPLACE".to_vec()]
        );
        assert_eq!(load.args[3], LIBRARY.as_bytes());
    }

    #[test]
    fn evalsha_names_the_functions_script_in_place_of_fcall() {
        let fcall = RedisCommand::new("FCALL")
            .arg(SETTLE)
            .arg("1")
            .arg("p:{u}:x")
            .arg("arg");
        assert_eq!(invoked(fcall.clone(), Invoke::Fcall), fcall);
        let evalsha = invoked(fcall.clone(), Invoke::Evalsha);
        let sha = script_sha(SETTLE).unwrap();
        assert_eq!(sha.len(), 40);
        assert_eq!(evalsha.args[0], b"EVALSHA");
        assert_eq!(evalsha.args[1], sha.as_bytes());
        assert_eq!(evalsha.args[2..], fcall.args[2..]);
        // Anything else is left alone.
        let other = RedisCommand::new("FCALL").arg("elsewhere").arg("0");
        assert_eq!(invoked(other.clone(), Invoke::Evalsha), other);
        let shas: std::collections::BTreeSet<_> =
            FUNCTIONS.iter().map(|f| script_sha(f).unwrap()).collect();
        assert_eq!(shas.len(), FUNCTIONS.len(), "one script per function");
    }

    #[test]
    fn each_script_is_the_library_calling_one_function() {
        let source = script(RESERVE).unwrap();
        assert!(!source.contains("#!lua"), "no library header in a script");
        assert!(!source.contains("redis.register_function"));
        assert!(source.ends_with("return registered['plan_limits_reserve'](KEYS, ARGV)\n"));
        assert!(script("plan_limits_other").is_none());
        // Every function the library registers, named by the hash of its script.
        assert_eq!(SCRIPT_SHAS.map(|(name, _)| name), FUNCTIONS);
        for (name, sha) in SCRIPT_SHAS {
            let source = script(name).unwrap();
            assert_eq!(sha1_smol::Sha1::from(source).digest().to_string(), sha);
        }
        let loads = load_scripts();
        assert_eq!(loads.len(), FUNCTIONS.len());
        assert_eq!(loads[0].args[..2], [b"SCRIPT".to_vec(), b"LOAD".to_vec()]);
        let noscript = explain(TransportError::NotSent(
            "NOSCRIPT No matching script.".into(),
        ));
        assert!(
            matches!(&noscript, TransportError::NotSent(m) if m.contains("functions load")),
            "{noscript:?}"
        );
        assert!(matches!(
            refusal_or_failure("NOSCRIPT No matching script. Please use EVAL.".into()),
            TransportError::NotSent(_)
        ));
    }

    #[test]
    fn an_error_raised_inside_a_function_is_not_taken_for_one_that_never_ran() {
        let raised = "NOPERM User default has no permissions to run the 'hsetnx' command \
                      script: plan_limits_settle, on @user_function:125.";
        assert!(matches!(
            parse_settled(RedisReply::Error(raised.into()), 1),
            Err(TransportError::Unknown(_))
        ));
        let refused = "NOPERM User default has no permissions to run the 'fcall' command";
        assert!(matches!(
            parse_settled(RedisReply::Error(refused.into()), 1),
            Err(TransportError::NotSent(_))
        ));
        // Envoy's redis_proxy: the master failed or timed out once the call was on its way
        // (it may have run), or no master was there to send it to (it did not).
        for (message, ran) in [
            ("upstream failure", true),
            ("upstream protocol error", true),
            ("no upstream host", false),
        ] {
            let answer = parse_settled(RedisReply::Error(message.into()), 1);
            assert_eq!(
                matches!(answer, Err(TransportError::Unknown(_))),
                ran,
                "{message}: {answer:?}"
            );
        }
    }

    #[test]
    fn reservation_replies_are_checked() {
        let reply = |v: Vec<RedisReply>| RedisReply::Array(v);
        let plan = || RedisReply::Bulk(b"free".to_vec());
        let named = || RedisReply::Bulk(b"gold".to_vec());
        assert_eq!(
            parse_reservation(reply(vec![
                RedisReply::Int(1),
                RedisReply::Int(4),
                RedisReply::Int(1),
                plan(),
                named(),
                RedisReply::Int(1),
                RedisReply::Int(2)
            ])),
            Ok(Reservation {
                status: ReserveStatus::Granted,
                committed: 4,
                pending: 1,
                plan: "free".into(),
                named_plan: "gold".into(),
                recorded: true,
                granted: 2,
                first: String::new(),
                recorded_anchor: None,
                total: 0,
                total_held: 0,
                leased: 0,
            })
        );
        for (status, expected) in [
            (0, ReserveStatus::Refused),
            (2, ReserveStatus::Unlimited),
            (3, ReserveStatus::UnknownPlan),
        ] {
            let r = parse_reservation(reply(vec![
                RedisReply::Int(status),
                RedisReply::Int(0),
                RedisReply::Int(0),
                plan(),
                plan(),
                RedisReply::Int(0),
            ]));
            assert_eq!(r.unwrap().status, expected);
        }
        let bad = [
            reply(vec![
                RedisReply::Int(4),
                RedisReply::Int(0),
                RedisReply::Int(0),
                plan(),
                plan(),
            ]),
            reply(vec![
                RedisReply::Int(1),
                RedisReply::Int(-4),
                RedisReply::Int(1),
                plan(),
                plan(),
            ]),
            reply(vec![
                RedisReply::Int(1),
                RedisReply::Int(4),
                RedisReply::Int(1),
                plan(),
            ]),
            RedisReply::Nil,
        ];
        for reply in bad {
            assert!(matches!(
                parse_reservation(reply),
                Err(TransportError::BadReply(_))
            ));
        }
    }

    #[test]
    fn a_missing_library_is_named() {
        let err = parse_reservation(RedisReply::Error("ERR Function not found".into()));
        assert!(
            matches!(err, Err(TransportError::NotSent(ref m)) if m.contains("plan-limits functions load")),
            "{err:?}"
        );
    }

    #[test]
    fn settle_replies_pair_each_item_with_its_entitlement() {
        let reply = RedisReply::Array(vec![
            RedisReply::Int(1),
            RedisReply::Int(1),
            RedisReply::Nil,
            RedisReply::Nil,
            RedisReply::Int(0),
            RedisReply::Bulk(b"pro".to_vec()),
            RedisReply::Bulk(b"15".to_vec()),
            RedisReply::Int(-1),
            RedisReply::Nil,
            RedisReply::Nil,
        ]);
        let settled = |done, plan: Option<&str>, anchor| Settled {
            done,
            entitled_plan: plan.map(String::from),
            entitled_anchor: anchor,
        };
        assert_eq!(
            parse_settled(reply.clone(), 3).unwrap(),
            SettleReply::Applied(vec![
                settled(Some(true), None, None),
                settled(Some(false), Some("pro"), Some(15)),
                settled(None, None, None),
            ])
        );
        assert!(parse_settled(reply, 2).is_err());
        assert!(parse_settled(RedisReply::Error("ERR x".into()), 1).is_err());
    }

    #[test]
    fn a_batch_applied_before_says_so_whatever_its_size() {
        let reply = RedisReply::Array(vec![RedisReply::Int(0)]);
        assert_eq!(parse_settled(reply, 5).unwrap(), SettleReply::AppliedBefore);
    }
}
