//! One root context per worker thread: owns the worker, applies plans.json to it, ticks it,
//! and stops it when Envoy stops the VM.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use plan_limits_core::Worker;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::host::{now, Shared};
use crate::http::PlanLimitsHttp;
use crate::metrics::MetricIds;
use crate::transport;

pub struct PlanLimitsRoot {
    shared: Rc<Shared>,
}

impl PlanLimitsRoot {
    pub fn new(id: u32) -> Self {
        let shared = Rc::new(Shared {
            worker: RefCell::new(Worker::new(getrandom::u64().unwrap_or(u64::from(id)))),
            metrics: MetricIds::define(),
            root_id: id,
        });
        #[cfg(feature = "redis-hostcalls")]
        redis_replies::register(id, &shared);
        Self { shared }
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
        self.shared
            .on_http_call_response(self.shared.root_id, token, num_headers, body_size);
    }

    fn on_done(&mut self) -> bool {
        // Envoy is stopping this VM: send what is queued; done now if nothing is in flight,
        // else `proxy_done` once the batch is answered.
        let done = self.shared.handle(self.shared.root_id, |worker, host| {
            worker.on_shutdown(now(), host)
        });
        self.shared.metrics.flush();
        done
    }
}

impl RootContext for PlanLimitsRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(stop) = crate::http::BENCH_STOP {
            log::error!("a bench build (PLAN_LIMITS_BENCH_STOP={stop}): it meters nothing");
        }
        let json = self.get_plugin_configuration().unwrap_or_default();
        let accepted = self.shared.handle(self.shared.root_id, |worker, host| {
            worker.configure(&json, host)
        });
        let plans = self.shared.worker.borrow().plans().cloned();
        if let (true, Some(plans)) = (accepted, plans) {
            let mut clusters = vec![&plans.redis];
            if plans.read_redis.cluster != plans.redis.cluster {
                clusters.push(&plans.read_redis);
            }
            for redis in clusters {
                if let Err(e) = transport::init(redis) {
                    // Requests follow their failure mode until Redis can be reached.
                    log::warn!(
                        "plan-limits: redis transport not ready ({}): {e}",
                        redis.cluster
                    );
                }
            }
            let tick = plans.redis.flush_interval_ms.max(1);
            self.set_tick_period(Duration::from_millis(tick));
        }
        accepted
    }

    fn on_tick(&mut self) {
        self.shared.handle(self.shared.root_id, |worker, host| {
            worker.on_tick(now(), host)
        });
        self.shared.metrics.flush();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(PlanLimitsHttp::new(
            self.shared.clone(),
            context_id,
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Higress answers Redis host calls on the root context that made them, through an export
/// the SDK does not know: find that root's worker by its id.
#[cfg(feature = "redis-hostcalls")]
mod redis_replies {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::{Rc, Weak};

    use crate::host::{now, Shared};
    use crate::transport;

    thread_local! {
        static ROOTS: RefCell<HashMap<u32, Weak<Shared>>> = RefCell::new(HashMap::new());
    }

    pub fn register(root_context_id: u32, shared: &Rc<Shared>) {
        ROOTS.with(|roots| {
            let mut roots = roots.borrow_mut();
            roots.retain(|_, root| root.strong_count() > 0);
            roots.insert(root_context_id, Rc::downgrade(shared));
        });
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_redis_call_response(
        root_context_id: u32,
        token: u32,
        status: u32,
        size: usize,
    ) {
        let shared =
            ROOTS.with(|roots| roots.borrow().get(&root_context_id).and_then(Weak::upgrade));
        if let Some(shared) = shared {
            let reply = transport::redis_call_reply(status, size);
            shared.handle(root_context_id, |worker, host| {
                worker.on_reply(token, reply, now(), host)
            });
        }
    }
}
