//! `plan-limits render istio|envoy-gateway|higress`: the filter's deployment on a platform,
//! as Kubernetes manifests derived from plans.json (the one source), so what the platform
//! is told (issuer, audience, identity headers, request timeout) cannot drift from what
//! the filter enforces. Pure functions: compiled plans, plans.json and options in, YAML out.
//!
//! What the filter needs from its host, and where each platform gives it:
//!
//! - **The verified token's claims.** The filter reads them from the request's dynamic
//!   metadata, `filter_metadata["envoy.filters.http.jwt_authn"][identity.jwt.payload_key]`,
//!   which no client can write. Istio's RequestAuthentication puts the payload there under
//!   `payload` (istiod's `EnvoyJwtFilterPayload`, since Istio 1.21; before, under the
//!   issuer); Envoy Gateway's SecurityPolicy under the issuer (its translator sets
//!   `payload_in_metadata` to it). Neither is promised by their APIs, so the key is an
//!   option (`--payload-key`). Higress's jwt-auth plugin writes no metadata: there the
//!   filter reads headers (`identity.source: trusted_headers`) the plugin sets from claims.
//! - **Client copies of the identity headers removed** before anything reads them (the
//!   filter sets them for the upstream): an early header filter in Envoy Gateway
//!   (ClientTrafficPolicy), a Lua filter put first by an EnvoyFilter in Istio and Higress.
//! - **The hold filter right after the plan filter, in the same VM**: a second plugin with
//!   the same module under the root id `plan_limits_hold`. Istio and Higress share a VM
//!   between plugins of the same module (no `vm_id` set, same code); Envoy Gateway gives
//!   each extension its own VM (`vm_id` = its name), so there it is left out and refusals
//!   are answered at once.
//! - **A way to Redis**: webdis behind an Envoy cluster for stock Envoy (an Istio mesh
//!   service, or a cluster Envoy Gateway is patched with), Redis itself through Higress's
//!   Redis host calls (the `redis-hostcalls` build).
//!
//! The schemas, as read from each project's API (field names exactly as they are):
//!
//! ```text
//! extensions.istio.io/v1alpha1 WasmPlugin.spec: selector.matchLabels, url (oci://, https://,
//!     file://), sha256, imagePullPolicy, imagePullSecret, pluginName (= Envoy root_id), phase
//!     (AUTHN | AUTHZ | STATS; after Istio's authn filters = AUTHZ, after authz = STATS),
//!     priority (higher first within a phase), pluginConfig (Struct, handed over as JSON), match
//! security.istio.io/v1 RequestAuthentication.spec: selector.matchLabels, jwtRules[]: issuer,
//!     audiences[], jwksUri, forwardOriginalToken, outputPayloadToHeader, outputClaimToHeaders[]
//!     {header, claim}; a request without a token passes, one with a bad token is 401
//! networking.istio.io/v1alpha3 EnvoyFilter.spec: workloadSelector.labels, configPatches[]:
//!     applyTo, match.context (GATEWAY), match.listener.filterChain.filter.name, patch
//! networking.istio.io/v1 DestinationRule.spec: host, trafficPolicy.connectionPool.{tcp, http},
//!     trafficPolicy.outlierDetection
//! gateway.envoyproxy.io/v1alpha1 EnvoyExtensionPolicy.spec: targetRefs[] {group, kind, name},
//!     wasm[]: name, rootID, code {type: Image | HTTP, image {url, pullSecretRef}, http {url},
//!     sha256}, config (JSON), failOpen
//! gateway.envoyproxy.io/v1alpha1 SecurityPolicy.spec: targetRefs[], jwt {optional,
//!     providers[]: name, issuer, audiences[], remoteJWKS {uri} (https), claimToHeaders[]
//!     {header, claim}}
//! gateway.envoyproxy.io/v1alpha1 ClientTrafficPolicy.spec: targetRefs[],
//!     headers.earlyRequestHeaders {set, add, remove}, timeout.http.requestReceivedTimeout
//! gateway.envoyproxy.io/v1alpha1 EnvoyPatchPolicy.spec: targetRef {group, kind, name}, type
//!     JSONPatch, jsonPatches[]: {type, name, operation {op, path, value}}; op add with path ""
//!     adds a whole resource (needs extensionApis.enableEnvoyPatchPolicy)
//! extensions.higress.io/v1alpha1 WasmPlugin.spec: url, sha256, imagePullPolicy, pluginName,
//!     phase (UNSPECIFIED_PHASE | AUTHN | AUTHZ | STATS), priority, defaultConfig (handed over
//!     as the plugin's JSON when there are no matchRules), defaultConfigDisable, matchRules[]
//!     (adds `_rules_` to the JSON, which plans.json would refuse); the selector is Higress's own
//! Higress jwt-auth plugin config: global_auth, consumers[]: name, issuer, jwks (inline),
//!     claims_to_headers[] {claim, header, override}, from_headers[], keep_token
//! ```

