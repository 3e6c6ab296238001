//! The two Redis scripts and the commands that run them. Each runs atomically in Redis, so
//! reserve / commit / release never interleave with another request's.
//!
//! A command names its script by SHA1 (`EVALSHA`), so a request carries 40 bytes instead of
//! the script; when Redis does not know it yet (`NOSCRIPT`, after a restart), the same command
//! is built once more with the source (`EVAL`): see `Form`.

use std::sync::OnceLock;

use super::{RedisCommand, RedisReply};
use crate::keys::UsageKeys;
use crate::settlement::Settlement;

pub const RESERVE: &str = include_str!("reserve.lua");
pub const SETTLE: &str = include_str!("settle.lua");

/// How a command names its script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `EVALSHA <sha1>`: the usual form.
    BySha,
    /// `EVAL <source>`: after Redis answered `NOSCRIPT`.
    WithSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Reserve,
    Settle,
}

impl Script {
    fn source(self) -> &'static str {
        match self {
            Script::Reserve => RESERVE,
            Script::Settle => SETTLE,
        }
    }

    fn sha1(self) -> &'static str {
        static RESERVE_SHA: OnceLock<String> = OnceLock::new();
        static SETTLE_SHA: OnceLock<String> = OnceLock::new();
        let cell = match self {
            Script::Reserve => &RESERVE_SHA,
            Script::Settle => &SETTLE_SHA,
        };
        cell.get_or_init(|| sha1_smol::Sha1::from(self.source()).digest().to_string())
    }

    fn command(self, form: Form) -> RedisCommand {
        match form {
            Form::BySha => RedisCommand::new("EVALSHA").arg(self.sha1()),
            Form::WithSource => RedisCommand::new("EVAL").arg(self.source()),
        }
    }
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

/// One request's reservation: `reserve.lua` on its user's keys.
#[derive(Debug, Clone, Copy)]
pub struct ReserveArgs<'a> {
    pub keys: &'a UsageKeys,
    pub action: &'a str,
    pub limit: u64,
    pub reservation_id: &'a str,
    pub now_ms: u64,
    pub ttl_ms: u64,
}

pub fn reserve(args: ReserveArgs, form: Form) -> RedisCommand {
    Script::Reserve
        .command(form)
        .arg("2")
        .arg(&args.keys.summary)
        .arg(&args.keys.pending)
        .arg(args.action)
        .arg(args.limit.to_string())
        .arg(args.reservation_id)
        .arg(args.now_ms.to_string())
        .arg(args.now_ms.saturating_add(args.ttl_ms).to_string())
        .arg(args.ttl_ms.to_string())
}

pub fn parse_reservation(reply: RedisReply) -> Result<Reservation, super::TransportError> {
    let ints = reply.into_ints()?;
    match *ints.as_slice() {
        [granted @ (0 | 1), committed, pending] if committed >= 0 && pending >= 0 => {
            Ok(Reservation {
                granted: granted == 1,
                committed: committed.unsigned_abs(),
                pending: pending.unsigned_abs(),
            })
        }
        _ => Err(super::TransportError::BadReply(format!(
            "reserve returned {ints:?}"
        ))),
    }
}

/// Fields per item in `settle.lua`'s ARGV.
const SETTLE_FIELDS: usize = 13;

/// One `settle.lua` call for a batch of settlements.
pub fn settle(
    batch: &[Settlement],
    events_stream: &str,
    events_max_len: Option<u64>,
    form: Form,
) -> RedisCommand {
    let mut cmd = Script::Settle
        .command(form)
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

    fn args(keys: &UsageKeys) -> ReserveArgs<'_> {
        ReserveArgs {
            keys,
            action: "upload",
            limit: 5,
            reservation_id: "r1",
            now_ms: 1000,
            ttl_ms: 60_000,
        }
    }

    #[test]
    fn reserve_passes_keys_then_arguments() {
        let keys = UsageKeys::new("p", "u", "2026-11", "upload");
        let cmd = reserve(args(&keys), Form::BySha);
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
    fn scripts_are_named_by_sha1_or_sent_with_their_source() {
        let keys = UsageKeys::new("p", "u", "2026-11", "upload");
        let by_sha = reserve(args(&keys), Form::BySha);
        assert_eq!(by_sha.args[0], b"EVALSHA");
        assert_eq!(
            by_sha.args[1],
            sha1_smol::Sha1::from(RESERVE)
                .digest()
                .to_string()
                .as_bytes()
        );
        let eval = reserve(args(&keys), Form::WithSource);
        assert_eq!(eval.args[0], b"EVAL");
        assert_eq!(eval.args[1], RESERVE.as_bytes());
        assert_eq!(eval.args[2..], by_sha.args[2..]);
        let settle_eval = settle(&[], "s", None, Form::WithSource);
        assert_eq!(settle_eval.args[1], SETTLE.as_bytes());
        assert!(is_noscript(&RedisReply::Error(
            "NOSCRIPT No matching script.".into()
        )));
        assert!(!is_noscript(&RedisReply::Error("ERR x".into())));
    }

    #[test]
    fn reservation_replies_are_checked() {
        let ints = |v: &[i64]| RedisReply::Array(v.iter().map(|&n| RedisReply::Int(n)).collect());
        assert_eq!(
            parse_reservation(ints(&[1, 4, 1])),
            Ok(Reservation {
                granted: true,
                committed: 4,
                pending: 1
            })
        );
        assert!(parse_reservation(ints(&[2, 4, 1])).is_err());
        assert!(parse_reservation(ints(&[1, -4, 1])).is_err());
        assert!(parse_reservation(ints(&[1])).is_err());
        assert!(parse_reservation(RedisReply::Nil).is_err());
    }
}
