//! The faults the adversary injects while its clients run: Redis paused or killed and
//! restarted, webdis killed and restarted, Envoy killed with SIGKILL and started again on the
//! same ports, the upstream paused past the route timeout. Each strikes when the clients have
//! begun the step the plan names, and is always undone (a paused process is continued even if
//! the run panics), so the invariant is checked against a whole gateway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plan_limits_services::gateway::EnvoyGateway;

use super::plan::{Fault, FaultKind};

/// What the faults did in a run.
#[derive(Debug, Clone, Default)]
pub struct FaultLog {
    /// Each fault as it struck: its kind, when (since the clients started), and what happened.
    pub struck: Vec<(FaultKind, Duration, String)>,
    /// Envoy processes that served the run (1 + restarts).
    pub envoys: usize,
}

impl FaultLog {
    pub fn envoy_killed(&self) -> bool {
        self.struck
            .iter()
            .any(|(k, _, _)| *k == FaultKind::EnvoyKill)
    }
}

/// Where the clients are: steps begun, and how many are still running.
#[derive(Debug, Default)]
pub struct Progress {
    pub steps_begun: AtomicUsize,
    pub clients_running: AtomicUsize,
}

/// Strikes each of `faults` in turn when the clients reach it (or at once once they are all
/// done, so a plan's faults always strike). Run it on a thread that outlives the gateway: the
/// processes it starts again die with the thread that started them.
pub fn strike_all(
    gw: &mut EnvoyGateway,
    faults: &[Fault],
    progress: &Progress,
    started: Instant,
) -> FaultLog {
    let mut log = FaultLog {
        struck: Vec::new(),
        envoys: 1,
    };
    for fault in faults {
        while progress.steps_begun.load(Ordering::SeqCst) < fault.at_step
            && progress.clients_running.load(Ordering::SeqCst) > 0
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let at = started.elapsed();
        let what = strike(gw, fault, &mut log);
        log.struck.push((fault.kind, at, what));
    }
    log
}

/// One fault, undone before it returns; says what happened.
fn strike(gw: &mut EnvoyGateway, fault: &Fault, log: &mut FaultLog) -> String {
    let lasting = Duration::from_millis(fault.duration_ms);
    match fault.kind {
        FaultKind::RedisPause => {
            let _paused = Stopped::new(gw.redis.service().pid());
            std::thread::sleep(lasting);
            format!("Redis paused {} ms", fault.duration_ms)
        }
        FaultKind::UpstreamPause => {
            let _paused = Stopped::new(gw.upstream.service.pid());
            std::thread::sleep(lasting);
            format!("upstream paused {} ms", fault.duration_ms)
        }
        FaultKind::RedisRestart => {
            let took = timed(|| gw.kill_and_restart_redis(lasting));
            format!("Redis down {} ms, back after {took:?}", fault.duration_ms)
        }
        FaultKind::WebdisRestart => {
            let took = timed(|| gw.kill_and_restart_webdis(lasting));
            format!("webdis down {} ms, back after {took:?}", fault.duration_ms)
        }
        FaultKind::EnvoyKill => {
            log.envoys += 1;
            let name = format!("envoy-{}", log.envoys);
            let mut result = Ok(());
            let took = timed(|| result = gw.kill_and_restart_envoy(&name, lasting));
            if std::env::var_os("ADVERSARY_ENVOY_DEBUG").is_some() {
                super::envoy_debug_logs(gw.admin_port);
            }
            match result {
                Ok(()) => format!("Envoy killed, {name} listening after {took:?}"),
                Err(e) => panic!("Envoy could not be started again: {e}"),
            }
        }
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

/// A process stopped with SIGSTOP until this is dropped (SIGCONT), panics included.
struct Stopped(i32);

impl Stopped {
    fn new(pid: u32) -> Self {
        let pid = i32::try_from(pid).unwrap_or_else(|_| panic!("pid {pid} out of range"));
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}