use plan_limits_core::{IdentitySource, Plans, HOLD_ROOT_ID, PLAN_ROOT_ID, REDIS_CLUSTER};
use serde_json::{json, Value};

/// Where the filter is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Istio,
    EnvoyGateway,
    Higress,
}

impl Platform {
    fn default_namespace(self) -> &'static str {
        match self {
            Platform::Istio => "istio-system",
            Platform::EnvoyGateway => "default",
            Platform::Higress => "higress-system",
        }
    }
}

/// What plans.json does not say: where the module, the gateway and the services are.
#[derive(Debug, Clone)]
pub struct Options {
    /// The module: `oci://REGISTRY/REPO:TAG` (or `@sha256:...`, or no scheme: OCI), or an
    /// `https://` URL of the `.wasm`.
    pub image: String,
    pub namespace: Option<String>,
    /// Istio: the gateway's labels `key=value[,key=value]` (default `istio=ingressgateway`);
    /// Envoy Gateway: the Gateway's name (default `eg`); Higress: not used.
    pub target: Option<String>,
    /// Where Istio and Envoy Gateway fetch the token's keys (identity `jwt`).
    pub jwks_uri: Option<String>,
    /// The JSON Web Key Set itself, for Higress's jwt-auth plugin (identity `jwt`).
    pub jwks: Option<String>,
    /// The key `jwt_authn` writes the payload under (default: the platform's).
    pub payload_key: Option<String>,
    /// webdis `host:port` (Istio, Envoy Gateway).
    pub webdis_service: String,
    /// Redis `host:port` as Higress knows the service (Higress).
    pub redis_service: String,
    /// Higress's jwt-auth plugin image.
    pub higress_jwt_auth_image: String,
}

impl Options {
    /// Fills what was not given and only the deployment knows (the module's image, where the
    /// token's keys are) with placeholders plainly marked as such, so a complete manifest is
    /// printed; returns each as `(flag, placeholder)`, to be said on stderr.
    pub fn fill_placeholders(&mut self, platform: Platform) -> Vec<(&'static str, String)> {
        let mut filled = Vec::new();
        if self.image.is_empty() {
            self.image = PLACEHOLDER_IMAGE.into();
            filled.push(("--image", self.image.clone()));
        }
        if self.jwks_uri.is_none() && matches!(platform, Platform::Istio | Platform::EnvoyGateway) {
            self.jwks_uri = Some(PLACEHOLDER_JWKS_URI.into());
            filled.push(("--jwks-uri", PLACEHOLDER_JWKS_URI.into()));
        }
        if self.jwks.is_none() && platform == Platform::Higress {
            self.jwks = Some(PLACEHOLDER_JWKS.into());
            filled.push(("--jwks-file", PLACEHOLDER_JWKS.into()));
        }
        filled
    }
}

/// What `fill_placeholders` puts where a value was not given: each says it is one.
pub const PLACEHOLDER_IMAGE: &str = "oci://REGISTRY.PLACEHOLDER/plan-limits-filter:TAG";
pub const PLACEHOLDER_JWKS_URI: &str = "https://ISSUER.PLACEHOLDER/.well-known/jwks.json";
pub const PLACEHOLDER_JWKS: &str =
    r#"{"keys":[{"kty":"RSA","kid":"PLACEHOLDER","n":"PLACEHOLDER","e":"AQAB"}]}"#;

pub const DEFAULT_WEBDIS_SERVICE: &str = "webdis.plan-limits.svc.cluster.local:7379";
pub const DEFAULT_REDIS_SERVICE: &str = "redis.plan-limits.svc.cluster.local:6379";
pub const DEFAULT_HIGRESS_JWT_AUTH_IMAGE: &str =
    "oci://higress-registry.cn-hangzhou.cr.aliyuncs.com/plugins/jwt-auth:1.0.0";

/// One manifest and the comment printed above it.
struct Manifest {
    comment: String,
    body: Value,
}

fn manifest(comment: &str, body: Value) -> Manifest {
    Manifest {
        comment: comment.into(),
        body,
    }
}

