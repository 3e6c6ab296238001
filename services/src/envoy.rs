//! Envoy: its configuration rendered from `envoy.yaml` and plans.json, the process, and what
//! its admin endpoint reports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plan_limits_core::config::IdentitySource;
use plan_limits_core::plans::Plans;
use plan_limits_core::routes::PathPattern;

use crate::process::Service;

/// What fills envoy.yaml's placeholders.
pub struct EnvoyParams<'a> {
    pub admin_port: u16,
    pub gateway_port: u16,
    pub upstream_port: u16,
    pub webdis_port: u16,
    pub upstream_timeout: &'a str,
    pub filter_wasm: &'a Path,
    pub plans_json: &'a str,
    /// The JSON Web Key Set Envoy verifies bearer tokens with (`jwt` identity).
    pub jwks: &'a Path,
}

/// The repository's envoy.yaml template.
pub fn template() -> String {
    let path = crate::repo_root().join("envoy.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Renders the envoy.yaml `template`; plans.json becomes the filter's configuration verbatim,
/// so limits live in one place only, and Envoy's metered routes are rendered from its routes.
pub fn render(template: &str, p: &EnvoyParams) -> Result<String, String> {
    let plans: serde_json::Value =
        serde_json::from_str(p.plans_json).map_err(|e| format!("plans.json: {e}"))?;
    // A JSON string is a valid YAML double-quoted scalar.
    let plans = serde_json::Value::String(plans.to_string()).to_string();
    // A plans.json the filter refuses yields no metered routes: Envoy (or its `--mode
    // validate`) then fails on the filter's own message, naming the field.
    let compiled = Plans::from_json(p.plans_json.as_bytes()).ok();
    let routes = compiled
        .as_ref()
        .map(|plans| unmetered_routes(plans, p.upstream_timeout))
        .unwrap_or_default();
    let identity = compiled
        .as_ref()
        .map(|plans| identity_filters(plans, p.jwks))
        .unwrap_or_default();
    let request_timeout = compiled
        .as_ref()
        .map(|plans| format!("{}s", plans.request_timeout_ms.div_ceil(1000)))
        .unwrap_or_else(|| "300s".into());
    let rendered = template
        .replace("@ADMIN_PORT@", &p.admin_port.to_string())
        .replace("@GATEWAY_PORT@", &p.gateway_port.to_string())
        .replace("@UPSTREAM_PORT@", &p.upstream_port.to_string())
        .replace("@WEBDIS_PORT@", &p.webdis_port.to_string())
        .replace("@UPSTREAM_TIMEOUT@", p.upstream_timeout)
        .replace("@FILTER_WASM@", &p.filter_wasm.display().to_string())
        .replace("@UNMETERED_ROUTES@", &routes)
        .replace("@IDENTITY_FILTERS@", &identity)
        .replace("@REQUEST_TIMEOUT@", &request_timeout)
        .replace("@PLANS_JSON@", &plans);
    match unfilled_placeholder(&rendered) {
        Some(name) => Err(format!("envoy.yaml: placeholder @{name}@ was not filled")),
        None => Ok(rendered),
    }
}

/// Envoy routes for the paths plans.json lists as unmetered, with the filter disabled on
/// them: an exact path with or without one trailing slash, a prefix on whole segments, the
/// method without case. (Envoy matches these as spelt; the filter, which sees every other
/// spelling, passes the same paths whatever their spelling.)
pub fn unmetered_routes(plans: &Plans, timeout: &str) -> String {
    let indent = "              ";
    let quoted = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = Vec::new();
    for route in plans.unmetered() {
        let method = route
            .method
            .as_deref()
            .map(|m| {
                format!(
                    ", headers: [{{ name: \":method\", string_match: {{ exact: {}, ignore_case: true }} }}]",
                    quoted(m)
                )
            })
            .unwrap_or_default();
        let matchers = match &route.path {
            PathPattern::Exact(path) if path == "/" => vec![format!("path: {}", quoted(path))],
            PathPattern::Exact(path) => vec![
                format!("path: {}", quoted(path)),
                format!("path: {}", quoted(&format!("{path}/"))),
            ],
            PathPattern::Prefix(prefix) if prefix == "/" => vec!["prefix: \"/\"".to_string()],
            PathPattern::Prefix(prefix) => {
                vec![format!("path_separated_prefix: {}", quoted(prefix))]
            }
        };
        for matcher in matchers {
            out.push(format!(
                "{indent}- match: {{ {matcher}{method} }}\n\
                 {indent}  route: {{ cluster: product_upstream, timeout: {timeout} }}\n\
                 {indent}  typed_per_filter_config:\n\
                 {indent}    plan_limits:\n\
                 {indent}      \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n\
                 {indent}      disabled: true\n\
                 {indent}    plan_limits_hold:\n\
                 {indent}      \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n\
                 {indent}      disabled: true"
            ));
        }
    }
    out.join("\n")
}

/// The filters ahead of plan-limits that establish who is calling. For `jwt`: client copies
/// of the identity headers are removed (the filter sets them for the upstream, verified), then
/// `jwt_authn` verifies a bearer token and puts its payload in the request's metadata; a
/// request without a valid token still reaches the filter, which answers 401 on metered
/// routes. For `trusted_headers`: nothing (an authenticator in front sets them).
pub fn identity_filters(plans: &Plans, jwks: &Path) -> String {
    let identity = &plans.identity;
    if identity.source != IdentitySource::Jwt {
        return String::new();
    }
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let jwt = &identity.jwt;
    format!(
        r#"          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
                - remove: {user}
                - remove: {plan}
                - remove: {org}
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                plan_limits:
                  issuer: {issuer}
                  audiences: [{audience}]
                  local_jwks: {{ filename: {jwks} }}
                  forward: false
                  payload_in_metadata: {payload}
              rules:
              - match: {{ prefix: "/" }}
                requires:
                  requires_any:
                    requirements:
                    - provider_name: plan_limits
                    - allow_missing_or_failed: {{}}"#,
        user = q(&identity.user_header),
        plan = q(&identity.plan_header),
        org = q(&identity.org_header),
        issuer = q(&jwt.issuer),
        audience = q(&jwt.audience),
        jwks = q(&jwks.display().to_string()),
        payload = q(&jwt.payload_key),
    )
}

fn unfilled_placeholder(text: &str) -> Option<&str> {
    text.split('@')
        .skip(1)
        .find(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
}

/// The Envoy binary: `ENVOY_BIN`, else the repository's `.venv` (made by `make deps`), else PATH.
pub fn envoy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return bin.into();
    }
    let venv = crate::repo_root().join(".venv/bin/envoy");
    if venv.exists() {
        venv
    } else {
        "envoy".into()
    }
}

/// How to start one Envoy.
pub struct EnvoyOptions<'a> {
    /// Names its config and log files in `dir`.
    pub name: &'a str,
    pub dir: &'a Path,
    pub config: &'a str,
    pub concurrency: u32,
    /// `(base id, epoch)`: start as a hot restart of another Envoy (epoch 0 starts the first).
    pub hot_restart: Option<(u32, u32)>,
    /// Wait until this port listens (not for a hot restart's later epochs).
    pub port: u16,
}

