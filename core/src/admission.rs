//! A request's head, read once: which action it is, who calls on which plan, and whether the
//! filter answers it itself (401, 400, 403, 405, 413) before any Redis call.

use std::borrow::Cow;
use std::rc::Rc;

use chrono::{DateTime, Utc};

use crate::config::{
    Gauge, Identity, IdentitySource, JwtClaims, OtherMethods, UnknownPlan, Variants,
};
use crate::period::BillingPeriod;
use crate::plans::{Action, Endpoint, PathClass, Plans};
use crate::reports::{self, Report};
use crate::request::{MeteredRequest, RequestFacts};
use crate::responses::{self, LocalResponse};
use crate::routes;

/// The request as the host hands it over: its headers (pseudo-headers included, names in
/// lower case, values as bytes: a client may send any) and the claims of its verified token.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    headers: &'a [(String, Vec<u8>)],
    claims: &'a Claims,
}

/// The claims `jwt_authn` verified and put in the request's dynamic metadata (absent without
/// a valid token). Strings as their bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub user: Option<Vec<u8>>,
    pub plan: Option<Vec<u8>>,
    pub org: Option<Vec<u8>>,
    /// The anchor day: a number (`jwt_authn` writes numbers as f64, little-endian) or digits.
    pub anchor: Option<Vec<u8>>,
}

impl Claims {
    /// The claims `jwt` names, from the whole payload read in one host call: Envoy hands a
    /// map over as proxy-wasm pairs (`[count][key len, value len]*[key \0 value \0]*`,
    /// little-endian u32s), each value encoded as a single claim would be. `None` if the bytes
    /// are not such pairs.
    pub fn from_payload(payload: &[u8], jwt: &JwtClaims) -> Option<Self> {
        let mut claims = Self::default();
        for (key, value) in pairs(payload)? {
            let slot = if key == jwt.user_claim.as_bytes() {
                &mut claims.user
            } else if key == jwt.plan_claim.as_bytes() {
                &mut claims.plan
            } else if key == jwt.org_claim.as_bytes() {
                &mut claims.org
            } else if key == jwt.anchor_claim.as_bytes() {
                &mut claims.anchor
            } else {
                continue;
            };
            // (An empty claim is no claim, as a read of that one claim answers it.)
            *slot = (!value.is_empty()).then(|| value.to_vec());
        }
        Some(claims)
    }
}

/// proxy-wasm's encoding of a map (see `Claims::from_payload`), as (key, value) slices.
fn pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let u32_at = |at: usize| -> Option<usize> {
        let word = bytes.get(at..at.checked_add(4)?)?;
        usize::try_from(u32::from_le_bytes(word.try_into().ok()?)).ok()
    };
    let count = u32_at(0)?;
    // Each pair takes 8 bytes of sizes and 2 of terminators: a count the bytes cannot hold is
    // refused before anything is allocated for it.
    if count > bytes.len() / 10 {
        return None;
    }
    let mut at = 4 + 8 * count;
    // The next `len` bytes and their terminating \0.
    let mut take = |len: usize| -> Option<&[u8]> {
        let end = at.checked_add(len)?;
        let piece = bytes.get(at..end)?;
        (bytes.get(end) == Some(&0)).then_some(())?;
        at = end + 1;
        Some(piece)
    };
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let (key_len, value_len) = (u32_at(4 + 8 * i)?, u32_at(8 + 8 * i)?);
        let key = take(key_len)?;
        let value = take(value_len)?;
        out.push((key, value));
    }
    (at == bytes.len()).then_some(out)
}

// Returned and matched at once, never stored: a boxed request would only cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Admission {
    /// No metered route matched: pass untouched, count nothing.
    Unmetered,
    /// Answered by the filter (401, 400, 403, 405, 413).
    Refused(LocalResponse),
    /// On a metered route: it goes on, or first reserves a unit, by its terms' limit.
    Metered(MeteredRequest),
    /// A report the filter answers itself from Redis (the usage endpoints).
    Report(Report),
    /// A release route (a delete, a member removed): it goes on, and its success gives back.
    Release(Release),
}