/// The manifests for `platform`, as one YAML stream.
pub fn kubernetes(
    platform: Platform,
    plans: &Plans,
    plans_json: &Value,
    redis_cluster: &Value,
    options: &Options,
) -> Result<String, String> {
    let manifests = match platform {
        Platform::Istio => istio(plans, plans_json, redis_cluster, options)?,
        Platform::EnvoyGateway => envoy_gateway(plans, plans_json, redis_cluster, options)?,
        Platform::Higress => higress(plans, plans_json, options)?,
    };
    let mut out = String::new();
    for m in manifests {
        out.push_str("---\n");
        for line in m.comment.lines() {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        out.push_str(&serde_norway::to_string(&m.body).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn namespace(platform: Platform, options: &Options) -> String {
    options
        .namespace
        .clone()
        .unwrap_or_else(|| platform.default_namespace().into())
}

fn metadata(name: &str, namespace: &str) -> Value {
    json!({"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "plan-limits"}})
}

/// `host:port`.
fn host_port(service: &str, what: &str) -> Result<(String, u16), String> {
    let (host, port) = service
        .rsplit_once(':')
        .ok_or_else(|| format!("{what}: {service} is not host:port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{what}: {port} is not a port"))?;
    if host.is_empty() {
        return Err(format!("{what}: {service} names no host"));
    }
    Ok((host.into(), port))
}

/// The image as Istio and Higress name it (`oci://` when no scheme is given).
fn module_url(image: &str) -> Result<String, String> {
    if image.is_empty() {
        return Err("--image: give the module's image (oci://REGISTRY/REPO:TAG)".into());
    }
    Ok(if image.contains("://") {
        image.to_string()
    } else {
        format!("oci://{image}")
    })
}

/// Sets `path` in `value` (making objects on the way) to `to`.
fn set(value: &mut Value, path: &[&str], to: Value) {
    let mut at = value;
    for key in path {
        if !at.is_object() {
            *at = json!({});
        }
        at = &mut at[*key];
    }
    *at = to;
}

/// plans.json as the filter will get it on the platform, with `edits` (JSON path, value)
/// applied; refused here if the filter would refuse it.
fn plugin_config(plans_json: &Value, edits: &[(&[&str], Value)]) -> Result<Value, String> {
    let mut config = plans_json.clone();
    // The platform's one route to Redis carries the usage reads too (Envoy's own config gives
    // them a cluster of their own).
    set(&mut config, &["redis", "read_cluster"], Value::Null);
    for (path, to) in edits {
        set(&mut config, path, to.clone());
    }
    Plans::from_json(config.to_string().as_bytes())
        .map_err(|e| format!("the rendered plugin configuration: {e}"))?;
    Ok(config)
}

fn identity_headers(plans: &Plans) -> [&str; 4] {
    plans.identity.verified_headers()
}

/// A Gateway API duration (at most five digits a unit: `2h14m20s`, not `8060s`).
fn gateway_api_duration(ms: u64) -> String {
    let total = ms.div_ceil(1000);
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    let parts = [(h, "h"), (m, "m"), (s, "s")];
    let text: String = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".into()
    } else {
        text
    }
}

/// The Lua filter, first in the gateway's chain, that removes client copies of the
/// identity headers (Istio and Higress have no early header removal of their own).
fn strip_identity_headers(plans: &Plans, namespace: &str, labels: Value) -> Manifest {
    let removes: String = identity_headers(plans)
        .iter()
        .map(|h| format!("  request_handle:headers():remove({})\n", json!(h)))
        .collect();
    manifest(
        "Client copies of the identity headers removed before any filter reads them: the\n\
         filter sets them for the upstream, verified. First in the gateway's HTTP filters.",
        json!({
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "EnvoyFilter",
            "metadata": metadata("plan-limits-identity-headers", namespace),
            "spec": {
                "workloadSelector": {"labels": labels},
                "configPatches": [{
                    "applyTo": "HTTP_FILTER",
                    "match": {
                        "context": "GATEWAY",
                        "listener": {"filterChain": {"filter": {
                            "name": "envoy.filters.network.http_connection_manager"}}},
                    },
                    "patch": {
                        "operation": "INSERT_FIRST",
                        "value": {
                            "name": "plan-limits.remove-identity-headers",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                                "default_source_code": {"inline_string":
                                    format!("function envoy_on_request(request_handle)\n{removes}end\n")},
                            },
                        },
                    },
                }],
            },
        }),
    )
}

fn istio(
    plans: &Plans,
    plans_json: &Value,
    redis_cluster: &Value,
    options: &Options,
) -> Result<Vec<Manifest>, String> {
    let ns = namespace(Platform::Istio, options);
    let labels = selector_labels(options.target.as_deref().unwrap_or("istio=ingressgateway"))?;
    let url = module_url(&options.image)?;
    let (webdis_host, webdis_port) = host_port(&options.webdis_service, "--webdis-service")?;
    let jwt = plans.identity.source == IdentitySource::Jwt;
    let payload_key = options.payload_key.clone().unwrap_or("payload".into());
    let mut edits: Vec<(&[&str], Value)> = vec![
        // Istio names a mesh service's cluster outbound|PORT||HOST.
        (
            &["redis", "cluster"],
            json!(format!("outbound|{webdis_port}||{webdis_host}")),
        ),
        (&["redis", "authority"], json!(webdis_host)),
    ];
    if jwt {
        edits.push((&["identity", "jwt", "payload_key"], json!(payload_key)));
    }
    let config = plugin_config(plans_json, &edits)?;
    let mut out = vec![
        manifest(
            "The plan filter: plans.json as its configuration (redis.cluster and redis.authority\n\
             name webdis as Istio knows it; identity.jwt.payload_key is where Istio puts the\n\
             verified token's payload). Phase STATS: after Istio's authentication and\n\
             authorization filters, so a request refused by either is never reserved.\n\
             Unmetered paths pass through it (the filter knows them): Istio cannot skip a\n\
             plugin per path.",
            json!({
                "apiVersion": "extensions.istio.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": metadata("plan-limits", &ns),
                "spec": {
                    "selector": {"matchLabels": labels},
                    "url": url,
                    "imagePullPolicy": "IfNotPresent",
                    "pluginName": PLAN_ROOT_ID,
                    "phase": "STATS",
                    "priority": 20,
                    "pluginConfig": config,
                },
            }),
        ),
        manifest(
            &format!(
                "The hold filter: the same module under the root id {HOLD_ROOT_ID}, right after\n\
                 the plan filter (same phase, lower priority) and in the same VM (same code, no\n\
                 vm_id), so a refused client still writing its body reads the answer. Keep other\n\
                 plugins out of priorities 11 to 19 of this phase."
            ),
            json!({
                "apiVersion": "extensions.istio.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": metadata("plan-limits-hold", &ns),
                "spec": {
                    "selector": {"matchLabels": labels},
                    "url": url,
                    "imagePullPolicy": "IfNotPresent",
                    "pluginName": HOLD_ROOT_ID,
                    "phase": "STATS",
                    "priority": 10,
                },
            }),
        ),
    ];
    if jwt {
        let jwks_uri = options
            .jwks_uri
            .as_deref()
            .ok_or("--jwks-uri: where Istio fetches the keys of plans.json's issuer")?;
        out.push(manifest(
            "The bearer token verified (issuer and audience from plans.json's identity.jwt);\n\
             its payload goes into the request's metadata, where the filter reads the claims.\n\
             A request without a token passes on to the filter (401 JSON on metered routes).",
            json!({
                "apiVersion": "security.istio.io/v1",
                "kind": "RequestAuthentication",
                "metadata": metadata("plan-limits", &ns),
                "spec": {
                    "selector": {"matchLabels": labels},
                    "jwtRules": [{
                        "issuer": plans.identity.jwt.issuer,
                        "audiences": [plans.identity.jwt.audience],
                        "jwksUri": jwks_uri,
                        "forwardOriginalToken": false,
                    }],
                },
            }),
        ));
        out.push(strip_identity_headers(plans, &ns, labels.clone()));
    }
    out.push(manifest(
        &format!(
            "webdis, the filter's way to Redis (stock Envoy has no Redis calls for Wasm): the\n\
             same circuit breakers and outlier detection as envoy.yaml's {REDIS_CLUSTER}."
        ),
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": metadata("plan-limits-webdis", &ns),
            "spec": {
                "host": webdis_host,
                "trafficPolicy": destination_policy(redis_cluster)?,
            },
        }),
    ));
    Ok(out)
}

/// envoy.yaml's webdis cluster as an Istio traffic policy.
fn destination_policy(cluster: &Value) -> Result<Value, String> {
    let thresholds = &cluster["circuit_breakers"]["thresholds"][0];
    let outlier = &cluster["outlier_detection"];
    let number = |v: &Value, what: &str| {
        v.as_u64()
            .ok_or_else(|| format!("envoy.yaml {REDIS_CLUSTER}: no {what}"))
    };
    let text = |v: &Value, what: &str| {
        v.as_str()
            .map(String::from)
            .ok_or_else(|| format!("envoy.yaml {REDIS_CLUSTER}: no {what}"))
    };
    Ok(json!({
        "connectionPool": {
            "tcp": {
                "maxConnections": number(&thresholds["max_connections"], "max_connections")?,
                "connectTimeout": text(&cluster["connect_timeout"], "connect_timeout")?,
            },
            "http": {
                "http1MaxPendingRequests": number(&thresholds["max_pending_requests"], "max_pending_requests")?,
                "http2MaxRequests": number(&thresholds["max_requests"], "max_requests")?,
                "maxRetries": number(&thresholds["max_retries"], "max_retries")?,
            },
        },
        "outlierDetection": {
            "consecutiveGatewayErrors": number(&outlier["consecutive_gateway_failure"], "consecutive_gateway_failure")?,
            "consecutive5xxErrors": 0,
            "interval": text(&outlier["interval"], "interval")?,
            "baseEjectionTime": text(&outlier["base_ejection_time"], "base_ejection_time")?,
            "maxEjectionPercent": number(&outlier["max_ejection_percent"], "max_ejection_percent")?,
        },
    }))
}

/// `key=value[,key=value]` as a label map.
fn selector_labels(target: &str) -> Result<Value, String> {
    let mut labels = serde_json::Map::new();
    for pair in target.split(',') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("--target: {pair} is not key=value"))?;
        labels.insert(k.trim().into(), json!(v.trim()));
    }
    Ok(Value::Object(labels))
}

