//! `${NAME}` and `${NAME:-default}` in the file's values: substitution from the
//! environment, with the written text kept for display (secrets are never shown).

use std::collections::HashMap;

use toml::Spanned;
use toml::de::DeValue;

use super::error::{KeyPath, Seg};
use super::source::Diag;

/// Whether the value at `path` is a secret: `server.token` and `store.url` (kept as
/// [`super::Secret`]), a handler's `secret` (a [`super::SigningKey`]) and its `headers`
/// values (sent as sensitive). A variable such a value names gets no default in the
/// file: the secret would then sit in the file, in Git.
pub(super) fn is_secret(path: &KeyPath) -> bool {
    let keys: Vec<&str> = path
        .0
        .iter()
        .filter_map(|seg| match seg {
            Seg::Key(key) => Some(key.as_str()),
            Seg::Index(_) => None,
        })
        .collect();
    matches!(
        keys.as_slice(),
        ["server", "token"] | ["store", "url"] | ["handler", "secret"] | ["handler", "headers", _]
    )
}

pub(super) fn substitute_value(
    value: &mut Spanned<DeValue<'_>>,
    path: &KeyPath,
    lookup: &dyn Fn(&str) -> Option<String>,
    originals: &mut HashMap<KeyPath, String>,
    diags: &mut Vec<Diag>,
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) => {
            if !s.contains('$') {
                return;
            }
            match expand(s, lookup, is_secret(path)) {
                Ok(expanded) => {
                    if expanded != s.as_ref() {
                        originals.insert(path.clone(), s.to_string());
                        *s = std::borrow::Cow::Owned(expanded);
                    }
                }
                Err(message) => diags.push(Diag {
                    path: path.clone(),
                    span: Some(span),
                    message,
                }),
            }
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &path.index(i), lookup, originals, diags);
            }
        }
        DeValue::Table(table) => {
            for (key, item) in table.iter_mut() {
                let path = path.key(key.get_ref().as_ref());
                substitute_value(item, &path, lookup, originals, diags);
            }
        }
        _ => {}
    }
}

/// Expands `${NAME}` and `${NAME:-default}`; `$${` stands for a literal `${`. A `$` not
/// followed by `{` is kept as it is.
pub fn expand_env(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    expand(text, lookup, false)
}

/// [`expand_env`], for a value that is a `secret` or not: a variable missing from a
/// secret is to be set, never given a default in the file.
fn expand(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    secret: bool,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(literal) = after.strip_prefix("${") {
            out.push_str("${");
            rest = literal;
            continue;
        }
        let Some(inner) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = inner.find('}') else {
            return Err(format!("unclosed `${{` in {text:?}"));
        };
        let expr = &inner[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expr, None),
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "`${{{expr}}}` is not a valid variable reference; write ${{NAME}} or \
                 ${{NAME:-default}}"
            ));
        }
        match (lookup(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) if secret => {
                return Err(format!(
                    "environment variable `{name}` is not set; set it in provisiond's \
                     environment (this is a secret: give it no default in the file)"
                ));
            }
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set (write ${{{name}:-default}} \
                     to give a default)"
                ));
            }
        }
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The names of the variables `text` refers to with `${NAME}` or `${NAME:-default}`, in
/// order, each once; `$${` (a literal `${`) is skipped.
pub(super) fn env_references(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        if let Some(literal) = after.strip_prefix("${") {
            rest = literal;
            continue;
        }
        rest = after;
        let Some(inner) = after.strip_prefix('{') else {
            continue;
        };
        let expr = inner.split('}').next().unwrap_or_default();
        let name = expr.split(":-").next().unwrap_or_default();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables() {
        assert_eq!(expand_env("a ${TOKEN} b", &env).unwrap(), "a s3cret b");
        assert_eq!(expand_env("${NOPE:-x:y}", &env).unwrap(), "x:y");
        assert_eq!(expand_env("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(expand_env("${EMPTY}", &env).unwrap(), "");
        assert_eq!(expand_env("$${TOKEN} $5", &env).unwrap(), "${TOKEN} $5");
        assert!(
            expand_env("${NOPE}", &env)
                .unwrap_err()
                .contains("`NOPE` is not set")
        );
        assert!(expand_env("${1X}", &env).is_err());
        assert!(expand_env("${TOKEN", &env).is_err());
    }

    #[test]
    fn finds_the_variables_a_value_refers_to() {
        assert_eq!(
            env_references("${A}://u:${B:-x}@h/$${C}/${A}/$5"),
            ["A", "B"]
        );
        assert!(env_references("http://h/").is_empty());
    }
}
