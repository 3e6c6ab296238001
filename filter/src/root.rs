//! One root context per worker: owns the parsed configuration, hands it to each request, and
//! sends the worker's settlements to Redis in batches on every tick.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::http::MeteredHttp;
use crate::metrics::{bump, Metrics};
use crate::transport;
use plan_limits_core::config::{Config, RedisSettings};
use plan_limits_core::request::{unix_millis, Gate};
use plan_limits_core::settlements::{BatchReport, SettlementQueue};

/// What every request of this worker shares. A reconfigure replaces the gate; the settler and
/// the reservation ids outlive it, so nothing queued is lost and no id is reused.
pub struct Shared {
    pub gate: Gate,
    pub settler: Rc<Settler>,
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

/// The worker's settlement queue and whether a batch of it is on its way to Redis.
pub struct Settler {
    pub queue: RefCell<SettlementQueue>,
    in_flight: Cell<bool>,
    /// Envoy is stopping the VM and waits for `proxy_done` once the last batch is answered.
    stopping: Cell<bool>,
}

impl Settler {
    /// Sends the next batch if one is due and none is in flight.
    pub fn flush(self: &Rc<Self>, redis: &RedisSettings, metrics: Metrics) {
        if self.in_flight.get() {
            return;
        }
        let now_ms = unix_millis(crate::now());
        let Some(command) =
            self.queue
                .borrow_mut()
                .next_batch(now_ms, &redis.events_stream, redis.events_max_len)
        else {
            return;
        };
        let settler = self.clone();
        let settings = redis.clone();
        let sent = transport::call(redis, &command, move |reply| {
            settler.in_flight.set(false);
            let report = settler
                .queue
                .borrow_mut()
                .on_batch_reply(reply, unix_millis(crate::now()));
            record(&metrics, &report);
            // More may be waiting: keep the queue moving without waiting for the next tick.
            settler.flush(&settings, metrics);
            if settler.stopping.get() && settler.idle() {
                let _ = proxy_wasm::hostcalls::done();
            }
        });
        match sent {
            Ok(_) => self.in_flight.set(true),
            Err(e) => {
                let report = self.queue.borrow_mut().on_batch_reply(Err(e), now_ms);
                record(&metrics, &report);
            }
        }
    }

    fn idle(&self) -> bool {
        !self.in_flight.get()
    }
}

pub struct PlanLimitsRoot {
    shared: Option<Rc<Shared>>,
    settler: Rc<Settler>,
    ids: Rc<ReservationIds>,
}

impl PlanLimitsRoot {
    pub fn new() -> Self {
        let defaults = RedisSettings::default();
        Self {
            shared: None,
            settler: Rc::new(Settler {
                queue: RefCell::new(SettlementQueue::new(
                    defaults.max_queued_settlements,
                    defaults.max_batch,
                )),
                in_flight: Cell::new(false),
                stopping: Cell::new(false),
            }),
            ids: Rc::new(ReservationIds {
                vm_nonce: getrandom::u64().unwrap_or(0),
                next: Cell::new(0),
            }),
        }
    }

    fn flush(&self) {
        if let Some(shared) = &self.shared {
            self.settler
                .flush(&shared.gate.config.redis, shared.metrics);
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
        transport::on_http_call_response(token, num_headers, body_size);
    }

    fn on_done(&mut self) -> bool {
        // Envoy is stopping this VM: send what is queued; done now if nothing is in flight,
        // else `proxy_done` once the batch is answered.
        self.settler.stopping.set(true);
        self.flush();
        self.settler.idle()
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
        if let Err(e) = transport::init(redis) {
            // Requests follow their failure mode until Redis can be reached.
            warn!("plan-limits: redis transport not ready: {e}");
        }
        self.settler
            .queue
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
            settler: self.settler.clone(),
            metrics: Metrics::define(),
            ids: self.ids.clone(),
        }));
        true
    }

    fn on_tick(&mut self) {
        self.flush();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(MeteredHttp::new(shared, context_id)))
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
    } else if report.dropped_unknown > 0 {
        warn!(
            "plan-limits: {} counts were not applied",
            report.dropped_unknown
        );
    }
}
