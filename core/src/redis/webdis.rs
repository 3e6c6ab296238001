//! The webdis HTTP front of Redis: `POST /` whose body is `COMMAND/arg/arg...`, each argument
//! percent-encoded where webdis would read it otherwise (so `/`, `.`, `+`, `?` and binary
//! bytes survive), and a JSON reply `{"COMMAND": value}` where a Redis error is
//! `[false, "message"]`.

use percent_encoding::{percent_encode, AsciiSet, CONTROLS};

use super::{RedisCommand, RedisReply, TransportError};

/// What webdis reads specially in a command's text (`cmd_run`, `decode_uri`): `/` between
/// arguments, `%XX` escapes, `+` (a space), `?` (a query string) and `.` (a trailing `.ext`
/// names the reply format); and controls, space and `#`, fine in a body but not in a log.
/// Every other byte goes as it is: a settlement batch's keys and plan limits are mostly `{`,
/// `:` and `"`, which encoded would triple (bytes to write here and to read in webdis).
const ARG: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'#')
    .add(b'%')
    .add(b'+')
    .add(b'.')
    .add(b'/')
    .add(b'?');

/// The request body for `command`.
pub fn request_body(command: &RedisCommand) -> Vec<u8> {
    let mut body = String::with_capacity(command.args.iter().map(|a| a.len() + 1).sum());
    for (i, arg) in command.args.iter().enumerate() {
        if i > 0 {
            body.push('/');
        }
        body.extend(percent_encode(arg, ARG));
    }
    body.into_bytes()
}

/// Reads webdis's answer: `status` is the HTTP status, `body` the JSON.
pub fn parse_response(status: Option<u32>, body: &[u8]) -> Result<RedisReply, TransportError> {
    match status {
        Some(200) => {}
        Some(503) => return Err(TransportError::NotSent("webdis: redis unavailable".into())),
        // Envoy's answer when the call's timeout passed: webdis may have run the command.
        Some(504) => return Err(TransportError::Unknown("timed out".into())),
        Some(403) => {
            return Err(TransportError::NotSent(
                "webdis refused the command (acl)".into(),
            ))
        }
        Some(other) => return Err(TransportError::NotSent(format!("webdis: HTTP {other}"))),
        None => return Err(TransportError::Unknown("no HTTP status".into())),
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| TransportError::BadReply(format!("webdis JSON: {e}")))?;
    let (_, reply) = value
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
        .ok_or_else(|| TransportError::BadReply("webdis: expected {\"COMMAND\": reply}".into()))?;
    Ok(from_json(reply))
}

fn from_json(value: &serde_json::Value) -> RedisReply {
    use serde_json::Value;
    match value {
        Value::Null => RedisReply::Nil,
        Value::Number(n) => n
            .as_i64()
            .map(RedisReply::Int)
            .unwrap_or_else(|| RedisReply::Bulk(n.to_string().into_bytes())),
        Value::String(s) => RedisReply::Bulk(s.clone().into_bytes()),
        Value::Bool(b) => RedisReply::Int(i64::from(*b)),
        Value::Array(items) => match items.as_slice() {
            [Value::Bool(false), Value::String(message)] => RedisReply::Error(message.clone()),
            [Value::Bool(true), Value::String(status)] => RedisReply::Status(status.clone()),
            _ => RedisReply::Array(items.iter().map(from_json).collect()),
        },
        Value::Object(_) => RedisReply::Bulk(value.to_string().into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_percent_encoded() {
        let cmd = RedisCommand::new("EVAL")
            .arg("return {1}")
            .arg("0")
            .arg("a/b.c%")
            .arg([0xff, b'\n']);
        assert_eq!(
            String::from_utf8(request_body(&cmd)).unwrap(),
            "EVAL/return%20{1}/0/a%2Fb%2Ec%25/%FF%0A"
        );
    }

    #[test]
    fn script_replies_are_read() {
        let reply = parse_response(Some(200), br#"{"EVAL":[1,4,1]}"#).unwrap();
        assert_eq!(reply.into_ints().unwrap(), vec![1, 4, 1]);
    }

    #[test]
    fn redis_errors_are_errors() {
        let reply = parse_response(Some(200), br#"{"EVAL":[false,"ERR boom"]}"#).unwrap();
        assert_eq!(reply, RedisReply::Error("ERR boom".into()));
        assert!(matches!(
            reply.into_ints(),
            Err(TransportError::NotSent(m)) if m == "ERR boom"
        ));
    }

    #[test]
    fn http_failures_mean_not_sent() {
        assert!(matches!(
            parse_response(Some(503), b""),
            Err(TransportError::NotSent(_))
        ));
        assert!(matches!(
            parse_response(None, b""),
            Err(TransportError::Unknown(_))
        ));
        assert!(matches!(
            parse_response(Some(200), b"<html>"),
            Err(TransportError::BadReply(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn fuzz_webdis_reply_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_response(Some(200), &body).map(|r| r.into_ints());
        }

        #[test]
        fn fuzz_webdis_reply_json(s in "\\{\"EVAL\":\\[(-?[0-9]{1,20}|null|false|true|\"[a-z]*\"|,|\\[|\\]){0,12}\\]\\}") {
            let _ = parse_response(Some(200), s.as_bytes()).map(|r| r.into_ints());
        }
    }
}
