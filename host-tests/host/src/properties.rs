//! Properties (`proxy_get_property`, `proxy_set_property`): paths are `\0`-separated; the
//! stream's own properties first, then the plugin's (`plugin_name`, `plugin_root_id`, ...;
//! the hold filter's contexts see its own root id).

use wasmtime::{Caller, Linker};

use super::abi::{NOT_FOUND, OK, SERIALIZATION_FAILURE};
use super::memory::{give, read};
use super::state::VmState;

fn path_key(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).replace('\0', ".")
}

pub fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut caller: Caller<'_, VmState>,
         path_ptr: i32,
         path_len: i32,
         out_ptr: i32,
         out_len: i32|
         -> wasmtime::Result<i32> {
            let key = path_key(&read(&mut caller, path_ptr, path_len)?);
            let state = caller.data_mut();
            let hold_root_id = match &state.hold_root {
                Some((_, root_id)) if key == "plugin_root_id" && state.in_hold_filter() => {
                    Some(root_id.clone().into_bytes())
                }
                _ => None,
            };
            let value = hold_root_id
                .map(Some)
                .or_else(|| state.stream().and_then(|s| s.properties.get(&key).cloned()))
                .or_else(|| state.plugin_properties.get(&key).cloned().map(Some));
            match value {
                None => Ok(NOT_FOUND),
                Some(None) => Ok(SERIALIZATION_FAILURE),
                Some(Some(value)) => {
                    give(&mut caller, &value, out_ptr, out_len)?;
                    Ok(OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: Caller<'_, VmState>,
         path_ptr: i32,
         path_len: i32,
         value_ptr: i32,
         value_len: i32|
         -> wasmtime::Result<i32> {
            let key = path_key(&read(&mut caller, path_ptr, path_len)?);
            let value = read(&mut caller, value_ptr, value_len)?;
            let state = caller.data_mut();
            match state.stream() {
                Some(stream) => {
                    stream.properties.insert(key, Some(value));
                }
                None => {
                    state.plugin_properties.insert(key, value);
                }
            }
            Ok(OK)
        },
    )?;
    Ok(())
}
