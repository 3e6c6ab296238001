//! `proxy_http_call`: the filter's outbound HTTP calls, held until the test lets them run,
//! then sent for real (to the `host:port` of the named cluster) and answered through
//! `proxy_on_http_call_response` on the root context, like Envoy's async client. A call that
//! fails or times out is answered with no headers, as Envoy does.

use std::time::Duration;

use wasmtime::{Caller, Linker};

use super::abi::{deserialize_pairs, Pairs, BAD_ARGUMENT, OK};
use super::memory::{read, read_string, write_u32};
use super::state::{Callout, HttpCallResponse, VmState};

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut caller: Caller<'_, VmState>,
         upstream_ptr: i32,
         upstream_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         body_ptr: i32,
         body_len: i32,
         trailers_ptr: i32,
         trailers_len: i32,
         timeout_ms: i32,
         token_out: i32|
         -> wasmtime::Result<i32> {
            let cluster = read_string(&mut caller, upstream_ptr, upstream_len)?;
            let headers = read(&mut caller, headers_ptr, headers_len)?;
            let body = read(&mut caller, body_ptr, body_len)?;
            let _trailers = read(&mut caller, trailers_ptr, trailers_len)?;
            let Some(headers) = deserialize_pairs(&headers) else {
                return Ok(BAD_ARGUMENT);
            };
            let has = |name: &str| headers.iter().any(|(k, _)| k == name);
            // Envoy refuses calls to unknown clusters and calls without these pseudo-headers.
            let known = caller.data().http_clusters.contains_key(&cluster);
            if !(known && has(":method") && has(":path") && has(":authority")) {
                return Ok(BAD_ARGUMENT);
            }
            // On the root context: proxy-wasm-cpp-host's `http_call` uses
            // `contextOrEffectiveContext()->root_context()`.
            let token = caller.data_mut().push_call(Callout::Http {
                cluster,
                headers,
                body,
                timeout_ms: timeout_ms as u32,
            });
            write_u32(&mut caller, token_out, token)?;
            Ok(OK)
        },
    )?;
    Ok(())
}

/// Sends the call for real; `None` when it failed or timed out.
pub fn perform(
    address: &str,
    headers: &Pairs,
    body: &[u8],
    timeout_ms: u32,
) -> Option<HttpCallResponse> {
    let value = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let url = format!("http://{address}{}", value(":path"));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(u64::from(timeout_ms.max(1)))))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = ureq::http::Request::builder()
        .method(value(":method").as_str())
        .uri(&url);
    for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        request = request.header(k.as_str(), v.as_slice());
    }
    let request = request
        .header("host", value(":authority"))
        .body(body.to_vec())
        .ok()?;
    let mut response = agent.run(request).ok()?;
    let mut headers: Pairs = vec![(
        ":status".into(),
        response.status().as_u16().to_string().into_bytes(),
    )];
    for (k, v) in response.headers() {
        headers.push((k.as_str().to_string(), v.as_bytes().to_vec()));
    }
    let body = response.body_mut().read_to_vec().ok()?;
    Some(HttpCallResponse {
        headers,
        body,
        trailers: Vec::new(),
    })
}
