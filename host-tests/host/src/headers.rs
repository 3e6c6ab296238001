//! Header maps (`proxy_*_header_map_*`): request and response headers and trailers of the
//! effective stream, and the headers of an HTTP call's answer. Keys are matched without case
//! (Envoy keeps them lower-case); a get returns the first value, as Envoy does.

use wasmtime::{Caller, Linker};

use super::abi::{deserialize_pairs, map, serialize_pairs, Pairs, BAD_ARGUMENT, NOT_FOUND, OK};
use super::memory::{give, read, read_string};
use super::state::VmState;

fn map_of(state: &mut VmState, map_type: i32) -> Option<&mut Pairs> {
    match map_type {
        map::HTTP_CALL_RESPONSE_HEADERS => {
            state.http_call_response.as_mut().map(|r| &mut r.headers)
        }
        map::HTTP_CALL_RESPONSE_TRAILERS => {
            state.http_call_response.as_mut().map(|r| &mut r.trailers)
        }
        _ => {
            let stream = state.stream()?;
            match map_type {
                map::REQUEST_HEADERS => Some(&mut stream.request_headers),
                map::REQUEST_TRAILERS => Some(&mut stream.request_trailers),
                map::RESPONSE_HEADERS => Some(&mut stream.response_headers),
                map::RESPONSE_TRAILERS => Some(&mut stream.response_trailers),
                _ => None,
            }
        }
    }
}

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: Caller<'_, VmState>,
         map_type: i32,
         key_ptr: i32,
         key_len: i32,
         out_ptr: i32,
         out_len: i32|
         -> wasmtime::Result<i32> {
            let key = read_string(&mut caller, key_ptr, key_len)?;
            let value = match map_of(caller.data_mut(), map_type) {
                None => return Ok(BAD_ARGUMENT),
                Some(pairs) => pairs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                    .map(|(_, v)| v.clone()),
            };
            match value {
                None => Ok(NOT_FOUND),
                Some(value) => {
                    give(&mut caller, &value, out_ptr, out_len)?;
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: Caller<'_, VmState>,
         map_type: i32,
         out_ptr: i32,
         out_len: i32|
         -> wasmtime::Result<i32> {
            let bytes = match map_of(caller.data_mut(), map_type) {
                None => return Ok(BAD_ARGUMENT),
                Some(pairs) => serialize_pairs(pairs),
            };
            give(&mut caller, &bytes, out_ptr, out_len)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut caller: Caller<'_, VmState>, map_type: i32, out: i32| -> wasmtime::Result<i32> {
            let size = match map_of(caller.data_mut(), map_type) {
                None => return Ok(BAD_ARGUMENT),
                Some(pairs) => serialize_pairs(pairs).len(),
            };
            super::memory::write_u32(&mut caller, out, size as u32)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: Caller<'_, VmState>,
         map_type: i32,
         ptr: i32,
         len: i32|
         -> wasmtime::Result<i32> {
            let bytes = read(&mut caller, ptr, len)?;
            let Some(new_pairs) = deserialize_pairs(&bytes) else {
                return Ok(BAD_ARGUMENT);
            };
            match map_of(caller.data_mut(), map_type) {
                None => Ok(BAD_ARGUMENT),
                Some(pairs) => {
                    *pairs = new_pairs
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect();
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut caller: Caller<'_, VmState>,
         map_type: i32,
         key_ptr: i32,
         key_len: i32,
         value_ptr: i32,
         value_len: i32|
         -> wasmtime::Result<i32> {
            let key = read_string(&mut caller, key_ptr, key_len)?.to_ascii_lowercase();
            let value = read(&mut caller, value_ptr, value_len)?;
            match map_of(caller.data_mut(), map_type) {
                None => Ok(BAD_ARGUMENT),
                Some(pairs) => {
                    pairs.push((key, value));
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut caller: Caller<'_, VmState>,
         map_type: i32,
         key_ptr: i32,
         key_len: i32,
         value_ptr: i32,
         value_len: i32|
         -> wasmtime::Result<i32> {
            let key = read_string(&mut caller, key_ptr, key_len)?.to_ascii_lowercase();
            let value = read(&mut caller, value_ptr, value_len)?;
            match map_of(caller.data_mut(), map_type) {
                None => Ok(BAD_ARGUMENT),
                Some(pairs) => {
                    // (Header names are case-insensitive, as in get and remove.)
                    pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                    pairs.push((key, value));
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: Caller<'_, VmState>,
         map_type: i32,
         key_ptr: i32,
         key_len: i32|
         -> wasmtime::Result<i32> {
            let key = read_string(&mut caller, key_ptr, key_len)?;
            match map_of(caller.data_mut(), map_type) {
                None => Ok(BAD_ARGUMENT),
                Some(pairs) => {
                    pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                    Ok(OK)
                }
            }
        },
    )?;
    Ok(())
}
