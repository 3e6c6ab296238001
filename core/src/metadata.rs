//! A usage event's `metadata`: what plans.json lists for the action, taken from the request's
//! (and the upstream's response) headers, cut to a length, and nothing else.

use std::collections::BTreeMap;

use crate::config::{ConfigError, MetadataField};

/// Headers never read into metadata: a usage event is no place for a credential.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];
/// Fields per action, and characters per field: an event stays small.
const MAX_FIELDS: usize = 16;
const MAX_LEN: usize = 1024;

/// Where one field comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    header: String,
    /// A parameter of the header's value (`content-disposition:filename`).
    param: Option<String>,
    response: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    /// Tried in order; the first present wins (request headers before response headers).
    sources: Vec<Source>,
    max_len: usize,
}

/// An action's metadata fields, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataSpec {
    fields: Vec<Field>,
}

/// One request's metadata so far: field name to value, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

impl MetadataSpec {
    /// Checks and compiles `actions.<key>.metadata` (`path` names it in errors).
    pub fn compile(
        fields: &BTreeMap<String, MetadataField>,
        path: &str,
    ) -> Result<Self, ConfigError> {
        if fields.len() > MAX_FIELDS {
            return Err(ConfigError::at(
                path,
                format!("{} fields; at most {MAX_FIELDS}", fields.len()),
            ));
        }
        let mut compiled = Vec::with_capacity(fields.len());
        for (name, field) in fields {
            let at = format!("{path}.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(ConfigError::at(at, "field names use only a-z, 0-9 and _"));
            }
            if field.max_len == 0 || field.max_len > MAX_LEN {
                return Err(ConfigError::at(
                    format!("{at}.max_len"),
                    format!("{}; from 1 to {MAX_LEN}", field.max_len),
                ));
            }
            let request = field.headers.iter().map(|h| (h, false, "headers"));
            let response = field
                .response_headers
                .iter()
                .map(|h| (h, true, "response_headers"));
            let mut sources = Vec::new();
            for (spec, response, list) in request.chain(response) {
                sources.push(source(spec, response).map_err(|reason| {
                    ConfigError::at(format!("{at}.{list}"), format!("\"{spec}\": {reason}"))
                })?);
            }
            if sources.is_empty() {
                return Err(ConfigError::at(
                    at,
                    "needs `headers` or `response_headers` to read it from",
                ));
            }
            compiled.push(Field {
                name: name.clone(),
                sources,
                max_len: field.max_len,
            });
        }
        Ok(Self { fields: compiled })
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields read from the request's headers (`first`: a header's first value).
    pub fn read_request<'h>(&self, first: impl Fn(&str) -> Option<&'h [u8]>) -> Metadata {
        let mut out = Metadata::default();
        for field in &self.fields {
            let value = field
                .sources
                .iter()
                .filter(|s| !s.response)
                .find_map(|s| first(&s.header).and_then(|v| s.read(v)));
            if let Some(value) = value {
                out.0
                    .insert(field.name.clone(), clean(&value, field.max_len));
            }
        }
        out
    }

    /// The response headers some field may be read from.
    pub fn response_headers(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .flat_map(|f| f.sources.iter())
            .filter(|s| s.response)
            .map(|s| s.header.as_str())
    }

    /// Fills, from a response header's value, the fields the request left without one.
    pub fn read_response(&self, metadata: &mut Metadata, header: &str, value: &[u8]) {
        for field in &self.fields {
            if metadata.0.contains_key(&field.name) {
                continue;
            }
            let value = field
                .sources
                .iter()
                .filter(|s| s.response && s.header.eq_ignore_ascii_case(header))
                .find_map(|s| s.read(value));
            if let Some(value) = value {
                metadata
                    .0
                    .insert(field.name.clone(), clean(&value, field.max_len));
            }
        }
    }
}

impl Metadata {
    /// The event's `metadata` value: a JSON object, or empty when there is none.
    pub fn to_json(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&self.0).unwrap_or_default()
        }
    }

    pub fn get(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(String::as_str)
    }
}

fn source(spec: &str, response: bool) -> Result<Source, &'static str> {
    let (header, param) = match spec.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (spec, None),
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_*".contains(&b))
    };
    if !token(header) || header.contains('*') {
        return Err("a header name in lower case (a-z, 0-9, -)");
    }
    if param.is_some_and(|p| !token(p)) {
        return Err("a parameter name in lower case after the colon");
    }
    if SECRET_HEADERS.contains(&header) {
        return Err("carries credentials: never recorded");
    }
    Ok(Source {
        header: header.to_string(),
        param: param.map(str::to_string),
        response,
    })
}

