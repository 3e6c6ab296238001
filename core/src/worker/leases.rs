//! Leases (`redis.lease_units`): units of a user's allowance this worker holds beyond its
//! requests in flight, reserved in Redis together with one request's own unit while much
//! remains. The user's next requests are admitted from them without a call of their own
//! (each then commits or releases its unit like any reservation); what is unused goes back
//! `lease_hold_ms` after the grant, or when the worker stops.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::config::RedisSettings;
use crate::redis::functions::{self, Reservation};
use crate::request::{unix_millis, MeteredRequest};
use crate::settlement::Settlement;

/// One user's, action's and period's leased units, from one grant or more (requests that
/// asked at the same time each brought theirs).
struct Lease {
    /// Units not handed out yet, oldest first, each with when it goes back (unix ms).
    units: VecDeque<(String, u64)>,
    /// The latest answer that granted units: what a request admitted from them is decided by
    /// (its plan too: a request under another plan asks Redis).
    granted: Reservation,
    /// A release of one unit (each unit's id set in it as it goes back).
    release: Settlement,
}

/// This worker's leases, by the user's pending set (user, action, period).
#[derive(Default)]
pub(super) struct Leases {
    by_pending: HashMap<String, Lease>,
}

impl Leases {
    /// A unit for `request`, and the answer it is admitted under; `None`: it asks Redis.
    pub fn take(
        &mut self,
        request: &MeteredRequest,
        now_ms: u64,
    ) -> Option<(String, &Reservation)> {
        let lease = self.by_pending.get_mut(request.keys().pending.as_str())?;
        if lease.granted.plan != request.plan().key {
            return None;
        }
        // (Units whose time is up are left for `expire` to give back.)
        let fresh = lease.units.iter().position(|(_, until)| *until > now_ms)?;
        let (id, _) = lease.units.remove(fresh)?;
        Some((id, &lease.granted))
    }

    /// `request`'s reservation came with `granted.leased` more units: kept for the requests
    /// that follow, after any the user's lease still has.
    pub fn add(
        &mut self,
        request: &MeteredRequest,
        granted: Reservation,
        now: DateTime<Utc>,
        redis: &RedisSettings,
    ) {
        let until = unix_millis(now).saturating_add(redis.lease_hold_ms);
        let units = unit_ids(request, granted.leased).map(|id| (id, until));
        match self.by_pending.get_mut(request.keys().pending.as_str()) {
            Some(lease) => {
                lease.units.extend(units);
                lease.granted = granted;
            }
            None => {
                let lease = Lease {
                    units: units.collect(),
                    granted,
                    release: request.lease_release(now, redis),
                };
                self.by_pending
                    .insert(request.keys().pending.clone(), lease);
            }
        }
    }

    /// Releases of the units whose time is up (of every unit, with `all`).
    pub fn expire(&mut self, now_ms: u64, all: bool) -> Vec<Settlement> {
        let mut out = Vec::new();
        self.by_pending.retain(|_, lease| {
            // (Units are added in the order of their time: the due ones come first.)
            let due = match all {
                true => lease.units.len(),
                false => lease.units.partition_point(|(_, until)| *until <= now_ms),
            };
            let ids = lease.units.drain(..due).map(|(id, _)| id);
            out.extend(releases(&lease.release, ids, now_ms));
            !lease.units.is_empty()
        });
        out
    }
}

/// The ids of the `n` units a lease brought with `request`'s reservation.
fn unit_ids(request: &MeteredRequest, n: u64) -> impl Iterator<Item = String> + '_ {
    (1..=n).map(move |k| functions::leased_unit_id(request.reservation_id(), k))
}

/// What gives the units `ids` back, each a copy of `release` under its id.
fn releases<'a>(
    release: &'a Settlement,
    ids: impl Iterator<Item = String> + 'a,
    now_ms: u64,
) -> impl Iterator<Item = Settlement> + 'a {
    ids.map(move |id| Settlement {
        reservation_id: id,
        made_at_ms: now_ms,
        ..release.clone()
    })
}

