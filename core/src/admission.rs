//! A request's head, read once: which action it is, who calls on which plan, and whether the
//! filter answers it itself (401, 400, 403, 411, 413) before any Redis call.

use std::borrow::Cow;
use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::config::Identity;
use crate::period::BillingPeriod;
use crate::plans::{Action, FeatureAccess, Plan, Plans};
use crate::request::{MeteredRequest, RequestFacts};
use crate::responses::{self, LocalResponse};
use crate::routes;

/// The request headers as the host hands them over (pseudo-headers included, names in lower
/// case, values as bytes: a client may send any).
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    headers: &'a [(String, Vec<u8>)],
}

pub enum Admission {
    /// No metered route matched: pass untouched, count nothing.
    Unmetered,
    /// Answered by the filter (401, 400, 403, 411, 413).
    Refused(LocalResponse),
    /// On a metered route: it goes on, or first reserves a unit, by its terms' limit.
    Metered(MeteredRequest),
}

impl<'a> RequestHead<'a> {
    pub fn new(headers: &'a [(String, Vec<u8>)]) -> Self {
        Self { headers }
    }

    fn values(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn first(&self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    /// A header that may appear at most once: with two copies, the upstream might read the
    /// other one.
    fn single(&self, name: &'a str) -> Result<Option<&'a [u8]>, LocalResponse> {
        let mut values = self.values(name);
        match (values.next(), values.next()) {
            (first, None) => Ok(first),
            _ => Err(responses::bad_request(
                name,
                "the header appears more than once",
            )),
        }
    }

    fn text(&self, name: &'a str) -> Cow<'a, str> {
        String::from_utf8_lossy(self.first(name).unwrap_or_default())
    }

    pub fn method(&self) -> Cow<'a, str> {
        self.text(":method")
    }

    pub fn path(&self) -> Cow<'a, str> {
        self.text(":path")
    }
}

/// Decides what the head alone decides.
pub fn admit(plans: &Plans, head: RequestHead, now: DateTime<Utc>) -> Admission {
    let Some(action) = plans.route(&head.method(), &head.path()) else {
        return Admission::Unmetered;
    };
    match metered(plans, action, head, now) {
        Ok(request) => Admission::Metered(request),
        Err(response) => Admission::Refused(response),
    }
}

fn metered(
    plans: &Plans,
    action: &Rc<Action>,
    head: RequestHead,
    now: DateTime<Utc>,
) -> Result<MeteredRequest, LocalResponse> {
    let identity = &plans.identity;
    let user = user(identity, head)?;
    let plan_name = head.single(&identity.plan_header)?;
    let terms = action.terms(plan_name.and_then(|p| std::str::from_utf8(p).ok()));
    if let FeatureAccess::Missing { feature, offer } = &terms.feature {
        return Err(responses::feature_unavailable(
            action,
            &terms.plan,
            feature,
            offer.as_ref(),
        ));
    }
    let bytes = size(action, &terms.plan, head)?;
    Ok(MeteredRequest::new(RequestFacts {
        action: action.clone(),
        terms: terms.clone(),
        user,
        kind: kind(action, head),
        bytes,
        request_id: head.text("x-request-id").into_owned(),
        period: BillingPeriod::calendar_month(now),
        key_prefix: &plans.redis.key_prefix,
    }))
}

/// The caller: one non-empty header, UTF-8 without control characters, not too long.
fn user(identity: &Identity, head: RequestHead) -> Result<String, LocalResponse> {
    let header = &identity.user_header;
    let raw = match head.single(header)? {
        None | Some([]) => return Err(responses::missing_user(header)),
        Some(raw) => raw,
    };
    if raw.len() > identity.max_user_id_bytes {
        return Err(responses::bad_request(
            header,
            "user id is longer than identity.max_user_id_bytes",
        ));
    }
    let user = std::str::from_utf8(raw)
        .map_err(|_| responses::bad_request(header, "user id is not UTF-8"))?;
    if user.chars().any(char::is_control) {
        return Err(responses::bad_request(
            header,
            "user id contains control characters",
        ));
    }
    Ok(user.to_string())
}

/// The bytes an upload declares, checked against the plan's file size limit where the action
/// asks for it (413 over it, 411 without a length).
fn size(action: &Action, plan: &Plan, head: RequestHead) -> Result<u64, LocalResponse> {
    let declared = head.single("content-length")?;
    if !action.enforce_max_file_size {
        return Ok(declared.and_then(parse_content_length).unwrap_or(0));
    }
    let raw = declared.ok_or_else(responses::length_required)?;
    let bytes = parse_content_length(raw)
        .ok_or_else(|| responses::bad_request("content-length", "not a whole number of bytes"))?;
    match plan.max_file_size_bytes {
        Some(max) if bytes > max => Err(responses::file_too_large(plan, bytes, max)),
        _ => Ok(bytes),
    }
}

/// A Content-Length is ASCII digits only (no sign, no spaces) and fits in u64.
fn parse_content_length(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// The kind recorded in the usage event (`other` when not an allowed value; empty when the
/// action has none or the request names none).
fn kind(action: &Action, head: RequestHead) -> String {
    let Some(source) = &action.kind else {
        return String::new();
    };
    let from_header = source
        .header
        .as_deref()
        .and_then(|name| head.first(name))
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let value = from_header.or_else(|| {
        source
            .query
            .as_deref()
            .and_then(|q| routes::query_param(&head.path(), q))
    });
    match value {
        None => String::new(),
        Some(v) if source.allowed.contains(&v) => v,
        Some(_) => "other".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{now, plans};

    fn admit_with(plans: &Plans, method: &str, path: &str, headers: &[(&str, &[u8])]) -> Admission {
        let mut all = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
        ];
        all.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_vec())));
        admit(plans, RequestHead::new(&all), now())
    }

