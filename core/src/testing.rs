//! Fixtures the core's unit tests share: the repository's plans, a fixed clock, request heads
//! and Redis replies.

use std::rc::Rc;

use chrono::{DateTime, TimeZone, Utc};

use crate::admission::{admit, Admission, Claims, RequestHead};
use crate::plans::{Action, Plans};
use crate::request::MeteredRequest;

pub const PLANS_JSON: &str = include_str!("../../plans.json");

pub fn plans() -> Plans {
    Plans::from_json(PLANS_JSON.as_bytes()).unwrap()
}

/// The repository's plans.json with `edit` applied, as JSON.
pub fn plans_json_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut value: serde_json::Value = serde_json::from_str(PLANS_JSON).unwrap();
    edit(&mut value);
    value.to_string()
}

pub fn action(plans: &Plans, key: &str) -> Rc<Action> {
    plans
        .actions()
        .iter()
        .find(|a| a.key == key)
        .unwrap()
        .clone()
}

/// 2026-11-27T12:00:00Z, three and a half days before November ends.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
}

/// A request as the host hands it over: its headers and its verified token's claims.
#[derive(Debug, Clone)]
pub struct Req {
    pub headers: Vec<(String, Vec<u8>)>,
    pub claims: Claims,
}

impl Req {
    pub fn head(&self) -> RequestHead<'_> {
        RequestHead::new(&self.headers, &self.claims)
    }

    pub fn header(mut self, name: &str, value: &[u8]) -> Self {
        self.headers.push((name.into(), value.to_vec()));
        self
    }
}

/// A request of `user` whose token claims `plan`, with a 10-byte body.
pub fn head(method: &str, path: &str, user: &str, plan: &str) -> Req {
    Req {
        headers: vec![
            (":method".into(), method.into()),
            (":path".into(), path.into()),
            ("content-length".into(), b"10".to_vec()),
        ],
        claims: Claims {
            user: Some(user.into()),
            plan: Some(plan.into()),
            org: None,
            anchor: None,
        },
    }
}

/// The request `req` makes at `when`, which must be metered.
pub fn metered(plans: &Plans, req: &Req, when: DateTime<Utc>) -> MeteredRequest {
    match admit(plans, req.head(), when) {
        Admission::Metered(m) => m,
        Admission::Refused(r) => panic!("refused: {} {}", r.status, r.body),
        Admission::Unmetered => panic!("unmetered"),
        Admission::Report(_) => panic!("a report"),
        Admission::Release(_) => panic!("a release route"),
    }
}
