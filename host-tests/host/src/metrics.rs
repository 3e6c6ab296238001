//! Metrics (`proxy_define_metric`, `proxy_increment_metric`, ...): one registry per plugin,
//! shared by name across its VMs as in Envoy, readable by tests.

use wasmtime::{Caller, Linker};

use super::abi::{NOT_FOUND, OK};
use super::memory::{read_string, write_u32, write_u64};
use super::state::VmState;

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: Caller<'_, VmState>,
         metric_type: i32,
         name_ptr: i32,
         name_len: i32,
         id_out: i32|
         -> wasmtime::Result<i32> {
            let name = read_string(&mut caller, name_ptr, name_len)?;
            let shared = caller.data().shared.clone();
            let id = {
                let mut metrics = shared.metrics.lock().unwrap();
                let next = metrics.by_name.len() as u32 + 1;
                let id = *metrics.by_name.entry(name).or_insert(next);
                metrics.values.entry(id).or_insert((metric_type, 0));
                id
            };
            write_u32(&mut caller, id_out, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: Caller<'_, VmState>, id: i32, offset: i64| -> i32 {
            let mut metrics = caller.data().shared.metrics.lock().unwrap();
            match metrics.values.get_mut(&(id as u32)) {
                None => NOT_FOUND,
                Some((_, value)) => {
                    *value = value.saturating_add_signed(offset);
                    OK
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: Caller<'_, VmState>, id: i32, value: i64| -> i32 {
            let mut metrics = caller.data().shared.metrics.lock().unwrap();
            match metrics.values.get_mut(&(id as u32)) {
                None => NOT_FOUND,
                Some((_, v)) => {
                    *v = value as u64;
                    OK
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: Caller<'_, VmState>, id: i32, out: i32| -> wasmtime::Result<i32> {
            let value = caller
                .data()
                .shared
                .metrics
                .lock()
                .unwrap()
                .values
                .get(&(id as u32))
                .map(|(_, v)| *v);
            match value {
                None => Ok(NOT_FOUND),
                Some(v) => {
                    write_u64(&mut caller, out, v)?;
                    Ok(OK)
                }
            }
        },
    )?;
    Ok(())
}
