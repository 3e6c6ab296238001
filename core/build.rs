//! Makes each function of the Redis library (`src/redis/plan_limits.lua`) a script for
//! `EVAL`/`EVALSHA`, and its SHA1, at build time: the .wasm carries the 40-character names,
//! not the hashing (native loaders take the sources). Envoy's `redis_proxy` forwards
//! `EVALSHA` but not `FCALL`.

use std::fmt::Write as _;

const LIBRARY: &str = "src/redis/plan_limits.lua";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={LIBRARY}");
    let library = std::fs::read_to_string(LIBRARY)?;
    // The library's header names the library, which a script may not.
    let body = library
        .split_once('\n')
        .map_or("", |(_, rest)| rest)
        .replace("redis.register_function", "register");
    let functions: Vec<&str> = library
        .split("function_name = '")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .collect();
    let mut shas = String::new();
    let mut sources = String::new();
    for name in &functions {
        // Its functions registered into a local table instead of Redis's, then the one asked
        // for called with the script's KEYS and ARGV.
        let script = format!(
            "local registered = {{}}\n\
             local function register(spec) registered[spec.function_name] = spec.callback end\n\
             {body}\n\
             return registered['{name}'](KEYS, ARGV)\n"
        );
        let sha = sha1_smol::Sha1::from(&script).digest().to_string();
        writeln!(shas, "    ({name:?}, {sha:?}),")?;
        writeln!(sources, "    ({name:?}, {script:?}),")?;
    }
    let n = functions.len();
    let out = format!(
        "/// Each function's script's SHA1, as `EVALSHA` names it.\n\
         pub const SCRIPT_SHAS: [(&str, &str); {n}] = [\n{shas}];\n\
         /// Each function's script.\n\
         pub const SCRIPT_SOURCES: [(&str, &str); {n}] = [\n{sources}];\n"
    );
    let path = std::path::Path::new(&std::env::var("OUT_DIR")?).join("scripts.rs");
    std::fs::write(path, out)?;
    Ok(())
}
