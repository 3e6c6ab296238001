//! Which action (if any) a request is: method and path matched against `routes` in order.

use crate::config::Route;

/// Returns the action of the first route that matches; `None` means the request is unmetered.
pub fn match_action<'a>(routes: &'a [Route], method: &str, path: &str) -> Option<&'a str> {
    let path = path_without_query(path);
    routes
        .iter()
        .find(|route| {
            route
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && path_matches(route, path)
        })
        .map(|route| route.action.as_str())
}

fn path_matches(route: &Route, path: &str) -> bool {
    if let Some(exact) = &route.path {
        return trim_trailing_slash(path) == trim_trailing_slash(exact);
    }
    if let Some(prefix) = &route.prefix {
        let prefix = trim_trailing_slash(prefix);
        return match path.strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
            None => false,
        };
    }
    false
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
    use crate::config::Config;

    fn routes() -> Vec<Route> {
        Config::from_json(include_bytes!("../../plans.json"))
            .unwrap()
            .routes
    }

    #[test]
    fn the_demo_routes_map_to_their_actions() {
        let r = routes();
        assert_eq!(match_action(&r, "POST", "/api/upload"), Some("upload"));
        assert_eq!(match_action(&r, "POST", "/api/upload/"), Some("upload"));
        assert_eq!(match_action(&r, "POST", "/api/upload?x=1"), Some("upload"));
        assert_eq!(
            match_action(&r, "POST", "/api/teammate?kind=vision"),
            Some("ai_analysis")
        );
        assert_eq!(
            match_action(&r, "GET", "/api/procedures/42"),
            Some("procedure_view")
        );
        assert_eq!(
            match_action(&r, "POST", "/api/export/pdf"),
            Some("pdf_export")
        );
        assert_eq!(
            match_action(&r, "POST", "/api/export/dxf"),
            Some("dxf_export")
        );
        assert_eq!(
            match_action(&r, "GET", "/api/v1/diagrams"),
            Some("api_call")
        );
        assert_eq!(match_action(&r, "DELETE", "/api/v1"), Some("api_call"));
    }

    #[test]
    fn other_requests_are_unmetered() {
        let r = routes();
        assert_eq!(match_action(&r, "GET", "/api/upload"), None);
        assert_eq!(match_action(&r, "GET", "/"), None);
        assert_eq!(match_action(&r, "GET", "/health"), None);
        assert_eq!(match_action(&r, "POST", "/api/uploads"), None);
        assert_eq!(match_action(&r, "GET", "/api/v10/x"), None);
        assert_eq!(match_action(&r, "GET", "/api/proceduresX"), None);
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
            let _ = match_action(&routes(), &method, &path);
            let _ = query_param(&path, "kind");
        }
    }
}
