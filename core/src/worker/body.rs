//! A request's body as it passes: a refused stream's discarded until its answer, a streamed
//! upload's measured against its plan's file size.

use chrono::{DateTime, Utc};

use crate::metrics::{Metric, Outcome};
use crate::request::unix_millis;

use super::{count_outcome, BodyFlow, Drain, Io, Stream, StreamId, Worker};

impl Worker {
    /// `len` bytes of `stream`'s request body passed (`end_of_stream`: the last of it). A
    /// refused stream's body is discarded, and answered at its end; a streamed upload past
    /// its plan's file size is refused here (413), its unit given back.
    pub fn on_request_body(
        &mut self,
        stream: StreamId,
        len: u64,
        end_of_stream: bool,
        now: DateTime<Utc>,
        io: &mut dyn Io,
    ) -> BodyFlow {
        let (max, max_ms) = self
            .plans
            .as_ref()
            .map_or((0, 0), |p| (p.max_drain_bytes, p.max_drain_ms));
        let draining = match self.streams.get_mut(&stream) {
            Some(Stream::Draining(drain)) => Some(drain),
            Some(Stream::Metered(entry)) => entry.drain.as_mut(),
            _ => None,
        };
        if let Some(drain) = draining {
            drain.read = drain.read.saturating_add(len);
            let overdue = drain.overdue(unix_millis(now), max_ms);
            if !(end_of_stream || drain.read > max || overdue) {
                return BodyFlow::Discard;
            }
            if let Some(response) = drain.response.take() {
                if end_of_stream {
                    io.count(Metric::AnsweredAfterBody, 1);
                }
                io.respond(stream, &response);
            }
            return BodyFlow::Stop;
        }
        let (Some(plans), Some(Stream::Metered(entry))) =
            (self.plans.clone(), self.streams.get_mut(&stream))
        else {
            return BodyFlow::Continue;
        };
        match entry.request.on_body(len) {
            Ok(()) => {
                if end_of_stream {
                    entry.request.on_forwarded();
                }
                BodyFlow::Continue
            }
            Err(response) => {
                count_outcome(io, &entry.request, Outcome::Rejected);
                let settlement = entry
                    .request
                    .on_response(response.status, now, &plans.redis);
                // Its headers went upstream already: what is discarded here never follows
                // them, and Envoy resets the upstream request when the answer goes.
                let answer_now = if end_of_stream {
                    Some(response)
                } else {
                    entry.drain = Some(Drain::new(response));
                    None
                };
                self.queue(settlement, io);
                match answer_now {
                    Some(response) => {
                        io.respond(stream, &response);
                        BodyFlow::Stop
                    }
                    None => BodyFlow::Discard,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::fixtures::*;

    #[test]
    fn a_refusal_waits_for_the_body_its_client_is_still_writing() {
        let mut io = holding();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        // Its headers go on, to the hold filter; its body comes here and goes nowhere.
        assert_eq!(send(&mut w, 1, &no_token, &mut io), Flow::Continue);
        assert_eq!(io.held, [1]);
        assert!(io.responded.is_empty());
        let piece = w.on_request_body(1, 4, false, now(), &mut io);
        assert_eq!(piece, BodyFlow::Discard);
        assert!(io.responded.is_empty());
        let last = w.on_request_body(1, 6, true, now(), &mut io);
        assert_eq!(last, BodyFlow::Stop);
        assert_eq!(io.status_for(1), Some(401));
        assert_eq!(io.count_of(Metric::AnsweredAfterBody), 1);
        assert_eq!(io.count_of(Metric::Rejected), 1);
    }

    #[test]
    fn a_refused_body_is_read_for_max_drain_ms_at_most() {
        let mut io = holding();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        // A client at a byte a second: answered once max_drain_ms (10 s) have passed, by its
        // next byte or by a tick, whichever comes first.
        for stream in [1, 2] {
            assert_eq!(send(&mut w, stream, &no_token, &mut io), Flow::Continue);
            let piece = w.on_request_body(stream, 1, false, now(), &mut io);
            assert_eq!(piece, BodyFlow::Discard);
        }
        let later = now() + chrono::Duration::milliseconds(9_999);
        assert_eq!(
            w.on_request_body(1, 1, false, later, &mut io),
            BodyFlow::Discard
        );
        w.on_tick(later, &mut io);
        assert!(io.responded.is_empty());
        let late = now() + chrono::Duration::seconds(10);
        assert_eq!(
            w.on_request_body(1, 1, false, late, &mut io),
            BodyFlow::Stop
        );
        assert_eq!(io.status_for(1), Some(401));
        w.on_tick(late, &mut io);
        assert_eq!(io.status_for(2), Some(401));
        assert_eq!(io.responded.len(), 2, "each answered once");
        w.on_tick(late + chrono::Duration::seconds(1), &mut io);
        assert_eq!(io.responded.len(), 2);
    }

    #[test]
    fn a_body_past_what_is_worth_reading_is_answered_there() {
        let json = plans_json_with(|p| p["gateway"] = serde_json::json!({"max_drain_bytes": 100}));
        let mut io = holding();
        let mut w = worker_with(&mut io, &json);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        no_token.headers.retain(|(n, _)| n != "content-length");
        assert_eq!(send(&mut w, 1, &no_token, &mut io), Flow::Continue);
        w.on_request_body(1, 100, false, now(), &mut io);
        assert!(io.responded.is_empty());
        let past = w.on_request_body(1, 1, false, now(), &mut io);
        assert_eq!(past, BodyFlow::Stop);
        assert_eq!(io.status_for(1), Some(401));
        assert_eq!(io.count_of(Metric::AnsweredAfterBody), 0);
        // Anything after the answer stops too, and is answered no more.
        let later = w.on_request_body(1, 1, true, now(), &mut io);
        assert_eq!(later, BodyFlow::Stop);
        assert_eq!(io.responded.len(), 1);
    }

    #[test]
    fn a_429_after_the_reservation_waits_for_the_body_too() {
        let mut io = holding();
        let mut w = worker(&mut io);
        assert_eq!(send(&mut w, 1, &upload("u"), &mut io), Flow::Pause);
        let (token, _) = io.last_sent();
        w.on_reply(token, reserved(0, 5, 0, "free"), now(), &mut io);
        // Resumed into the hold filter, not to the upstream.
        assert_eq!(
            (io.held.as_slice(), io.resumed.as_slice()),
            (&[1][..], &[1][..])
        );
        assert!(io.responded.is_empty());
        assert_eq!(io.count_of(Metric::Allowed), 0);
        w.on_request_body(1, 10, true, now(), &mut io);
        assert_eq!(io.status_for(1), Some(429));
        // The remembered refusal of the same user, decided from the head, waits as well.
        assert_eq!(send(&mut w, 2, &upload("u"), &mut io), Flow::Continue);
        assert_eq!(io.held, [1, 2]);
        w.on_request_body(2, 10, true, now(), &mut io);
        assert_eq!(io.status_for(2), Some(429));
    }

    #[test]
    fn a_client_that_leaves_while_its_body_is_discarded_leaves_nothing_behind() {
        let mut io = holding();
        let mut w = worker(&mut io);
        let mut no_token = upload("u");
        no_token.claims = Default::default();
        send(&mut w, 1, &no_token, &mut io);
        w.on_request_body(1, 4, false, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        assert!(io.responded.is_empty());
        assert_eq!(
            w.on_request_body(1, 4, true, now(), &mut io),
            BodyFlow::Continue
        );
        assert!(io.responded.is_empty());
    }

    #[test]
    fn a_streamed_upload_past_the_plans_file_size_is_refused_as_it_streams() {
        let mut io = holding();
        let mut w = worker(&mut io);
        assert_eq!(send(&mut w, 1, &streamed_upload("u"), &mut io), Flow::Pause);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        let mb = 1 << 20;
        for _ in 0..10 {
            let piece = w.on_request_body(1, mb, false, now(), &mut io);
            assert_eq!(piece, BodyFlow::Continue);
        }
        // One byte past the free plan's 10 MB: that piece and the rest never reach the
        // upstream; the answer waits for the end of the body.
        let piece = w.on_request_body(1, 1, false, now(), &mut io);
        assert_eq!(piece, BodyFlow::Discard);
        assert!(io.responded.is_empty());
        let piece = w.on_request_body(1, mb, true, now(), &mut io);
        assert_eq!(piece, BodyFlow::Stop, "its end never reaches the upstream");
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 413);
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["max_bytes"], 10 * mb);
        assert_eq!(io.count_of(Metric::Rejected), 1);
        // Its unit is given back; its own 413 passing the response path changes nothing.
        w.on_response_headers(1, 413, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"release"));
        assert!(!batch.args.iter().any(|a| a == b"commit"));
    }

    #[test]
    fn a_streamed_upload_is_counted_with_the_bytes_its_body_had() {
        let mut io = holding();
        let mut w = worker(&mut io);
        send(&mut w, 1, &streamed_upload("u"), &mut io);
        let (token, _) = io.last_sent();
        w.on_reply(token, granted(), now(), &mut io);
        w.on_request_body(1, 700, false, now(), &mut io);
        w.on_request_body(1, 300, true, now(), &mut io);
        w.on_response_headers(1, 201, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(batch.args.iter().any(|a| a == b"commit"));
        assert!(batch.args.iter().any(|a| a == b"1000"), "the body's bytes");
    }

    #[test]
    fn a_streamed_upload_holds_the_file_size_and_is_refused_past_the_room_left() {
        let mut io = holding();
        let mut w = worker(&mut io);
        send(&mut w, 1, &streamed_upload("u"), &mut io);
        let (token, reserve) = io.last_sent();
        let mb = 1_u64 << 20;
        assert!(
            reserve
                .args
                .iter()
                .any(|a| a == (10 * mb).to_string().as_bytes()),
            "no Content-Length: it holds the plan's file size"
        );
        // 1 MB of room is left when it starts (others hold 2 MB).
        let gib = 1_i64 << 30;
        let room = 1 << 20;
        let stored = gib - room - 2 * (1 << 20);
        w.on_reply(token, with_storage(1, stored, 2 << 20), now(), &mut io);
        assert_eq!(io.resumed, [1]);
        assert_eq!(
            w.on_request_body(1, mb, false, now(), &mut io),
            BodyFlow::Continue
        );
        assert_eq!(
            w.on_request_body(1, 1, false, now(), &mut io),
            BodyFlow::Discard
        );
        assert_eq!(
            w.on_request_body(1, 1, true, now(), &mut io),
            BodyFlow::Stop
        );
        let (_, answer) = io.responded.last().unwrap();
        assert_eq!(answer.status, 403);
        w.on_response_headers(1, 403, None, now(), &mut io);
        w.on_stream_end(1, true, now(), &mut io);
        w.on_tick(now(), &mut io);
        let (_, batch) = io.last_sent();
        assert!(
            batch.args.iter().any(|a| a == b"release"),
            "the unit goes back"
        );
        assert!(
            batch
                .args
                .iter()
                .any(|a| a == (10 * mb).to_string().as_bytes()),
            "and the bytes it held"
        );
    }
}
