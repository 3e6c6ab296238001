//! Runs the filter's Redis commands on a real Redis with the `redis` crate, and turns its
//! replies into the filter's `RedisReply`: what a Redis transport on the host side does.

use plan_limits_core::redis::{RedisCommand, RedisReply};

/// Runs `command`; a script Redis does not know yet is sent again with its source, as the
/// filter's transports do.
pub fn run(conn: &mut redis::Connection, command: &RedisCommand) -> RedisReply {
    let reply = run_once(conn, command);
    match plan_limits_core::redis::scripts::with_source(command) {
        Some(eval) if plan_limits_core::redis::scripts::is_noscript(&reply) => {
            run_once(conn, &eval)
        }
        _ => reply,
    }
}

fn run_once(conn: &mut redis::Connection, command: &RedisCommand) -> RedisReply {
    let mut cmd = redis::cmd(std::str::from_utf8(&command.args[0]).expect("command name"));
    for arg in &command.args[1..] {
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

pub use plan_limits_core::redis::resp::from_value;
