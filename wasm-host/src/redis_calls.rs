//! Redis host calls as the Higress gateway's Envoy has them:
//! `proxy_redis_init(cluster, username, password, timeout_ms)`,
//! `proxy_redis_call(cluster, RESP query, token out)`, answered through
//! `proxy_on_redis_call_response(root_context_id, token, status, size)` with the RESP reply in
//! buffer 9. The host side runs the query on a real Redis with the `redis` crate.

use wasmtime::{Caller, Linker};

use super::abi::{BAD_ARGUMENT, OK};
use super::memory::{read, read_string, write_u32};
use super::state::{Callout, PendingCall, VmState};

/// The cluster name up to `?` (Higress passes options such as `?db=1` after it).
fn cluster_name(raw: &str) -> &str {
    raw.split('?').next().unwrap_or(raw)
}

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_redis_init",
        |mut caller: Caller<'_, VmState>,
         cluster_ptr: i32,
         cluster_len: i32,
         user_ptr: i32,
         user_len: i32,
         password_ptr: i32,
         password_len: i32,
         _timeout_ms: i32|
         -> wasmtime::Result<i32> {
            let cluster = read_string(&mut caller, cluster_ptr, cluster_len)?;
            let _ = read(&mut caller, user_ptr, user_len)?;
            let _ = read(&mut caller, password_ptr, password_len)?;
            let cluster = cluster_name(&cluster).to_string();
            let state = caller.data_mut();
            if !state.redis_clusters.contains_key(&cluster) {
                return Ok(BAD_ARGUMENT);
            }
            state.redis_initialized.insert(cluster, true);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_redis_call",
        |mut caller: Caller<'_, VmState>,
         cluster_ptr: i32,
         cluster_len: i32,
         query_ptr: i32,
         query_len: i32,
         token_out: i32|
         -> wasmtime::Result<i32> {
            let cluster = read_string(&mut caller, cluster_ptr, cluster_len)?;
            let cluster = cluster_name(&cluster).to_string();
            let query = read(&mut caller, query_ptr, query_len)?;
            let state = caller.data_mut();
            if !state
                .redis_initialized
                .get(&cluster)
                .copied()
                .unwrap_or(false)
            {
                return Ok(BAD_ARGUMENT);
            }
            state.next_token += 1;
            let token = state.next_token;
            // Higress runs Redis calls on the root context and answers it there.
            let context_id = state.root_context_id;
            state.pending.push_back(PendingCall {
                token,
                context_id,
                callout: Callout::Redis { cluster, query },
            });
            write_u32(&mut caller, token_out, token)?;
            Ok(OK)
        },
    )?;
    Ok(())
}

/// Runs a RESP-encoded command on the real Redis and returns the RESP-encoded reply; `None`
/// when Redis could not be reached (a network error, status non-zero for the filter).
pub fn perform(conn: &mut redis::Connection, query: &[u8]) -> Option<Vec<u8>> {
    let args = match redis::parse_redis_value(query) {
        Ok(redis::Value::Array(args)) => args,
        _ => return Some(b"-ERR the host could not parse the query\r\n".to_vec()),
    };
    let mut cmd = redis::Cmd::new();
    for arg in args {
        match arg {
            redis::Value::BulkString(bytes) => cmd.arg(bytes),
            _ => return Some(b"-ERR query arguments must be bulk strings\r\n".to_vec()),
        };
    }
    match cmd.query::<redis::Value>(conn) {
        Ok(value) => Some(encode(&value)),
        Err(e)
            if e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout() =>
        {
            None
        }
        // Redis answered with an error: hand it on as the error reply it was.
        Err(e) => {
            let text = match (e.code(), e.detail()) {
                (Some(code), Some(detail)) => format!("{code} {detail}"),
                (Some(code), None) => code.to_string(),
                _ => format!("ERR {e}"),
            };
            Some(format!("-{}\r\n", text.replace(['\r', '\n'], " ")).into_bytes())
        }
    }
}

/// RESP2 encoding of a reply.
pub fn encode(value: &redis::Value) -> Vec<u8> {
    use redis::Value;
    let mut out = Vec::new();
    match value {
        Value::Nil => out.extend_from_slice(b"$-1\r\n"),
        Value::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Value::BulkString(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Value::SimpleString(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Value::Okay => out.extend_from_slice(b"+OK\r\n"),
        Value::Array(items) | Value::Set(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for item in items {
                out.extend(encode(item));
            }
        }
        Value::ServerError(e) => {
            let text = format!("{} {}", e.code(), e.details().unwrap_or_default());
            out.extend_from_slice(
                format!("-{}\r\n", text.trim_end().replace(['\r', '\n'], " ")).as_bytes(),
            )
        }
        other => {
            let text = format!("{other:?}");
            out.extend_from_slice(format!("${}\r\n{text}\r\n", text.len()).as_bytes());
        }
    }
    out
}
