//! How a Redis command travels: stock Envoy has no Redis host calls, so it goes to webdis
//! (an HTTP front of Redis) through `dispatch_http_call` on a cluster named in plans.json.

use std::time::Duration;

use proxy_wasm::traits::Context;

use crate::config::RedisSettings;
use crate::redis::{webdis, RedisCommand, RedisReply, TransportError};

/// Sends `command`; the answer arrives as `on_http_call_response` with the returned token.
pub fn send(
    ctx: &dyn Context,
    settings: &RedisSettings,
    command: &RedisCommand,
) -> Result<u32, TransportError> {
    let body = webdis::request_body(command);
    ctx.dispatch_http_call(
        &settings.cluster,
        vec![
            (":method", "POST"),
            (":path", "/"),
            (":authority", &settings.authority),
            ("content-type", "text/plain"),
        ],
        Some(&body),
        vec![],
        Duration::from_millis(settings.timeout_ms),
    )
    .map_err(|status| TransportError::NotSent(format!("dispatch_http_call: {status:?}")))
}

/// Reads the answer inside `on_http_call_response`. Envoy reports a timeout or a reset as a
/// response without headers.
pub fn receive(
    ctx: &dyn Context,
    num_headers: usize,
    body_size: usize,
) -> Result<RedisReply, TransportError> {
    if num_headers == 0 {
        return Err(TransportError::Unknown(
            "no response (timeout or reset)".into(),
        ));
    }
    let status = ctx
        .get_http_call_response_header(":status")
        .and_then(|s| s.parse().ok());
    let body = ctx
        .get_http_call_response_body(0, body_size)
        .unwrap_or_default();
    webdis::parse_response(status, &body)
}
