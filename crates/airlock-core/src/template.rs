//! Operation templates: the only way the vendor can ask an appliance to run something.
//!
//! A template is a script plus typed variables with constraints, the data-access tags the
//! customer is shown, and the phase it needs. Rendering never splices values into the script:
//! each value is checked against its type and anchored pattern, then handed to the script as
//! an environment variable (`AIRLOCK_VAR_<NAME>`), so no value can change what the script is.
//! The customer approves the SHA-256 of the exact [`RenderedCommand`]: script and environment.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::Phase;
use crate::run_spec::RunSpec;

/// Longest value a variable may take.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Largest `template.toml` accepted, by the control plane at push and the appliance alike.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Largest script accepted.
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;
/// Most variables a template may declare. With [`crate::pattern::MAX_COMPILED_BYTES`] per
/// pattern, this bounds what one template costs to compile (and so to load, list or render).
pub const MAX_VARIABLES: usize = 32;
/// Most data tags a template may declare.
pub const MAX_DATA_TAGS: usize = 32;

/// `template.toml`, as the vendor writes it next to the script it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateManifest {
    /// Lowercase letters, digits and `-`; this is the operation's kind.
    pub name: String,
    pub description: String,
    pub phase: Phase,
    /// What customer data this may touch, e.g. `service:restart`, `customer-db:read`.
    #[serde(default)]
    pub data_tags: BTreeSet<String>,
    /// File name of the script, beside `template.toml`.
    pub body: String,
    #[serde(default)]
    pub variables: Vec<Variable>,
    /// What it asks of its box (`[run]`): root, limits. Part of the command the customer signs.
    #[serde(default, skip_serializing_if = "RunSpec::is_default")]
    pub run: RunSpec,
}

