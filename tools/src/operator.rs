//! What `plan-limits` does against a running gateway's Redis (as an admin): read a user's
//! usage and history (the same JSON the gateway's endpoints answer, built by the same code),
//! change what a user may do (each change one transaction with its `admin` event), and export
//! the event stream for billing.
//!
//! The Redis may be a Redis Cluster (`INFO cluster` says so): reads go to the master of their
//! key's slot, a change's transaction to the master of the user's slot, the library to every
//! master, and an export reads every slot's event stream.

use std::io::Write;

use chrono::{DateTime, NaiveDate, Utc};
use plan_limits_core::{
    admin_transaction, all_events_streams, functions, history_query, key_slot, usage_query,
    AdminOp, LocalResponse, Plans, RedisCommand, RedisReply, Report, ReportKind, UserKeys,
    CLUSTER_SLOTS,
};
use plan_limits_services::redis_exec;

/// One entry of `CLUSTER SLOTS`: first and last slot, and its master's host and port.
fn slot_range(range: redis::Value) -> Result<(u16, u16, (String, u16)), String> {
    use redis::Value;
    let bad = |what: &Value| format!("CLUSTER SLOTS answered {what:?}");
    let Value::Array(items) = &range else {
        return Err(bad(&range));
    };
    match items.as_slice() {
        [Value::Int(start), Value::Int(end), Value::Array(node), ..] => match node.as_slice() {
            [host, Value::Int(port), ..] => {
                let host =
                    redis::from_redis_value_ref::<String>(host).map_err(|e| e.to_string())?;
                let number = |n: i64| u16::try_from(n).map_err(|_| bad(&range));
                Ok((number(*start)?, number(*end)?, (host, number(*port)?)))
            }
            _ => Err(bad(&range)),
        },
        _ => Err(bad(&range)),
    }
}

/// A master: its address (`None`: the one Redis) and the slot ranges it serves.
pub(crate) struct Master {
    pub(crate) node: Option<(String, u16)>,
    slots: Vec<(u16, u16)>,
}

/// The Redis at REDIS_URL, as the operator reaches it.
pub enum Redis {
    One(redis::Connection),
    /// A Redis Cluster: commands routed by key; `url` (any master's, with the admin's
    /// credentials) reaches the others with the same credentials.
    Cluster {
        conn: Box<redis::cluster::ClusterConnection>,
        url: String,
    },
}

impl Redis {
    /// Connects to `url`, and to the whole cluster when it is a master of one.
    pub fn connect(url: &str) -> Result<Self, String> {
        let failed = |e: redis::RedisError| format!("{url}: {e}");
        let mut conn = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .map_err(failed)?;
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query(&mut conn)
            .map_err(failed)?;
        if !info.contains("cluster_enabled:1") {
            return Ok(Redis::One(conn));
        }
        let conn = redis::cluster::ClusterClient::new(vec![url])
            .and_then(|c| c.get_connection())
            .map_err(failed)?;
        Ok(Redis::Cluster {
            conn: Box::new(conn),
            url: url.to_string(),
        })
    }

    pub fn as_dyn(&mut self) -> &mut dyn redis::ConnectionLike {
        match self {
            Redis::One(conn) => conn,
            Redis::Cluster { conn, .. } => conn.as_mut(),
        }
    }

    /// Every master's address and the hash slots it serves (`CLUSTER SLOTS`); one Redis is
    /// one master of every slot, at `None`.
    pub(crate) fn masters(&mut self) -> Result<Vec<Master>, String> {
        let Redis::Cluster { conn, .. } = self else {
            return Ok(vec![Master {
                node: None,
                slots: vec![(0, CLUSTER_SLOTS - 1)],
            }]);
        };
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(conn.as_mut())
            .map_err(|e| format!("CLUSTER SLOTS: {e}"))?;
        let mut masters: Vec<Master> = Vec::new();
        for range in ranges {
            let (start, end, node) = slot_range(range)?;
            let node = Some(node);
            match masters.iter_mut().find(|m| m.node == node) {
                Some(master) => master.slots.push((start, end)),
                None => masters.push(Master {
                    node,
                    slots: vec![(start, end)],
                }),
            }
        }
        Ok(masters)
    }

