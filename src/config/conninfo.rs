//! `store.url` safe to show: a PostgreSQL connection string with its password masked.
//!
//! Both forms libpq and tokio-postgres accept: a URL
//! (`postgres://app:PASSWORD@db1,db2/billing?target_session_attrs=read-write`) and a
//! key=value string (`host=db1 user=app password=PASSWORD`). Everything else stays as
//! written, so an operator can still see which database a sidecar uses.

/// The keys whose values are secrets, in a key=value string or a URL's query.
const SECRET_KEYS: &[&str] = &["password", "sslpassword"];

/// `conninfo` with every password replaced by `***`. When a key=value string cannot be
/// read, all of it is `***`: what cannot be parsed cannot be shown safely.
pub(super) fn masked(conninfo: &str) -> String {
    for scheme in ["postgresql://", "postgres://"] {
        if conninfo.starts_with(scheme) {
            return masked_url(conninfo, scheme.len());
        }
    }
    masked_key_values(conninfo).unwrap_or_else(|| "***".to_owned())
}

/// A URL: the password of `user:password@` and the `password=` query parameters.
///
/// Parsers disagree on where the credentials end when a password holds a raw `@`:
/// tokio-postgres takes the first `@`, a URL parser the last one before `/`, `?` or
/// `#`. The mask runs to whichever is further, so neither reading leaks a part. Every
/// `key=value` after a `?` or `&` is then looked at, wherever the `@` left the query.
fn masked_url(url: &str, scheme_len: usize) -> String {
    let (head, rest) = url.split_at(scheme_len);
    let mut credentials_masked = String::with_capacity(rest.len());
    let mut after = rest;
    if let Some(first_at) = rest.find('@') {
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let last_at = rest[..authority_end]
            .rfind('@')
            .map_or(first_at, |at| at.max(first_at));
        if let Some(colon) = rest[..first_at].find(':')
            && colon + 1 < last_at
        {
            credentials_masked.push_str(&rest[..=colon]);
            credentials_masked.push_str("***");
            after = &rest[last_at..];
        }
    }
    credentials_masked.push_str(after);
    let mut out = head.to_owned();
    // Where the current part starts in `credentials_masked`.
    let mut at = 0;
    for (i, part) in credentials_masked.split(['?', '&']).enumerate() {
        if i > 0 {
            // The delimiter this part follows, as written.
            out.push_str(&credentials_masked[at - 1..at]);
        }
        at += part.len() + 1;
        match part.split_once('=') {
            Some((key, _)) if i > 0 && is_secret(&percent_decoded(key)) => {
                out.push_str(key);
                out.push_str("=***");
            }
            _ => out.push_str(part),
        }
    }
    out
}

/// A key=value string, read as libpq reads it: `key = value` pairs separated by
/// whitespace, a value either bare or in single quotes with `\` escapes. `None` when it
/// does not read.
fn masked_key_values(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        rest = trimmed;
        if rest.is_empty() {
            return Some(out);
        }
        let key_end = rest.find(|c: char| c == '=' || c.is_whitespace())?;
        let key = &rest[..key_end];
        let after_key = rest[key_end..].trim_start();
        let after_eq = after_key.strip_prefix('=')?;
        let value_start = after_eq.trim_start();
        let value_len = value_length(value_start)?;
        let written_up_to_value = rest.len() - value_start.len();
        out.push_str(&rest[..written_up_to_value]);
        if is_secret(key) {
            out.push_str("***");
        } else {
            out.push_str(&value_start[..value_len]);
        }
        rest = &value_start[value_len..];
    }
}

/// The length in bytes of the value that `text` starts with, quotes included.
fn value_length(text: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    if text.starts_with('\'') {
        chars.next();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '\'' => return Some(i + 1),
                _ => {}
            }
        }
        return None; // unterminated quote
    }
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            c if c.is_whitespace() => return Some(i),
            _ => {}
        }
    }
    Some(text.len())
}

fn is_secret(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// `%XX` decoded, for comparing a query key; anything not valid stays as it is.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::masked;

    #[test]
    fn a_urls_password_is_masked_and_nothing_else() {
        for (written, shown) in [
            (
                "postgres://app:s3cret@db1,db2/billing?target_session_attrs=read-write",
                "postgres://app:***@db1,db2/billing?target_session_attrs=read-write",
            ),
            (
                "postgresql://app:p%40ss%3Aw0rd@db1:5432,db2:5433/billing",
                "postgresql://app:***@db1:5432,db2:5433/billing",
            ),
            // A raw `@` or `/` in the password: masked whichever way it is read.
            (
                "postgres://app:p@ss@db/billing",
                "postgres://app:***@db/billing",
            ),
            (
                "postgres://app:pa/ss@db/billing",
                "postgres://app:***@db/billing",
            ),
            (
                "postgres://app:pa?ss@db/billing",
                "postgres://app:***@db/billing",
            ),
            (
                "postgres://app@db/billing?password=s3cret&sslmode=require",
                "postgres://app@db/billing?password=***&sslmode=require",
            ),
            (
                "postgres://db/billing?user=app&pass%77ord=s3cret&sslpassword=k3y",
                "postgres://db/billing?user=app&pass%77ord=***&sslpassword=***",
            ),
            // No password: shown as it is.
            (
                "postgres://app@db1,db2/billing?target_session_attrs=read-write",
                "postgres://app@db1,db2/billing?target_session_attrs=read-write",
            ),
            (
                "postgres://[::1]:5432/billing",
                "postgres://[::1]:5432/billing",
            ),
            ("postgres://app:@db/billing", "postgres://app:@db/billing"),
            (
                "postgres:///billing?host=/run/pg",
                "postgres:///billing?host=/run/pg",
            ),
            // An `@` in the query is no end of credentials that hides the query.
            (
                "postgres://db/billing?application_name=a@b&password=s3cret",
                "postgres://db/billing?application_name=a@b&password=***",
            ),
            (
                "postgres://db/billing?password=s3cret&application_name=a@b",
                "postgres://db/billing?password=***&application_name=a@b",
            ),
        ] {
            assert_eq!(masked(written), shown, "{written}");
        }
    }

    #[test]
    fn a_key_value_strings_password_is_masked_and_nothing_else() {
        for (written, shown) in [
            (
                "host=db1,db2 dbname=billing user=app password=s3cret",
                "host=db1,db2 dbname=billing user=app password=***",
            ),
            (
                "password = 'p@ss w:rd \\' x' host=db",
                "password = *** host=db",
            ),
            (
                "host=db password=p\\ ss user=app",
                "host=db password=*** user=app",
            ),
            (
                "host=db sslpassword=k3y PASSWORD=s3cret",
                "host=db sslpassword=*** PASSWORD=***",
            ),
            (
                "host=db dbname='my db' user=app",
                "host=db dbname='my db' user=app",
            ),
            ("", ""),
        ] {
            assert_eq!(masked(written), shown, "{written}");
        }
    }

    #[test]
    fn what_does_not_read_is_not_shown() {
        for written in ["host=db password='s3cret", "host=db s3cret", "s3cret"] {
            assert_eq!(masked(written), "***", "{written}");
        }
    }
}
