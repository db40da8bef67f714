//! `${env:VAR}` and `${env:VAR:-default}` substitution in configuration values.

use serde_yaml::Value;

use super::Issue;

/// Replaces references in every string of `value`, recording a problem per bad reference.
///
/// A string that is exactly one reference is re-read as YAML, so `k: ${env:K}` with `K=20`
/// yields the number 20, as in the OpenTelemetry Collector.
pub fn substitute(value: &mut Value, path: &str, issues: &mut Vec<Issue>) {
    match value {
        Value::String(s) => {
            if !s.contains("${") {
                return;
            }
            match expand(s) {
                Ok((expanded, whole)) => {
                    *value = if whole {
                        serde_yaml::from_str::<Value>(&expanded)
                            .ok()
                            .filter(|v| !matches!(v, Value::Mapping(_) | Value::Sequence(_)))
                            .unwrap_or(Value::String(expanded))
                    } else {
                        Value::String(expanded)
                    };
                }
                Err(message) => issues.push(Issue::new(path, message)),
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute(item, &format!("{path}[{i}]"), issues);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = key_name(key);
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                substitute(item, &child, issues);
            }
        }
        Value::Tagged(tagged) => substitute(&mut tagged.value, path, issues),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

pub fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// Expands all references in `input`; says whether the input was exactly one reference.
fn expand(input: &str) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    let mut references = 0;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated reference in {input:?}: missing '}}'"))?;
        let reference = &after[..end];
        let spec = reference.strip_prefix("env:").ok_or_else(|| {
            format!("unsupported reference ${{{reference}}}: only ${{env:VAR}} and ${{env:VAR:-default}} are supported")
        })?;
        let (name, default) = match spec.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (spec, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        match (std::env::var(name), default) {
            (Ok(value), _) => out.push_str(&value),
            (Err(_), Some(default)) => out.push_str(default),
            (Err(_), None) => {
                return Err(format!(
                    "environment variable {name} is not set (use ${{env:{name}:-default}} for a default)"
                ))
            }
        }
        references += 1;
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    let whole = references == 1 && input.starts_with("${") && input.ends_with('}');
    Ok((out, whole))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(yaml: &str) -> (Value, Vec<Issue>) {
        let mut value: Value = serde_yaml::from_str(yaml).unwrap();
        let mut issues = Vec::new();
        substitute(&mut value, "", &mut issues);
        (value, issues)
    }

    #[test]
    fn substitutes_set_variables_and_defaults() {
        std::env::set_var("PHOENIX_TEST_KEY", "secret");
        let (v, issues) =
            run("a: { h: 'Bearer ${env:PHOENIX_TEST_KEY}', d: '${env:PHOENIX_UNSET_X:-7}' }");
        assert!(issues.is_empty());
        assert_eq!(v["a"]["h"], Value::String("Bearer secret".into()));
        assert_eq!(v["a"]["d"], serde_yaml::from_str::<Value>("7").unwrap());
    }

    #[test]
    fn unset_variable_names_the_path() {
        let (_, issues) = run("exporters: { otlp: { headers: { k: '${env:PHOENIX_UNSET_Y}' } } }");
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].path, "exporters.otlp.headers.k");
        assert!(issues[0].message.contains("PHOENIX_UNSET_Y is not set"));
    }

    #[test]
    fn unterminated_and_foreign_references_are_errors() {
        let (_, issues) = run("a: '${env:X'\nb: '${file:/etc/passwd}'");
        assert_eq!(issues.len(), 2);
    }
}
