//! `proxy_log`, `proxy_get_log_level`: log lines are kept for tests to read.

use wasmtime::{Caller, Linker};

use super::abi::OK;
use super::memory::{read_string, write_u32};
use super::state::VmState;

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut caller: Caller<'_, VmState>,
         level: i32,
         ptr: i32,
         len: i32|
         -> wasmtime::Result<i32> {
            let message = read_string(&mut caller, ptr, len)?;
            caller.data().log(level, message);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: Caller<'_, VmState>, out: i32| -> wasmtime::Result<i32> {
            write_u32(&mut caller, out, 0)?; // trace: the host keeps everything
            Ok(OK)
        },
    )?;
    Ok(())
}
