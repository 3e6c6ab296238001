//! Which action (if any) a request is: method and path matched against the routes of
//! plans.json, in order. Patterns are normalised once, when plans.json is compiled; the Envoy
//! route table rendered from them (tools) uses the same normalised patterns.

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
}

/// One route: an optional method (any when absent, compared without case), a path pattern,
/// and what it leads to.
#[derive(Debug, Clone)]
pub struct Route<T> {
    pub method: Option<String>,
    pub path: PathPattern,
    pub target: T,
}

/// The first route matching `method` and `path` (the query string and fragment are ignored);
/// `None` means the request is unmetered.
pub fn find<'a, T>(routes: &'a [Route<T>], method: &str, path: &str) -> Option<&'a Route<T>> {
    let path = path_without_query(path);
    routes.iter().find(|route| {
        route
            .method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && route.path.matches(path)
    })
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
        let route = |method: Option<&str>, path: PathPattern, target| Route {
            method: method.map(String::from),
            path,
            target,
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
        r.insert(
            0,
            Route {
                method: None,
                path: PathPattern::prefix("/api"),
                target: "first",
            },
        );
        assert_eq!(
            find(&r, "POST", "/api/upload").map(|r| r.target),
            Some("first")
        );
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
