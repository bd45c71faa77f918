//! The configuration reference (`archiver config reference`), generated from the definitions the
//! loader uses: every key of [`Config`] with its documentation comment, type and default, and the
//! variables that set it. `docs/src/reference/configuration.md` is this text; a test fails when
//! they differ, or when a key has no documentation.

use std::fmt::Write;

use serde_json::{Map, Value};

use super::{Config, CONNECTION_ENV, NAMED_VARIABLES};

/// One key of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its dotted key, as in the TOML file's tables (`watch.batch_size`).
    pub key: String,
    /// Its type, in words.
    pub kind: String,
    /// Its default, as TOML would write it (`(unset)` when there is none).
    pub default: String,
    /// Its documentation, on one line.
    pub description: String,
    /// The variables that set it: the named ones, then the generic `ARCHIVER_SECTION__KEY`.
    pub variables: Vec<String>,
}

/// Variables read outside the configuration's keys.
const OTHER_VARIABLES: &[(&str, &str)] = &[
    ("ARCHIVER_CONFIG", "The configuration file (`--config`); default: `config/archiver.toml` when present."),
    ("RUST_LOG", "A log filter (`archiver=debug,mongodb=info`) that takes precedence over `LOG_LEVEL`."),
    ("JOURNAL_STREAM", "Set by systemd when standard error goes to the journal: no log files unless `LOG_DIR` is set."),
    ("NOTIFY_SOCKET, WATCHDOG_USEC", "Set by systemd (`Type=notify`, `WatchdogSec=`): `watch` reports readiness and pings the watchdog."),
    ("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN", "Credentials of an `s3://` table (else the instance's role); never printed."),
    ("AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP", "Region and endpoint of an `s3://` table; an S3-compatible store (MinIO) by its endpoint, plain HTTP only with `AWS_ALLOW_HTTP=true`."),
    ("GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_SERVICE_ACCOUNT, GOOGLE_SERVICE_ACCOUNT_KEY", "Credentials of a `gs://` table (else the instance's); never printed. Untested."),
    ("AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_TENANT_ID", "Account and credentials of an `az://` or `abfss://` table (else the managed identity); never printed. Untested."),
];

/// Every key of the configuration, in the order of its tables.
pub fn entries() -> Vec<Entry> {
    let schema = schemars::schema_for!(Config);
    let root = schema.as_value();
    let definitions = root.get("$defs").and_then(Value::as_object).cloned().unwrap_or_default();
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let mut out = Vec::new();
    walk("", root, &definitions, &defaults, &mut out);
    out
}

/// The schema `node` stands for, its `$ref` followed.
fn resolve<'a>(node: &'a Value, definitions: &'a Map<String, Value>) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => definitions.get(name).unwrap_or(node),
        None => node,
    }
}