/// A request on a release route, for the verified caller.
#[derive(Debug, Clone)]
pub struct Release {
    pub gauge: Gauge,
    pub user: String,
    pub org: Option<String>,
    pub request_id: String,
}

/// Who is calling, as the configured identity source says.
struct Caller<'a> {
    user: String,
    plan: Option<&'a [u8]>,
    org: Option<&'a [u8]>,
    /// The subscription's anchor day the token names (0: none).
    anchor: u32,
}

impl<'a> RequestHead<'a> {
    pub fn new(headers: &'a [(String, Vec<u8>)], claims: &'a Claims) -> Self {
        Self { headers, claims }
    }

    fn values<'n>(&self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn first(&self, name: &str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    /// A header that may appear at most once: with two copies, the upstream might read the
    /// other one.
    fn single(&self, name: &str) -> Result<Option<&'a [u8]>, LocalResponse> {
        let mut values = self.values(name);
        match (values.next(), values.next()) {
            (first, None) => Ok(first),
            _ => Err(responses::bad_request(
                name,
                "the header appears more than once",
            )),
        }
    }

    fn text(&self, name: &str) -> Cow<'a, str> {
        String::from_utf8_lossy(self.first(name).unwrap_or_default())
    }

    pub fn method(&self) -> Cow<'a, str> {
        self.text(":method")
    }

    pub fn path(&self) -> Cow<'a, str> {
        self.text(":path")
    }

    /// The client waits for a go-ahead before sending its body (`Expect: 100-continue`): an
    /// answer now reaches it before it sent any.
    pub fn expects_continue(&self) -> bool {
        self.first("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
    }

    /// The Content-Length, if one well-formed one is declared.
    pub fn content_length(&self) -> Option<u64> {
        self.single("content-length")
            .ok()
            .flatten()
            .and_then(parse_content_length)
    }
}

/// Decides what the head alone decides.
pub fn admit(plans: &Plans, head: RequestHead, now: DateTime<Utc>) -> Admission {
    let action = match plans.classify(&head.method(), &head.path()) {
        PathClass::Endpoint(_, false) => {
            return Admission::Refused(responses::method_not_allowed("GET"))
        }
        PathClass::Endpoint(endpoint, true) => {
            return match report(plans, endpoint, head, now) {
                Ok(report) => Admission::Report(report),
                Err(response) => Admission::Refused(response),
            }
        }
        PathClass::Unmetered => return Admission::Unmetered,
        PathClass::Release(gauge) => {
            return match caller(&plans.identity, head) {
                Ok(caller) => Admission::Release(Release {
                    gauge,
                    user: caller.user,
                    org: caller.org.map(|o| String::from_utf8_lossy(o).into_owned()),
                    request_id: request_id(head),
                }),
                Err(response) => Admission::Refused(response),
            }
        }
        PathClass::Guarded => return Admission::Refused(responses::not_routed()),
        PathClass::Metered(action) => action,
        PathClass::Variant {
            route,
            method_matches: false,
        } => match route.target.other_methods {
            OtherMethods::Meter => &route.target.action,
            OtherMethods::Refuse => {
                let allowed = route.method.as_deref().unwrap_or_default();
                return Admission::Refused(responses::method_not_allowed(allowed));
            }
        },
        PathClass::Variant {
            route,
            method_matches: true,
        } => match route.target.variants {
            Variants::Meter => &route.target.action,
            Variants::Refuse => {
                return Admission::Refused(responses::bad_request(
                    ":path",
                    "another spelling of a metered path; use its own",
                ))
            }
        },
    };
    match metered(plans, action, head, now) {
        Ok(request) => Admission::Metered(request),
        Err(response) => Admission::Refused(response),
    }
}

