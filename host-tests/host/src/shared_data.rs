//! Shared data with compare-and-swap, and shared queues, across every VM of the plugin.

use wasmtime::{Caller, Linker};

use super::abi::{CAS_MISMATCH, EMPTY, NOT_FOUND, OK};
use super::memory::{give, read, read_string, write_u32};
use super::state::VmState;

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut caller: Caller<'_, VmState>,
         key_ptr: i32,
         key_len: i32,
         out_ptr: i32,
         out_len: i32,
         cas_out: i32|
         -> wasmtime::Result<i32> {
            let key = read_string(&mut caller, key_ptr, key_len)?;
            let entry = caller
                .data()
                .shared
                .shared_data
                .lock()
                .unwrap()
                .get(&key)
                .cloned();
            match entry {
                None => Ok(NOT_FOUND),
                Some((value, cas)) => {
                    give(&mut caller, &value, out_ptr, out_len)?;
                    write_u32(&mut caller, cas_out, cas)?;
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut caller: Caller<'_, VmState>,
         key_ptr: i32,
         key_len: i32,
         value_ptr: i32,
         value_len: i32,
         cas: i32|
         -> wasmtime::Result<i32> {
            let key = read_string(&mut caller, key_ptr, key_len)?;
            let value = read(&mut caller, value_ptr, value_len)?;
            let shared = caller.data().shared.clone();
            let mut data = shared.shared_data.lock().unwrap();
            let current = data.get(&key).map(|(_, c)| *c);
            // cas 0 writes unconditionally; otherwise it must match the current version.
            if cas != 0 && current != Some(cas as u32) {
                return Ok(CAS_MISMATCH);
            }
            let next = current.unwrap_or(0).wrapping_add(1).max(1);
            data.insert(key, (value, next));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: Caller<'_, VmState>,
         name_ptr: i32,
         name_len: i32,
         id_out: i32|
         -> wasmtime::Result<i32> {
            let name = read_string(&mut caller, name_ptr, name_len)?;
            let shared = caller.data().shared.clone();
            let id = {
                let mut queues = shared.queues.lock().unwrap();
                let next = queues.by_name.len() as u32 + 1;
                let id = *queues.by_name.entry(name).or_insert(next);
                queues.items.entry(id).or_default();
                id
            };
            write_u32(&mut caller, id_out, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: Caller<'_, VmState>,
         _vm_ptr: i32,
         _vm_len: i32,
         name_ptr: i32,
         name_len: i32,
         id_out: i32|
         -> wasmtime::Result<i32> {
            let name = read_string(&mut caller, name_ptr, name_len)?;
            let id = caller
                .data()
                .shared
                .queues
                .lock()
                .unwrap()
                .by_name
                .get(&name)
                .copied();
            match id {
                None => Ok(NOT_FOUND),
                Some(id) => {
                    write_u32(&mut caller, id_out, id)?;
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut caller: Caller<'_, VmState>, id: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let value = read(&mut caller, ptr, len)?;
            let shared = caller.data().shared.clone();
            let mut queues = shared.queues.lock().unwrap();
            match queues.items.get_mut(&(id as u32)) {
                None => Ok(NOT_FOUND),
                Some(q) => {
                    q.push_back(value);
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: Caller<'_, VmState>,
         id: i32,
         out_ptr: i32,
         out_len: i32|
         -> wasmtime::Result<i32> {
            let shared = caller.data().shared.clone();
            let item = {
                let mut queues = shared.queues.lock().unwrap();
                match queues.items.get_mut(&(id as u32)) {
                    None => return Ok(NOT_FOUND),
                    Some(q) => q.pop_front(),
                }
            };
            match item {
                None => Ok(EMPTY),
                Some(value) => {
                    give(&mut caller, &value, out_ptr, out_len)?;
                    Ok(OK)
                }
            }
        },
    )?;
    Ok(())
}
