//! One root context per worker: owns the parsed configuration, hands it to each request, and
//! sends the worker's settlements to Redis in batches on every tick.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::http::MeteredHttp;
use super::metrics::{bump, Metrics};
use super::transport;
use crate::config::Config;
use crate::request::{unix_millis, Gate};
use crate::settlements::{BatchReport, SettlementQueue};

/// What every request of this worker shares. A reconfigure replaces the gate; the queue and
/// the reservation ids outlive it, so nothing queued is lost and no id is reused.
pub struct Shared {
    pub gate: Gate,
    pub queue: Rc<RefCell<SettlementQueue>>,
    pub metrics: Metrics,
    pub ids: Rc<ReservationIds>,
}

/// Reservation ids: a random per-VM prefix and a counter, unique across workers and Envoys.
pub struct ReservationIds {
    vm_nonce: u64,
    next: Cell<u64>,
}

impl ReservationIds {
    pub fn next(&self) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("{:016x}-{n}", self.vm_nonce)
    }
}

pub struct PlanLimitsRoot {
    shared: Option<Rc<Shared>>,
    queue: Rc<RefCell<SettlementQueue>>,
    ids: Rc<ReservationIds>,
    batch_token: Option<u32>,
}

impl PlanLimitsRoot {
    pub fn new() -> Self {
        let defaults = crate::config::RedisSettings::default();
        Self {
            shared: None,
            queue: Rc::new(RefCell::new(SettlementQueue::new(
                defaults.max_queued_settlements,
                defaults.max_batch,
            ))),
            ids: Rc::new(ReservationIds {
                vm_nonce: getrandom::u64().unwrap_or(0),
                next: Cell::new(0),
            }),
            batch_token: None,
        }
    }

    fn flush(&mut self) {
        let Some(shared) = &self.shared else { return };
        if self.batch_token.is_some() {
            return;
        }
        let redis = &shared.gate.config.redis;
        let now_ms = unix_millis(super::now(self));
        let Some(command) = shared.queue.borrow_mut().next_batch(
            now_ms,
            &redis.events_stream,
            redis.events_max_len,
        ) else {
            return;
        };
        match transport::send(self, redis, &command) {
            Ok(token) => self.batch_token = Some(token),
            Err(e) => {
                let report = shared.queue.borrow_mut().on_batch_reply(Err(e), now_ms);
                record(&shared.metrics, &report);
            }
        }
    }
}

impl Context for PlanLimitsRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        if self.batch_token != Some(token) {
            return;
        }
        self.batch_token = None;
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let reply = transport::receive(self, num_headers, body_size);
        let now_ms = unix_millis(super::now(self));
        let report = shared.queue.borrow_mut().on_batch_reply(reply, now_ms);
        record(&shared.metrics, &report);
        // More may be waiting: keep the queue moving without waiting for the next tick.
        self.flush();
    }

    fn on_done(&mut self) -> bool {
        // Envoy is stopping this VM: send what is queued, and say we are done once it is out.
        self.flush();
        self.batch_token.is_none()
    }
}

impl RootContext for PlanLimitsRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::from_json(&bytes) {
            Ok(config) => config,
            Err(e) => {
                error!("plan-limits: configuration refused: {e}");
                return false;
            }
        };
        let redis = &config.redis;
        self.queue
            .borrow_mut()
            .resize(redis.max_queued_settlements, redis.max_batch);
        self.set_tick_period(Duration::from_millis(redis.flush_interval_ms.max(1)));
        info!(
            "plan-limits: {} plans, {} actions, {} routes",
            config.plans.len(),
            config.actions.len(),
            config.routes.len()
        );
        self.shared = Some(Rc::new(Shared {
            gate: Gate::new(config),
            queue: self.queue.clone(),
            metrics: Metrics::define(),
            ids: self.ids.clone(),
        }));
        true
    }

    fn on_tick(&mut self) {
        self.flush();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(MeteredHttp::new(shared)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn record(metrics: &Metrics, report: &BatchReport) {
    bump(metrics.counted, report.counted);
    bump(metrics.released, report.released);
    bump(metrics.commits_unmatched, report.commits_unmatched);
    bump(metrics.settlements_dropped, report.dropped_unknown);
    if let Some(e) = &report.error {
        bump(metrics.settle_errors, 1);
        warn!(
            "plan-limits: settlement batch failed ({e}); {} to resend, {} dropped",
            report.requeued, report.dropped_unknown
        );
    }
    if report.dropped_unknown > 0 && report.error.is_none() {
        warn!(
            "plan-limits: {} counts were not applied",
            report.dropped_unknown
        );
    }
}
