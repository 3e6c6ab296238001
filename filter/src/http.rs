//! One context per request: feeds the core's pipeline what Envoy reports and carries out what
//! it decides (continue, pause for Redis, answer locally, queue a settlement).

use std::cell::RefCell;
use std::rc::Rc;

use log::warn;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::metrics::bump;
use crate::root::Shared;
use crate::transport::{self, Reply};
use plan_limits_core::redis::scripts::Settlement;
use plan_limits_core::request::{Admission, Decision, MeteredRequest};
use plan_limits_core::responses::LocalResponse;

pub struct MeteredHttp {
    shared: Rc<Shared>,
    context_id: u32,
    /// Shared with the handler waiting for the reservation's answer.
    state: Rc<RefCell<RequestState>>,
}

#[derive(Default)]
struct RequestState {
    metered: Option<MeteredRequest>,
    reservation_token: Option<u32>,
    ended: bool,
}

impl MeteredHttp {
    pub fn new(shared: Rc<Shared>, context_id: u32) -> Self {
        Self {
            shared,
            context_id,
            state: Rc::default(),
        }
    }

    fn queue(&self, settlement: Option<Settlement>) {
        let Some(settlement) = settlement else { return };
        if self
            .shared
            .settler
            .queue
            .borrow_mut()
            .push(settlement)
            .is_some()
        {
            bump(self.shared.metrics.settlements_dropped, 1);
            warn!("plan-limits: settlement queue full, oldest settlement dropped");
        }
    }
}

fn respond(response: &LocalResponse) {
    let headers: Vec<(&str, &str)> = response
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _ = hostcalls::send_http_response(response.status, headers, Some(response.body.as_bytes()));
}

/// Applies the reservation's answer (or its failure): counts it, and answers the client when
/// the request may not go on. Returns whether it may go on.
fn apply(shared: &Shared, metered: &mut MeteredRequest, reply: Reply) -> bool {
    let metrics = &shared.metrics;
    match metered.on_reservation(&shared.gate, reply, crate::now()) {
        Decision::Allowed => {
            bump(metrics.allowed, 1);
            true
        }
        Decision::Denied(response) => {
            bump(metrics.denied, 1);
            respond(&response);
            false
        }
        Decision::FailOpen(e) => {
            bump(metrics.redis_errors, 1);
            bump(metrics.fail_open, 1);
            warn!(
                "plan-limits: {} for user {:?} let through unchecked (fail_open): {e}",
                metered.action(),
                metered.user()
            );
            true
        }
        Decision::FailClosed(e, response) => {
            bump(metrics.redis_errors, 1);
            bump(metrics.fail_closed, 1);
            warn!(
                "plan-limits: {} refused (fail_closed): {e}",
                metered.action()
            );
            respond(&response);
            false
        }
    }
}

/// The reservation's answer arrived for stream `context_id`, which is paused waiting for it.
fn on_reservation(shared: &Shared, state: &RefCell<RequestState>, context_id: u32, reply: Reply) {
    let mut state = state.borrow_mut();
    state.reservation_token = None;
    if state.ended {
        return;
    }
    // The Redis host calls answer on the root context: act on this stream.
    if hostcalls::set_effective_context(context_id).is_err() {
        return;
    }
    let Some(metered) = state.metered.as_mut() else {
        return;
    };
    if apply(shared, metered, reply) {
        let _ = hostcalls::resume_http_request();
    }
}

impl Context for MeteredHttp {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        transport::on_http_call_response(token, num_headers, body_size);
    }
}

impl HttpContext for MeteredHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = self.shared.clone();
        let method = self.get_http_request_header(":method").unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        // Fetched once, and only for metered routes.
        let all = std::cell::OnceCell::new();
        let headers = |name: &str| -> Vec<Vec<u8>> {
            all.get_or_init(|| self.get_http_request_headers_bytes())
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        };
        let admission = shared
            .gate
            .admit(&method, &path, &headers, crate::now(), || shared.ids.next());
        let metrics = &shared.metrics;
        match admission {
            // Not counted: Envoy's own request stats already do, and this path must stay cheap.
            Admission::Unmetered => Action::Continue,
            Admission::Reject(response) => {
                bump(metrics.rejected, 1);
                respond(&response);
                Action::Pause
            }
            Admission::Deny(response) => {
                bump(metrics.denied, 1);
                respond(&response);
                Action::Pause
            }
            Admission::Proceed(metered) => {
                bump(metrics.allowed, 1);
                self.state.borrow_mut().metered = Some(metered);
                Action::Continue
            }
            Admission::Reserve(metered, command) => {
                self.state.borrow_mut().metered = Some(metered);
                let (waiting, context_id) = (self.state.clone(), self.context_id);
                let handler_shared = shared.clone();
                let sent = transport::call(&shared.gate.config.redis, &command, move |reply| {
                    on_reservation(&handler_shared, &waiting, context_id, reply)
                });
                match sent {
                    Ok(token) => {
                        self.state.borrow_mut().reservation_token = Some(token);
                        Action::Pause
                    }
                    Err(e) => {
                        // Not sent at all: the action's failure mode decides, right now.
                        let mut state = self.state.borrow_mut();
                        let metered = state.metered.as_mut().expect("stored above");
                        if apply(&shared, metered, Err(e)) {
                            Action::Continue
                        } else {
                            Action::Pause
                        }
                    }
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // A local reply of our own (429, 403, ...) also passes here: its metered request, if
        // any, is already settled.
        if self.state.borrow().metered.is_some() {
            let status = self
                .get_http_response_header(":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let settlement = self
                .state
                .borrow_mut()
                .metered
                .as_mut()
                .and_then(|m| m.on_response(&self.shared.gate, status, crate::now()));
            self.queue(settlement);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let mut state = self.state.borrow_mut();
        state.ended = true;
        if let Some(token) = state.reservation_token.take() {
            transport::forget(token);
        }
        let settlement = state
            .metered
            .as_mut()
            .and_then(|m| m.on_end(&self.shared.gate, crate::now()));
        drop(state);
        self.queue(settlement);
    }
}