fn envoy_gateway(
    plans: &Plans,
    plans_json: &Value,
    redis_cluster: &Value,
    options: &Options,
) -> Result<Vec<Manifest>, String> {
    let ns = namespace(Platform::EnvoyGateway, options);
    let gateway = options.target.clone().unwrap_or("eg".into());
    let target_refs =
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}]);
    let (webdis_host, webdis_port) = host_port(&options.webdis_service, "--webdis-service")?;
    let jwt = plans.identity.source == IdentitySource::Jwt;
    let issuer = plans.identity.jwt.issuer.clone();
    let mut edits: Vec<(&[&str], Value)> = vec![(&["redis", "authority"], json!(webdis_host))];
    if jwt {
        let key = options.payload_key.clone().unwrap_or(issuer.clone());
        edits.push((&["identity", "jwt", "payload_key"], json!(key)));
    }
    let config = plugin_config(plans_json, &edits)?;
    let url = module_url(&options.image)?;
    let code = match url.strip_prefix("oci://") {
        // Envoy Gateway names images without a scheme.
        Some(image) => json!({"type": "Image", "image": {"url": image}}),
        None => json!({"type": "HTTP", "http": {"url": url}}),
    };
    let mut out = vec![manifest(
        "The plan filter on every route of the Gateway: plans.json as its configuration\n\
         (redis.authority names webdis; identity.jwt.payload_key is where Envoy Gateway puts\n\
         the verified token's payload: under the issuer). Envoy Gateway puts jwt_authn first\n\
         and Wasm extensions after it. No hold filter: Envoy Gateway runs each extension in\n\
         its own VM (vm_id = its name), and the hold filter must share the plan filter's, so\n\
         a refused client still writing its body is answered at once and may see a reset.",
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyExtensionPolicy",
            "metadata": metadata("plan-limits", &ns),
            "spec": {
                "targetRefs": target_refs,
                "wasm": [{
                    "name": PLAN_ROOT_ID,
                    "rootID": PLAN_ROOT_ID,
                    "code": code,
                    "config": config,
                    "failOpen": false,
                }],
            },
        }),
    )];
    if jwt {
        let jwks_uri = options
            .jwks_uri
            .as_deref()
            .ok_or("--jwks-uri: where Envoy Gateway fetches the keys of plans.json's issuer")?;
        if !jwks_uri.starts_with("https://") {
            return Err("--jwks-uri: Envoy Gateway fetches remote keys over https only".into());
        }
        out.push(manifest(
            "The bearer token verified (issuer and audience from plans.json's identity.jwt);\n\
             optional, so a request without one reaches the filter (401 JSON on metered\n\
             routes, unmetered paths pass); a bad token is 401 from Envoy.",
            json!({
                "apiVersion": "gateway.envoyproxy.io/v1alpha1",
                "kind": "SecurityPolicy",
                "metadata": metadata("plan-limits", &ns),
                "spec": {
                    "targetRefs": target_refs,
                    "jwt": {
                        "optional": true,
                        "providers": [{
                            "name": "plan-limits",
                            "issuer": issuer,
                            "audiences": [plans.identity.jwt.audience],
                            "remoteJWKS": {"uri": jwks_uri},
                        }],
                    },
                },
            }),
        ));
    }
    let mut client = json!({
        "targetRefs": target_refs,
        // The whole request, body included: the largest upload a plan allows on the slowest
        // link taken (plans.json's gateway), as envoy.yaml's request_timeout.
        "timeout": {"http": {"requestReceivedTimeout": gateway_api_duration(plans.request_timeout_ms)}},
    });
    if jwt {
        client["headers"] = json!({"earlyRequestHeaders": {"remove": identity_headers(plans)}});
    }
    out.push(manifest(
        "Before any filter: client copies of the identity headers removed (the filter sets\n\
         them, verified), and the whole-request timeout rendered from plans.json.",
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "ClientTrafficPolicy",
            "metadata": metadata("plan-limits", &ns),
            "spec": client,
        }),
    ));
    let cluster_name = plans.redis.cluster.clone();
    let mut cluster = redis_cluster.clone();
    cluster["name"] = json!(cluster_name);
    cluster["type"] = json!("STRICT_DNS");
    cluster["load_assignment"] = json!({
        "cluster_name": cluster_name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": webdis_host, "port_value": webdis_port}}}}]}],
    });
    out.push(manifest(
        "webdis, the filter's way to Redis (stock Envoy has no Redis calls for Wasm), as the\n\
         cluster plans.json's redis.cluster names: envoy.yaml's, addressed by DNS. Envoy\n\
         Gateway has no API for a cluster no route uses: this patch needs\n\
         extensionApis.enableEnvoyPatchPolicy: true in its EnvoyGateway config.",
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyPatchPolicy",
            "metadata": metadata("plan-limits-webdis", &ns),
            "spec": {
                "targetRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway},
                "type": "JSONPatch",
                "jsonPatches": [{
                    "type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                    "name": cluster_name,
                    "operation": {"op": "add", "path": "", "value": cluster},
                }],
            },
        }),
    ));
    Ok(out)
}

