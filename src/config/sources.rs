//! Where each value of the effective configuration comes from, for `archiver config show`: the
//! highest layer that sets it, as [`super::Config::load`] merges them.

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde_json::Value;

use super::{Config, CONNECTION_ENV};
use crate::redact::SecretUri;

/// The keys whose values are connection strings: shown with their password masked.
const SECRET_KEYS: [&str; 2] = ["mongodb.uri", "archive.uri"];

/// One value of the effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Its dotted key (`watch.batch_size`).
    pub key: String,
    /// Its value as JSON, a connection string's password masked.
    pub value: Value,
    /// Where it comes from: `default`, `file config/archiver.toml`, an environment variable, or a
    /// flag.
    pub source: String,
}

/// Every value of `config`, in key order, with its source. `named` gives, for the keys set by a
/// named variable or a flag, which one (`MONGODB_DB`, `flag --db`); `file` is the configuration
/// file read, if any; `environment` is the process's environment.
pub fn settings(
    config: &Config,
    file: Option<&Path>,
    named: &BTreeMap<String, String>,
    environment: &[(String, String)],
) -> Vec<Setting> {
    let mut leaves = Vec::new();
    let tree = serde_json::to_value(config).unwrap_or_default();
    flatten("", &tree, &mut leaves);
    let from_file = file.map(|path| (path.display().to_string(), Figment::from(Toml::file_exact(path))));
    leaves
        .into_iter()
        .map(|(key, mut value)| {
            if SECRET_KEYS.contains(&key.as_str()) {
                if let Value::String(uri) = &value {
                    value = Value::String(SecretUri::new(uri.clone()).to_string());
                }
            }
            let source = source_of(&key, from_file.as_ref(), named, environment);
            Setting { key, value, source }
        })
        .collect()
}

/// The leaves of `tree` (arrays are leaves), with their dotted keys.
fn flatten(prefix: &str, tree: &Value, out: &mut Vec<(String, Value)>) {
    match tree {
        Value::Object(map) => {
            for (name, value) in map {
                let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                flatten(&key, value, out);
            }
        }
        leaf => out.push((prefix.to_owned(), leaf.clone())),
    }
}

/// Whether `setter` (a key set by a layer) sets `key`: itself, or a table holding it.
fn covers(setter: &str, key: &str) -> bool {
    key == setter || key.strip_prefix(setter).is_some_and(|rest| rest.starts_with('.'))
}

fn source_of(
    key: &str,
    file: Option<&(String, Figment)>,
    named: &BTreeMap<String, String>,
    environment: &[(String, String)],
) -> String {
    if let Some(source) = named.get(key) {
        return source.clone();
    }
    let set = |name: &str| environment.iter().any(|(var, _)| var.eq_ignore_ascii_case(name));
    if let Some((var, _)) = CONNECTION_ENV.iter().find(|(var, setter)| covers(setter, key) && set(var)) {
        return (*var).to_owned();
    }
    let prefixed = environment.iter().find(|(var, _)| {
        var.strip_prefix("ARCHIVER_").filter(|rest| *rest != "CONFIG").is_some_and(|rest| {
            let setter = rest.split("__").map(str::to_ascii_lowercase).collect::<Vec<_>>().join(".");
            covers(&setter, key)
        })
    });
    if let Some((var, _)) = prefixed {
        return var.clone();
    }
    if let Some((path, figment)) = file {
        if figment.find_value(key).is_ok() {
            return format!("file {path}");
        }
    }
    "default".to_owned()
}

/// The settings as `key = value  # source` lines, grouped by table as in the TOML file.
pub fn render(settings: &[Setting]) -> String {
    let width = settings.iter().map(|s| s.key.len() + 3 + shown(&s.value).len()).max().unwrap_or(0).min(72);
    let mut out = String::new();
    for setting in settings {
        let line = format!("{} = {}", setting.key, shown(&setting.value));
        out.push_str(&format!("{line:<width$}  # {}\n", setting.source));
    }
    out
}

/// A value as in a TOML file; an unset one as `(unset)`.
fn shown(value: &Value) -> String {
    match value {
        Value::Null => "(unset)".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_is_shown_with_the_highest_layer_that_sets_it_and_no_password() {
        let mut config = Config::default();
        config.mongodb.uri = SecretUri::new("mongodb://app:Hunter2x@db1:27017/");
        config.watch.batch_size = 50;
        config.lookups.client.fields = vec!["nom".to_owned()];
        let named = BTreeMap::from([("mongodb.uri".to_owned(), "MONGODB_URI".to_owned())]);
        let environment = vec![
            ("ARCHIVER_WATCH__BATCH_SIZE".to_owned(), "50".to_owned()),
            ("ARCHIVER_LOOKUPS__CLIENT".to_owned(), "{fields=[\"nom\"]}".to_owned()),
            ("MONGODB_APP_NAME".to_owned(), "app".to_owned()),
        ];
        let settings = settings(&config, None, &named, &environment);
        let find = |key: &str| settings.iter().find(|s| s.key == key).unwrap_or_else(|| panic!("{key}"));
        assert_eq!(find("mongodb.uri").source, "MONGODB_URI");
        assert_eq!(find("mongodb.uri").value, Value::from("mongodb://app:***@db1:27017/"));
        assert_eq!(find("watch.batch_size").source, "ARCHIVER_WATCH__BATCH_SIZE");
        assert_eq!(find("lookups.client.fields").source, "ARCHIVER_LOOKUPS__CLIENT");
        assert_eq!(find("connection.app_name").source, "MONGODB_APP_NAME");
        assert_eq!(find("watch.batch_max_wait_ms").source, "default");
        assert!(!render(&settings).contains("Hunter2x"));
    }
}
