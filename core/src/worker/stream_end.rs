//! The end of a stream: what it still holds is settled, and whatever it waited for is
//! forgotten.

use chrono::{DateTime, Utc};

use super::{Io, Stream, StreamId, Worker};

impl Worker {
    /// `stream` is gone (completed, reset, or the client left): a unit it still holds is
    /// released, or counted if the whole request reached an upstream (`reached`) and its
    /// action counts that; an answer still owed to it is no longer wanted.
    pub fn on_stream_end(
        &mut self,
        stream: StreamId,
        reached: bool,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) {
        let mut entry = match self.streams.remove(&stream) {
            Some(Stream::Metered(entry)) => entry,
            Some(Stream::Reporting(pending)) => {
                self.calls.in_flight.remove(&pending.call);
                return;
            }
            Some(Stream::Draining(_) | Stream::Releasing { .. }) | None => return,
        };
        // Not sent yet: it never will be (its end's release asks Redis to let go of nothing).
        self.calls
            .waiting_reservations
            .retain(|(waiting, _)| *waiting != stream);
        let Some(plans) = self.plans.clone() else {
            return;
        };
        // A lease its reservation asked for, whose answer will not be read: what Redis may
        // have granted goes back with its own unit (a unit never granted releases nothing).
        let asked = entry.request.lease_asked();
        self.queue(
            super::leases::unkept(&entry.request, asked, now, &plans.redis),
            io,
        );
        let settlement = entry.request.on_end(reached, now, &plans.redis);
        self.queue(settlement, io);
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    #[test]
    fn a_stream_that_ends_while_waiting_releases_and_ignores_the_late_answer() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        send(&mut w, 1, &upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_stream_end(1, true, now(), &mut io);
        w.on_reply(token, granted(), now(), &mut io);
        assert!(io.resumed.is_empty() && io.responded.is_empty());
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"release"));
    }

    #[test]
    fn upstream_failures_and_departures_release() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        for (stream, status) in [(1, Some(500)), (2, None)] {
            send(&mut w, stream, &upload("u"), &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(token, granted(), now(), &mut io);
            if let Some(status) = status {
                w.on_response_headers(stream, status, None, now(), &mut io);
            }
            w.on_stream_end(stream, true, now(), &mut io);
        }
        w.on_tick(now(), &mut io);
        let (token, batch) = io.last_sent();
        let releases = batch.args.iter().filter(|a| *a == b"release").count();
        assert_eq!(releases, 2);
        w.on_reply(token, settled(&[0, 0]), now(), &mut io);
        assert_eq!(io.count_of(Metric::Released), 2);
        assert_eq!(io.count_of(Metric::Counted), 0);
    }

    #[test]
    fn an_analysis_fully_forwarded_is_counted_when_its_client_leaves() {
        let mut io = Recorder::default();
        let mut w = worker(&mut io);
        let ai = head("POST", "/api/teammate", "u", "free");
        for stream in [1, 2] {
            send(&mut w, stream, &ai, &mut io);
            let (token, _) = io.last_sent();
            w.on_reply(token, granted(), now(), &mut io);
        }
        assert_eq!(
            w.on_request_body(1, 10, true, now(), &mut io),
            BodyFlow::Continue
        );
        w.on_stream_end(1, true, now(), &mut io);
        w.on_stream_end(2, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        let modes: Vec<&[u8]> = batch
            .args
            .iter()
            .map(Vec::as_slice)
            .filter(|a| *a == b"commit" || *a == b"release")
            .collect();
        assert_eq!(modes, [&b"commit"[..], &b"release"[..]]);
        let (token, _) = io.last_sent();
        w.on_reply(token, settled(&[1, 0]), now(), &mut io);
        // A request without a body is forwarded with its headers.
        let ai_no_body = head("POST", "/api/teammate", "v", "free");
        w.on_request_headers(4, ai_no_body.head(), true, now(), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        w.on_stream_end(4, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"commit"));
    }
}