impl Source {
    /// The value it names in a header's value (none when the parameter is absent).
    fn read(&self, value: &[u8]) -> Option<String> {
        let value = String::from_utf8_lossy(value);
        let Some(param) = &self.param else {
            return Some(value.into_owned());
        };
        value.split(';').skip(1).find_map(|part| {
            let (name, v) = part.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case(param)
                .then(|| unquote(v.trim()))
        })
    }
}

/// A quoted-string's content (`"a \"b\".pdf"` is `a "b".pdf`), or a token as it is.
fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"') else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Without control characters, at most `max_len` characters, trimmed.
fn clean(value: &str, max_len: usize) -> String {
    value
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(max_len)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<MetadataSpec, ConfigError> {
        let fields: BTreeMap<String, MetadataField> =
            serde_json::from_str(json).expect("valid JSON");
        MetadataSpec::compile(&fields, "actions.upload.metadata")
    }

    fn headers<'h>(list: &'h [(&str, &'h str)]) -> impl Fn(&str) -> Option<&'h [u8]> {
        move |name| {
            list.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        }
    }

    #[test]
    fn fields_come_from_the_first_listed_header_present_cut_and_cleaned() {
        let s = spec(
            r#"{"file_name": {"headers": ["content-disposition:filename", "x-file-name"], "max_len": 8},
                "content_type": {"headers": ["content-type"]},
                "session": {"headers": ["x-session-id"]}}"#,
        )
        .unwrap();
        let m = s.read_request(headers(&[
            (
                "content-disposition",
                "attachment; filename=\"a \\\"b\\\"\nc.pdf\"",
            ),
            ("x-file-name", "ignored.pdf"),
            ("content-type", " application/pdf "),
        ]));
        assert_eq!(m.get("file_name"), Some("a \"b\"c.p"));
        assert_eq!(m.get("content_type"), Some("application/pdf"));
        assert_eq!(m.get("session"), None);
        assert_eq!(
            m.to_json(),
            r#"{"content_type":"application/pdf","file_name":"a \"b\"c.p"}"#
        );
        // Without the parameter, the next header.
        let m = s.read_request(headers(&[
            ("content-disposition", "attachment"),
            ("x-file-name", "plan.dxf"),
        ]));
        assert_eq!(m.get("file_name"), Some("plan.dxf"));
        assert_eq!(Metadata::default().to_json(), "");
    }

    #[test]
    fn a_response_header_fills_what_the_request_did_not_say() {
        let s = spec(
            r#"{"session": {"headers": ["x-session-id"], "response_headers": ["x-session-id"]},
                "model": {"response_headers": ["x-model"]}}"#,
        )
        .unwrap();
        assert_eq!(
            s.response_headers().collect::<Vec<_>>(),
            ["x-model", "x-session-id"]
        );
        let mut m = s.read_request(headers(&[("x-session-id", "s-1")]));
        s.read_response(&mut m, "x-session-id", b"s-2");
        s.read_response(&mut m, "X-Model", b"vision-2");
        assert_eq!(m.get("session"), Some("s-1"));
        assert_eq!(m.get("model"), Some("vision-2"));
    }

    #[test]
    fn a_bad_field_is_refused_naming_it_and_the_reason() {
        let cases = [
            (
                r#"{"Name": {"headers": ["x-a"]}}"#,
                "actions.upload.metadata.Name",
            ),
            (r#"{"a": {"headers": []}}"#, "actions.upload.metadata.a"),
            (
                r#"{"a": {"headers": ["X-A"]}}"#,
                "actions.upload.metadata.a.headers",
            ),
            (
                r#"{"a": {"headers": ["x-a:"]}}"#,
                "actions.upload.metadata.a.headers",
            ),
            (
                r#"{"a": {"headers": ["authorization"]}}"#,
                "actions.upload.metadata.a.headers",
            ),
            (
                r#"{"a": {"response_headers": ["set-cookie"]}}"#,
                "actions.upload.metadata.a.response_headers",
            ),
            (
                r#"{"a": {"headers": ["x-a"], "max_len": 0}}"#,
                "actions.upload.metadata.a.max_len",
            ),
            (
                r#"{"a": {"headers": ["x-a"], "max_len": 5000}}"#,
                "actions.upload.metadata.a.max_len",
            ),
        ];
        for (json, path) in cases {
            let err = spec(json).expect_err(json);
            assert_eq!(err.path, path, "{json}: {err}");
        }
        let err = spec(r#"{"a": {"headers": ["cookie"]}}"#).unwrap_err();
        assert!(err.to_string().contains("credentials"), "{err}");
    }
}
