//! Which action (if any) a request is: method and path matched against the routes of
//! plans.json, in order. Patterns are normalised once, when plans.json is compiled.
//!
//! A path is also matched loosely, as a web framework may read it (`canonical`): without case,
//! `;parameters`, trailing dots or percent-encoded letters, so that no other spelling of a
//! metered path reaches its handler unmetered.

/// A path pattern, normalised: no trailing slash (but for `/` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// The path itself, with or without one trailing slash.
    Exact(String),
    /// The path and everything under it, on whole segments: `/api/v1` matches `/api/v1` and
    /// `/api/v1/x`, not `/api/v10`.
    Prefix(String),
}

impl PathPattern {
    pub fn exact(pattern: &str) -> Self {
        Self::Exact(trim_trailing_slash(pattern).to_string())
    }

    pub fn prefix(pattern: &str) -> Self {
        Self::Prefix(trim_trailing_slash(pattern).to_string())
    }

    /// Whether `path` (without its query string) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => trim_trailing_slash(path) == exact,
            Self::Prefix(prefix) => match path.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
                None => false,
            },
        }
    }

    /// The pattern as `canonical` spells paths (lower case).
    pub fn loose(&self) -> Self {
        match self {
            Self::Exact(p) => Self::Exact(canonical(p)),
            Self::Prefix(p) => Self::Prefix(canonical(p)),
        }
    }
}

/// One route: an optional method (any when absent, compared without case), a path pattern,
/// and what it leads to.
#[derive(Debug, Clone)]
pub struct Route<T> {
    pub method: Option<String>,
    pub path: PathPattern,
    /// `path` as `canonical` spells paths.
    pub loose: PathPattern,
    pub target: T,
}

impl<T> Route<T> {
    pub fn new(method: Option<String>, path: PathPattern, target: T) -> Self {
        let loose = path.loose();
        Self {
            method,
            path,
            loose,
            target,
        }
    }

    fn method_matches(&self, method: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }
}

/// The first route matching `method` and `path` (the query string and fragment are ignored);
/// `None` means the request is unmetered.
pub fn find<'a, T>(routes: &'a [Route<T>], method: &str, path: &str) -> Option<&'a Route<T>> {
    let path = path_without_query(path);
    routes
        .iter()
        .find(|route| route.method_matches(method) && route.path.matches(path))
}

/// The first route whose path matches `canonical` (a `canonical` path) loosely: one that also
/// matches `method` if any does; with whether the method matched.
pub fn find_loose<'a, T>(
    routes: &'a [Route<T>],
    method: &str,
    canonical: &str,
) -> Option<(&'a Route<T>, bool)> {
    let same_path = |route: &&Route<T>| route.loose.matches(canonical);
    routes
        .iter()
        .filter(same_path)
        .find(|route| route.method_matches(method))
        .map(|route| (route, true))
        .or_else(|| routes.iter().find(same_path).map(|route| (route, false)))
}

/// `path` as a web framework may read it: query and fragment dropped, percent-encoded
/// unreserved characters decoded, each segment's `;parameters` and trailing dots dropped, a
/// trailing slash dropped, in lower case.
pub fn canonical(path: &str) -> String {
    let path = path_without_query(path);
    let decoded: Vec<u8> = decode_unreserved(path.as_bytes());
    let decoded = String::from_utf8_lossy(&decoded);
    let segments: Vec<&str> = decoded
        .split('/')
        .map(|segment| {
            let segment = segment.split(';').next().unwrap_or(segment);
            // `.` and `..` are Envoy's to resolve; only dots after a name go.
            if segment.bytes().all(|b| b == b'.') {
                segment
            } else {
                segment.trim_end_matches('.')
            }
        })
        .collect();
    trim_trailing_slash(&segments.join("/")).to_ascii_lowercase()
}