    fn status(admission: &Admission) -> Option<u32> {
        match admission {
            Admission::Refused(r) => Some(r.status),
            _ => None,
        }
    }

    fn metered(admission: Admission) -> MeteredRequest {
        match admission {
            Admission::Metered(m) => m,
            _ => panic!("expected a metered request"),
        }
    }

    #[test]
    fn unmatched_routes_are_unmetered() {
        assert!(matches!(
            admit_with(&plans(), "GET", "/health", &[]),
            Admission::Unmetered
        ));
    }

    #[test]
    fn a_metered_route_without_a_user_is_401() {
        let p = plans();
        assert_eq!(
            status(&admit_with(&p, "POST", "/api/teammate", &[])),
            Some(401)
        );
        assert_eq!(
            status(&admit_with(
                &p,
                "POST",
                "/api/teammate",
                &[("x-user-id", b"")]
            )),
            Some(401)
        );
    }

    #[test]
    fn bad_user_ids_are_400() {
        let p = plans();
        let long = vec![b'a'; 257];
        for bad in [&long[..], b"\xff\xfe", b"a\nb"] {
            let a = admit_with(&p, "POST", "/api/teammate", &[("x-user-id", bad)]);
            assert_eq!(status(&a), Some(400));
        }
        let longest = vec![b'a'; 256];
        let a = admit_with(&p, "POST", "/api/teammate", &[("x-user-id", &longest)]);
        assert!(matches!(a, Admission::Metered(_)));
    }

    #[test]
    fn duplicated_identity_or_length_headers_are_400() {
        let p = plans();
        for name in ["x-user-id", "x-user-plan", "content-length"] {
            let mut headers: Vec<(&str, &[u8])> = vec![
                ("x-user-id", b"u"),
                ("x-user-plan", b"free"),
                ("content-length", b"1"),
            ];
            headers.push((name, b"other"));
            let a = admit_with(&p, "POST", "/api/upload", &headers);
            assert_eq!(status(&a), Some(400), "{name}");
        }
    }

    #[test]
    fn header_names_compare_without_case() {
        let p = plans();
        let m = metered(admit_with(
            &p,
            "POST",
            "/api/teammate",
            &[("X-User-Id", b"u"), ("X-User-Plan", b"professional")],
        ));
        assert_eq!((m.user(), m.plan().key.as_str()), ("u", "professional"));
    }

