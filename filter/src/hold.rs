//! The hold filter: a second instance of this module (`root_id: plan_limits_hold`), placed
//! right after the plan filter in the same VM. It stops, before the upstream, a request the
//! plan filter refused while its client was still writing the body: the plan filter lets the
//! headers on (a paused head would stop the body from reaching it too), reads and discards
//! the body, and answers at its end, so a client that writes its whole body before reading
//! gets the answer instead of a reset.
//!
//! The plan filter marks such a request with a header carrying a secret of this VM; the hold
//! filter stops only requests with that exact value, so a client cannot stop its own request
//! (or learn the secret: a held request never reaches the upstream).

use std::cell::Cell;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

/// The root id that makes a root context the hold filter.
pub use plan_limits_core::HOLD_ROOT_ID as ROOT_ID;
const HEADER: &str = "x-plan-limits-hold";

thread_local! {
    /// This VM's secret, once a hold filter is configured in it (one VM per worker thread).
    static SECRET: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The request header that has the hold filter stop a request; `None` when no hold filter
/// runs in this VM (nothing would stop it).
pub fn marker() -> Option<(&'static str, String)> {
    SECRET
        .with(Cell::get)
        .map(|secret| (HEADER, format!("{secret:016x}")))
}

pub struct HoldRoot;

impl Context for HoldRoot {}

impl RootContext for HoldRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        if SECRET.with(Cell::get).is_none() {
            let secret = getrandom::u64().unwrap_or(0) | 1;
            SECRET.with(|s| s.set(Some(secret)));
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Hold))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Hold;

impl Context for Hold {}

impl HttpContext for Hold {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(value) = self.get_http_request_header(HEADER) else {
            return Action::Continue;
        };
        if marker().is_some_and(|(_, secret)| value == secret) {
            // Held until the plan filter answers, which ends the stream.
            Action::Pause
        } else {
            Action::Continue
        }
    }
}