    /// A connection of its own to a master (`None`: the one Redis), with REDIS_URL's
    /// credentials.
    pub(crate) fn connect_master(
        &mut self,
        node: Option<&(String, u16)>,
    ) -> Result<redis::Connection, String> {
        use redis::IntoConnectionInfo;
        let url = match self {
            Redis::Cluster { url, .. } => url.clone(),
            Redis::One(_) => return Err("one Redis: use its connection".into()),
        };
        let mut info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| e.to_string())?;
        if let Some((host, port)) = node {
            info = info.set_addr(redis::ConnectionAddr::Tcp(host.clone(), *port));
        }
        redis::Client::open(info)
            .and_then(|c| c.get_connection())
            .map_err(|e| format!("master {node:?}: {e}"))
    }

    /// Runs `commands` pipelined (on a cluster, a pipeline per master); their answers in order.
    fn pipelined<T: redis::FromRedisValue>(
        &mut self,
        commands: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, String> {
        let values: Vec<redis::Value> = match self {
            Redis::One(conn) => {
                let mut pipe = redis::pipe();
                for command in commands {
                    pipe.add_command(command);
                }
                pipe.query(conn)
            }
            Redis::Cluster { conn, .. } => {
                let mut pipe = redis::cluster::cluster_pipe();
                for command in commands {
                    pipe.add_command(command);
                }
                pipe.query(conn)
            }
        }
        .map_err(|e| e.to_string())?;
        values
            .into_iter()
            .map(|v| redis::from_redis_value(v).map_err(|e| e.to_string()))
            .collect()
    }

    /// Runs `commands` in one MULTI/EXEC on the master of `key`'s slot.
    fn run_atomically_at(&mut self, key: &str, commands: &[RedisCommand]) -> Result<(), String> {
        if let Redis::One(conn) = self {
            return redis_exec::run_atomically(conn, commands);
        }
        let slot = key_slot(key.as_bytes());
        let node = self
            .masters()?
            .into_iter()
            .find(|m| m.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .and_then(|m| m.node)
            .ok_or_else(|| format!("no master serves slot {slot}"))?;
        let mut conn = self.connect_master(Some(&node))?;
        redis_exec::run_atomically(&mut conn, commands)
    }

    /// Loads the library and its scripts (for `redis.invoke: evalsha`) on every master;
    /// returns how many masters.
    pub fn load_library(&mut self) -> Result<usize, String> {
        let mut commands = vec![functions::load_library()];
        commands.extend(functions::load_scripts());
        let masters = self.masters()?;
        for Master { node, .. } in &masters {
            let mut own;
            let conn: &mut dyn redis::ConnectionLike = match (node, &mut *self) {
                (None, Redis::One(conn)) => conn,
                (node, _) => {
                    own = self.connect_master(node.as_ref())?;
                    &mut own
                }
            };
            for command in &commands {
                if let RedisReply::Error(e) = redis_exec::run(conn, command) {
                    let at = node
                        .as_ref()
                        .map(|(h, p)| format!(" on {h}:{p}"))
                        .unwrap_or_default();
                    return Err(format!(
                        "{}{at}: {e}",
                        String::from_utf8_lossy(&command.args[0])
                    ));
                }
            }
        }
        Ok(masters.len())
    }
}

/// `GET /api/usage`'s JSON for `user`.
pub fn usage(
    conn: &mut dyn redis::ConnectionLike,
    plans: &Plans,
    user: &str,
    period: Option<&str>,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let path = period.map_or_else(String::new, |p| format!("/?period={p}"));
    let kind = usage_query(plans, &path, now).map_err(|r| refusal(&r))?;
    report(conn, plans, kind, user, now)
}

/// `GET /api/usage/history`'s JSON for `user`, its query parameters given by name (those
/// with a value).
pub fn history(
    conn: &mut dyn redis::ConnectionLike,
    plans: &Plans,
    user: &str,
    params: &[(&str, Option<&str>)],
    now: DateTime<Utc>,
) -> Result<String, String> {
    let query: Vec<String> = params
        .iter()
        .filter_map(|(name, value)| value.map(|v| format!("{name}={v}")))
        .collect();
    let path = format!("/?{}", query.join("&"));
    let kind = history_query(plans, &path, now).map_err(|r| refusal(&r))?;
    report(conn, plans, kind, user, now)
}

/// The anchor day billing recorded for `user` (0: none, the calendar month).
fn recorded_anchor(
    conn: &mut dyn redis::ConnectionLike,
    plans: &Plans,
    user: &str,
) -> Result<u32, String> {
    let key = UserKeys::new(&plans.redis.key_prefix, user).entitlement();
    let day: Option<u32> = redis::cmd("HGET")
        .arg(&key)
        .arg("anchor_day")
        .query(conn)
        .map_err(|e| format!("HGET {key}: {e}"))?;
    Ok(day.unwrap_or(0))
}

fn report(
    conn: &mut dyn redis::ConnectionLike,
    plans: &Plans,
    kind: ReportKind,
    user: &str,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let anchor = recorded_anchor(conn, plans, user)?;
    let report = Report::new(kind, user.to_string(), None, anchor, plans, now);
    let now_ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
    let reply = redis_exec::run(conn, &report.command(plans, now_ms));
    let answer = report.answer(Ok(reply), plans, now);
    if answer.status == 200 {
        Ok(answer.body)
    } else {
        Err(refusal(&answer))
    }
}

/// An answer's JSON `message`, for the terminal.
fn refusal(response: &LocalResponse) -> String {
    serde_json::from_str::<serde_json::Value>(&response.body)
        .ok()
        .and_then(|v| v["message"].as_str().map(String::from))
        .unwrap_or_else(|| response.body.clone())
}

/// Applies `op` to `user`, with its admin event, in one transaction (on a cluster, on the
/// master of the user's slot, where all of it lives).
pub fn apply(
    redis: &mut Redis,
    plans: &Plans,
    user: &str,
    op: &AdminOp,
    operator: &str,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let anchor = match op {
        AdminOp::SetPlan {
            anchor_day: Some(day),
            ..
        } => *day,
        _ => recorded_anchor(redis.as_dyn(), plans, user)?,
    };
    let commands = admin_transaction(plans, user, op, operator, anchor, now)?;
    let key = UserKeys::new(&plans.redis.key_prefix, user).entitlement();
    redis.run_atomically_at(&key, &commands)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

/// The columns of a CSV export: the stream id, then every field an event may have.
const COLUMNS: [&str; 19] = [
    "id",
    "event",
    "op",
    "user",
    "action",
    "kind",
    "bytes",
    "status",
    "at",
    "request_id",
    "plan",
    "period",
    "units",
    "operator",
    "idempotency_key",
    "threshold",
    "used",
    "limit",
    "metadata",
];

/// Writes the events recorded on days `from` to `to` (UTC, both included) to `out`; returns
/// how many. On a cluster, every slot's stream is read (those that exist, by their names,
/// without scanning the keyspace) an hour at a time, each hour's events sorted by time, and
/// each event says its `stream` (its id is unique within it).
pub fn export(
    redis: &mut Redis,
    plans: &Plans,
    from: NaiveDate,
    to: NaiveDate,
    format: Format,
    out: &mut dyn Write,
) -> Result<u64, String> {
    let start = day_start_ms(from)?;
    let end = day_start_ms(to.succ_opt().ok_or("--to is too late")?)? - 1;
    let on_cluster = matches!(redis, Redis::Cluster { .. });
    let streams = events_streams(redis, plans)?;
    let mut csv = (format == Format::Csv).then(|| csv::Writer::from_writer(Vec::new()));
    if let Some(w) = &mut csv {
        let mut header = COLUMNS.to_vec();
        if on_cluster {
            header.push("stream");
        }
        w.write_record(header).map_err(|e| e.to_string())?;
    }
    const HOUR_MS: u64 = 3_600_000;
    let window = if on_cluster { HOUR_MS } else { end - start + 1 };
    let mut written = 0u64;
    let mut from_ms = start;
    while from_ms <= end {
        let to_ms = from_ms.saturating_add(window - 1).min(end);
        let mut events = read_range(redis, &streams, from_ms, to_ms)?;
        if on_cluster {
            events.sort_by(|a, b| (id_order(&a.1), &a.0).cmp(&(id_order(&b.1), &b.0)));
        }
        for (stream, id, fields) in &events {
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv.first().map(String::as_str) == Some(name))
                    .and_then(|kv| kv.get(1).cloned())
                    .unwrap_or_default()
            };
            match &mut csv {
                Some(w) => {
                    let mut row: Vec<String> = COLUMNS
                        .iter()
                        .map(|c| if *c == "id" { id.clone() } else { field(c) })
                        .collect();
                    if on_cluster {
                        row.push(stream.clone());
                    }
                    w.write_record(&row).map_err(|e| e.to_string())?;
                }
                None => {
                    let mut object = serde_json::Map::new();
                    object.insert("id".into(), id.clone().into());
                    if on_cluster {
                        object.insert("stream".into(), stream.clone().into());
                    }
                    for kv in fields.chunks(2) {
                        if let [k, v] = kv {
                            object.insert(k.clone(), v.clone().into());
                        }
                    }
                    writeln!(out, "{}", serde_json::Value::Object(object))
                        .map_err(|e| e.to_string())?;
                }
            }
            written += 1;
        }
        from_ms = to_ms + 1;
    }
    if let Some(w) = csv {
        let bytes = w.into_inner().map_err(|e| e.to_string())?;
        out.write_all(&bytes).map_err(|e| e.to_string())?;
    }
    Ok(written)
}