/// Starts Envoy with `options.config`.
pub fn start(options: EnvoyOptions) -> Service {
    let EnvoyOptions {
        name,
        dir,
        config,
        concurrency,
        hot_restart,
        port,
    } = options;
    let yaml = dir.join(format!("{name}.yaml"));
    std::fs::write(&yaml, config).unwrap_or_else(|e| panic!("{}: {e}", yaml.display()));
    let mut command = Command::new(envoy_bin());
    command
        .arg("-c")
        .arg(&yaml)
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--log-level", "warn", "--component-log-level", "wasm:info"]);
    match hot_restart {
        Some((base_id, epoch)) => {
            command.args([
                "--base-id",
                &base_id.to_string(),
                "--restart-epoch",
                &epoch.to_string(),
            ]);
        }
        None => {
            command.arg("--use-dynamic-base-id");
        }
    }
    let mut envoy = Service::spawn(name, command, &dir.join(format!("{name}.log")));
    if hot_restart.is_none_or(|(_, epoch)| epoch == 0) {
        envoy.wait_for_port(port, Duration::from_secs(30));
    }
    envoy
}

/// A filter counter from the Envoy whose admin listens on `admin_port`
/// (`wasmcustom.plan_limits.<name>`).
pub fn metric_at(admin_port: u16, name: &str) -> u64 {
    admin_stat(admin_port, &format!("wasmcustom.plan_limits.{name}"))
}

/// A counter from Envoy's admin `/stats` by its full name (0 when absent).
pub fn admin_stat(admin_port: u16, name: &str) -> u64 {
    let stats = crate::http::get(admin_port, &format!("/stats?filter={name}")).body_text();
    let key = format!("{name}: ");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmetered_paths_are_rendered_with_the_filter_disabled() {
        let mut json: serde_json::Value = serde_json::from_str(&crate::plans_json()).unwrap();
        json["unmetered"] = serde_json::json!([
            {"method": "GET", "path": "/api/upload/"},
            {"prefix": "/static/"},
            {"method": "HEAD", "prefix": "/"},
        ]);
        json["routes"] =
            serde_json::json!([{"method": "POST", "path": "/api/upload", "action": "upload"}]);
        let plans = Plans::from_json(json.to_string().as_bytes()).unwrap();
        let routes = unmetered_routes(&plans, "15s");
        let lines: Vec<&str> = routes
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("- match"))
            .collect();
        assert_eq!(
            lines,
            [
                r#"- match: { path: "/api/upload", headers: [{ name: ":method", string_match: { exact: "GET", ignore_case: true } }] }"#,
                r#"- match: { path: "/api/upload/", headers: [{ name: ":method", string_match: { exact: "GET", ignore_case: true } }] }"#,
                r#"- match: { path_separated_prefix: "/static" }"#,
                r#"- match: { prefix: "/", headers: [{ name: ":method", string_match: { exact: "HEAD", ignore_case: true } }] }"#,
            ]
        );
        // Both filters (the plan filter and its hold filter) on each.
        assert_eq!(routes.matches("plan_limits:\n").count(), 4);
        assert_eq!(routes.matches("plan_limits_hold:\n").count(), 4);
        assert_eq!(routes.matches("disabled: true").count(), 8);
    }

    #[test]
    fn every_placeholder_must_be_filled() {
        let params = EnvoyParams {
            admin_port: 1,
            gateway_port: 2,
            upstream_port: 3,
            webdis_port: 4,
            upstream_timeout: "1s",
            filter_wasm: Path::new("/f.wasm"),
            plans_json: "{}",
            jwks: Path::new("/jwks.json"),
        };
        assert!(render(&template(), &params).is_ok());
        let err = render("a: @NOT_THERE@", &params).unwrap_err();
        assert!(err.contains("@NOT_THERE@"), "{err}");
    }
}