fn walk(prefix: &str, node: &Value, definitions: &Map<String, Value>, defaults: &Value, out: &mut Vec<Entry>) {
    let node = resolve(node, definitions);
    let Some(properties) = node.get("properties").and_then(Value::as_object) else { return };
    for (name, property) in properties {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        let target = resolve(property, definitions);
        let default = defaults.get(name).cloned().unwrap_or(Value::Null);
        if target.get("properties").is_some() && default.is_object() {
            walk(&key, target, definitions, &default, out);
            continue;
        }
        let description = property
            .get("description")
            .or_else(|| target.get("description"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        out.push(Entry {
            kind: kind_of(property, definitions),
            default: shown(&default),
            description,
            variables: variables_of(&key),
            key,
        });
    }
}

/// The type of a property, in words: `integer`, `string or unset`, `one of: file, mongodb`.
fn kind_of(property: &Value, definitions: &Map<String, Value>) -> String {
    let mut optional = false;
    let mut kinds = Vec::new();
    let alternatives: Vec<&Value> = match property.get("anyOf").and_then(Value::as_array) {
        Some(any) => any.iter().collect(),
        None => vec![property],
    };
    for alternative in alternatives {
        let target = resolve(alternative, definitions);
        if let Some(choices) = target.get("oneOf").or_else(|| target.get("enum")).and_then(Value::as_array) {
            let names: Vec<String> = choices
                .iter()
                .filter_map(|c| c.get("const").or(Some(c)).and_then(Value::as_str).map(|s| format!("`{s}`")))
                .collect();
            kinds.push(format!("one of {}", names.join(", ")));
            continue;
        }
        let types: Vec<&str> = match target.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec!["string"],
        };
        for t in types {
            match t {
                "null" => optional = true,
                "array" => kinds.push("list of strings".to_owned()),
                other => kinds.push(other.to_owned()),
            }
        }
    }
    let mut kind = kinds.join(" or ");
    if optional {
        kind.push_str(" (optional)");
    }
    kind
}

/// The variables that set `key`.
fn variables_of(key: &str) -> Vec<String> {
    let mut variables: Vec<String> = NAMED_VARIABLES
        .iter()
        .chain(CONNECTION_ENV)
        .filter(|(_, k)| *k == key)
        .map(|(var, _)| (*var).to_owned())
        .collect();
    variables.push(format!("ARCHIVER_{}", key.replace('.', "__").to_ascii_uppercase()));
    variables
}

/// A default as TOML would write it.
fn shown(value: &Value) -> String {
    match value {
        Value::Null => "(unset)".to_owned(),
        Value::String(s) if s.is_empty() => "\"\"".to_owned(),
        other => other.to_string(),
    }
}

/// Escapes a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The reference, as the manual's Markdown page.
pub fn markdown() -> String {
    let mut out = String::new();
    out.push_str(
        "# Configuration reference\n\n\
         <!-- Generated by `archiver config reference` from the code; do not edit by hand. -->\n\n\
         Every setting, with its key in `config/archiver.toml` (the table is the part before the last \
         dot: `watch.batch_size` is `batch_size` in `[watch]`), the variables that set it, its type, \
         its default and what it does. A named variable (or its flag, listed by `archiver <command> --help`) \
         wins over `ARCHIVER_SECTION__KEY`, which wins over the file, which wins over the default; \
         `archiver config show` prints the values in effect and where each comes from.\n",
    );
    let mut table = String::new();
    for entry in entries() {
        let section = entry.key.split('.').next().unwrap_or_default().to_owned();
        if section != table {
            let _ = write!(
                out,
                "\n## `[{section}]`\n\n| Key | Variables | Type | Default | Description |\n|---|---|---|---|---|\n"
            );
            table = section;
        }
        let variables: Vec<String> = entry.variables.iter().map(|v| format!("`{v}`")).collect();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | `{}` | {} |",
            entry.key,
            variables.join(", "),
            cell(&entry.kind),
            cell(&entry.default),
            cell(&entry.description)
        );
    }
    out.push_str("\n## Other variables\n\n| Variable | Description |\n|---|---|\n");
    for (variable, description) in OTHER_VARIABLES {
        let _ = writeln!(out, "| `{variable}` | {} |", cell(description));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key added without its documentation comment fails here.
    #[test]
    fn every_key_has_a_type_a_default_and_a_description() {
        let entries = entries();
        assert!(entries.len() > 60, "{} keys", entries.len());
        for entry in &entries {
            assert!(!entry.description.is_empty(), "{} has no documentation comment", entry.key);
            assert!(!entry.kind.is_empty(), "{} has no type", entry.key);
        }
        let batch_size = entries.iter().find(|e| e.key == "watch.batch_size").unwrap();
        assert_eq!(batch_size.default, "500");
        assert_eq!(batch_size.variables, ["BATCH_SIZE", "ARCHIVER_WATCH__BATCH_SIZE"]);
    }

    /// Each named variable sets a key that exists.
    #[test]
    fn every_named_variable_sets_a_key_of_the_reference() {
        let keys: Vec<String> = entries().into_iter().map(|e| e.key).collect();
        for (variable, key) in NAMED_VARIABLES.iter().chain(CONNECTION_ENV) {
            assert!(keys.iter().any(|k| k == key), "{variable} sets {key}, which is not a key");
        }
    }
}
