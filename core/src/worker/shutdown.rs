//! Stopping, and the worker's record in Redis: its heartbeat, and its goodbye.

use chrono::{DateTime, Utc};

use crate::request::unix_millis;
use crate::settlement_queue::Group;

use super::{invoke, Io, Token, Waiter, Worker};

impl Worker {
    /// The host is stopping this worker: send what is queued. `true`: done now; otherwise
    /// `Io::done` follows once the last batch is answered.
    pub fn on_shutdown(&mut self, now: DateTime<Utc>, io: &mut dyn Io) -> bool {
        self.stopping = true;
        // What leases hold goes back with the last batch.
        let held = self.leases.expire(unix_millis(now), true);
        self.queue(held, io);
        self.flush(now, io);
        if self.settlements.batch_in_flight() {
            // The last batch says goodbye.
            return false;
        }
        self.report_queue(io);
        // Nothing to send: a goodbye of its own, so Redis knows this worker stopped cleanly.
        self.send_record(now, io).is_none()
    }

    /// A worker that sent no batch for `HEARTBEAT_MS` says it is alive, and one that stops
    /// says goodbye: in its record in Redis, one call without items. (On a cluster, in slot
    /// 0's.) `Some` when sent.
    pub(super) fn send_record(&mut self, now: DateTime<Utc>, io: &mut dyn Io) -> Option<Token> {
        let plans = self.plans.clone()?;
        let group = if plans.redis.cluster_mode {
            Group::Slot(0)
        } else {
            Group::All
        };
        let now_ms = unix_millis(now);
        let command = self.settle_command(&plans, group, &[], 0, now_ms, self.queued_settlements());
        let token = invoke(io, &plans.redis, command).ok()?;
        self.sent_record_at_ms = now_ms;
        self.said_goodbye |= self.stopping;
        self.calls.sent(token, Waiter::Record, now);
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    #[test]
    fn a_stopping_worker_sends_what_is_queued_then_is_done() {
        // Idle: it says goodbye (its record in Redis, so it is not taken for killed), then is
        // done; without Redis, at once.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        assert!(!w.on_shutdown(now(), &mut io), "a goodbye is on its way");
        let (token, goodbye) = io.last_sent();
        assert_eq!(goodbye.args[2], b"2", "no items: the record alone");
        assert_eq!(goodbye.args.last().unwrap(), b"1", "stopping");
        w.on_reply(
            token,
            Ok(RedisReply::Array(vec![RedisReply::Int(1)])),
            now(),
            &mut io,
        );
        assert_eq!(io.done, 1);
        let mut io = Recorder {
            refuse_sends: true,
            ..Recorder::default()
        };
        let mut w = worker(&mut io);
        assert!(
            w.on_shutdown(now(), &mut io),
            "nothing can be sent: done at once"
        );
        // With settlements queued: they go, saying it stops, then it is done.
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        view_of(&mut w, 1, "u", "free", &mut io);
        assert!(!w.on_shutdown(now(), &mut io), "a batch is on its way");
        let (token, batch) = io.last_sent();
        assert_eq!(stopping_flag(batch), b"1", "the batch says it stops");
        assert_eq!(io.done, 0);
        w.on_reply(token, settled(&[1]), now(), &mut io);
        assert_eq!(io.done, 1);
        assert_eq!(io.count_of(Metric::Counted), 1);
    }

    #[test]
    fn a_worker_that_sends_nothing_for_a_while_says_it_is_alive() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        w.on_tick(now(), &mut io);
        w.on_tick(now() + chrono::Duration::milliseconds(29_999), &mut io);
        assert!(io.sent.is_empty());
        w.on_tick(now() + chrono::Duration::seconds(30), &mut io);
        let (_, heartbeat) = io.last_sent();
        assert_eq!(name(heartbeat).1, b"plan_limits_settle_v2");
        assert_eq!(heartbeat.args[2], b"2", "no items");
        assert_eq!(heartbeat.args[4], b"plan-limits:applied:000000000000feed");
    }
}