/// A report for the verified caller (401 without one, 400 for a bad query).
fn report(
    plans: &Plans,
    endpoint: Endpoint,
    head: RequestHead,
    now: DateTime<Utc>,
) -> Result<Report, LocalResponse> {
    let caller = caller(&plans.identity, head)?;
    let kind = match endpoint {
        Endpoint::Usage => reports::usage_query(plans, &head.path(), now)?,
        Endpoint::History => reports::history_query(plans, &head.path(), now)?,
    };
    let claimed = caller.plan.map(|p| String::from_utf8_lossy(p).into_owned());
    Ok(Report::new(
        kind,
        caller.user,
        claimed,
        caller.anchor,
        plans,
        now,
    ))
}

fn metered(
    plans: &Plans,
    action: &Rc<Action>,
    head: RequestHead,
    now: DateTime<Utc>,
) -> Result<MeteredRequest, LocalResponse> {
    let identity = &plans.identity;
    let caller = caller(identity, head)?;
    // No plan named: the default plan. A plan plans.json does not know: as configured.
    let named = caller.plan.map(|p| String::from_utf8_lossy(p).into_owned());
    let (terms, unknown_plan) = match named.as_deref().map(|name| (name, action.terms_of(name))) {
        None => (action.terms(None), None),
        Some((_, Some(terms))) => (terms, None),
        Some((name, None)) => match identity.unknown_plan {
            UnknownPlan::DefaultPlan => (action.terms(None), Some(name.to_string())),
            UnknownPlan::Forbid => return Err(responses::unknown_plan(name)),
        },
    };
    let request = MeteredRequest::new(RequestFacts {
        action: action.clone(),
        terms: terms.clone(),
        user: caller.user,
        org: caller.org.map(|o| String::from_utf8_lossy(o).into_owned()),
        unknown_plan,
        kind: kind(action, head),
        metadata: action.metadata.read_request(|name| head.first(name)),
        declared_bytes: declared_size(head)?,
        request_id: request_id(head),
        idempotency_key: idempotency_key(head, &plans.idempotency_header)?,
        anchor: caller.anchor,
        period: BillingPeriod::anchored(now, caller.anchor),
        key_prefix: &plans.redis.key_prefix,
    });
    request.admissible()?;
    Ok(request)
}

/// The caller from the verified token's claims (`jwt`), or from headers an authenticator in
/// front set (`trusted_headers`).
fn caller<'a>(identity: &Identity, head: RequestHead<'a>) -> Result<Caller<'a>, LocalResponse> {
    match identity.source {
        IdentitySource::Jwt => {
            let claims = head.claims;
            let raw = match claims.user.as_deref() {
                None | Some([]) => return Err(responses::missing_token()),
                Some(raw) => raw,
            };
            Ok(Caller {
                user: user_id(identity, &identity.jwt.user_claim, raw)?,
                plan: claims.plan.as_deref(),
                org: claims.org.as_deref(),
                anchor: anchor_day(&identity.jwt.anchor_claim, claims.anchor.as_deref())?,
            })
        }
        IdentitySource::TrustedHeaders => {
            let header = &identity.user_header;
            let raw = match head.single(header)? {
                None | Some([]) => return Err(responses::missing_user(header)),
                Some(raw) => raw,
            };
            Ok(Caller {
                user: user_id(identity, header, raw)?,
                plan: head.single(&identity.plan_header)?,
                org: head.single(&identity.org_header)?,
                anchor: 0,
            })
        }
    }
}

/// An anchor day claim: a whole number from 1 to 31 (400 naming the claim otherwise); 0 when
/// there is none.
fn anchor_day(claim: &str, raw: Option<&[u8]>) -> Result<u32, LocalResponse> {
    let Some(raw) = raw else { return Ok(0) };
    let number = match <[u8; 8]>::try_from(raw) {
        // `jwt_authn` hands numbers over as f64, little-endian.
        // (Compared, not cast: a float-to-int cast is an instruction not every host runs.)
        Ok(bytes) => {
            let n = f64::from_le_bytes(bytes);
            (1..=31u32).find(|day| f64::from(*day) == n)
        }
        Err(_) => std::str::from_utf8(raw).ok().and_then(|s| s.parse().ok()),
    };
    number.filter(|n| (1..=31).contains(n)).ok_or_else(|| {
        responses::bad_request(claim, "an anchor day is a whole number from 1 to 31")
    })
}

