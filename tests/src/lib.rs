//! What the suites share: the gateways they run against (the wasmtime harness with either
//! filter build, and real Envoy), the requests they send, and how they read the counts.

pub mod adversary;
pub mod simulation;

pub use plan_limits_harness::{Build, Harness};
pub use plan_limits_services::gateway::{EnvoyGateway, Gateway, GatewayOptions};
pub use plan_limits_services::http::{Body, Request, Response};
pub use plan_limits_services::usage::{self, eventually};

pub const MB: u64 = 1024 * 1024;

/// The time the harness starts at: late in November 2026, so a month end is near.
pub const HARNESS_START: &str = "2026-11-27T12:00:00Z";

/// The repository's plans.json with `edit` applied.
pub fn plans_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut plans: serde_json::Value = serde_json::from_str(&plan_limits_services::plans_json())
        .unwrap_or_else(|e| panic!("plans.json: {e}"));
    edit(&mut plans);
    plans.to_string()
}

/// The filter in our wasmtime host with the repository's plans, two VMs (workers), its own
/// Redis, the clock at `HARNESS_START`.
pub fn harness(build: Build) -> Harness {
    let h = Harness::start(build, &plan_limits_services::plans_json(), 2);
    h.set_time(HARNESS_START);
    h
}

/// Real Envoy (two workers) with the repository's plans, and its own Redis, webdis and demo
/// upstream.
pub fn envoy() -> EnvoyGateway {
    EnvoyGateway::start(GatewayOptions::default())
}

/// Real Envoy with `edit` applied to the plans and a 2 s route timeout.
pub fn envoy_with(edit: impl FnOnce(&mut serde_json::Value)) -> EnvoyGateway {
    EnvoyGateway::start(GatewayOptions {
        plans_json: plans_with(edit),
        upstream_timeout: "2s".into(),
        ..GatewayOptions::default()
    })
}

/// A bearer token of `user` claiming `plan`, signed by the key every test gateway trusts.
pub fn token(user: &str, plan: &str) -> String {
    plan_limits_services::jwt::DevKey::for_tests().token(
        &plan_limits_core::JwtClaims::default(),
        &plan_limits_services::jwt::TokenClaims {
            user,
            plan: Some(plan),
            org: None,
            anchor_day: None,
            ttl_secs: 3600,
        },
    )
}

/// A bearer token with `claims` besides the issuer, audience and expiry every test gateway
/// accepts (valid for ten minutes by the real clock, which `jwt_authn` checks), signed by the
/// key they trust.
pub fn token_with(claims: serde_json::Value) -> String {
    let jwt = plan_limits_core::JwtClaims::default();
    let now = chrono::Utc::now().timestamp();
    let mut payload = serde_json::json!({"iss": jwt.issuer, "aud": jwt.audience,
        "iat": now, "exp": now + 600});
    if let (Some(payload), Some(claims)) = (payload.as_object_mut(), claims.as_object()) {
        payload.extend(claims.clone());
    }
    plan_limits_services::jwt::DevKey::for_tests().sign(&payload)
}

/// An upload of a small diagram by `user` on `plan`.
pub fn upload(user: &str, plan: &str) -> Request {
    Request::new("POST", "/api/upload")
        .user(user, plan)
        .body(Body::Bytes(b"<diagram/>".to_vec()))
}

/// Sends `n` uploads for `user` on `plan` at once, spread over `ports`; returns the statuses
/// in the order sent.
pub fn concurrent_uploads(ports: &[u16], user: &str, plan: &str, n: usize) -> Vec<u16> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let port = ports[i % ports.len()];
                s.spawn(move || upload(user, plan).send(port).status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// An AI analysis by `user` on `plan`.
pub fn analysis(user: &str, plan: &str) -> Request {
    Request::new("POST", "/api/teammate").user(user, plan)
}

/// `user`'s count of `action` in the gateway's current period.
pub fn counter(gw: &dyn Gateway, user: &str, action: &str) -> u64 {
    usage::counter(&mut gw.redis(), user, action, &gw.period())
}

/// Whether `user`'s count of `action` reaches `n` (settlements reach Redis a few
/// milliseconds after the response through Envoy, at once in the harness).
pub fn counts(gw: &dyn Gateway, user: &str, action: &str, n: u64) -> bool {
    eventually(|| counter(gw, user, action) == n)
}

/// Reservations `user` still holds for `action` in the gateway's current period.
pub fn pending(gw: &dyn Gateway, user: &str, action: &str) -> u64 {
    usage::pending(&mut gw.redis(), user, action, &gw.period())
}

/// Stalls the Redis at `url` (an admin's) for `seconds` with DEBUG SLEEP, from another
/// thread; join the handle to wait for the end of the stall.
pub fn stall_redis(url: String, seconds: &'static str) -> std::thread::JoinHandle<()> {
    let handle = std::thread::spawn(move || {
        let mut c = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connect to stall Redis: {e}"));
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(seconds)
            .exec(&mut c)
            .unwrap_or_else(|e| panic!("DEBUG SLEEP: {e}"));
    });
    // Let the stall begin before the caller sends what it should meet.
    std::thread::sleep(std::time::Duration::from_millis(50));
    handle
}

/// Runs a scenario once per gateway, as three tests: the harness with the webdis build, the
/// harness with the Redis host-call build, and real Envoy.
#[macro_export]
macro_rules! on_every_gateway {
    ($name:ident, |$gw:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($gw: &mut dyn $crate::Gateway) $body

            #[test]
            fn harness_webdis() {
                run(&mut $crate::harness($crate::Build::Webdis))
            }

            #[test]
            fn harness_redis_hostcalls() {
                run(&mut $crate::harness($crate::Build::RedisHostCalls))
            }

            #[test]
            fn envoy() {
                run(&mut $crate::envoy())
            }
        }
    };
}

/// Runs a harness scenario once per filter build, as two tests.
#[macro_export]
macro_rules! on_both_builds {
    ($name:ident, |$build:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($build: $crate::Build) $body

            #[test]
            fn webdis() {
                run($crate::Build::Webdis)
            }

            #[test]
            fn redis_hostcalls() {
                run($crate::Build::RedisHostCalls)
            }
        }
    };
}
