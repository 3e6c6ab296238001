//! The WASI preview-1 calls a `wasm32-wasip1` module needs (as Envoy offers them): no
//! environment, stdout/stderr into the log, randomness, the clock, and `proc_exit` as a trap.

use wasmtime::{Caller, Linker};

use super::memory::{read, write, write_u32, write_u64};
use super::state::VmState;

const WASI: &str = "wasi_snapshot_preview1";
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        WASI,
        "environ_sizes_get",
        |mut caller: Caller<'_, VmState>, count: i32, size: i32| -> wasmtime::Result<i32> {
            write_u32(&mut caller, count, 0)?;
            write_u32(&mut caller, size, 0)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        WASI,
        "environ_get",
        |_: Caller<'_, VmState>, _: i32, _: i32| -> i32 { ERRNO_SUCCESS },
    )?;
    linker.func_wrap(
        WASI,
        "args_sizes_get",
        |mut caller: Caller<'_, VmState>, count: i32, size: i32| -> wasmtime::Result<i32> {
            write_u32(&mut caller, count, 0)?;
            write_u32(&mut caller, size, 0)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        WASI,
        "args_get",
        |_: Caller<'_, VmState>, _: i32, _: i32| -> i32 { ERRNO_SUCCESS },
    )?;
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut caller: Caller<'_, VmState>,
         fd: i32,
         iovs: i32,
         iovs_len: i32,
         written_out: i32|
         -> wasmtime::Result<i32> {
            if fd != 1 && fd != 2 {
                return Ok(ERRNO_BADF);
            }
            let mut text = Vec::new();
            for i in 0..iovs_len {
                let iov = read(&mut caller, iovs + i * 8, 8)?;
                let ptr = i32::from_le_bytes(iov[0..4].try_into().unwrap());
                let len = i32::from_le_bytes(iov[4..8].try_into().unwrap());
                text.extend(read(&mut caller, ptr, len)?);
            }
            write_u32(&mut caller, written_out, text.len() as u32)?;
            let level = if fd == 2 { 4 } else { 2 };
            caller
                .data()
                .log(level, String::from_utf8_lossy(&text).trim_end().to_string());
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        WASI,
        "random_get",
        |mut caller: Caller<'_, VmState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let mut bytes = Vec::with_capacity(len as usize);
            let state = caller.data_mut();
            while bytes.len() < len as usize {
                // splitmix64: seeded per VM, so runs are repeatable.
                state.random_state = state.random_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state.random_state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
            bytes.truncate(len as usize);
            write(&mut caller, ptr, &bytes)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut caller: Caller<'_, VmState>,
         _id: i32,
         _precision: i64,
         out: i32|
         -> wasmtime::Result<i32> {
            let nanos = caller.data().shared.clock.nanos();
            write_u64(&mut caller, out, nanos)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        WASI,
        "proc_exit",
        |_: Caller<'_, VmState>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("the filter called proc_exit({code})"))
        },
    )?;
    Ok(())
}
