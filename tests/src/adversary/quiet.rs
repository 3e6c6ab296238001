//! Waiting until the gateway is quiet: the invariant is about what happened, so it can only be
//! read once nothing is happening any more. Quiet means the upstream finished every handler
//! it started (slow ones, and those a paused upstream resumed), reservations of a killed Envoy
//! are past their expiry (and a probe made Redis look at them), Envoy holds no request and no
//! queued settlement, and the ledger and the event stream have stopped changing.

use std::time::{Duration, Instant};

use plan_limits_services::gateway::EnvoyGateway;

/// How the wait went.
#[derive(Debug, Clone)]
pub struct Quiet {
    pub waited: Duration,
    /// False if the gateway was still busy when the wait gave up.
    pub reached: bool,
    pub last: Activity,
}

/// What is still moving in the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// Requests the upstream's ledger lists.
    pub upstream_requests: usize,
    /// Events in the stream.
    pub events: u64,
    /// Settlements Envoy's workers still queue.
    pub settlements_queued: u64,
    /// Requests Envoy is still serving.
    pub requests_active: u64,
}

impl Activity {
    pub fn read(gw: &EnvoyGateway) -> Self {
        let ledger = gw.upstream.ledger();
        let events: u64 = redis::cmd("XLEN")
            .arg(plan_limits_services::usage::events_stream())
            .query(&mut gw.redis.connection())
            .unwrap_or(0);
        Self {
            upstream_requests: ledger.0["requests"].as_object().map_or(0, |r| r.len()),
            events,
            settlements_queued: stat_sum(gw.admin_port, "settlements_queued"),
            requests_active: stat_sum(gw.admin_port, "http.gateway.downstream_rq_active"),
        }
    }

    fn idle(&self) -> bool {
        self.settlements_queued == 0 && self.requests_active == 0
    }
}

/// The sum of Envoy's admin stats whose name contains `part` (0 if Envoy does not answer).
fn stat_sum(admin_port: u16, part: &str) -> u64 {
    let path = format!("/stats?filter={part}");
    let Ok(answer) = plan_limits_services::http::Request::new("GET", &path).try_send(admin_port)
    else {
        return 0;
    };
    answer
        .body_text()
        .lines()
        .filter_map(|line| line.rsplit_once(": "))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}

/// Waits `settle` (the longest the upstream may still work, or a reservation still hold),
/// runs `probe` (requests that make Redis look at expired reservations), then polls until
/// nothing moves for a second, giving up after 30 s.
pub fn wait_until_quiet(gw: &EnvoyGateway, settle: Duration, probe: impl FnOnce()) -> Quiet {
    let started = Instant::now();
    std::thread::sleep(settle);
    probe();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Activity::read(gw);
    let mut still_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = Activity::read(gw);
        if now != last {
            still_since = Instant::now();
            last = now;
            continue;
        }
        if last.idle() && still_since.elapsed() >= Duration::from_secs(1) {
            return Quiet {
                waited: started.elapsed(),
                reached: true,
                last,
            };
        }
        if Instant::now() >= deadline {
            return Quiet {
                waited: started.elapsed(),
                reached: false,
                last,
            };
        }
    }
}