impl TemplateManifest {
    /// Parses `template.toml` alone, within its size limit, compiling nothing: for showing a
    /// stored template. [`Template::new`] checks the rest.
    pub fn parse(manifest_toml: &str) -> Result<Self, TemplateError> {
        if manifest_toml.len() > MAX_MANIFEST_BYTES {
            return Err(TemplateError::Limit(TemplateLimit::ManifestBytes { bytes: manifest_toml.len() }));
        }
        toml::from_str(manifest_toml).map_err(|e| TemplateError::Manifest(e.to_string()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    /// Lowercase letters, digits and `_`; exported as `AIRLOCK_VAR_<NAME>`.
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: VarType,
    /// A regular expression the whole value must match (anchoring is added).
    pub pattern: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    #[default]
    String,
    Integer,
    Boolean,
}

/// A template ready to render: its manifest, its script, and the hash that names this exact content.
#[derive(Clone, Debug)]
pub struct Template {
    manifest: TemplateManifest,
    script: String,
    patterns: BTreeMap<String, regex::Regex>,
    content_sha256: String,
}

/// What runs, exactly: the customer approves its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedCommand {
    pub template: String,
    pub template_sha256: String,
    pub script: String,
    pub env: BTreeMap<String, String>,
    /// What it asks of its box; absent when it asks nothing, so older commands keep their digest.
    #[serde(default, skip_serializing_if = "RunSpec::is_default")]
    pub run: RunSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template.toml: {0}")]
    Manifest(String),
    #[error("template is invalid: {0}")]
    Invalid(String),
    #[error("variable `{0}` is required")]
    Missing(String),
    #[error("the template has no variable `{0}`")]
    Unknown(String),
    #[error("variable `{name}`: {why}")]
    BadValue { name: String, why: String },
    /// The template is over one of the limits above: refused before any costly work.
    #[error("the template is over a limit: {0}")]
    Limit(TemplateLimit),
}

/// Which limit a template exceeds; a refusal says it as a type, the text is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateLimit {
    #[error("template.toml is {bytes} bytes; at most {MAX_MANIFEST_BYTES} are accepted")]
    ManifestBytes { bytes: usize },
    #[error("the script is {bytes} bytes; at most {MAX_SCRIPT_BYTES} are accepted")]
    ScriptBytes { bytes: usize },
    #[error("{count} variables; at most {MAX_VARIABLES} are accepted")]
    Variables { count: usize },
    #[error("{count} data tags; at most {MAX_DATA_TAGS} are accepted")]
    DataTags { count: usize },
    #[error("variable `{variable}` pattern: {error}")]
    Pattern { variable: String, error: crate::pattern::PatternError },
}

impl Template {
    /// Parses and checks a manifest and its script.
    pub fn new(manifest_toml: &str, script: &str) -> Result<Self, TemplateError> {
        let limit = |l: TemplateLimit| Err(TemplateError::Limit(l));
        if manifest_toml.len() > MAX_MANIFEST_BYTES {
            return limit(TemplateLimit::ManifestBytes { bytes: manifest_toml.len() });
        }
        if script.len() > MAX_SCRIPT_BYTES {
            return limit(TemplateLimit::ScriptBytes { bytes: script.len() });
        }
        let manifest = TemplateManifest::parse(manifest_toml)?;
        let invalid = |m: String| Err(TemplateError::Invalid(m));
        let ident = |s: &str, extra: u8| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == extra)
        };
        if !ident(&manifest.name, b'-') {
            return invalid(format!("name `{}` must be 1-64 lowercase letters, digits or `-`", manifest.name));
        }
        // A template named like one of the appliance's own read-only probes would pass as one
        // (Observe needs no customer signature for those); the names are reserved.
        if crate::probe::BUILTIN_PROBE_NAMES.contains(&manifest.name.as_str()) {
            return invalid(format!("name `{}` is reserved for the appliance's built-in probes", manifest.name));
        }
        // A deploy installs a signed release; a script under its name would pass for one.
        if [crate::deploy::DEPLOY_KIND, crate::deploy::TASK_KIND].contains(&manifest.name.as_str()) {
            return invalid(format!("name `{}` is reserved for releases' deploys and tasks", manifest.name));
        }
        if script.trim().is_empty() {
            return invalid("the script is empty".into());
        }
        // What the customer reviews is what runs: no byte may hide in a terminal. Only newline
        // and tab are allowed, and only in the script and the description.
        if let Some(c) = script.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            return invalid(format!(
                "the script contains the control character {:?}; only newline and tab are allowed",
                c
            ));
        }
        if let Some(c) = manifest.description.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            return invalid(format!("the description contains the control character {c:?}"));
        }
        if manifest.body.is_empty() || manifest.body.chars().any(char::is_control) {
            return invalid("the body must name the script file, without control characters".into());
        }
        // Tags decide what is secret and what built-in denies apply, so they are a small ASCII
        // vocabulary: `output:secret` with a zero-width space or a Cyrillic `е` would look the
        // same in review and not be treated as secret.
        if manifest.data_tags.len() > MAX_DATA_TAGS {
            return limit(TemplateLimit::DataTags { count: manifest.data_tags.len() });
        }
        // Counted before any pattern compiles: the count bounds the work.
        if manifest.variables.len() > MAX_VARIABLES {
            return limit(TemplateLimit::Variables { count: manifest.variables.len() });
        }
        for tag in &manifest.data_tags {
            if !is_data_tag(tag) {
                return invalid(format!(
                    "data tag {tag:?} must be 1-64 of `a-z`, `0-9`, `:`, `_` and `-` (ASCII only)"
                ));
            }
        }
        let mut patterns = BTreeMap::new();
        let mut names = BTreeSet::new();
        for v in &manifest.variables {
            if !ident(&v.name, b'_') {
                return invalid(format!("variable name `{}` must be 1-64 lowercase letters, digits or `_`", v.name));
            }
            if !names.insert(v.name.clone()) {
                return invalid(format!("variable `{}` is declared twice", v.name));
            }
            if let Some(p) = &v.pattern {
                let re = crate::pattern::anchored(p).map_err(|error| {
                    if error.is_limit() {
                        TemplateError::Limit(TemplateLimit::Pattern { variable: v.name.clone(), error })
                    } else {
                        TemplateError::Invalid(format!("variable `{}` pattern: {error}", v.name))
                    }
                })?;
                patterns.insert(v.name.clone(), re);
            }
        }
        let content = serde_json::to_vec(&(&manifest, script)).map_err(|e| TemplateError::Invalid(e.to_string()))?;
        let content_sha256 = data_encoding::HEXLOWER.encode(&Sha256::digest(&content));
        Ok(Self { manifest, script: script.to_owned(), patterns, content_sha256 })
    }

    pub fn manifest(&self) -> &TemplateManifest {
        &self.manifest
    }

    /// SHA-256 of the manifest and script: an edited template is a different template.
    pub fn content_sha256(&self) -> &str {
        &self.content_sha256
    }

    /// Checks every value and produces the exact command. Values become environment variables.
    pub fn render(&self, values: &BTreeMap<String, String>) -> Result<RenderedCommand, TemplateError> {
        if let Some(unknown) = values.keys().find(|k| !self.manifest.variables.iter().any(|v| &v.name == *k)) {
            return Err(TemplateError::Unknown(unknown.clone()));
        }
        let mut env = BTreeMap::new();
        for var in &self.manifest.variables {
            let value = values.get(&var.name).ok_or_else(|| TemplateError::Missing(var.name.clone()))?;
            let bad = |why: &str| TemplateError::BadValue { name: var.name.clone(), why: why.to_owned() };
            if value.len() > MAX_VALUE_BYTES {
                return Err(bad("longer than 4096 bytes"));
            }
            if value.chars().any(char::is_control) {
                return Err(bad("contains control characters"));
            }
            match var.kind {
                VarType::String => {}
                VarType::Integer if value.parse::<i64>().is_ok() => {}
                VarType::Integer => return Err(bad("must be an integer")),
                VarType::Boolean if matches!(value.as_str(), "true" | "false") => {}
                VarType::Boolean => return Err(bad("must be true or false")),
            }
            if let Some(re) = self.patterns.get(&var.name)
                && !re.is_match(value)
            {
                return Err(bad("does not match the template's pattern"));
            }
            env.insert(format!("AIRLOCK_VAR_{}", var.name.to_ascii_uppercase()), value.clone());
        }
        Ok(RenderedCommand {
            template: self.manifest.name.clone(),
            template_sha256: self.content_sha256.clone(),
            script: self.script.clone(),
            env,
            run: self.manifest.run,
        })
    }
}