/// A user id: UTF-8 without control characters, not too long.
fn user_id(identity: &Identity, field: &str, raw: &[u8]) -> Result<String, LocalResponse> {
    if raw.len() > identity.max_user_id_bytes {
        return Err(responses::bad_request(
            field,
            "user id is longer than identity.max_user_id_bytes",
        ));
    }
    let user = std::str::from_utf8(raw)
        .map_err(|_| responses::bad_request(field, "user id is not UTF-8"))?;
    if user.chars().any(char::is_control) {
        return Err(responses::bad_request(
            field,
            "user id contains control characters",
        ));
    }
    Ok(user.to_string())
}

/// The bytes the request declares (Content-Length); `None`: none declared (a chunked body,
/// measured as it streams) or no body.
fn declared_size(head: RequestHead) -> Result<Option<u64>, LocalResponse> {
    match head.single("content-length")? {
        None => Ok(None),
        Some(raw) => parse_content_length(raw)
            .map(Some)
            .ok_or_else(|| responses::bad_request("content-length", "not a whole number of bytes")),
    }
}

/// A Content-Length is ASCII digits only (no sign, no spaces) and fits in u64.
fn parse_content_length(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// The idempotency key a client sent: at most 128 plain characters (400 otherwise, naming the
/// header), since it goes into a Redis key and billing's events.
fn idempotency_key(head: RequestHead, header: &str) -> Result<Option<String>, LocalResponse> {
    let Some(raw) = head.single(header)? else {
        return Ok(None);
    };
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
    if raw.is_empty() || raw.len() > 128 || !raw.iter().all(plain) {
        return Err(responses::bad_request(
            header,
            "1 to 128 letters, digits, '-', '_', '.' or ':'",
        ));
    }
    Ok(Some(String::from_utf8_lossy(raw).into_owned()))
}

/// The request id recorded in the usage event: Envoy's `x-request-id`, kept only if it is
/// short and plain (a client could otherwise write anything into billing's events).
fn request_id(head: RequestHead) -> String {
    const MAX: usize = 128;
    let raw = head.first("x-request-id").unwrap_or_default();
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
    if raw.len() <= MAX && raw.iter().all(plain) {
        String::from_utf8_lossy(raw).into_owned()
    } else {
        String::new()
    }
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
    use crate::testing::{head, now, plans, plans_json_with, Req};

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

    fn admit_req(plans: &Plans, req: &Req) -> Admission {
        admit(plans, req.head(), now())
    }

    /// The repository's plans with identity read from headers an authenticator set.
    fn trusted_headers() -> Plans {
        Plans::from_json(
            plans_json_with(|p| p["identity"]["source"] = "trusted_headers".into()).as_bytes(),
        )
        .unwrap()
    }

    /// A request without a token, with these headers.
    fn bare(method: &str, path: &str, headers: &[(&str, &[u8])]) -> Req {
        let mut req = head(method, path, "", "");
        req.claims = Claims::default();
        for (name, value) in headers {
            req = req.header(name, value);
        }
        req
    }

    /// `pairs` as Envoy encodes a map.
    fn encode_pairs(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = u32::try_from(pairs.len()).unwrap().to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend(u32::try_from(k.len()).unwrap().to_le_bytes());
            out.extend(u32::try_from(v.len()).unwrap().to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend(k.as_bytes());
            out.push(0);
            out.extend(*v);
            out.push(0);
        }
        out
    }

    #[test]
    fn claims_come_from_the_whole_payload_read_at_once() {
        let jwt = JwtClaims::default();
        let anchor = 14.0f64.to_le_bytes();
        let payload = encode_pairs(&[
            ("iss", b"plan-limits-dev"),
            ("sub", b"alice"),
            // A list claim is pairs too: skipped like any claim the plans do not name.
            ("roles", &encode_pairs(&[("admin", b"")])),
            ("plan", b"professional"),
            ("anchor_day", &anchor),
        ]);
        let claims = Claims::from_payload(&payload, &jwt).unwrap();
        assert_eq!(
            claims,
            Claims {
                user: Some(b"alice".to_vec()),
                plan: Some(b"professional".to_vec()),
                org: None,
                anchor: Some(anchor.to_vec()),
            }
        );
        // Other claim names, as plans.json sets them.
        let renamed = JwtClaims {
            user_claim: "iss".into(),
            ..JwtClaims::default()
        };
        let claims = Claims::from_payload(&payload, &renamed).unwrap();
        assert_eq!(claims.user.as_deref(), Some(&b"plan-limits-dev"[..]));
        assert_eq!(
            Claims::from_payload(&encode_pairs(&[]), &jwt),
            Some(Claims::default())
        );
        // An empty claim is none, as when read alone (Envoy hands an empty value as none).
        let empty = encode_pairs(&[("sub", b"alice"), ("plan", b""), ("anchor_day", b"")]);
        let claims = Claims::from_payload(&empty, &jwt).unwrap();
        assert_eq!((claims.plan, claims.anchor), (None, None));
    }

    #[test]
    fn a_payload_that_is_not_pairs_is_refused_whole() {
        let jwt = JwtClaims::default();
        let good = encode_pairs(&[("sub", b"alice"), ("plan", b"free")]);
        for cut in 0..good.len() {
            assert_eq!(
                Claims::from_payload(&good[..cut], &jwt),
                None,
                "cut at {cut}"
            );
        }
        // Bytes after the last pair, a terminator that is not \0.
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(Claims::from_payload(&longer, &jwt), None);
        let mut unterminated = good.clone();
        *unterminated.last_mut().unwrap() = b'x';
        assert_eq!(Claims::from_payload(&unterminated, &jwt), None);
        // A count the bytes cannot hold (nothing is allocated for it), sizes past the end.
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Claims::from_payload(&huge, &jwt), None);
        let mut long = good.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Claims::from_payload(&long, &jwt), None);
    }

    #[test]
    fn unmatched_routes_are_unmetered() {
        assert!(matches!(
            admit_req(&plans(), &bare("GET", "/health", &[])),
            Admission::Unmetered
        ));
    }

    #[test]
    fn without_a_verified_token_a_metered_route_is_401_whatever_headers_say() {
        let p = plans();
        let no_token = bare("POST", "/api/teammate", &[("x-user-id", b"victim")]);
        let Admission::Refused(r) = admit_req(&p, &no_token) else {
            panic!("expected 401")
        };
        assert_eq!(r.status, 401);
        assert!(r
            .headers
            .contains(&("www-authenticate".into(), "Bearer".into())));
        let empty = head("POST", "/api/teammate", "", "free");
        assert_eq!(status(&admit_req(&p, &empty)), Some(401));
    }

    #[test]
    fn the_user_and_plan_come_from_the_claims_not_the_headers() {
        let p = plans();
        let req = head("POST", "/api/teammate", "alice", "professional")
            .header("x-user-id", b"mallory")
            .header("x-user-plan", b"enterprise");
        let m = metered(admit_req(&p, &req));
        assert_eq!((m.user(), m.plan().key.as_str()), ("alice", "professional"));
        let mut no_plan = head("POST", "/api/teammate", "alice", "");
        no_plan.claims.plan = None;
        assert_eq!(metered(admit_req(&p, &no_plan)).plan().key, "free");
    }

    #[test]
    fn bad_user_ids_are_400() {
        let p = plans();
        for bad in [&[b'a'; 257][..], b"\xff\xfe", b"a\nb"] {
            let mut req = head("POST", "/api/teammate", "", "free");
            req.claims.user = Some(bad.to_vec());
            assert_eq!(status(&admit_req(&p, &req)), Some(400));
        }
        let longest = "a".repeat(256);
        let req = head("POST", "/api/teammate", &longest, "free");
        assert!(matches!(admit_req(&p, &req), Admission::Metered(_)));
    }

    #[test]
    fn an_unknown_plan_gets_the_default_plan_or_403_as_configured() {
        let req = head("POST", "/api/teammate", "u", "platinum");
        let m = metered(admit_req(&plans(), &req));
        assert_eq!(
            (m.plan().key.as_str(), m.unknown_plan()),
            ("free", Some("platinum"))
        );
        let forbid = Plans::from_json(
            plans_json_with(|p| p["identity"]["unknown_plan"] = "forbid".into()).as_bytes(),
        )
        .unwrap();
        let Admission::Refused(r) = admit_req(&forbid, &req) else {
            panic!("expected 403")
        };
        assert_eq!(r.status, 403);
        assert!(r.body.contains("platinum"), "{}", r.body);
    }

    #[test]
    fn trusted_headers_are_read_once_each() {
        let p = trusted_headers();
        let req = bare(
            "POST",
            "/api/teammate",
            &[
                ("X-User-Id", b"u"),
                ("X-User-Plan", b"professional"),
                ("x-org-id", b"acme"),
            ],
        );
        let m = metered(admit_req(&p, &req));
        assert_eq!((m.user(), m.plan().key.as_str()), ("u", "professional"));
        assert_eq!(
            m.identity_headers("x-user-id", "x-user-plan", "x-org-id")[2],
            ("x-org-id", "acme")
        );
        assert_eq!(
            status(&admit_req(&p, &bare("POST", "/api/teammate", &[]))),
            Some(401)
        );
        for name in ["x-user-id", "x-user-plan", "content-length"] {
            let req = bare(
                "POST",
                "/api/upload",
                &[
                    ("x-user-id", b"u"),
                    ("x-user-plan", b"free"),
                    ("content-length", b"1"),
                ],
            )
            .header(name, b"other");
            assert_eq!(status(&admit_req(&p, &req)), Some(400), "{name}");
        }
    }

    #[test]
    fn other_spellings_are_metered_or_refused_as_the_route_says() {
        let p = plans();
        let m = metered(admit_req(&p, &head("POST", "/API/Upload;x", "u", "free")));
        assert_eq!(m.action().key, "upload");
        let Admission::Refused(r) = admit_req(&p, &head("PUT", "/api/upload", "u", "free")) else {
            panic!("another method")
        };
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("allow".into(), "POST".into())));
        assert_eq!(
            status(&admit_req(&p, &head("POST", "/api/uploads", "u", "free"))),
            Some(403)
        );
        let strict = Plans::from_json(
            plans_json_with(|v| {
                v["routes"][0]["variants"] = "refuse".into();
                v["routes"][0]["other_methods"] = "meter".into();
            })
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            status(&admit_req(
                &strict,
                &head("POST", "/api/UPLOAD", "u", "free")
            )),
            Some(400)
        );
        let put = metered(admit_req(&strict, &head("PUT", "/api/upload", "u", "free")));
        assert_eq!(put.action().key, "upload");
    }

    #[test]
    fn the_kind_comes_from_the_header_or_the_query_and_is_checked() {
        let p = plans();
        let kind = |path: &str, headers: &[(&str, &[u8])]| {
            let mut req = head("POST", path, "u", "free");
            for (name, value) in headers {
                req = req.header(name, value);
            }
            metered(admit_req(&p, &req)).kind().to_string()
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
    fn the_tokens_anchor_day_sets_the_period() {
        let p = plans();
        let mut req = head("POST", "/api/upload", "u", "free");
        req.claims.anchor = Some(15f64.to_le_bytes().to_vec());
        assert_eq!(metered(admit_req(&p, &req)).period().id, "2026-11-15");
        req.claims.anchor = Some(b"31".to_vec());
        assert_eq!(metered(admit_req(&p, &req)).period().id, "2026-10-31");
        for bad in [&40f64.to_le_bytes()[..], &1.5f64.to_le_bytes(), b"0", b"x"] {
            req.claims.anchor = Some(bad.to_vec());
            let refused = admit_req(&p, &req);
            assert_eq!(status(&refused), Some(400), "{bad:?}");
        }
    }

    #[test]
    fn features_outside_the_plan_are_403() {
        let p = plans();
        let free = head("POST", "/api/export/dxf", "u", "free");
        assert_eq!(status(&admit_req(&p, &free)), Some(403));
        let pro = head("POST", "/api/export/dxf", "u", "professional");
        assert_eq!(metered(admit_req(&p, &pro)).limit(), Some(50));
    }

    /// An upload of `plan` declaring `length`.
    fn upload(plan: &str, length: &[u8]) -> Req {
        let mut req = head("POST", "/api/upload", "u", plan);
        req.headers.retain(|(n, _)| n != "content-length");
        req.header("content-length", length)
    }

    #[test]
    fn upload_sizes_are_checked_against_the_plan() {
        let p = plans();
        let mb11 = (11 * 1024 * 1024).to_string();
        assert_eq!(
            status(&admit_req(&p, &upload("free", mb11.as_bytes()))),
            Some(413)
        );
        let mb50 = (50 * 1024 * 1024).to_string();
        let pro = metered(admit_req(&p, &upload("professional", mb50.as_bytes())));
        assert_eq!(pro.bytes(), 50 * 1024 * 1024);
        assert_eq!(pro.limit(), None);
    }

    #[test]
    fn uploads_declare_one_valid_content_length_or_none() {
        let p = plans();
        // None: a chunked body, measured as it streams.
        let mut none = head("POST", "/api/upload", "u", "free");
        none.headers.retain(|(n, _)| n != "content-length");
        let streamed = metered(admit_req(&p, &none));
        assert_eq!(streamed.bytes(), 0);
        for bad in [&b"-1"[..], b"12a", b"", b" 1", b"99999999999999999999999"] {
            let a = admit_req(&p, &upload("free", bad));
            assert_eq!(status(&a), Some(400), "{:?}", String::from_utf8_lossy(bad));
        }
        let twice = upload("free", b"1").header("content-length", b"2");
        assert_eq!(status(&admit_req(&p, &twice)), Some(400));
    }

    #[test]
    fn a_limited_request_knows_its_keys_and_limit() {
        let p = plans();
        let req = head("POST", "/api/teammate?kind=vision", "u:1", "free")
            .header("x-request-id", b"req-7");
        let m = metered(admit_req(&p, &req));
        assert_eq!(m.keys().summary, "plan-limits:{u%3A1}:2026-11");
        assert_eq!(m.limit(), Some(3));
        assert_eq!(m.request_id(), "req-7");
    }

    #[test]
    fn a_request_id_goes_into_events_only_if_short_and_plain() {
        let p = plans();
        let id = |value: &[u8]| {
            let req = head("POST", "/api/teammate", "u", "free").header("x-request-id", value);
            metered(admit_req(&p, &req)).request_id().to_string()
        };
        assert_eq!(
            id(b"0b6c0e4e-5c1c-4f7e-9c7b-0d7c4c2e4f11"),
            "0b6c0e4e-5c1c-4f7e-9c7b-0d7c4c2e4f11"
        );
        assert_eq!(id(&[b'a'; 129]), "");
        assert_eq!(id(b"a\"b"), "");
        assert_eq!(id(b"\xff"), "");
    }

    proptest::proptest! {
        #[test]
        fn fuzz_admission_claims_and_headers(user in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                             plan in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                                             length in proptest::collection::vec(proptest::num::u8::ANY, 0..24)) {
            let p = plans();
            let mut req = upload("free", &length);
            req.claims.user = Some(user.clone());
            req.claims.plan = Some(plan);
            if let Admission::Metered(m) = admit_req(&p, &req) {
                proptest::prop_assert_eq!(m.user().as_bytes(), &user[..]);
            }
        }
    }
}