fn higress(plans: &Plans, plans_json: &Value, options: &Options) -> Result<Vec<Manifest>, String> {
    let ns = namespace(Platform::Higress, options);
    if options.target.is_some() {
        return Err("--target: Higress applies its WasmPlugins to its own gateway".into());
    }
    let url = module_url(&options.image)?;
    let (redis_host, redis_port) = host_port(&options.redis_service, "--redis-service")?;
    let jwt = plans.identity.source == IdentitySource::Jwt;
    let mut edits: Vec<(&[&str], Value)> = vec![(
        // Higress names a service's cluster outbound|PORT||HOST (its wasm-go FQDNCluster).
        &["redis", "cluster"],
        json!(format!("outbound|{redis_port}||{redis_host}")),
    )];
    if jwt {
        edits.push((&["identity", "source"], json!("trusted_headers")));
    }
    let config = plugin_config(plans_json, &edits)?;
    let mut comment = String::from(
        "The plan filter, the Redis host-call build (target/oci/plan-limits-filter-redis-hostcalls):\n\
         plans.json as its configuration, redis.cluster naming Redis as Higress knows it.\n\
         Phase STATS, after the authentication plugins.",
    );
    if jwt {
        comment.push_str(
            "\nidentity.source is trusted_headers: Higress's jwt-auth plugin writes no metadata,\n\
             it sets the identity headers from the verified token's claims.",
        );
    }
    if plans.redis.password.is_some() {
        comment.push_str(
            "\nredis.password is in this manifest: whoever may read WasmPlugins may read it.",
        );
    }
    let mut out = vec![
        manifest(
            &comment,
            json!({
                "apiVersion": "extensions.higress.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": metadata("plan-limits", &ns),
                "spec": {
                    "url": url,
                    "imagePullPolicy": "IfNotPresent",
                    "pluginName": PLAN_ROOT_ID,
                    "phase": "STATS",
                    "priority": 20,
                    "defaultConfig": config,
                },
            }),
        ),
        manifest(
            &format!(
                "The hold filter: the same module under the root id {HOLD_ROOT_ID}, right after\n\
                 the plan filter (same phase, lower priority), in its VM."
            ),
            json!({
                "apiVersion": "extensions.higress.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": metadata("plan-limits-hold", &ns),
                "spec": {
                    "url": url,
                    "imagePullPolicy": "IfNotPresent",
                    "pluginName": HOLD_ROOT_ID,
                    "phase": "STATS",
                    "priority": 10,
                    "defaultConfig": {},
                },
            }),
        ),
    ];
    if jwt {
        let jwks = options.jwks.as_deref().ok_or(
            "--jwks-file: the JSON Web Key Set of plans.json's issuer (Higress's jwt-auth takes it inline)",
        )?;
        let id = &plans.identity;
        let claims = [
            (&id.jwt.user_claim, &id.user_header),
            (&id.jwt.plan_claim, &id.plan_header),
            (&id.jwt.org_claim, &id.org_header),
        ]
        .map(|(claim, header)| json!({"claim": claim, "header": header, "override": true}));
        out.push(manifest(
            "Higress's jwt-auth plugin: the bearer token verified against plans.json's issuer,\n\
             its claims set as the identity headers. Every request needs a valid token\n\
             (global_auth), unmetered paths too; the audience is not checked.",
            json!({
                "apiVersion": "extensions.higress.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": metadata("plan-limits-jwt-auth", &ns),
                "spec": {
                    "url": options.higress_jwt_auth_image,
                    "imagePullPolicy": "IfNotPresent",
                    "phase": "AUTHN",
                    "priority": 340,
                    "defaultConfig": {
                        "global_auth": true,
                        "consumers": [{
                            "name": "plan-limits",
                            "issuer": id.jwt.issuer,
                            "jwks": jwks,
                            "claims_to_headers": claims,
                            "keep_token": false,
                        }],
                    },
                },
            }),
        ));
        out.push(strip_identity_headers(
            plans,
            &ns,
            json!({"higress": format!("{ns}-higress-gateway")}),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plans_json() -> Value {
        serde_json::from_str(&plan_limits_services::plans_json()).unwrap()
    }

    fn options() -> Options {
        Options {
            image: "oci://registry.example/plan-limits-filter:0.1.0".into(),
            namespace: None,
            target: None,
            jwks_uri: Some("https://auth.example/.well-known/jwks.json".into()),
            jwks: Some(r#"{"keys":[]}"#.into()),
            payload_key: None,
            webdis_service: DEFAULT_WEBDIS_SERVICE.into(),
            redis_service: DEFAULT_REDIS_SERVICE.into(),
            higress_jwt_auth_image: DEFAULT_HIGRESS_JWT_AUTH_IMAGE.into(),
        }
    }

    /// envoy.yaml's webdis cluster, as the CLI takes it from the builder.
    fn redis_cluster() -> Value {
        plan_limits_services::envoy::webdis_cluster(4)
    }

    #[test]
    fn the_platforms_get_envoy_yamls_breakers_and_outlier_detection_for_webdis() {
        let cluster = redis_cluster();
        assert_eq!(
            cluster["outlier_detection"]["consecutive_gateway_failure"],
            3
        );
        let policy = destination_policy(&cluster).unwrap();
        assert_eq!(policy["connectionPool"]["tcp"]["maxConnections"], 64);
        assert_eq!(policy["connectionPool"]["http"]["maxRetries"], 0);
        assert_eq!(policy["outlierDetection"]["baseEjectionTime"], "1s");
        assert!(destination_policy(&json!({})).is_err());
    }

    fn render(platform: Platform, json: &Value, options: &Options) -> Result<Vec<Value>, String> {
        let plans = Plans::from_json(json.to_string().as_bytes()).unwrap();
        let yaml = kubernetes(platform, &plans, json, &redis_cluster(), options)?;
        Ok(parse(&yaml))
    }

    fn parse(yaml: &str) -> Vec<Value> {
        use serde::Deserialize;
        serde_norway::Deserializer::from_str(yaml)
            .map(|doc| Value::deserialize(doc).unwrap())
            .collect()
    }

    fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn istio_gets_both_filters_the_token_rule_and_webdis() {
        let docs = render(Platform::Istio, &plans_json(), &options()).unwrap();
        assert_eq!(docs.len(), 5);
        let plan = kind(&docs, "WasmPlugin", "plan-limits");
        assert_eq!(plan["apiVersion"], "extensions.istio.io/v1alpha1");
        assert_eq!(plan["metadata"]["namespace"], "istio-system");
        let spec = &plan["spec"];
        assert_eq!(
            spec["url"],
            "oci://registry.example/plan-limits-filter:0.1.0"
        );
        assert_eq!(spec["selector"]["matchLabels"]["istio"], "ingressgateway");
        assert_eq!(
            (&spec["pluginName"], &spec["phase"]),
            (&json!("plan_limits"), &json!("STATS"))
        );
        let config = &spec["pluginConfig"];
        assert_eq!(config["plans"], plans_json()["plans"]);
        assert_eq!(config["identity"]["jwt"]["payload_key"], "payload");
        assert_eq!(
            config["redis"]["cluster"],
            "outbound|7379||webdis.plan-limits.svc.cluster.local"
        );
        let hold = &kind(&docs, "WasmPlugin", "plan-limits-hold")["spec"];
        assert_eq!(
            (&hold["url"], &hold["pluginName"]),
            (&spec["url"], &json!("plan_limits_hold"))
        );
        assert_eq!(hold["phase"], spec["phase"]);
        assert!(
            hold["priority"].as_i64() < spec["priority"].as_i64(),
            "right after"
        );
        let rule = &kind(&docs, "RequestAuthentication", "plan-limits")["spec"]["jwtRules"][0];
        assert_eq!(rule["issuer"], "plan-limits-dev");
        assert_eq!(rule["audiences"], json!(["plan-limits"]));
        let filter = kind(&docs, "EnvoyFilter", "plan-limits-identity-headers");
        let lua = filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
            ["default_source_code"]["inline_string"]
            .as_str()
            .unwrap();
        assert!(lua.contains(r#"remove("x-user-plan")"#), "{lua}");
        let webdis = &kind(&docs, "DestinationRule", "plan-limits-webdis")["spec"];
        assert_eq!(webdis["host"], "webdis.plan-limits.svc.cluster.local");
        assert_eq!(
            webdis["trafficPolicy"]["outlierDetection"]["consecutiveGatewayErrors"],
            3
        );
    }

    #[test]
    fn envoy_gateway_gets_the_policies_and_the_webdis_cluster() {
        let docs = render(Platform::EnvoyGateway, &plans_json(), &options()).unwrap();
        let policy = kind(&docs, "EnvoyExtensionPolicy", "plan-limits");
        assert_eq!(policy["spec"]["targetRefs"][0]["name"], "eg");
        let wasm = policy["spec"]["wasm"].as_array().unwrap();
        assert_eq!(wasm.len(), 1, "no hold filter: it would not share the VM");
        assert_eq!(
            wasm[0]["code"]["image"]["url"],
            "registry.example/plan-limits-filter:0.1.0"
        );
        assert_eq!(wasm[0]["rootID"], "plan_limits");
        assert_eq!(
            wasm[0]["config"]["identity"]["jwt"]["payload_key"],
            "plan-limits-dev"
        );
        let jwt = &kind(&docs, "SecurityPolicy", "plan-limits")["spec"]["jwt"];
        assert_eq!(jwt["optional"], true);
        assert_eq!(jwt["providers"][0]["issuer"], "plan-limits-dev");
        let client = &kind(&docs, "ClientTrafficPolicy", "plan-limits")["spec"];
        assert_eq!(
            client["headers"]["earlyRequestHeaders"]["remove"],
            json!(["x-user-id", "x-user-plan", "x-org-id", "x-user-features"])
        );
        assert_eq!(
            client["timeout"]["http"]["requestReceivedTimeout"],
            "2h14m20s"
        );
        assert_eq!(gateway_api_duration(60_000), "1m");
        assert_eq!(gateway_api_duration(400_000_000), "111h6m40s");
        let patch =
            &kind(&docs, "EnvoyPatchPolicy", "plan-limits-webdis")["spec"]["jsonPatches"][0];
        let cluster = &patch["operation"]["value"];
        assert_eq!(
            (&cluster["name"], &cluster["type"]),
            (&json!("plan_limits_redis"), &json!("STRICT_DNS"))
        );
        assert_eq!(wasm[0]["config"]["redis"]["cluster"], cluster["name"]);
        // An https URL of the .wasm is an HTTP source.
        let mut http = options();
        http.image = "https://files.example/plan_limits_filter.wasm".into();
        let docs = render(Platform::EnvoyGateway, &plans_json(), &http).unwrap();
        let code = &kind(&docs, "EnvoyExtensionPolicy", "plan-limits")["spec"]["wasm"][0]["code"];
        assert_eq!(code["type"], "HTTP");
        let mut plain = options();
        plain.jwks_uri = Some("http://auth.example/jwks".into());
        assert!(render(Platform::EnvoyGateway, &plans_json(), &plain)
            .unwrap_err()
            .contains("https"));
    }

    #[test]
    fn higress_gets_the_host_call_build_with_headers_from_its_jwt_plugin() {
        let docs = render(Platform::Higress, &plans_json(), &options()).unwrap();
        let plan = kind(&docs, "WasmPlugin", "plan-limits");
        assert_eq!(plan["apiVersion"], "extensions.higress.io/v1alpha1");
        let config = &plan["spec"]["defaultConfig"];
        assert_eq!(config["identity"]["source"], "trusted_headers");
        assert_eq!(
            config["redis"]["cluster"],
            "outbound|6379||redis.plan-limits.svc.cluster.local"
        );
        assert_eq!(
            kind(&docs, "WasmPlugin", "plan-limits-hold")["spec"]["pluginName"],
            "plan_limits_hold"
        );
        let jwt = &kind(&docs, "WasmPlugin", "plan-limits-jwt-auth")["spec"];
        assert_eq!(jwt["phase"], "AUTHN");
        let consumer = &jwt["defaultConfig"]["consumers"][0];
        assert_eq!(consumer["issuer"], "plan-limits-dev");
        assert_eq!(
            consumer["claims_to_headers"][0],
            json!({"claim": "sub", "header": "x-user-id", "override": true})
        );
        kind(&docs, "EnvoyFilter", "plan-limits-identity-headers");
    }

    #[test]
    fn behind_an_authenticator_of_its_own_no_token_rule_is_rendered() {
        let mut json = plans_json();
        json["identity"]["source"] = "trusted_headers".into();
        for platform in [Platform::Istio, Platform::EnvoyGateway, Platform::Higress] {
            let docs = render(
                platform,
                &json,
                &Options {
                    jwks_uri: None,
                    jwks: None,
                    ..options()
                },
            )
            .unwrap();
            let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
            assert!(
                !kinds.iter().any(
                    |k| ["RequestAuthentication", "SecurityPolicy", "EnvoyFilter"].contains(k)
                ),
                "{platform:?}: {kinds:?}"
            );
        }
    }

    #[test]
    fn what_only_the_deployment_knows_is_a_marked_placeholder() {
        for platform in [Platform::Istio, Platform::EnvoyGateway, Platform::Higress] {
            let mut given = Options {
                image: String::new(),
                jwks_uri: None,
                jwks: None,
                ..options()
            };
            let filled = given.fill_placeholders(platform);
            let flags: Vec<&str> = filled.iter().map(|(flag, _)| *flag).collect();
            let keys = if platform == Platform::Higress {
                "--jwks-file"
            } else {
                "--jwks-uri"
            };
            assert_eq!(flags, ["--image", keys], "{platform:?}");
            let manifests = render(platform, &plans_json(), &given).unwrap();
            let text = serde_json::to_string(&manifests).unwrap();
            assert!(text.contains("PLACEHOLDER"), "{platform:?}");
        }
        let mut complete = options();
        assert!(complete.fill_placeholders(Platform::Istio).is_empty());
    }

    #[test]
    fn what_a_platform_needs_and_was_not_given_is_named() {
        let no_keys = Options {
            jwks_uri: None,
            jwks: None,
            ..options()
        };
        assert!(render(Platform::Istio, &plans_json(), &no_keys)
            .unwrap_err()
            .contains("--jwks-uri"));
        assert!(render(Platform::Higress, &plans_json(), &no_keys)
            .unwrap_err()
            .contains("--jwks-file"));
        let no_image = Options {
            image: String::new(),
            ..options()
        };
        assert!(render(Platform::Istio, &plans_json(), &no_image)
            .unwrap_err()
            .contains("--image"));
        let bad_service = Options {
            webdis_service: "webdis".into(),
            ..options()
        };
        assert!(render(Platform::Istio, &plans_json(), &bad_service)
            .unwrap_err()
            .contains("host:port"));
    }
}
