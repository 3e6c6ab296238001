//! The WASI preview-1 calls as the Higress gateway's proxy-wasm-cpp-host offers them
//! (higress-group/proxy-wasm-cpp-host `src/exports.cc`, registered by `FOR_ALL_WASI_FUNCTIONS`
//! in `include/proxy-wasm/exports.h` under both `wasi_unstable` and `wasi_snapshot_preview1`):
//! no environment, no files, stdout/stderr into the log, randomness, the clock, and stubs with
//! the same error codes for the rest, so a Go (wasip1) plugin links and runs.

use std::sync::OnceLock;
use std::time::Instant;

use wasmtime::{Caller, Linker};

use super::memory::{read, write, write_u32, write_u64};
use super::state::VmState;

const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOENT: i32 = 44;
const ERRNO_NOSYS: i32 = 52;
const ERRNO_NOTSUP: i32 = 58;

/// cpp-host's `PROXY_WASM_HOST_WASI_RANDOM_GET_MAX_SIZE_BYTES` (`include/proxy-wasm/limits.h`).
const RANDOM_GET_MAX: i32 = 64 * 1024;
const RIGHTS_FD_WRITE: u64 = 64;
/// Envoy's `Context::error`, which these stubs call, logs at trace.
const LOG_TRACE: i32 = 0;

/// A guest pointer out of bounds is EFAULT for the guest, as in cpp-host, not a trap.
fn errno(result: wasmtime::Result<()>) -> i32 {
    match result {
        Ok(()) => ERRNO_SUCCESS,
        Err(_) => ERRNO_FAULT,
    }
}

/// Envoy's monotonic clock: real elapsed time. The wall clock stays the test clock; a
/// monotonic clock that never moves would leave a Go runtime spinning.
fn monotonic_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    for module in MODULES {
        add_module(linker, module)?;
    }
    Ok(())
}