/// The releases of `n` units `request`'s reservation leased (or asked for), when they are not
/// kept: its request was refused after all, reserved in the wrong period, or ended before
/// the answer came.
pub(super) fn unkept(
    request: &MeteredRequest,
    n: u64,
    now: DateTime<Utc>,
    redis: &RedisSettings,
) -> Vec<Settlement> {
    if n == 0 {
        // (Most requests: nothing leased, and no release to build.)
        return Vec::new();
    }
    let release = request.lease_release(now, redis);
    releases(&release, unit_ids(request, n), unix_millis(now)).collect()
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    /// A worker whose reservations ask for leases of four units (its successes' commits
    /// batched, not each sent at once for read-your-writes).
    fn leasing_worker(io: &mut Recorder) -> Worker {
        let json = plans_json_with(|v| {
            v["gateway"]["read_your_writes"] = false.into();
            v["redis"]["lease_units"] = 4.into();
            v["redis"]["lease_hold_ms"] = 1000.into();
        });
        worker_with(io, &json)
    }

    fn api_call(user: &str) -> Req {
        head("GET", "/api/v1/diagrams", user, "enterprise")
    }

    /// plan_limits_reserve's grant of one unit and `leased` more.
    fn granted_with_lease(leased: i64) -> Result<RedisReply, TransportError> {
        let plan = || RedisReply::Bulk(b"enterprise".to_vec());
        Ok(RedisReply::Array(vec![
            RedisReply::Int(1),
            RedisReply::Int(0),
            RedisReply::Int(1 + leased),
            plan(),
            plan(),
            RedisReply::Int(0),
            RedisReply::Int(0),
            RedisReply::Bulk(Vec::new()),
            RedisReply::Bulk(Vec::new()),
            RedisReply::Int(0),
            RedisReply::Int(0),
            RedisReply::Int(leased),
        ]))
    }

    /// Sends user u's API call as `stream`: its reservation call's token and its id.
    fn reserving(w: &mut Worker, stream: StreamId, io: &mut Recorder) -> (Token, String) {
        send(w, stream, &api_call("u"), io);
        let (token, reserve) = io.last_sent();
        let id = String::from_utf8(functions::reserve_args(reserve)[3].clone()).unwrap();
        (token, id)
    }

    /// The ids of reservation `id`'s leased units `units` (`<id>#k`), as `mode` in a batch.
    fn units(
        mode: &'static str,
        id: &str,
        units: std::ops::RangeInclusive<u64>,
    ) -> Vec<(&'static str, String)> {
        units
            .map(|k| (mode, functions::leased_unit_id(id, k)))
            .collect()
    }

    /// The settlements of the batch in flight: (mode, reservation id), by id.
    fn batch_of(w: &Worker) -> Vec<(&'static str, String)> {
        let mut batch: Vec<_> = w
            .settlements
            .in_flight(crate::settlement_queue::Group::All)
            .iter()
            .map(|s| (s.mode.as_str(), s.reservation_id.clone()))
            .collect();
        batch.sort_by(|a, b| a.1.cmp(&b.1));
        batch
    }

    #[test]
    fn a_lease_admits_the_users_next_requests_without_a_call_and_gives_back_what_is_left() {
        let mut io = Recorder::default();
        let mut w = leasing_worker(&mut io);
        assert_eq!(send(&mut w, 1, &api_call("u"), &mut io), Flow::Pause);
        let (token, reserve) = io.last_sent();
        let args = functions::reserve_args(reserve);
        assert_eq!((&args[12][..], &args[13][..]), (&b"4"[..], &b"10"[..]));
        let id = String::from_utf8(args[3].clone()).unwrap();
        w.on_reply(token, granted_with_lease(3), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        // The next two requests go on at once, each on one of the lease's units.
        let calls = io.sent.len();
        for stream in [2, 3] {
            assert_eq!(
                send(&mut w, stream, &api_call("u"), &mut io),
                Flow::Continue
            );
        }
        assert_eq!(io.sent.len(), calls, "no call of their own");
        assert_eq!(io.count_of(Metric::Leased), 2);
        // Another user's request is not admitted from it.
        assert_eq!(send(&mut w, 4, &api_call("v"), &mut io), Flow::Pause);
        let (other, _) = io.last_sent();
        w.on_reply(other, reserved(1, 0, 1, "enterprise"), now(), &mut io);
        // Each commits its own unit.
        for stream in [1, 2, 3] {
            w.on_response_headers(stream, 200, None, now(), &mut io);
            w.on_stream_end(stream, true, now(), &mut io);
        }
        w.on_tick(now(), &mut io);
        let committed: Vec<_> = batch_of(&w)
            .into_iter()
            .filter(|(mode, _)| *mode == "commit")
            .map(|(_, id)| id)
            .collect();
        assert_eq!(
            committed,
            [id.clone(), format!("{id}#1"), format!("{id}#2")]
        );
        let (batch, _) = io.last_sent();
        w.on_reply(batch, settled(&[1, 1, 1]), now(), &mut io);
        // The unit left goes back once the lease's time is up, not before.
        let later = |ms| now() + chrono::Duration::milliseconds(ms);
        w.on_tick(later(999), &mut io);
        assert!(batch_of(&w).is_empty());
        w.on_tick(later(1000), &mut io);
        assert_eq!(batch_of(&w), [("release", format!("{id}#3"))]);
        // Then the user's next request asks Redis again.
        let (batch, _) = io.last_sent();
        w.on_reply(batch, settled(&[1]), later(1000), &mut io);
        let before = io.sent.len();
        assert_eq!(send(&mut w, 5, &api_call("u"), &mut io), Flow::Pause);
        assert_eq!(io.sent.len(), before + 1);
    }

    #[test]
    fn the_units_of_requests_that_asked_at_once_are_all_kept() {
        let mut io = Recorder::default();
        let mut w = leasing_worker(&mut io);
        let mut asked = Vec::new();
        for stream in [1, 2] {
            asked.push(reserving(&mut w, stream, &mut io));
        }
        for (token, _) in &asked {
            w.on_reply(*token, granted_with_lease(2), now(), &mut io);
        }
        // Four units between the two leases: three requests take the first three.
        let calls = io.sent.len();
        for stream in [3, 4, 5] {
            assert_eq!(
                send(&mut w, stream, &api_call("u"), &mut io),
                Flow::Continue
            );
        }
        assert_eq!(io.sent.len(), calls, "no call of their own");
        assert_eq!(io.count_of(Metric::Leased), 3);
        // Once the hold is over, the one unit left goes back: the second lease's last.
        w.on_tick(now() + chrono::Duration::milliseconds(1000), &mut io);
        let second = &asked[1].1;
        assert_eq!(batch_of(&w), units("release", second, 2..=2));
    }

    #[test]
    fn a_request_holding_more_than_its_unit_asks_for_no_lease_and_leases_are_off_by_default() {
        let mut io = Recorder::default();
        let mut w = leasing_worker(&mut io);
        // An idempotency key's marker is one request's: no lease.
        let keyed = api_call("u").header("idempotency-key", b"k-1");
        send(&mut w, 1, &keyed, &mut io);
        let (_, reserve) = io.last_sent();
        assert!(functions::reserve_args(reserve)[12].is_empty());
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &api_call("u"), &mut io);
        let (_, reserve) = io.last_sent();
        assert!(functions::reserve_args(reserve)[12].is_empty());
    }

    #[test]
    fn a_stopping_worker_gives_back_its_leases_units_with_its_last_batch() {
        let mut io = Recorder::default();
        let mut w = leasing_worker(&mut io);
        let (token, id) = reserving(&mut w, 1, &mut io);
        w.on_reply(token, granted_with_lease(2), now(), &mut io);
        w.on_response_headers(1, 200, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        assert!(!w.on_shutdown(now(), &mut io));
        assert_eq!(
            batch_of(&w),
            [vec![("commit", id.clone())], units("release", &id, 1..=2)].concat()
        );
    }

    #[test]
    fn a_stream_that_ends_before_its_leasing_answer_gives_back_what_it_asked_for() {
        let mut io = Recorder::default();
        let mut w = leasing_worker(&mut io);
        let (token, id) = reserving(&mut w, 1, &mut io);
        w.on_stream_end(1, false, now(), &mut io);
        // The answer comes after the end: it is not read, so the end released the lease's
        // units with its own (those Redis did not grant release nothing).
        w.on_reply(token, granted_with_lease(3), now(), &mut io);
        w.on_tick(now(), &mut io);
        assert_eq!(
            batch_of(&w),
            [vec![("release", id.clone())], units("release", &id, 1..=3)].concat()
        );
        assert_eq!(io.count_of(Metric::Leased), 0);
    }

    #[test]
    fn a_lease_whose_request_is_refused_after_all_is_given_back_at_once() {
        let mut io = Recorder::default();
        let mut w = leasing_worker(&mut io);
        let (token, id) = reserving(&mut w, 1, &mut io);
        // Billing's record names a plan whose API calls are 0: this one is refused (403), and
        // the lease goes back with its own unit.
        let mut answer = granted_with_lease(2).unwrap();
        if let RedisReply::Array(items) = &mut answer {
            items[3] = RedisReply::Bulk(b"free".to_vec());
            items[4] = RedisReply::Bulk(b"free".to_vec());
            items[5] = RedisReply::Int(1);
        }
        w.on_reply(token, Ok(answer), now(), &mut io);
        assert_eq!(io.status_for(1), Some(403));
        w.on_stream_end(1, false, now(), &mut io);
        w.on_tick(now(), &mut io);
        assert_eq!(
            batch_of(&w),
            [vec![("release", id.clone())], units("release", &id, 1..=2)].concat()
        );
        // And no later request is admitted from it.
        send(&mut w, 2, &api_call("u"), &mut io);
        assert_eq!(io.count_of(Metric::Leased), 0);
    }
}