/// Decodes `%XX` where it stands for a letter, a digit, `-`, `.`, `_` or `~` (RFC 3986's
/// unreserved characters, which mean the same encoded or not); leaves the rest encoded.
fn decode_unreserved(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        let hex = path
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'));
        match (b, hex) {
            (b'%', Some(c)) => {
                out.push(c);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn trim_trailing_slash(path: &str) -> &str {
    if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    }
}

pub fn path_without_query(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// The first value of `name` in the query string, percent-decoded.
pub fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<Route<&'static str>> {
        let route = |method: Option<&str>, path: PathPattern, target| {
            Route::new(method.map(String::from), path, target)
        };
        vec![
            route(Some("POST"), PathPattern::exact("/api/upload/"), "upload"),
            route(
                None,
                PathPattern::prefix("/api/procedures"),
                "procedure_view",
            ),
            route(None, PathPattern::prefix("/api/v1"), "api_call"),
            route(
                Some("post"),
                PathPattern::exact("/api/teammate"),
                "ai_analysis",
            ),
        ]
    }

    fn action(method: &str, path: &str) -> Option<&'static str> {
        find(&routes(), method, path).map(|r| r.target)
    }

    #[test]
    fn patterns_are_normalised_once() {
        assert_eq!(
            PathPattern::exact("/api/upload/"),
            PathPattern::Exact("/api/upload".into())
        );
        assert_eq!(PathPattern::prefix("/"), PathPattern::Prefix("/".into()));
    }

    #[test]
    fn exact_paths_match_with_or_without_a_trailing_slash_and_query() {
        assert_eq!(action("POST", "/api/upload"), Some("upload"));
        assert_eq!(action("POST", "/api/upload/"), Some("upload"));
        assert_eq!(action("POST", "/api/upload?x=1"), Some("upload"));
        assert_eq!(action("POST", "/api/upload#f"), Some("upload"));
        assert_eq!(action("POST", "/api/uploads"), None);
        assert_eq!(action("GET", "/api/upload"), None);
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert_eq!(action("GET", "/api/procedures"), Some("procedure_view"));
        assert_eq!(action("GET", "/api/procedures/42"), Some("procedure_view"));
        assert_eq!(action("GET", "/api/proceduresX"), None);
        assert_eq!(action("DELETE", "/api/v1"), Some("api_call"));
        assert_eq!(action("GET", "/api/v10/x"), None);
        assert!(PathPattern::prefix("/").matches("/anything"));
    }

    #[test]
    fn methods_compare_without_case_and_the_first_route_wins() {
        assert_eq!(action("POST", "/api/teammate"), Some("ai_analysis"));
        assert_eq!(action("post", "/api/upload"), Some("upload"));
        let mut r = routes();
        r.insert(0, Route::new(None, PathPattern::prefix("/api"), "first"));
        assert_eq!(
            find(&r, "POST", "/api/upload").map(|r| r.target),
            Some("first")
        );
    }

    #[test]
    fn canonical_paths_read_as_a_lenient_framework_would() {
        for (spelling, canonical_form) in [
            ("/api/upload", "/api/upload"),
            ("/API/Upload", "/api/upload"),
            ("/api/upload;jsessionid=1", "/api/upload"),
            ("/api/upload.", "/api/upload"),
            ("/api/upload...", "/api/upload"),
            ("/api/upload/", "/api/upload"),
            ("/api/%75pload", "/api/upload"),
            ("/api/%55PLOAD?x=1", "/api/upload"),
            ("/api/v1;x/d", "/api/v1/d"),
            ("/api/%2e%2e/x", "/api/../x"),
            ("/api/a%2Fb", "/api/a%2fb"),
            ("/", "/"),
        ] {
            assert_eq!(canonical(spelling), canonical_form, "{spelling}");
        }
    }

    #[test]
    fn loose_matching_finds_the_route_of_another_spelling_and_says_if_the_method_matched() {
        let r = routes();
        let loose = |method: &str, path: &str| {
            find_loose(&r, method, &canonical(path)).map(|(route, same)| (route.target, same))
        };
        assert_eq!(loose("POST", "/API/Upload"), Some(("upload", true)));
        assert_eq!(loose("GET", "/api/upload;x"), Some(("upload", false)));
        assert_eq!(loose("GET", "/API/V1/x"), Some(("api_call", true)));
        assert_eq!(loose("GET", "/api/other"), None);
    }

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(
            query_param("/a?x=1&kind=photo%20x", "kind").as_deref(),
            Some("photo x")
        );
        assert_eq!(query_param("/a?kind", "kind").as_deref(), Some(""));
        assert_eq!(query_param("/a", "kind"), None);
    }

    proptest::proptest! {
        #[test]
        fn fuzz_route_matching(method in ".{0,8}", path in ".{0,64}") {
            let _ = find(&routes(), &method, &path);
            let _ = query_param(&path, "kind");
        }
    }
}
