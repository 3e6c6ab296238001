//! Redis host calls as the Higress gateway's Envoy has them:
//! `proxy_redis_init(cluster, username, password, timeout_ms)`,
//! `proxy_redis_call(cluster, RESP query, token out)`, answered through
//! `proxy_on_redis_call_response(root_context_id, token, status, size)` with the RESP reply in
//! buffer 9. The host side runs the query on a real Redis with the `redis` crate.
//!
//! Init options follow Higress's wasm-go SDK (`pkg/wrapper/redis_wrapper.go`,
//! `RedisClusterClient.Init`): the cluster name carries them after `?` as `k=v` pairs joined
//! by `&` (a wasm-go plugin passes
//! `outbound|6379||redis.dns?db=5&buffer_flush_timeout=3&max_buffer_size_before_flush=1024`);
//! calls name the bare cluster. Only `db` matters here: the other two tune Envoy's request
//! pipelining, and this host runs one call at a time.
//!
//! Connections are set up as Higress's Envoy sets up its Redis clients
//! (`AsyncClientImpl::initialize` in higress-group/envoy `source/common/redis/` takes the
//! username, password, options and op timeout; the client sends AUTH, then SELECT, ahead of
//! the first command and drops their replies), so a wrong password shows up in the reply to
//! the filter's own command, not as an unreachable Redis.
//!
//! A Redis Cluster behind a host-call cluster is reached with the `redis` crate's cluster
//! connection: each call goes to the master of its first key's slot, following `MOVED`, as a
//! cluster-aware endpoint in front of the masters would. (Higress's own client,
//! `AsyncClientImpl::send` in higress-group/envoy, picks a host without a key and hands the
//! raw reply back, `MOVED` included: on Higress a cluster needs such an endpoint in front.)
//! Its handshake is the crate's (AUTH as `init` says, on every master), so a wrong password
//! fails the call rather than answering it with an error.

use std::collections::BTreeMap;
use std::time::Duration;

use wasmtime::{Caller, Linker};

use super::abi::{BAD_ARGUMENT, OK};
use super::memory::{read, read_string, write_u32};
use super::state::{Callout, RedisInit, RedisUpstream, VmState};

/// For a timeout of 0: Envoy's default Redis op timeout (`ConfigImpl()` in higress-group/envoy
/// `source/common/redis/async_client_impl.h`), also what wasm-go plugins default to.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The cluster name up to `?`.
fn cluster_name(raw: &str) -> &str {
    raw.split('?').next().unwrap_or(raw)
}

/// The `k=v&k=v` options after `?` in the cluster name.
fn cluster_options(raw: &str) -> BTreeMap<String, String> {
    let Some((_, query)) = raw.split_once('?') else {
        return BTreeMap::new();
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (pair.to_string(), String::new()),
        })
        .collect()
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
         timeout_ms: i32|
         -> wasmtime::Result<i32> {
            let raw = read_string(&mut caller, cluster_ptr, cluster_len)?;
            let username = read_string(&mut caller, user_ptr, user_len)?;
            let password = read_string(&mut caller, password_ptr, password_len)?;
            let cluster = cluster_name(&raw).to_string();
            let state = caller.data_mut();
            if !state.redis_clusters.contains_key(&cluster) {
                return Ok(BAD_ARGUMENT);
            }
            let timeout = match timeout_ms as u32 {
                0 => DEFAULT_TIMEOUT,
                ms => Duration::from_millis(ms.into()),
            };
            let init = RedisInit {
                username,
                password,
                options: cluster_options(&raw),
                timeout,
            };
            state.redis_initialized.insert(cluster, init);
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
            if !state.redis_initialized.contains_key(&cluster) {
                return Ok(BAD_ARGUMENT);
            }
            let token = state.push_call(Callout::Redis { cluster, query });
            write_u32(&mut caller, token_out, token)?;
            Ok(OK)
        },
    )?;
    Ok(())
}

