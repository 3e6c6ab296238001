//! Buffers (`proxy_get_buffer_bytes`, `proxy_set_buffer_bytes`): plugin and VM configuration,
//! request and response bodies, an HTTP call's body and a Redis call's reply.

use wasmtime::{Caller, Linker};

use super::abi::{buffer, BAD_ARGUMENT, NOT_FOUND, OK};
use super::memory::{give, read};
use super::state::VmState;

fn buffer_of(state: &mut VmState, buffer_type: i32) -> Option<&mut Vec<u8>> {
    match buffer_type {
        buffer::PLUGIN_CONFIGURATION => Some(&mut state.plugin_configuration),
        buffer::VM_CONFIGURATION => Some(&mut state.vm_configuration),
        buffer::HTTP_CALL_RESPONSE_BODY => state.http_call_response.as_mut().map(|r| &mut r.body),
        buffer::REDIS_CALL_RESPONSE => state.redis_call_response.as_mut(),
        buffer::REQUEST_BODY => state.stream().map(|s| &mut s.request_body),
        buffer::RESPONSE_BODY => state.stream().map(|s| &mut s.response_body),
        _ => None,
    }
}

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: Caller<'_, VmState>,
         buffer_type: i32,
         start: i32,
         max: i32,
         out_ptr: i32,
         out_len: i32|
         -> wasmtime::Result<i32> {
            let slice = match buffer_of(caller.data_mut(), buffer_type) {
                None => return Ok(NOT_FOUND),
                Some(bytes) => {
                    let start = (start as u32 as usize).min(bytes.len());
                    let end = start.saturating_add(max as u32 as usize).min(bytes.len());
                    bytes[start..end].to_vec()
                }
            };
            give(&mut caller, &slice, out_ptr, out_len)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: Caller<'_, VmState>,
         buffer_type: i32,
         start: i32,
         size: i32,
         ptr: i32,
         len: i32|
         -> wasmtime::Result<i32> {
            let data = read(&mut caller, ptr, len)?;
            match buffer_of(caller.data_mut(), buffer_type) {
                None => Ok(BAD_ARGUMENT),
                Some(bytes) => {
                    let start = (start as u32 as usize).min(bytes.len());
                    let end = start.saturating_add(size as u32 as usize).min(bytes.len());
                    bytes.splice(start..end, data);
                    Ok(OK)
                }
            }
        },
    )?;
    Ok(())
}