fn add_module(linker: &mut Linker<VmState>, wasi: &str) -> wasmtime::Result<()> {
    linker.func_wrap(
        wasi,
        "environ_sizes_get",
        |mut caller: Caller<'_, VmState>, count: i32, size: i32| -> i32 {
            errno(write_u32(&mut caller, count, 0).and_then(|_| write_u32(&mut caller, size, 0)))
        },
    )?;
    linker.func_wrap(
        wasi,
        "environ_get",
        |_: Caller<'_, VmState>, _: i32, _: i32| -> i32 { ERRNO_SUCCESS },
    )?;
    linker.func_wrap(
        wasi,
        "args_sizes_get",
        |mut caller: Caller<'_, VmState>, count: i32, size: i32| -> i32 {
            errno(write_u32(&mut caller, count, 0).and_then(|_| write_u32(&mut caller, size, 0)))
        },
    )?;
    linker.func_wrap(
        wasi,
        "args_get",
        |_: Caller<'_, VmState>, _: i32, _: i32| -> i32 { ERRNO_SUCCESS },
    )?;
    linker.func_wrap(
        wasi,
        "fd_write",
        |mut caller: Caller<'_, VmState>,
         fd: i32,
         iovs: i32,
         iovs_len: i32,
         written_out: i32|
         -> i32 {
            let level = match fd {
                1 => 2,
                2 => 4,
                _ => return ERRNO_BADF,
            };
            let mut text = Vec::new();
            for i in 0..iovs_len {
                let Ok(iov) = read(&mut caller, iovs + i * 8, 8) else {
                    return ERRNO_FAULT;
                };
                let ptr = i32::from_le_bytes(iov[0..4].try_into().unwrap());
                let len = i32::from_le_bytes(iov[4..8].try_into().unwrap());
                match read(&mut caller, ptr, len) {
                    Ok(bytes) => text.extend(bytes),
                    Err(_) => return ERRNO_FAULT,
                }
            }
            let written = text.len() as u32;
            if !text.is_empty() {
                let message = String::from_utf8_lossy(&text);
                let message = message.strip_suffix('\n').unwrap_or(&message).to_string();
                caller.data().log(level, message);
            }
            errno(write_u32(&mut caller, written_out, written))
        },
    )?;
    // Reading files is not supported (ENOSYS); seek and close succeed after a trace line.
    linker.func_wrap(
        wasi,
        "fd_read",
        |_: Caller<'_, VmState>, _fd: i32, _iovs: i32, _len: i32, _nread: i32| -> i32 {
            ERRNO_NOSYS
        },
    )?;
    linker.func_wrap(
        wasi,
        "fd_seek",
        |caller: Caller<'_, VmState>, _fd: i32, _offset: i64, _whence: i32, _out: i32| -> i32 {
            caller
                .data()
                .log(LOG_TRACE, "wasi_unstable fd_seek".to_string());
            ERRNO_SUCCESS
        },
    )?;
    linker.func_wrap(
        wasi,
        "fd_close",
        |caller: Caller<'_, VmState>, _fd: i32| -> i32 {
            caller
                .data()
                .log(LOG_TRACE, "wasi_unstable fd_close".to_string());
            ERRNO_SUCCESS
        },
    )?;
    linker.func_wrap(
        wasi,
        "fd_fdstat_get",
        |mut caller: Caller<'_, VmState>, fd: i32, stat: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return ERRNO_BADF;
            }
            // filetype 0, flags 0, rights_base FD_WRITE, rights_inheriting 0; like cpp-host,
            // a failed write is not reported.
            let mut fdstat = [0u8; 24];
            fdstat[8..16].copy_from_slice(&RIGHTS_FD_WRITE.to_le_bytes());
            let _ = write(&mut caller, stat, &fdstat);
            ERRNO_SUCCESS
        },
    )?;
    linker.func_wrap(
        wasi,
        "fd_fdstat_set_flags",
        |_: Caller<'_, VmState>, _fd: i32, _flags: i32| -> i32 { ERRNO_NOSYS },
    )?;
    linker.func_wrap(
        wasi,
        "fd_filestat_get",
        |_: Caller<'_, VmState>, _fd: i32, _buf: i32| -> i32 { ERRNO_BADF },
    )?;
    // No preopened directories: the guest's libc finds none and never opens a path.
    linker.func_wrap(
        wasi,
        "fd_prestat_get",
        |_: Caller<'_, VmState>, _fd: i32, _buf: i32| -> i32 { ERRNO_BADF },
    )?;
    linker.func_wrap(
        wasi,
        "fd_prestat_dir_name",
        |_: Caller<'_, VmState>, _fd: i32, _path: i32, _len: i32| -> i32 { ERRNO_NOSYS },
    )?;
    linker.func_wrap(
        wasi,
        "path_open",
        |_: Caller<'_, VmState>,
         _fd: i32,
         _dirflags: i32,
         _path: i32,
         _path_len: i32,
         _oflags: i32,
         _rights_base: i64,
         _rights_inheriting: i64,
         _fdflags: i32,
         _fd_out: i32|
         -> i32 { ERRNO_NOENT },
    )?;
    linker.func_wrap(
        wasi,
        "path_filestat_get",
        |_: Caller<'_, VmState>, _fd: i32, _flags: i32, _path: i32, _len: i32, _buf: i32| -> i32 {
            ERRNO_NOTSUP
        },
    )?;
    linker.func_wrap(
        wasi,
        "random_get",
        |mut caller: Caller<'_, VmState>, ptr: i32, len: i32| -> i32 {
            if !(0..=RANDOM_GET_MAX).contains(&len) {
                return ERRNO_INVAL;
            }
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
            errno(write(&mut caller, ptr, &bytes))
        },
    )?;
    linker.func_wrap(
        wasi,
        "clock_time_get",
        |mut caller: Caller<'_, VmState>, id: i32, _precision: i64, out: i32| -> i32 {
            let nanos = match id {
                0 => caller.data().shared.clock.nanos(),
                1 => monotonic_nanos(),
                _ => return ERRNO_NOTSUP,
            };
            errno(write_u64(&mut caller, out, nanos))
        },
    )?;
    // A single-threaded guest is always the only runnable thread.
    linker.func_wrap(wasi, "sched_yield", |_: Caller<'_, VmState>| -> i32 {
        ERRNO_SUCCESS
    })?;
    // No event is ever reported and nothing sleeps: the host never blocks a worker (Go's
    // usleep and netpoll only need the call to succeed).
    linker.func_wrap(
        wasi,
        "poll_oneoff",
        |mut caller: Caller<'_, VmState>, _in: i32, _out: i32, _n: i32, nevents: i32| -> i32 {
            errno(write_u32(&mut caller, nevents, 0))
        },
    )?;
    linker.func_wrap(
        wasi,
        "proc_exit",
        |_: Caller<'_, VmState>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("the filter called proc_exit({code})"))
        },
    )?;
    Ok(())
}
