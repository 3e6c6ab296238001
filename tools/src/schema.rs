//! `plan-limits schema`: plans.json's JSON Schema, generated from the config's Rust types (their
//! doc comments become its descriptions). The repository commits it as `plans.schema.json`,
//! which plans.json names in `"$schema"` so that editors check and complete it, and its
//! reference for people as `docs/configuration.md` (`plan-limits schema --markdown`).

use plan_limits_core::Config;
use serde_json::Value;

/// The schema as pretty JSON (no trailing newline).
pub fn render() -> String {
    serde_json::to_string_pretty(&schema()).expect("a schema is plain JSON")
}

fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("a schema is plain JSON")
}

/// The configuration reference in Markdown: one row per field, by its path in plans.json
/// (`redis.timeout_ms`, `plans.<name>.limits`), with its type, default and description, all
/// read from the schema, so the reference cannot say what the filter does not take.
pub fn markdown() -> String {
    let schema = schema();
    let mut rows = Vec::new();
    Walk {
        defs: &schema["$defs"],
        rows: &mut rows,
    }
    .object(&schema, "");
    let mut out = String::from(
        "# plans.json: configuration reference\n\n\
         Generated from the filter's configuration types by `plan-limits schema --markdown` \
         (`make schema`); a test fails when it is stale. Editors check plans.json against \
         the same schema, [`plans.schema.json`](../plans.schema.json). A field the filter \
         does not know is refused, naming its path.\n\n\
         | field | type | default | meaning |\n|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            row.path, row.kind, row.default, row.meaning
        ));
    }
    out
}

struct Row {
    path: String,
    kind: String,
    default: String,
    meaning: String,
}

struct Walk<'a> {
    defs: &'a Value,
    rows: &'a mut Vec<Row>,
}

impl<'a> Walk<'a> {
    fn object(&mut self, schema: &Value, prefix: &str) {
        let schema = resolve(self.defs, schema);
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let Some(properties) = schema["properties"].as_object() else {
            return;
        };
        for (name, field) in properties {
            let path = format!("{prefix}{name}");
            self.field(field, &path, required.contains(&name.as_str()));
        }
    }

    fn field(&mut self, field: &Value, path: &str, required: bool) {
        let target = resolve(self.defs, field);
        let description = [field, target]
            .iter()
            .find_map(|s| s["description"].as_str())
            .unwrap_or("");
        let default = match (&field["default"], required) {
            (_, true) => "required".to_string(),
            (Value::Null, false) if field.get("default").is_some() => "`null`".to_string(),
            (Value::Null, false) => "–".to_string(),
            (value, false) => format!("`{}`", cell(&value.to_string())),
        };
        let nested = target["properties"].is_object();
        let map_of = target["additionalProperties"]
            .as_object()
            .map(|_| resolve(self.defs, &target["additionalProperties"]));
        let items = resolve(self.defs, &target["items"]);
        // An object whose fields have rows of their own is named plainly: its fields say the rest.
        let (kind, default) = match nested {
            true if !required => ("object".to_string(), "–".to_string()),
            true => ("object".to_string(), default),
            false => (kind(target, self.defs), default),
        };
        let row = Row {
            path: path.to_string(),
            kind,
            default,
            meaning: meaning(description, target),
        };
        // An object's own row only when it says something; its fields follow as rows.
        if !nested || !description.is_empty() {
            self.rows.push(row);
        }
        if nested {
            self.object(target, &format!("{path}."));
        } else if let Some(value) = map_of.filter(|v| v["properties"].is_object()) {
            self.object(value, &format!("{path}.<name>."));
        } else if items["properties"].is_object() {
            self.object(items, &format!("{path}[]."));
        }
    }
}

/// What `$ref` names, or the schema itself.
fn resolve<'s>(defs: &'s Value, schema: &'s Value) -> &'s Value {
    match schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        Some(name) => &defs[name],
        None => schema,
    }
}

/// The field's type as a reader wants it: `string`, `integer or null`, `"meter" | "refuse"`,
/// `{name: integer or null}`.
fn kind(schema: &Value, defs: &Value) -> String {
    let resolve = |s| resolve(defs, s).clone();
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    if let Some(variants) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        return variants
            .iter()
            .map(|v| {
                let v = resolve(v);
                match &v["const"] {
                    Value::Null => kind(&v, defs),
                    c => format!("`{c}`"),
                }
            })
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    if schema["type"] == "object" {
        if let Some(properties) = schema["properties"].as_object() {
            if !properties.is_empty() && schema["additionalProperties"] == false {
                let keys: Vec<&str> = properties.keys().map(String::as_str).collect();
                return format!("`{{{}}}`", keys.join(", "));
            }
        }
        if schema["additionalProperties"].is_object() {
            let value = resolve(&schema["additionalProperties"]);
            if value["properties"].is_object() {
                return "object by name".into();
            }
            return format!("{{name: {}}}", kind(&value, defs));
        }
        return "object".into();
    }
    let base = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    };
    if base == "array" {
        let items = resolve(&schema["items"]);
        if items["properties"].is_object() {
            return "array of objects".into();
        }
        return format!("array of {}", kind(&items, defs));
    }
    base
}

/// The description on one line, then what each named value of an enum means.
fn meaning(description: &str, schema: &Value) -> String {
    let mut text = cell(description);
    if let Some(variants) = schema["oneOf"].as_array() {
        for v in variants {
            if let (Some(c), Some(d)) = (v["const"].as_str(), v["description"].as_str()) {
                text.push_str(&format!(" `{c}`: {}", cell(d)));
            }
        }
    }
    text.trim().to_string()
}

/// Text fit for a table cell: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leaf_field_of_the_schema_has_a_row_named_by_its_path() {
        let md = markdown();
        for path in [
            "`default_plan` | string | required",
            "`redis.timeout_ms` | integer | `250`",
            "`plans.<name>.grace`",
            "`actions.<name>.metadata`",
            "`routes[].action`",
        ] {
            assert!(md.contains(path), "no row {path}:\n{md}");
        }
        assert!(md.contains("`fail_open`: Redis unreachable: let the request through"));
    }
}
