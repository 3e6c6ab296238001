//! One context per request: feeds the core's pipeline what Envoy reports and carries out what
//! it decides (continue, pause for Redis, answer locally, queue a settlement).

use std::rc::Rc;

use log::warn;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::metrics::bump;
use super::root::Shared;
use super::transport;
use crate::redis::scripts::Settlement;
use crate::request::{Admission, Decision, MeteredRequest};
use crate::responses::LocalResponse;

pub struct MeteredHttp {
    shared: Rc<Shared>,
    metered: Option<MeteredRequest>,
    reservation_token: Option<u32>,
}

impl MeteredHttp {
    pub fn new(shared: Rc<Shared>) -> Self {
        Self {
            shared,
            metered: None,
            reservation_token: None,
        }
    }

    fn respond(&self, response: &LocalResponse) {
        let headers: Vec<(&str, &str)> = response
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.send_http_response(response.status, headers, Some(response.body.as_bytes()));
    }

    fn queue(&self, settlement: Option<Settlement>) {
        let Some(settlement) = settlement else { return };
        if self.shared.queue.borrow_mut().push(settlement).is_some() {
            bump(self.shared.metrics.settlements_dropped, 1);
            warn!("plan-limits: settlement queue full, oldest settlement dropped");
        }
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
        if self.reservation_token.take() != Some(token) {
            return;
        }
        let shared = self.shared.clone();
        let reply = transport::receive(self, num_headers, body_size);
        let now = super::now(self);
        let metrics = &shared.metrics;
        let Some(metered) = self.metered.as_mut() else {
            return;
        };
        match metered.on_reservation(&shared.gate, reply, now) {
            Decision::Allowed => {
                bump(metrics.allowed, 1);
                self.resume_http_request();
            }
            Decision::Denied(response) => {
                bump(metrics.denied, 1);
                self.respond(&response);
            }
            Decision::FailOpen(e) => {
                bump(metrics.redis_errors, 1);
                bump(metrics.fail_open, 1);
                warn!(
                    "plan-limits: {} for user {:?} let through unchecked (fail_open): {e}",
                    metered.action(),
                    metered.user()
                );
                self.resume_http_request();
            }
            Decision::FailClosed(e, response) => {
                bump(metrics.redis_errors, 1);
                bump(metrics.fail_closed, 1);
                warn!(
                    "plan-limits: {} refused (fail_closed): {e}",
                    metered.action()
                );
                self.respond(&response);
            }
        }
    }
}

impl HttpContext for MeteredHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = self.shared.clone();
        let method = self.get_http_request_header(":method").unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let header = |name: &str| self.get_http_request_header_bytes(name);
        let admission = shared
            .gate
            .admit(&method, &path, &header, super::now(self), || {
                shared.ids.next()
            });
        let metrics = &shared.metrics;
        match admission {
            Admission::Unmetered => {
                bump(metrics.unmetered, 1);
                Action::Continue
            }
            Admission::Reject(response) => {
                bump(metrics.rejected, 1);
                self.respond(&response);
                Action::Pause
            }
            Admission::Proceed(metered) => {
                bump(metrics.allowed, 1);
                self.metered = Some(metered);
                Action::Continue
            }
            Admission::Reserve(mut metered, command) => {
                match transport::send(self, &shared.gate.config.redis, &command) {
                    Ok(token) => {
                        self.reservation_token = Some(token);
                        self.metered = Some(metered);
                        Action::Pause
                    }
                    Err(e) => {
                        // Same path as a failed reply: the action's failure mode decides.
                        let decision =
                            metered.on_reservation(&shared.gate, Err(e), super::now(self));
                        self.metered = Some(metered);
                        bump(metrics.redis_errors, 1);
                        match decision {
                            Decision::FailClosed(_, response) => {
                                bump(metrics.fail_closed, 1);
                                self.respond(&response);
                                Action::Pause
                            }
                            _ => {
                                bump(metrics.fail_open, 1);
                                Action::Continue
                            }
                        }
                    }
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // A local reply of our own (429, 403, ...) also passes here: it has no metered request
        // left to settle, or one that is already settled.
        if self.metered.is_some() {
            let status = self
                .get_http_response_header(":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let now = super::now(self);
            let settlement = self
                .metered
                .as_mut()
                .and_then(|m| m.on_response(&self.shared.gate, status, now));
            self.queue(settlement);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let now = super::now(self);
        let settlement = self
            .metered
            .as_mut()
            .and_then(|m| m.on_end(&self.shared.gate, now));
        self.queue(settlement);
    }
}
