//! The two Redis scripts and the commands that run them. Each runs atomically in Redis, so
//! reserve / commit / release never interleave with another request's.
//!
//! Commands name a script by its SHA1 (`EVALSHA`), so a request carries 40 bytes instead of
//! the script; when Redis does not know it yet (`NOSCRIPT`, after a restart), the transport
//! sends the same command once more as `EVAL` with the source (`with_source`).

use std::sync::OnceLock;

use super::{RedisCommand, RedisReply};
use crate::keys::UsageKeys;

pub const RESERVE: &str = include_str!("reserve.lua");
pub const SETTLE: &str = include_str!("settle.lua");

fn sha1_of(source: &'static str, cell: &'static OnceLock<String>) -> &'static str {
    cell.get_or_init(|| sha1_smol::Sha1::from(source).digest().to_string())
}

fn reserve_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    sha1_of(RESERVE, &SHA)
}

fn settle_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    sha1_of(SETTLE, &SHA)
}

/// The `EVAL` form of an `EVALSHA` command of one of our scripts.
pub fn with_source(command: &RedisCommand) -> Option<RedisCommand> {
    if command.args.first().map(Vec::as_slice) != Some(b"EVALSHA") {
        return None;
    }
    let sha = command.args.get(1)?;
    let source = [RESERVE, SETTLE]
        .into_iter()
        .zip([reserve_sha(), settle_sha()])
        .find(|(_, known)| known.as_bytes() == sha.as_slice())?
        .0;
    let mut args = command.args.clone();
    args[0] = b"EVAL".to_vec();
    args[1] = source.as_bytes().to_vec();
    Some(RedisCommand { args })
}

/// Redis does not have the script cached (it restarted, or it was flushed).
pub fn is_noscript(reply: &RedisReply) -> bool {
    matches!(reply, RedisReply::Error(message) if message.starts_with("NOSCRIPT"))
}

/// What `reserve.lua` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub granted: bool,
    /// Units counted this period (successes already committed).
    pub committed: u64,
    /// Reservations in flight, this one included when granted.
    pub pending: u64,
}

pub fn reserve(
    keys: &UsageKeys,
    action: &str,
    limit: u64,
    reservation_id: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> RedisCommand {
    RedisCommand::new("EVALSHA")
        .arg(reserve_sha())
        .arg("2")
        .arg(&keys.summary)
        .arg(&keys.pending)
        .arg(action)
        .arg(limit.to_string())
        .arg(reservation_id)
        .arg(now_ms.to_string())
        .arg((now_ms + ttl_ms).to_string())
        .arg(ttl_ms.to_string())
}

pub fn parse_reservation(ints: &[i64]) -> Option<Reservation> {
    match *ints {
        [granted @ (0 | 1), committed, pending] => Some(Reservation {
            granted: granted == 1,
            committed: u64::try_from(committed).ok()?,
            pending: u64::try_from(pending).ok()?,
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleMode {
    Commit,
    Count,
    Release,
}

impl SettleMode {
    fn as_str(self) -> &'static str {
        match self {
            SettleMode::Commit => "commit",
            SettleMode::Count => "count",
            SettleMode::Release => "release",
        }
    }
}

/// One request's settlement: what `settle.lua` needs to count it and record its usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub mode: SettleMode,
    pub keys: UsageKeys,
    pub reservation_id: String,
    pub action: String,
    pub user: String,
    pub plan: String,
    /// The plan's limits when the request was made (JSON object), kept in the summary.
    pub limits_json: std::rc::Rc<str>,
    pub kind: String,
    pub bytes: u64,
    pub status: u32,
    /// RFC 3339 time of the upstream's answer.
    pub at: String,
    pub request_id: String,
    pub period_id: String,
    /// How long the summary is kept from now (ms): until its period ends plus the retention.
    pub keep_for_ms: u64,
}

/// Fields per item in `settle.lua`'s ARGV.
const SETTLE_FIELDS: usize = 13;

pub fn settle(
    batch: &[Settlement],
    events_stream: &str,
    events_max_len: Option<u64>,
) -> RedisCommand {
    let mut cmd = RedisCommand::new("EVALSHA")
        .arg(settle_sha())
        .arg((1 + 2 * batch.len()).to_string())
        .arg(events_stream);
    for item in batch {
        cmd = cmd.arg(&item.keys.summary).arg(&item.keys.pending);
    }
    cmd = cmd
        .arg(events_max_len.map(|n| n.to_string()).unwrap_or_default())
        .arg(SETTLE_FIELDS.to_string());
    for item in batch {
        let before = cmd.args.len();
        cmd = cmd
            .arg(item.mode.as_str())
            .arg(&item.reservation_id)
            .arg(&item.action)
            .arg(&item.user)
            .arg(&item.plan)
            .arg(item.limits_json.as_bytes())
            .arg(&item.kind)
            .arg(item.bytes.to_string())
            .arg(item.status.to_string())
            .arg(&item.at)
            .arg(&item.request_id)
            .arg(&item.period_id)
            .arg(item.keep_for_ms.to_string());
        debug_assert_eq!(cmd.args.len() - before, SETTLE_FIELDS);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_passes_keys_then_arguments() {
        let keys = UsageKeys::new("p", "u", "2026-11", "upload");
        let cmd = reserve(&keys, "upload", 5, "r1", 1000, 60_000);
        let args: Vec<_> = cmd.args[2..]
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "2",
                "p:{u}:2026-11",
                "p:{u}:2026-11:pending:upload",
                "upload",
                "5",
                "r1",
                "1000",
                "61000",
                "60000"
            ]
        );
    }

    #[test]
    fn scripts_are_named_by_sha1_with_the_source_as_fallback() {
        let keys = UsageKeys::new("p", "u", "2026-11", "upload");
        let cmd = reserve(&keys, "upload", 5, "r1", 1000, 60_000);
        assert_eq!(cmd.args[0], b"EVALSHA");
        assert_eq!(cmd.args[1].len(), 40);
        let eval = with_source(&cmd).unwrap();
        assert_eq!(eval.args[0], b"EVAL");
        assert_eq!(eval.args[1], RESERVE.as_bytes());
        assert_eq!(eval.args[2..], cmd.args[2..]);
        assert!(with_source(&eval).is_none());
        assert!(is_noscript(&RedisReply::Error(
            "NOSCRIPT No matching script.".into()
        )));
        assert!(!is_noscript(&RedisReply::Error("ERR x".into())));
    }

    #[test]
    fn reservation_replies_are_checked() {
        assert_eq!(
            parse_reservation(&[1, 4, 1]),
            Some(Reservation {
                granted: true,
                committed: 4,
                pending: 1
            })
        );
        assert_eq!(parse_reservation(&[2, 4, 1]), None);
        assert_eq!(parse_reservation(&[1, -4, 1]), None);
        assert_eq!(parse_reservation(&[1]), None);
    }
}
