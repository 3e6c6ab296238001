//! Stream control and context: `proxy_continue_stream`, `proxy_close_stream`,
//! `proxy_send_local_response`, `proxy_set_effective_context`, `proxy_done`, and the calls
//! this host does not offer (gRPC, foreign functions), which answer "unimplemented".

use wasmtime::{Caller, Linker};

use super::abi::{deserialize_pairs, BAD_ARGUMENT, NOT_FOUND, OK, UNIMPLEMENTED};
use super::memory::{read, read_string, write_u32};
use super::state::{LocalReply, VmState};

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut caller: Caller<'_, VmState>, stream_type: i32| -> i32 {
            match caller.data_mut().stream() {
                None => NOT_FOUND,
                // (Stream type 1: the response.)
                Some(stream) if stream_type == 1 => {
                    stream.response_paused = false;
                    OK
                }
                Some(stream) => {
                    stream.resumed = true;
                    OK
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut caller: Caller<'_, VmState>, _stream_type: i32| -> i32 {
            match caller.data_mut().stream() {
                None => NOT_FOUND,
                Some(stream) => {
                    stream.closed = true;
                    OK
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: Caller<'_, VmState>,
         status: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         _grpc_status: i32|
         -> wasmtime::Result<i32> {
            let details = read_string(&mut caller, details_ptr, details_len)?;
            let body = read(&mut caller, body_ptr, body_len)?;
            let headers = read(&mut caller, headers_ptr, headers_len)?;
            let Some(headers) = deserialize_pairs(&headers) else {
                return Ok(BAD_ARGUMENT);
            };
            match caller.data_mut().stream() {
                None => Ok(NOT_FOUND),
                Some(stream) if stream.local_response.is_some() => Ok(BAD_ARGUMENT),
                Some(stream) => {
                    stream.local_response = Some(LocalReply {
                        status: status as u32,
                        details,
                        headers,
                        body,
                    });
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut caller: Caller<'_, VmState>, context_id: i32| -> i32 {
            let state = caller.data_mut();
            let id = context_id as u32;
            let hold_root = state.hold_root.as_ref().map(|(root, _)| *root);
            if id == state.root_context_id
                || Some(id) == hold_root
                || state.streams.contains_key(&id)
                || state.aliases.contains_key(&id)
            {
                state.effective_context = id;
                OK
            } else {
                BAD_ARGUMENT
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_done",
        |mut caller: Caller<'_, VmState>| -> i32 {
            caller.data_mut().done_called = true;
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut caller: Caller<'_, VmState>,
         code_out: i32,
         _msg_ptr_out: i32,
         msg_len_out: i32|
         -> wasmtime::Result<i32> {
            write_u32(&mut caller, code_out, 0)?;
            write_u32(&mut caller, msg_len_out, 0)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: Caller<'_, VmState>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 {
            UNIMPLEMENTED
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_: Caller<'_, VmState>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> i32 { UNIMPLEMENTED },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_: Caller<'_, VmState>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> i32 { UNIMPLEMENTED },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_: Caller<'_, VmState>, _: i32, _: i32, _: i32, _: i32| -> i32 { UNIMPLEMENTED },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |_: Caller<'_, VmState>, _: i32| -> i32 { UNIMPLEMENTED },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_close",
        |_: Caller<'_, VmState>, _: i32| -> i32 { UNIMPLEMENTED },
    )?;
    Ok(())
}
