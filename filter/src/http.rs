//! One context per request: hands the worker the request's headers, its body as it passes,
//! the upstream's status and the end of the stream, and (webdis build) the answers to its
//! reservation calls.

use std::rc::Rc;

use plan_limits_core::{BodyFlow, Claims, Flow, IdentitySource, Metric, RequestHead, ResponseFlow};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::host::{now, Shared};

/// Only in the builds `make profile` measures layers with, never in `make build`'s: `sdk`
/// stops each request at once (the contexts and callbacks alone), `read` after reading its
/// headers and claims. Such a build meters nothing (and says so when configured).
pub const BENCH_STOP: Option<&str> = option_env!("PLAN_LIMITS_BENCH_STOP");

pub struct PlanLimitsHttp {
    shared: Rc<Shared>,
    id: u32,
}

impl PlanLimitsHttp {
    pub fn new(shared: Rc<Shared>, id: u32) -> Self {
        Self { shared, id }
    }
}

impl PlanLimitsHttp {
    /// The verified token's claims the plans name, from the request's dynamic metadata: the
    /// whole payload in one host call, or (a claim Envoy cannot encode, such as a null, fails
    /// that call) one call per claim.
    fn claims(&self) -> Claims {
        let plans = self.shared.worker.borrow().plans().cloned();
        let Some(plans) = plans.filter(|p| p.identity.source == IdentitySource::Jwt) else {
            return Claims::default();
        };
        let jwt = &plans.identity.jwt;
        let whole = match hostcalls::get_property(jwt.payload_path().to_vec()) {
            // No payload: no valid token.
            Ok(None) => return Claims::default(),
            Ok(Some(payload)) => Claims::from_payload(&payload, jwt),
            Err(_) => None,
        };
        if let Some(claims) = whole {
            return claims;
        }
        self.shared.metrics.increment(Metric::ClaimsOneByOne, 1);
        let claim = |name: &str| {
            hostcalls::get_property(jwt.path(name).to_vec())
                .ok()
                .flatten()
        };
        Claims {
            user: claim(&jwt.user_claim),
            plan: claim(&jwt.plan_claim),
            org: claim(&jwt.org_claim),
            anchor: claim(&jwt.anchor_claim),
        }
    }
}

impl Context for PlanLimitsHttp {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        self.shared
            .on_http_call_response(self.id, token, num_headers, body_size);
    }
}

impl HttpContext for PlanLimitsHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if BENCH_STOP == Some("sdk") {
            return Action::Continue;
        }
        // One host call for all of them: Envoy's route table sends only metered routes here.
        let headers = self.get_http_request_headers_bytes();
        let claims = self.claims();
        if BENCH_STOP.is_some() {
            std::hint::black_box((&headers, &claims));
            return Action::Continue;
        }
        let id = self.id;
        let flow = self.shared.handle(id, |worker, host| {
            let head = RequestHead::new(&headers, &claims);
            worker.on_request_headers(id, head, end_of_stream, now(), host)
        });
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Pause => Action::Pause,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let id = self.id;
        let len = u64::try_from(body_size).unwrap_or(u64::MAX);
        let flow = self.shared.handle(id, |worker, host| {
            worker.on_request_body(id, len, end_of_stream, now(), host)
        });
        if flow != BodyFlow::Continue {
            // Emptied in place: nothing of it goes on. (Never paused before: a paused body
            // is Envoy's buffer, where the piece would pile up instead.)
            self.set_http_request_body(0, body_size, &[]);
        }
        match flow {
            BodyFlow::Continue | BodyFlow::Discard => Action::Continue,
            BodyFlow::Stop => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if BENCH_STOP.is_some() {
            return Action::Continue;
        }
        let status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let id = self.id;
        // (Only a delete's answer is read further: how many bytes it freed.)
        let wanted = self
            .shared
            .worker
            .borrow()
            .response_header_wanted(id)
            .map(String::from);
        if let Some(name) = wanted {
            let value = self.get_http_response_header_bytes(&name);
            self.shared.handle(id, |worker, host| {
                worker.on_response_header(id, value.as_deref(), host)
            });
        }
        // (Only an action whose usage events record the answer's headers reads them.)
        let metadata = self.shared.worker.borrow().response_metadata_wanted(id);
        for name in metadata {
            if let Some(value) = self.get_http_response_header_bytes(&name) {
                self.shared
                    .worker
                    .borrow_mut()
                    .on_response_metadata(id, &name, &value);
            }
        }
        // (Only a failure of a request not settled yet asks where the answer came from.)
        let wants_details = self.shared.worker.borrow().wants_answer_details(id, status);
        let details = wants_details
            .then(|| self.get_property(vec!["response", "code_details"]))
            .flatten()
            .and_then(|d| String::from_utf8(d).ok());
        let flow = self.shared.handle(id, |worker, host| {
            worker.on_response_headers(id, status, details.as_deref(), now(), host)
        });
        match flow {
            ResponseFlow::Continue => Action::Continue,
            // Until Redis has counted it (the worker resumes it).
            ResponseFlow::AwaitCommit => Action::Pause,
        }
    }

    fn on_log(&mut self) {
        if BENCH_STOP.is_some() {
            return;
        }
        let id = self.id;
        // (Only a request left unsettled, its client gone, asks whether it reached an upstream:
        // a connection to one was made. `upstream.address` is set once a host is chosen.)
        let wants = self.shared.worker.borrow().wants_upstream_reached(id);
        let reached = !wants
            || self
                .get_property(vec!["upstream", "local_address"])
                .is_some();
        self.shared.handle(id, |worker, host| {
            worker.on_stream_end(id, reached, now(), host)
        });
    }
}
