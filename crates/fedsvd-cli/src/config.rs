//! Resolving a run configuration: an embedded preset, then the user's JSON
//! file merged over it, then `--method`, then every `--set key=value`; the
//! result is checked key by key.

use std::path::Path;

use anyhow::{Context, bail};
use clap::ValueEnum;
use fedsvd::RunConfig;
use serde_json::{Map, Value};

/// The embedded starting points of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// About a minute on a 2-core machine (48 s measured): 1,200 RT
    /// examples, 6 short rounds.
    Quick,
    /// About 10 minutes on a 2-core machine (rounds of about 30 s measured):
    /// 8,000 RT examples, 6 clients all taking part in each of 20 rounds of
    /// 10 local steps, mean pooling and a trainable head, so the run learns
    /// under DP on every seed measured (see the README).
    Default,
    /// The paper's hyper-parameters (method.md §9): all of RT, 100 rounds of
    /// 10 local steps, batch 128, [CLS] pooler and frozen random head. Hours.
    Paper,
}

impl Preset {
    /// The preset's name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Quick => "quick",
            Preset::Default => "default",
            Preset::Paper => "paper",
        }
    }

    /// The preset's complete configuration as JSON text.
    pub fn json(self) -> &'static str {
        match self {
            Preset::Quick => include_str!("../presets/quick.json"),
            Preset::Default => include_str!("../presets/default.json"),
            Preset::Paper => include_str!("../presets/paper.json"),
        }
    }
}

/// The options of FedSVD that `--method fedsvd` fills in when absent.
fn fedsvd_defaults() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("name".into(), "fedsvd".into());
    m.insert("svd_period".into(), 1.into());
    m.insert("svd_warmup".into(), 0.into());
    m.insert("solver".into(), "factored".into());
    m
}

