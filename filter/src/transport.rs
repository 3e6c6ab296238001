//! How a Redis command travels, and how its answer finds the code waiting for it.
//!
//! - default build: stock Envoy has no Redis host calls, so commands go to webdis (an HTTP
//!   front of Redis) with `dispatch_http_call`; the answer arrives as an HTTP call response
//!   on the context that sent it.
//! - `redis-hostcalls` build: the Higress gateway's `proxy_redis_call`, answered through
//!   `proxy_on_redis_call_response` on the root context, the RESP reply in buffer 9.
//!
//! Either way the waiting code registered a handler under the call's token.

use std::cell::RefCell;
use std::collections::HashMap;

use plan_limits_core::config::RedisSettings;
use plan_limits_core::redis::{scripts, RedisCommand, RedisReply, TransportError};

pub type Reply = Result<RedisReply, TransportError>;
type Handler = Box<dyn FnOnce(Reply)>;

thread_local! {
    static WAITING: RefCell<HashMap<u32, Handler>> = RefCell::new(HashMap::new());
}

/// Sends `command`; `on_reply` runs with its answer. Returns the call's token.
/// A script Redis does not know yet (`NOSCRIPT`) is sent once more with its source.
pub fn call(
    settings: &RedisSettings,
    command: &RedisCommand,
    on_reply: impl FnOnce(Reply) + 'static,
) -> Result<u32, TransportError> {
    let token = imp::send(settings, command)?;
    let handler: Handler = match scripts::with_source(command) {
        None => Box::new(on_reply),
        Some(eval) => {
            let settings = settings.clone();
            Box::new(move |reply: Reply| match reply {
                Ok(ref r) if scripts::is_noscript(r) => {
                    // The retry's answer goes to the same handler, under the new token.
                    if let Err(e) = call(&settings, &eval, on_reply) {
                        log::warn!("plan-limits: resending a script with its source failed: {e}");
                    }
                }
                reply => on_reply(reply),
            })
        }
    };
    WAITING.with(|w| w.borrow_mut().insert(token, handler));
    Ok(token)
}

/// The waiting code is gone (its stream ended): drop its handler.
pub fn forget(token: u32) {
    WAITING.with(|w| w.borrow_mut().remove(&token));
}

fn answer(token: u32, reply: Reply) {
    // Taken out first: the handler may send another call.
    let handler = WAITING.with(|w| w.borrow_mut().remove(&token));
    if let Some(handler) = handler {
        handler(reply);
    }
}

/// Called from every context's `on_http_call_response`.
pub fn on_http_call_response(token: u32, num_headers: usize, body_size: usize) {
    #[cfg(not(feature = "redis-hostcalls"))]
    answer(token, imp::receive(num_headers, body_size));
    #[cfg(feature = "redis-hostcalls")]
    let _ = (token, num_headers, body_size);
}

/// Prepares the transport when a configuration is applied.
pub fn init(settings: &RedisSettings) -> Result<(), TransportError> {
    imp::init(settings)
}

#[cfg(not(feature = "redis-hostcalls"))]
mod imp {
    use std::time::Duration;

    use proxy_wasm::hostcalls;
    use proxy_wasm::types::{BufferType, MapType};

    use super::Reply;
    use plan_limits_core::config::RedisSettings;
    use plan_limits_core::redis::{webdis, RedisCommand, TransportError};

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
    use plan_limits_core::config::RedisSettings;
    use plan_limits_core::redis::{resp, RedisCommand, TransportError};

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
        // SAFETY: pointers and sizes describe live slices for the duration of the call.
        let status = unsafe {
            proxy_redis_init(
                cluster.as_ptr(),
                cluster.len(),
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                settings.timeout_ms as u32,
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

    /// Higress calls this on the root context; the token tells whose call it was.
    #[no_mangle]
    pub extern "C" fn proxy_on_redis_call_response(
        _root_context_id: u32,
        token: u32,
        status: u32,
        size: usize,
    ) {
        let reply: Reply = if status != STATUS_OK {
            Err(TransportError::Unknown(format!(
                "redis call failed (status {status})"
            )))
        } else {
            resp::parse_reply(&reply_bytes(size))
        };
        super::answer(token, reply);
    }
}