/// Every events stream of `plans` that exists: the one stream, or on a cluster every slot's
/// (and the one stream, for events written before the move to a cluster).
pub(crate) fn events_streams(redis: &mut Redis, plans: &Plans) -> Result<Vec<String>, String> {
    let base = &plans.redis.events_stream;
    if matches!(redis, Redis::Cluster { .. }) {
        let names: Vec<String> = std::iter::once(base.clone())
            .chain(all_events_streams(base))
            .collect();
        existing(redis, names)
    } else {
        Ok(vec![base.clone()])
    }
}

/// The names among `names` that exist (one pipelined `EXISTS` each).
fn existing(redis: &mut Redis, names: Vec<String>) -> Result<Vec<String>, String> {
    let commands = names
        .iter()
        .map(|name| redis::cmd("EXISTS").arg(name).clone())
        .collect();
    let found: Vec<bool> = redis
        .pipelined(commands)
        .map_err(|e| format!("EXISTS: {e}"))?;
    Ok(names
        .into_iter()
        .zip(found)
        .filter_map(|(name, exists)| exists.then_some(name))
        .collect())
}

/// One event as read: its stream, its id, its fields and values in turn.
pub(crate) type Event = (String, String, Vec<String>);

/// The events of `streams` recorded from `from_ms` to `to_ms` (both included), stream by
/// stream, each stream's in order; pages of 1000, all streams' in one pipeline per round.
pub(crate) fn read_range(
    redis: &mut Redis,
    streams: &[String],
    from_ms: u64,
    to_ms: u64,
) -> Result<Vec<Event>, String> {
    const PAGE: usize = 1000;
    let mut events = Vec::new();
    // The next page of each stream still being read: its index, the first id to read.
    let mut next: Vec<(usize, String)> = (0..streams.len())
        .map(|i| (i, format!("{from_ms}-0")))
        .collect();
    while !next.is_empty() {
        let commands = next
            .iter()
            .map(|(i, from_id)| {
                redis::cmd("XRANGE")
                    .arg(&streams[*i])
                    .arg(from_id)
                    .arg(to_ms.to_string())
                    .arg("COUNT")
                    .arg(PAGE)
                    .clone()
            })
            .collect();
        let pages: Vec<Vec<(String, Vec<String>)>> = redis
            .pipelined(commands)
            .map_err(|e| format!("XRANGE: {e}"))?;
        let mut again = Vec::new();
        for ((i, _), page) in next.iter().zip(pages) {
            if page.len() == PAGE {
                if let Some((last, _)) = page.last() {
                    again.push((*i, format!("({last}")));
                }
            }
            events.extend(
                page.into_iter()
                    .map(|(id, fields)| (streams[*i].clone(), id, fields)),
            );
        }
        next = again;
    }
    Ok(events)
}

/// A stream id's order: milliseconds, then sequence.
pub(crate) fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn day_start_ms(day: NaiveDate) -> Result<u64, String> {
    let start = day
        .and_hms_opt(0, 0, 0)
        .ok_or("not a day")?
        .and_utc()
        .timestamp_millis();
    u64::try_from(start).map_err(|_| format!("{day}: before 1970"))
}