    #[test]
    fn the_kind_comes_from_the_header_or_the_query_and_is_checked() {
        let p = plans();
        let kind = |path: &str, headers: &[(&str, &[u8])]| {
            let mut all = vec![("x-user-id", &b"u"[..])];
            all.extend_from_slice(headers);
            metered(admit_with(&p, "POST", path, &all))
                .kind()
                .to_string()
        };
        assert_eq!(kind("/api/teammate?kind=vision", &[]), "vision");
        assert_eq!(
            kind("/api/teammate?kind=vision", &[("x-analysis-kind", b"chat")]),
            "chat"
        );
        assert_eq!(kind("/api/teammate?kind=teleport", &[]), "other");
        assert_eq!(kind("/api/teammate", &[]), "");
    }

    #[test]
    fn unknown_plans_fall_back_to_the_default_plan() {
        let p = plans();
        for plan in [&b"platinum"[..], b"\xc3\x28"] {
            let m = metered(admit_with(
                &p,
                "POST",
                "/api/teammate",
                &[("x-user-id", b"u"), ("x-user-plan", plan)],
            ));
            assert_eq!(m.plan().key, "free");
        }
    }

    #[test]
    fn features_outside_the_plan_are_403() {
        let p = plans();
        let a = admit_with(&p, "POST", "/api/export/dxf", &[("x-user-id", b"u")]);
        assert_eq!(status(&a), Some(403));
        let a = admit_with(
            &p,
            "POST",
            "/api/export/dxf",
            &[("x-user-id", b"u"), ("x-user-plan", b"professional")],
        );
        assert_eq!(metered(a).limit(), Some(50));
    }

    #[test]
    fn upload_sizes_are_checked_against_the_plan() {
        let p = plans();
        let mb11 = (11 * 1024 * 1024).to_string();
        let mb50 = (50 * 1024 * 1024).to_string();
        let free = admit_with(
            &p,
            "POST",
            "/api/upload",
            &[("x-user-id", b"u"), ("content-length", mb11.as_bytes())],
        );
        assert_eq!(status(&free), Some(413));
        let pro = metered(admit_with(
            &p,
            "POST",
            "/api/upload",
            &[
                ("x-user-id", b"u"),
                ("x-user-plan", b"professional"),
                ("content-length", mb50.as_bytes()),
            ],
        ));
        assert_eq!(pro.bytes(), 50 * 1024 * 1024);
        assert_eq!(pro.limit(), None);
    }

    #[test]
    fn uploads_need_a_valid_content_length() {
        let p = plans();
        assert_eq!(
            status(&admit_with(
                &p,
                "POST",
                "/api/upload",
                &[("x-user-id", b"u")]
            )),
            Some(411)
        );
        for bad in [&b"-1"[..], b"12a", b"", b" 1", b"99999999999999999999999"] {
            let a = admit_with(
                &p,
                "POST",
                "/api/upload",
                &[("x-user-id", b"u"), ("content-length", bad)],
            );
            assert_eq!(status(&a), Some(400), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_limited_request_knows_its_keys_and_limit() {
        let p = plans();
        let m = metered(admit_with(
            &p,
            "POST",
            "/api/teammate?kind=vision",
            &[("x-user-id", b"u:1"), ("x-request-id", b"req-7")],
        ));
        assert_eq!(m.keys().summary, "plan-limits:{u%3A1}:2026-11");
        assert_eq!(m.limit(), Some(3));
        assert_eq!(m.request_id(), "req-7");
    }

    proptest::proptest! {
        #[test]
        fn fuzz_admission_headers(user in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                  plan in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                                  length in proptest::collection::vec(proptest::num::u8::ANY, 0..24)) {
            let p = plans();
            let a = admit_with(&p, "POST", "/api/upload", &[("x-user-id", &user), ("x-user-plan", &plan), ("content-length", &length)]);
            if let Admission::Metered(m) = a {
                proptest::prop_assert_eq!(m.user().as_bytes(), &user[..]);
            }
        }
    }
}