/// Whether `tag` is in the data-tag vocabulary: 1-64 of `a-z`, `0-9`, `:`, `_`, `-`.
pub fn is_data_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 64
        && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b':' | b'_' | b'-'))
}

impl RenderedCommand {
    /// SHA-256 (hex) of the canonical JSON of script and environment: what the customer signs.
    pub fn sha256(&self) -> String {
        // Plain data with sorted maps: serialization cannot fail and is stable.
        data_encoding::HEXLOWER.encode(&Sha256::digest(serde_json::to_vec(self).unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_tags_that_look_alike_in_review_are_refused() {
        for tag in [
            "output:secret\u{200b}", // a zero-width space
            "output:s\u{435}cret",   // a Cyrillic `е`
            "secret:re\u{430}d",     // a Cyrillic `а`
            "Output:Secret",         // one spelling per tag
            "output secret",
            "",
        ] {
            let manifest = MANIFEST.replace("service:restart", tag);
            let err = Template::new(&manifest, SCRIPT).unwrap_err().to_string();
            assert!(err.contains("data tag"), "{tag:?}: {err}");
        }
        for tag in ["output:secret", "customer-db:read", "host_read"] {
            assert!(Template::new(&MANIFEST.replace("service:restart", tag), SCRIPT).is_ok(), "{tag}");
        }
    }

    const MANIFEST: &str = r#"
name = "restart-service"
description = "Restart one service"
phase = "operate"
data_tags = ["service:restart"]
body = "restart.sh"

[[variables]]
name = "service"
pattern = "[a-z][a-z0-9-]{0,40}"

[[variables]]
name = "grace_seconds"
type = "integer"
"#;
    const SCRIPT: &str = "#!/bin/sh\nsystemctl restart \"$AIRLOCK_VAR_SERVICE\"\n";

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn renders_values_as_environment_never_into_the_script() {
        let t = Template::new(MANIFEST, SCRIPT).unwrap();
        let r = t.render(&values(&[("service", "api"), ("grace_seconds", "30")])).unwrap();
        assert_eq!(r.script, SCRIPT);
        assert_eq!(r.env["AIRLOCK_VAR_SERVICE"], "api");
        assert_eq!(r.env["AIRLOCK_VAR_GRACE_SECONDS"], "30");
        assert_eq!(r.template_sha256, t.content_sha256());
        assert_eq!(r.sha256().len(), 64);
    }

    #[test]
    fn values_outside_their_constraints_are_refused() {
        let t = Template::new(MANIFEST, SCRIPT).unwrap();
        for (pairs, expect) in [
            (vec![("service", "api; rm -rf /"), ("grace_seconds", "1")], "does not match"),
            (vec![("service", "api\nx"), ("grace_seconds", "1")], "control characters"),
            (vec![("service", "api"), ("grace_seconds", "soon")], "must be an integer"),
            (vec![("service", "api")], "required"),
            (vec![("service", "api"), ("grace_seconds", "1"), ("extra", "x")], "no variable `extra`"),
            // The pattern is anchored: a matching prefix is not enough.
            (vec![("service", "api$(id)"), ("grace_seconds", "1")], "does not match"),
        ] {
            let err = t.render(&values(&pairs)).unwrap_err().to_string();
            assert!(err.contains(expect), "{pairs:?}: expected `{expect}` in {err}");
        }
    }

    #[test]
    fn any_edit_changes_the_content_hash_and_the_command_digest() {
        let t = Template::new(MANIFEST, SCRIPT).unwrap();
        let edited = Template::new(MANIFEST, &SCRIPT.replace("restart", "stop")).unwrap();
        let retagged = Template::new(&MANIFEST.replace("service:restart", "customer-db:read"), SCRIPT).unwrap();
        assert_ne!(t.content_sha256(), edited.content_sha256());
        assert_ne!(t.content_sha256(), retagged.content_sha256());
        let v = values(&[("service", "api"), ("grace_seconds", "30")]);
        let other = values(&[("service", "web"), ("grace_seconds", "30")]);
        assert_ne!(t.render(&v).unwrap().sha256(), t.render(&other).unwrap().sha256());
        assert_eq!(t.render(&v).unwrap().sha256(), t.render(&v).unwrap().sha256());
    }

    /// A manifest with `count` variables, each with `pattern`.
    fn with_variables(count: usize, pattern: &str) -> String {
        let mut m = MANIFEST[..MANIFEST.find("[[variables]]").unwrap()].to_owned();
        for i in 0..count {
            m.push_str(&format!("[[variables]]\nname = \"v{i}\"\npattern = '{pattern}'\n"));
        }
        m
    }

    #[test]
    fn a_template_at_every_cap_loads_and_one_past_any_cap_is_refused_as_a_limit() {
        let at_cap = with_variables(MAX_VARIABLES, &"[a-z0-9]".repeat(crate::pattern::MAX_PATTERN_BYTES / 8));
        let script = format!("#!/bin/sh\n{}", "#".repeat(MAX_SCRIPT_BYTES - 10));
        let t = Template::new(&at_cap, &script).unwrap();
        assert_eq!(t.manifest().variables.len(), MAX_VARIABLES);

        let limit = |manifest: &str, script: &str| match Template::new(manifest, script) {
            Err(TemplateError::Limit(l)) => l,
            other => panic!("expected a limit, got {other:?}"),
        };
        assert_eq!(
            limit(&with_variables(MAX_VARIABLES + 1, "[a-z]+"), SCRIPT),
            TemplateLimit::Variables { count: MAX_VARIABLES + 1 }
        );
        assert!(matches!(limit(&at_cap, &format!("{script}##")), TemplateLimit::ScriptBytes { .. }));
        let padded = format!("{MANIFEST}\n{}", "#".repeat(MAX_MANIFEST_BYTES));
        assert!(matches!(limit(&padded, SCRIPT), TemplateLimit::ManifestBytes { .. }));
        let long = with_variables(1, &"a".repeat(crate::pattern::MAX_PATTERN_BYTES + 1));
        assert!(matches!(limit(&long, SCRIPT), TemplateLimit::Pattern { .. }));
        let tags: Vec<String> = (0..=MAX_DATA_TAGS).map(|i| format!("\"t{i}\"")).collect();
        let tagged = MANIFEST.replace("\"service:restart\"", &tags.join(","));
        assert!(matches!(limit(&tagged, SCRIPT), TemplateLimit::DataTags { .. }));
    }

    #[test]
    fn the_pathological_template_from_the_issue_is_refused_by_the_limits() {
        // 200 variables of `\w{100}`: 10.4 s and 1.17 GB with the regex crate's defaults. How
        // fast the refusal is, is timed where a clock may be read (`template_limits.rs`).
        let err = Template::new(&with_variables(200, r"\w{100}"), SCRIPT).unwrap_err();
        assert!(matches!(err, TemplateError::Limit(TemplateLimit::Variables { count: 200 })), "{err}");
        // Within the count, the first such pattern is refused for its compiled size.
        let err = Template::new(&with_variables(MAX_VARIABLES, r"\w{100}"), SCRIPT).unwrap_err();
        assert!(matches!(err, TemplateError::Limit(TemplateLimit::Pattern { .. })), "{err}");
    }

    #[test]
    fn malformed_templates_are_refused_with_a_reason() {
        for (manifest, script, expect) in [
            (MANIFEST.replace("restart-service", "Restart Service"), SCRIPT, "name"),
            (MANIFEST.replace("grace_seconds", "service"), SCRIPT, "declared twice"),
            (MANIFEST.replace("[a-z][a-z0-9-]{0,40}", "[a-z"), SCRIPT, "pattern"),
            (MANIFEST.replace("phase = \"operate\"", "phase = \"root\""), SCRIPT, "unknown variant"),
            (MANIFEST.replace("body = ", "shell = true\nbody = "), SCRIPT, "unknown field"),
            (MANIFEST.to_owned(), "  \n", "empty"),
            (MANIFEST.replace("restart-service", "status"), SCRIPT, "reserved"),
            // A pattern that closes its own anchoring would accept any value.
            (MANIFEST.replace("[a-z][a-z0-9-]{0,40}", "[a-z]+)|(.*"), SCRIPT, "not a regular expression on its own"),
            // Bytes that hide in a terminal: a carriage return and an erase-line sequence.
            (MANIFEST.to_owned(), "echo harmless\r\u{1b}[2Krm -rf /\n", "control character"),
            (MANIFEST.replace("Restart one service", "Restart\\u001b[2K"), SCRIPT, "control character"),
        ] {
            let err = Template::new(&manifest, script).unwrap_err().to_string();
            assert!(err.contains(expect), "expected `{expect}` in {err}");
        }
    }
}
