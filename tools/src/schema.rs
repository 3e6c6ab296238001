//! `plan-limits schema`: plans.json's JSON Schema, generated from the config's Rust types (their
//! doc comments become its descriptions). The repository commits it as `plans.schema.json`,
//! which plans.json names in `"$schema"` so that editors check and complete it.

use plan_limits_core::Config;

/// The schema as pretty JSON (no trailing newline).
pub fn render() -> String {
    let schema = schemars::schema_for!(Config);
    serde_json::to_string_pretty(&schema).expect("a schema is plain JSON")
}