/// An open connection to a host-call cluster's Redis.
pub enum RedisConnection {
    One(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl RedisConnection {
    pub fn as_dyn(&mut self) -> &mut dyn redis::ConnectionLike {
        match self {
            RedisConnection::One(conn) => conn,
            RedisConnection::Cluster(conn) => conn.as_mut(),
        }
    }
}

/// Opens a connection to `upstream` as Higress does with `init`; notes for the log.
pub fn connect_to(
    upstream: &RedisUpstream,
    init: &RedisInit,
) -> Result<(RedisConnection, Vec<String>), String> {
    match upstream {
        RedisUpstream::One(url) => {
            connect(url, init).map(|(conn, notes)| (RedisConnection::One(conn), notes))
        }
        RedisUpstream::Cluster(urls) => connect_cluster(urls, init)
            .map(|conn| (RedisConnection::Cluster(Box::new(conn)), Vec::new())),
    }
}

/// A cluster connection to the masters at `urls` with `init`'s credentials (else the URLs'),
/// its timeout per call. Calls that meet a master that is down fail after a few retries.
pub fn connect_cluster(
    urls: &[String],
    init: &RedisInit,
) -> Result<redis::cluster::ClusterConnection, String> {
    use redis::IntoConnectionInfo;
    let first = urls
        .first()
        .ok_or("a Redis Cluster needs at least one master")?
        .as_str()
        .into_connection_info()
        .map_err(|e| e.to_string())?;
    let from_url = first.redis_settings();
    let (username, password) = if init.password.is_empty() {
        (
            from_url.username().unwrap_or_default().to_string(),
            from_url.password().unwrap_or_default().to_string(),
        )
    } else {
        (init.username.clone(), init.password.clone())
    };
    let mut builder = redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
        .connection_timeout(init.timeout)
        .response_timeout(init.timeout)
        .retries(2);
    if !username.is_empty() {
        builder = builder.username(username);
    }
    if !password.is_empty() {
        builder = builder.password(password);
    }
    builder
        .build()
        .and_then(|client| client.get_connection())
        .map_err(|e| e.to_string())
}

/// Opens a connection to the cluster at `url` as Higress does with `init`: the read/write
/// timeout is the per-call timeout, AUTH (username and password, or password only) and SELECT
/// go first and their replies are dropped, each noted for the log. `Err` when Redis could not
/// be reached.
pub fn connect(url: &str, init: &RedisInit) -> Result<(redis::Connection, Vec<String>), String> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info().map_err(|e| e.to_string())?;
    let from_url = info.redis_settings().clone();
    // Credentials in the cluster's URL stand in for a filter that passes none.
    let (username, password) = if init.password.is_empty() {
        (
            from_url.username().unwrap_or_default().to_string(),
            from_url.password().unwrap_or_default().to_string(),
        )
    } else {
        (init.username.clone(), init.password.clone())
    };
    let db = match init.db() {
        Some(db) => Some(db.to_string()),
        None => (from_url.db() != 0).then(|| from_url.db().to_string()),
    };
    // The handshake is ours, not the crate's: it would refuse the connection on a bad AUTH.
    let bare = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
    let client = redis::Client::open(info.set_redis_settings(bare)).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_connection_with_timeout(init.timeout)
        .map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(init.timeout))
        .and_then(|_| conn.set_write_timeout(Some(init.timeout)))
        .map_err(|e| e.to_string())?;
    let mut notes = Vec::new();
    if !password.is_empty() {
        let mut auth = redis::cmd("AUTH");
        if !username.is_empty() {
            auth.arg(&username);
        }
        auth.arg(&password);
        handshake(&mut conn, &auth, "AUTH", &mut notes)?;
    }
    if let Some(db) = db {
        handshake(
            &mut conn,
            redis::cmd("SELECT").arg(&db),
            "SELECT",
            &mut notes,
        )?;
    }
    Ok((conn, notes))
}

/// One handshake command: its error reply is only noted, a network error fails the connection.
fn handshake(
    conn: &mut redis::Connection,
    cmd: &redis::Cmd,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    match cmd.query::<redis::Value>(conn) {
        Ok(_) => Ok(()),
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
            Err(format!("redis {name}: {e}"))
        }
        Err(e) => {
            notes.push(format!(
                "redis {name} failed (reply dropped, as Envoy does): {e}"
            ));
            Ok(())
        }
    }
}

/// Runs a RESP-encoded command on the real Redis and returns the RESP-encoded reply; `None`
/// when Redis could not be reached (a network error, status non-zero for the filter).
pub fn perform(conn: &mut dyn redis::ConnectionLike, query: &[u8]) -> Option<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_after_the_cluster_name() {
        let raw = concat!(
            "outbound|6379||redis.dns",
            "?db=5&buffer_flush_timeout=3&max_buffer_size_before_flush=1024"
        );
        assert_eq!(cluster_name(raw), "outbound|6379||redis.dns");
        let options = cluster_options(raw);
        assert_eq!(options.get("db").map(String::as_str), Some("5"));
        assert_eq!(options.len(), 3);
        assert!(cluster_options("plan_limits_redis").is_empty());
    }
}
