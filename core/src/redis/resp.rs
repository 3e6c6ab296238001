//! RESP, Redis's own wire format, for transports that speak it (the Redis host calls): the
//! `redis` crate packs commands and parses replies.

use super::{RedisCommand, RedisReply, TransportError};

pub fn encode_command(command: &RedisCommand) -> Vec<u8> {
    let mut cmd = redis::Cmd::new();
    for arg in &command.args {
        cmd.arg(&arg[..]);
    }
    cmd.get_packed_command()
}

pub fn parse_reply(bytes: &[u8]) -> Result<RedisReply, TransportError> {
    match redis::parse_redis_value(bytes) {
        Ok(value) => Ok(from_value(value)),
        // The crate turns error replies into errors; they are Redis's answer all the same.
        Err(e) if e.code().is_some() => Ok(RedisReply::Error(e.to_string())),
        Err(e) => Err(TransportError::BadReply(format!("RESP: {e}"))),
    }
}

/// An error reply as Redis wrote it: `NOSCRIPT No matching script...`.
fn error_text(code: &str, detail: Option<&str>) -> String {
    match detail {
        Some(detail) => format!("{code} {detail}"),
        None => code.to_string(),
    }
}

/// A reply of the `redis` crate as ours.
pub fn from_value(value: redis::Value) -> RedisReply {
    use redis::Value;
    match value {
        Value::Nil => RedisReply::Nil,
        Value::Int(n) => RedisReply::Int(n),
        Value::BulkString(b) => RedisReply::Bulk(b),
        Value::SimpleString(s) => RedisReply::Status(s),
        Value::Okay => RedisReply::Status("OK".into()),
        Value::Array(items) | Value::Set(items) => {
            RedisReply::Array(items.into_iter().map(from_value).collect())
        }
        Value::ServerError(e) => RedisReply::Error(error_text(e.code(), e.details())),
        other => RedisReply::Bulk(format!("{other:?}").into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_packed_as_arrays_of_bulk_strings() {
        let cmd = RedisCommand::new("EVAL").arg("return 1").arg("0");
        assert_eq!(
            encode_command(&cmd),
            b"*3\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n$1\r\n0\r\n"
        );
    }

    #[test]
    fn replies_are_parsed() {
        assert_eq!(
            parse_reply(b"*3\r\n:1\r\n:4\r\n:1\r\n")
                .unwrap()
                .into_ints()
                .unwrap(),
            vec![1, 4, 1]
        );
        assert!(matches!(
            parse_reply(b"-ERR boom\r\n"),
            Ok(RedisReply::Error(m)) if m.contains("boom")
        ));
        assert!(parse_reply(b"*3\r\n:1").is_err());
        assert_eq!(
            parse_reply(b"-NOSCRIPT No matching script.\r\n").unwrap(),
            RedisReply::Error("NOSCRIPT No matching script.".into())
        );
    }

    proptest::proptest! {
        #[test]
        fn fuzz_resp_reply(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
            let _ = parse_reply(&bytes).map(|r| r.into_ints());
        }
    }
}