/// Overlays `top` on `base`: objects merge key by key, anything else
/// replaces. A method object naming a different method replaces the whole
/// method, since each method has its own options.
fn merge(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(b), Value::Object(t)) => {
            let switches_method = matches!(
                (b.get("name"), t.get("name")),
                (Some(old), Some(new)) if old != new
            );
            if switches_method {
                b.clear();
            }
            for (key, value) in t {
                match b.get_mut(&key) {
                    Some(slot) if slot.is_object() && value.is_object() => merge(slot, value),
                    _ => {
                        b.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// Fills FedSVD's options when the method is FedSVD and some are missing.
fn complete_method(config: &mut Value) {
    if let Some(method) = config.pointer_mut("/federation/method")
        && method.get("name").and_then(Value::as_str) == Some("fedsvd")
        && let Value::Object(m) = method
    {
        for (key, value) in fedsvd_defaults() {
            m.entry(key).or_insert(value);
        }
    }
}

/// Parses one `--set key.path=value`. The value is read as JSON when it
/// parses (numbers, true/false, null, arrays, objects, quoted strings) and
/// as a plain string otherwise.
fn parse_set(assignment: &str) -> anyhow::Result<(Vec<String>, Value)> {
    let Some((key, raw)) = assignment.split_once('=') else {
        bail!("--set {assignment:?}: expected KEY=VALUE, e.g. --set federation.rounds=10");
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        bail!("--set {assignment:?}: the key must be a dotted path like data.clients");
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    Ok((key.split('.').map(str::to_string).collect(), value))
}

/// Sets `path` in `config`, refusing keys that do not exist (with the keys
/// that do), so a typo never silently adds an ignored setting.
fn apply_set(config: &mut Value, path: &[String], value: Value) -> anyhow::Result<()> {
    let mut node = config;
    for (depth, key) in path.iter().enumerate() {
        let here = path[..depth].join(".");
        let Value::Object(map) = node else {
            bail!(
                "--set {}: `{here}` is not an object, so it has no key `{key}`",
                path.join(".")
            );
        };
        if !map.contains_key(key) {
            let mut allowed: Vec<&str> = map.keys().map(String::as_str).collect();
            allowed.sort_unstable();
            let place = if here.is_empty() {
                "the top level".to_string()
            } else {
                format!("`{here}`")
            };
            bail!(
                "--set {}: unknown key `{key}` in {place}; allowed: {}",
                path.join("."),
                allowed.join(", ")
            );
        }
        if depth + 1 == path.len() {
            map.insert(key.clone(), value);
            return Ok(());
        }
        node = map.get_mut(key).expect("checked above");
    }
    Ok(())
}

/// Reads a JSON file, naming the file, line and column of a syntax error.
pub fn read_json_file(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}:{}:{}: not valid JSON: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// Turns a JSON value into a checked [`RunConfig`]; errors name the dotted
/// key and what it accepts.
pub fn to_run_config(value: Value, origin: &str) -> anyhow::Result<RunConfig> {
    let config: RunConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("{origin}: config key `{path}`: {}", e.inner())
    })?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    Ok(config)
}

/// The options that shape a run's configuration.
#[derive(Debug, Clone, Default)]
pub struct ConfigOptions<'a> {
    /// Starting preset (`default` when `None`).
    pub preset: Option<Preset>,
    /// A JSON file merged over the preset.
    pub file: Option<&'a Path>,
    /// `--method NAME`.
    pub method: Option<&'a str>,
    /// `--set KEY=VALUE`, in order.
    pub sets: &'a [String],
}

/// Resolves preset, file, method and overrides into a JSON value.
pub fn resolve_value(options: &ConfigOptions<'_>) -> anyhow::Result<Value> {
    let preset = options.preset.unwrap_or(Preset::Default);
    let mut config: Value =
        serde_json::from_str(preset.json()).context("the embedded preset is not valid JSON")?;
    if let Some(file) = options.file {
        let user = read_json_file(file)?;
        if !user.is_object() {
            bail!(
                "{}: the config must be a JSON object like the presets (see `fedsvd run --print-config`)",
                file.display()
            );
        }
        merge(&mut config, user);
    }
    if let Some(method) = options.method {
        fedsvd::Method::from_name(method).map_err(|e| anyhow::anyhow!("--method: {e}"))?;
        let mut m = Map::new();
        m.insert("name".into(), method.into());
        if let Some(slot) = config.pointer_mut("/federation/method") {
            merge(slot, Value::Object(m));
        }
    }
    complete_method(&mut config);
    for assignment in options.sets {
        let (path, value) = parse_set(assignment)?;
        apply_set(&mut config, &path, value)?;
        complete_method(&mut config);
    }
    Ok(config)
}

/// Resolves and checks a run configuration.
pub fn resolve(options: &ConfigOptions<'_>) -> anyhow::Result<RunConfig> {
    let origin = match options.file {
        Some(f) => f.display().to_string(),
        None => format!(
            "preset {}",
            options.preset.unwrap_or(Preset::Default).name()
        ),
    };
    to_run_config(resolve_value(options)?, &origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts<'a>(sets: &'a [String]) -> ConfigOptions<'a> {
        ConfigOptions {
            sets,
            ..ConfigOptions::default()
        }
    }

    #[test]
    fn every_preset_is_a_valid_config() {
        for preset in [Preset::Quick, Preset::Default, Preset::Paper] {
            let c = resolve(&ConfigOptions {
                preset: Some(preset),
                ..ConfigOptions::default()
            })
            .unwrap();
            assert_eq!(c.federation.method.name(), "fedsvd", "{}", preset.name());
        }
    }

    #[test]
    fn set_overrides_by_dotted_path_and_parses_json_values() {
        let sets = vec![
            "federation.rounds=3".to_string(),
            "privacy_typo=1".to_string(),
        ];
        let err = resolve(&opts(&sets)).unwrap_err().to_string();
        assert!(err.contains("unknown key `privacy_typo`"), "{err}");
        assert!(err.contains("federation"), "lists the allowed keys: {err}");

        let sets = vec![
            "federation.rounds=3".to_string(),
            "federation.privacy.epsilon=null".to_string(),
            "data.dataset=spam".to_string(),
        ];
        let c = resolve(&opts(&sets)).unwrap();
        assert_eq!(c.federation.rounds, 3);
        assert_eq!(c.federation.privacy.epsilon, None);
        assert_eq!(c.data.dataset, "spam");
    }

    #[test]
    fn wrong_types_and_values_name_the_key() {
        let sets = vec!["federation.training.lr=fast".to_string()];
        let err = resolve(&opts(&sets)).unwrap_err().to_string();
        assert!(err.contains("federation.training.lr"), "{err}");

        let sets = vec!["federation.privacy.delta=2".to_string()];
        let err = resolve(&opts(&sets)).unwrap_err().to_string();
        assert!(err.contains("privacy.delta"), "{err}");

        let sets = vec!["data.dataset=imdb".to_string()];
        let err = resolve(&opts(&sets)).unwrap_err().to_string();
        assert!(err.contains("data.dataset") && err.contains("rt"), "{err}");

        let sets = vec!["federation.clients_per_round=9".to_string()];
        let err = resolve(&opts(&sets)).unwrap_err().to_string();
        assert!(err.contains("clients_per_round"), "{err}");

        let sets = vec!["federation.method.name=fedprox".to_string()];
        let err = resolve(&opts(&sets)).unwrap_err().to_string();
        assert!(err.contains("federation.method"), "{err}");
    }

    #[test]
    fn a_file_merges_over_the_preset_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"federation": {"rounds": 2, "method": {"name": "ffa"}}}"#,
        )
        .unwrap();
        let c = resolve(&ConfigOptions {
            file: Some(&path),
            ..ConfigOptions::default()
        })
        .unwrap();
        assert_eq!(c.federation.rounds, 2);
        assert_eq!(c.federation.method, fedsvd::Method::Ffa);
        // Everything else comes from the preset.
        assert_eq!(c.data.clients, 6);

        std::fs::write(&path, r#"{"federation": {"round": 2}}"#).unwrap();
        let err = resolve(&ConfigOptions {
            file: Some(&path),
            ..ConfigOptions::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("federation.round") && err.contains("rounds"),
            "{err}"
        );

        std::fs::write(&path, "{\"federation\": {\n  \"rounds\": 2,\n}").unwrap();
        let err = resolve(&ConfigOptions {
            file: Some(&path),
            ..ConfigOptions::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("c.json:3"), "names file and line: {err}");
    }

    #[test]
    fn method_switch_replaces_the_method_options() {
        let sets: Vec<String> = Vec::new();
        let c = resolve(&ConfigOptions {
            method: Some("flora"),
            sets: &sets,
            ..ConfigOptions::default()
        })
        .unwrap();
        assert_eq!(c.federation.method, fedsvd::Method::Flora);
        let sets = vec!["federation.method.svd_period=4".to_string()];
        let c = resolve(&ConfigOptions {
            method: Some("fedsvd"),
            sets: &sets,
            ..ConfigOptions::default()
        })
        .unwrap();
        assert!(matches!(
            c.federation.method,
            fedsvd::Method::Fedsvd { svd_period: 4, .. }
        ));
        let err = resolve(&ConfigOptions {
            method: Some("fedprox"),
            ..ConfigOptions::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("fedsvd, ffa, fedavg, flora, fedex"), "{err}");
    }
}
