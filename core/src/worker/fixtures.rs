//! What the worker's tests share: workers on the repository's plans, requests, and Redis's
//! answers.

pub(super) use crate::cluster;
pub(super) use crate::metrics::Metric;
pub(super) use crate::period::BillingPeriod;
pub(super) use crate::redis::functions;
pub(super) use crate::redis::{RedisCommand, RedisReply, TransportError};
pub(super) use crate::settlement::SettleMode;
pub(super) use crate::testing::{head, now, plans_json_with, Recorder, Req, PLANS_JSON};

pub(super) use super::*;

pub(super) fn worker(io: &mut Recorder) -> Worker {
    worker_with(io, PLANS_JSON)
}

pub(super) fn worker_with(io: &mut Recorder, json: &str) -> Worker {
    let mut w = Worker::new(0xfeed);
    assert!(w.configure(json.as_bytes(), io));
    w
}

pub(super) fn send(w: &mut Worker, stream: StreamId, req: &Req, io: &mut Recorder) -> Flow {
    w.on_request_headers(stream, req.head(), false, now(), io)
}

pub(super) fn upload(user: &str) -> Req {
    head("POST", "/api/upload", user, "free")
}

/// What plan_limits_reserve answers under `plan`, claimed (billing recorded nothing).
pub(super) fn reserved(
    status: i64,
    committed: i64,
    pending: i64,
    plan: &str,
) -> Result<RedisReply, TransportError> {
    reply(status, committed, pending, plan, false)
}

/// What plan_limits_reserve answers under `plan`, which billing recorded.
pub(super) fn recorded(
    status: i64,
    committed: i64,
    pending: i64,
    plan: &str,
) -> Result<RedisReply, TransportError> {
    reply(status, committed, pending, plan, true)
}

pub(super) fn reply(
    status: i64,
    committed: i64,
    pending: i64,
    plan: &str,
    recorded: bool,
) -> Result<RedisReply, TransportError> {
    Ok(RedisReply::Array(vec![
        RedisReply::Int(status),
        RedisReply::Int(committed),
        RedisReply::Int(pending),
        RedisReply::Bulk(plan.into()),
        RedisReply::Bulk(plan.into()),
        RedisReply::Int(i64::from(recorded)),
    ]))
}

pub(super) fn granted() -> Result<RedisReply, TransportError> {
    reserved(1, 0, 1, "free")
}

/// What plan_limits_settle answers: the batch applied, each item done, no entitlement
/// recorded.
pub(super) fn settled(done: &[i64]) -> Result<RedisReply, TransportError> {
    let items = done
        .iter()
        .flat_map(|&d| [RedisReply::Int(d), RedisReply::Nil, RedisReply::Nil]);
    Ok(RedisReply::Array(
        std::iter::once(RedisReply::Int(1)).chain(items).collect(),
    ))
}

pub(super) fn name(command: &RedisCommand) -> (&[u8], &[u8]) {
    (&command.args[0], &command.args[1])
}

/// A recorder with a hold filter after the plan filter, as envoy.yaml renders it.
pub(super) fn holding() -> Recorder {
    Recorder {
        holds: true,
        ..Recorder::default()
    }
}

/// A free user's upload without a Content-Length (a chunked body).
pub(super) fn streamed_upload(user: &str) -> Req {
    let mut req = upload(user);
    req.headers.retain(|(n, _)| n != "content-length");
    req
}

/// plan_limits_reserve's answer to a free user's upload with `stored` and `held` bytes
/// already in their storage.
pub(super) fn with_storage(
    status: i64,
    stored: i64,
    held: i64,
) -> Result<RedisReply, TransportError> {
    let Ok(RedisReply::Array(mut items)) = reserved(status, 0, 1, "free") else {
        unreachable!()
    };
    items.extend([
        RedisReply::Int(0),
        RedisReply::Nil,
        RedisReply::Nil,
        RedisReply::Int(stored),
        RedisReply::Int(held),
    ]);
    Ok(RedisReply::Array(items))
}

/// A `plan_limits_settle_v2` call taken apart (after FCALL, its name and the key count).
pub(super) struct SettleCall<'a> {
    pub keys: &'a [Vec<u8>],
    pub args: &'a [Vec<u8>],
    /// Each item's fields.
    pub items: Vec<&'a [Vec<u8>]>,
}

pub(super) fn settle_call(batch: &RedisCommand) -> SettleCall<'_> {
    use crate::redis::functions::{SETTLE_ARGS, SETTLE_FIELDS};
    let numkeys: usize = String::from_utf8_lossy(&batch.args[2]).parse().unwrap();
    let (keys, rest) = batch.args[3..].split_at(numkeys);
    let (args, fields) = rest.split_at(SETTLE_ARGS);
    assert_eq!(fields.len() % SETTLE_FIELDS, 0, "whole items");
    SettleCall {
        keys,
        args,
        items: fields.chunks(SETTLE_FIELDS).collect(),
    }
}

/// How many settlements a `plan_limits_settle_v2` call holds.
pub(super) fn items_of(batch: &RedisCommand) -> usize {
    settle_call(batch).items.len()
}

/// The stopping flag of a `plan_limits_settle_v2` call (its last argument before the items).
pub(super) fn stopping_flag(batch: &RedisCommand) -> &[u8] {
    &settle_call(batch).args[11]
}

/// The settlement modes and outcomes in the next batch (answered: all done).
pub(super) fn next_batch(w: &mut Worker, io: &mut Recorder) -> Vec<(String, String)> {
    w.on_tick(now(), io);
    let (token, batch) = io.last_sent();
    let batch = batch.clone();
    w.on_reply(token, settled(&vec![1; items_of(&batch)]), now(), io);
    let text = |a: &[u8]| String::from_utf8_lossy(a).into_owned();
    let modes = ["commit", "count", "release", "extend", "give_back", "lost"];
    let at: Vec<usize> = (0..batch.args.len())
        .filter(|&i| modes.contains(&text(&batch.args[i]).as_str()))
        .filter(|&i| i + 16 < batch.args.len())
        .collect();
    at.into_iter()
        .map(|i| (text(&batch.args[i]), text(&batch.args[i + 16])))
        .collect()
}

/// A procedure view by `user` claiming `plan` (unlimited on it) that succeeds and ends: one
/// count queued.
pub(super) fn view_of(w: &mut Worker, stream: StreamId, user: &str, plan: &str, io: &mut Recorder) {
    let h = head("GET", "/api/procedures/1", user, plan);
    assert_eq!(send(w, stream, &h, io), Flow::Continue);
    w.on_response_headers(stream, 200, None, now(), io);
    w.on_stream_end(stream, true, now(), io);
}

pub(super) fn on_a_cluster(p: &mut serde_json::Value) {
    p["redis"]["cluster_mode"] = true.into();
}

/// The hash slot of every key a settle call names (its numkeys keys).
pub(super) fn slots_of(command: &RedisCommand) -> Vec<u16> {
    let n: usize = std::str::from_utf8(&command.args[2])
        .unwrap()
        .parse()
        .unwrap();
    command.args[3..3 + n]
        .iter()
        .map(|key| cluster::key_slot(key))
        .collect()
}
