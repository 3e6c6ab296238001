//! Runs the filter's Redis commands on a real Redis with the `redis` crate, and turns its
//! replies into the filter's `RedisReply`: what a Redis transport on the host side does.

use plan_limits_core::{RedisCommand, RedisReply};

/// Runs one command as it is (on one Redis, or routed by its first key on a cluster).
pub fn run(conn: &mut dyn redis::ConnectionLike, command: &RedisCommand) -> RedisReply {
    let Some((name, args)) = command.args.split_first() else {
        return RedisReply::Error("ERR empty command".into());
    };
    let mut cmd = redis::cmd(&String::from_utf8_lossy(name));
    for arg in args {
        cmd.arg(&arg[..]);
    }
    match cmd.query::<redis::Value>(conn) {
        Ok(value) => from_value(value),
        Err(e) => match (e.code(), e.detail()) {
            (Some(code), Some(detail)) => RedisReply::Error(format!("{code} {detail}")),
            (Some(code), None) => RedisReply::Error(code.to_string()),
            _ => RedisReply::Error(e.to_string()),
        },
    }
}

/// Runs `commands` as one MULTI/EXEC transaction: all of them or none.
pub fn run_atomically(
    conn: &mut redis::Connection,
    commands: &[RedisCommand],
) -> Result<(), String> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for command in commands {
        let Some((name, args)) = command.args.split_first() else {
            continue;
        };
        let cmd = pipe.cmd(&String::from_utf8_lossy(name));
        for arg in args {
            cmd.arg(&arg[..]);
        }
    }
    pipe.exec(conn).map_err(|e| e.to_string())
}

pub use plan_limits_core::resp::from_value;
