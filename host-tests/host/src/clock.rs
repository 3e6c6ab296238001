//! `proxy_get_current_time_nanoseconds` (the test-controlled clock) and
//! `proxy_set_tick_period_milliseconds`.

use wasmtime::{Caller, Linker};

use super::abi::OK;
use super::memory::write_u64;
use super::state::VmState;

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, VmState>, out: i32| -> wasmtime::Result<i32> {
            let nanos = caller.data().shared.clock.nanos();
            write_u64(&mut caller, out, nanos)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut caller: Caller<'_, VmState>, period: i32| -> i32 {
            caller.data_mut().tick_period_ms = period as u32;
            OK
        },
    )?;
    Ok(())
}
