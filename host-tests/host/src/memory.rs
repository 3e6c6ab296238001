//! Reading and writing the guest's linear memory, and handing it host data the way Envoy
//! does: memory the guest allocates (`proxy_on_memory_allocate`), pointer and size written
//! back through the guest's return pointers.

use wasmtime::{Caller, Extern, Memory};

use super::state::VmState;

pub type HostResult<T> = wasmtime::Result<T>;

fn memory(caller: &mut Caller<'_, VmState>) -> HostResult<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(wasmtime::format_err!("the module exports no memory")),
    }
}

pub fn read(caller: &mut Caller<'_, VmState>, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&caller)
        .get(ptr..ptr.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::format_err!("guest pointer {ptr}+{len} is out of bounds"))
}

pub fn read_string(caller: &mut Caller<'_, VmState>, ptr: i32, len: i32) -> HostResult<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

pub fn write(caller: &mut Caller<'_, VmState>, ptr: i32, bytes: &[u8]) -> HostResult<()> {
    let mem = memory(caller)?;
    mem.write(&mut *caller, ptr as u32 as usize, bytes)
        .map_err(|_| wasmtime::format_err!("guest pointer {ptr} is out of bounds"))
}

pub fn write_u32(caller: &mut Caller<'_, VmState>, ptr: i32, value: u32) -> HostResult<()> {
    write(caller, ptr, &value.to_le_bytes())
}

pub fn write_u64(caller: &mut Caller<'_, VmState>, ptr: i32, value: u64) -> HostResult<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Copies `data` into memory the guest allocates and writes its address and size to
/// `ptr_out` and `size_out` (the guest frees it).
pub fn give(
    caller: &mut Caller<'_, VmState>,
    data: &[u8],
    ptr_out: i32,
    size_out: i32,
) -> HostResult<()> {
    let address = if data.is_empty() {
        0
    } else {
        let allocate = caller
            .get_export("proxy_on_memory_allocate")
            .and_then(Extern::into_func)
            .ok_or_else(|| wasmtime::format_err!("the module exports no proxy_on_memory_allocate"))?
            .typed::<i32, i32>(&caller)?;
        let address = allocate.call(&mut *caller, data.len() as i32)?;
        if address == 0 {
            return Err(wasmtime::format_err!(
                "proxy_on_memory_allocate({}) returned 0",
                data.len()
            ));
        }
        write(caller, address, data)?;
        address
    };
    write_u32(caller, ptr_out, address as u32)?;
    write_u32(caller, size_out, data.len() as u32)
}
