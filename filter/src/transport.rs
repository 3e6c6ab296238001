//! How a Redis command travels, as bytes in and out: the worker decides what to send and
//! what an answer means.
//!
//! - default build: stock Envoy has no Redis host calls, so commands go to webdis (an HTTP
//!   front of Redis) with `dispatch_http_call`; the answer arrives as an HTTP call response
//!   on the context that sent it.
//! - `redis-hostcalls` build: the Higress gateway's `proxy_redis_call`, answered through
//!   `proxy_on_redis_call_response` on the root context (see `root.rs`), the RESP reply in
//!   buffer 9.

use plan_limits_core::{RedisCommand, RedisReply, RedisSettings, TransportError};

pub type Reply = Result<RedisReply, TransportError>;

/// Sends `command`; returns the call's token.
pub fn send(settings: &RedisSettings, command: &RedisCommand) -> Result<u32, TransportError> {
    imp::send(settings, command)
}

/// Prepares the transport when a configuration is applied.
pub fn init(settings: &RedisSettings) -> Result<(), TransportError> {
    imp::init(settings)
}

/// The Redis answer an HTTP call response carries (webdis build); `None` when HTTP calls are
/// not how Redis is reached.
pub fn http_call_reply(num_headers: usize, body_size: usize) -> Option<Reply> {
    #[cfg(not(feature = "redis-hostcalls"))]
    return Some(imp::receive(num_headers, body_size));
    #[cfg(feature = "redis-hostcalls")]
    {
        let _ = (num_headers, body_size);
        None
    }
}

#[cfg(feature = "redis-hostcalls")]
pub use imp::redis_call_reply;

#[cfg(not(feature = "redis-hostcalls"))]
mod imp {
    use std::time::Duration;

    use proxy_wasm::hostcalls;
    use proxy_wasm::types::{BufferType, MapType};

    use super::Reply;
    use plan_limits_core::RedisSettings;
    use plan_limits_core::{webdis, RedisCommand, TransportError};

    pub fn init(_: &RedisSettings) -> Result<(), TransportError> {
        Ok(())
    }

    pub fn send(settings: &RedisSettings, command: &RedisCommand) -> Result<u32, TransportError> {
        let body = webdis::request_body(command);
        hostcalls::dispatch_http_call(
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

    /// Envoy reports a timeout or a reset as a response without headers.
    pub fn receive(num_headers: usize, body_size: usize) -> Reply {
        if num_headers == 0 {
            return Err(TransportError::Unknown(
                "no response (timeout or reset)".into(),
            ));
        }
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse().ok());
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        webdis::parse_response(status, &body)
    }
}

#[cfg(feature = "redis-hostcalls")]
mod imp {
    use super::Reply;
    use plan_limits_core::RedisSettings;
    use plan_limits_core::{resp, RedisCommand, TransportError};

    const REDIS_CALL_RESPONSE: u32 = 9;
    const STATUS_OK: u32 = 0;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_redis_init(
            cluster: *const u8,
            cluster_size: usize,
            username: *const u8,
            username_size: usize,
            password: *const u8,
            password_size: usize,
            timeout_ms: u32,
        ) -> u32;
        fn proxy_redis_call(
            cluster: *const u8,
            cluster_size: usize,
            query: *const u8,
            query_size: usize,
            token: *mut u32,
        ) -> u32;
        fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            data: *mut *mut u8,
            size: *mut usize,
        ) -> u32;
    }

    pub fn init(settings: &RedisSettings) -> Result<(), TransportError> {
        let cluster = settings.cluster.as_bytes();
        let username = settings.username.as_deref().unwrap_or_default().as_bytes();
        let password = settings.password.as_deref().unwrap_or_default().as_bytes();
        let timeout_ms = u32::try_from(settings.timeout_ms).unwrap_or(u32::MAX);
        // SAFETY: pointers and sizes describe live slices for the duration of the call.
        let status = unsafe {
            proxy_redis_init(
                cluster.as_ptr(),
                cluster.len(),
                username.as_ptr(),
                username.len(),
                password.as_ptr(),
                password.len(),
                timeout_ms,
            )
        };
        match status {
            STATUS_OK => Ok(()),
            other => Err(TransportError::NotSent(format!(
                "proxy_redis_init: status {other}"
            ))),
        }
    }

    pub fn send(settings: &RedisSettings, command: &RedisCommand) -> Result<u32, TransportError> {
        let query = resp::encode_command(command);
        let cluster = settings.cluster.as_bytes();
        let mut token = 0u32;
        // SAFETY: as above; `token` outlives the call.
        let status = unsafe {
            proxy_redis_call(
                cluster.as_ptr(),
                cluster.len(),
                query.as_ptr(),
                query.len(),
                &mut token,
            )
        };
        match status {
            STATUS_OK => Ok(token),
            other => Err(TransportError::NotSent(format!(
                "proxy_redis_call: status {other}"
            ))),
        }
    }

    fn reply_bytes(size: usize) -> Vec<u8> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: the host writes a buffer it allocated with our allocator (the SDK's
        // proxy_on_memory_allocate), which we then own.
        unsafe {
            if proxy_get_buffer_bytes(REDIS_CALL_RESPONSE, 0, size, &mut data, &mut len)
                != STATUS_OK
                || data.is_null()
            {
                return Vec::new();
            }
            Vec::from_raw_parts(data, len, len)
        }
    }

    /// The answer to a Redis host call: `status` non-zero when Higress could not run it.
    pub fn redis_call_reply(status: u32, size: usize) -> Reply {
        if status != STATUS_OK {
            return Err(TransportError::Unknown(format!(
                "redis call failed (status {status})"
            )));
        }
        resp::parse_reply(&reply_bytes(size))
    }
}
