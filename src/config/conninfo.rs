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

/// What `store.url` asks of TLS, in libpq's terms (`sslmode`, `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// `sslrootcert`: the CA certificates a server's certificate is checked against.
    pub root: Option<Root>,
    /// `sslcert` and `sslkey`: the certificate (chain) and key provisiond shows when
    /// the server asks for one.
    pub client: Option<ClientCert>,
}

/// A client certificate: two PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// libpq's `sslmode`, all five of them: tokio-postgres itself reads only the first
/// three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, else without (libpq's default); the certificate
    /// is not checked, unless `sslrootcert` is given.
    Prefer,
    /// TLS or no connection; the certificate is not checked, unless `sslrootcert` is
    /// given.
    Require,
    /// TLS, the certificate signed by a trusted CA; its name is not checked.
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and naming the host connected to.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// `sslrootcert=system`: the system's (as for `https://` handlers).
    System,
    /// A PEM file of one or more CA certificates.
    File(std::path::PathBuf),
}

/// The CA certificates of an `sslrootcert` PEM file; what is wrong with it, when
/// something is (read at `check` and again when the store connects).
pub fn read_root_certificates(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certificates = read_certificates(path).map_err(|e| format!("sslrootcert: {e}"))?;
    for (n, certificate) in certificates.into_iter().enumerate() {
        roots.add(certificate).map_err(|e| {
            let reason = match e {
                rustls::Error::InvalidCertificate(why) => format!("{why:?}"),
                other => other.to_string(),
            };
            format!(
                "sslrootcert: certificate {} of {} cannot be used as a CA ({reason})",
                n + 1,
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The certificates of a PEM file, as they are (the `sslrootcert` file's, which a
/// server showing one of them is trusted with).
pub fn read_pem_certificates(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    read_certificates(path).map_err(|e| format!("sslrootcert: {e}"))
}

/// The certificates of a PEM file.
fn read_certificates(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM file of certificates: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// Takes `sslmode` and `sslrootcert` out of a connection string, for provisiond's own
/// TLS set-up, and returns the string tokio-postgres is given: `sslmode` `verify-ca`
/// and `verify-full` become `require` (TLS or nothing; the checks are made by the
/// verifier), `sslrootcert` is left out, and everything else stays as written. An
/// `sslmode` that is not one of libpq's five, or an `sslrootcert` of `system` with a
/// mode weaker than `verify-full` (libpq refuses it too), is an error.
pub(super) fn split_tls(conninfo: &str) -> Result<(String, PgTls), String> {
    let mut mode = None;
    let mut root = None;
    let (mut client_cert, mut client_key) = (None, None);
    let mut take = |key: &str, value: &str| -> Result<Option<String>, String> {
        match key {
            "sslmode" => {
                let read = match value {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    "allow" => {
                        return Err("sslmode=allow is not supported (TLS only when the server \
                                    insists on it): use prefer, or disable"
                            .into());
                    }
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, prefer, require, \
                             verify-ca, verify-full"
                        ));
                    }
                };
                mode = Some(read);
                Ok(Some(
                    match read {
                        SslMode::VerifyCa | SslMode::VerifyFull => "require",
                        other => other.as_str(),
                    }
                    .to_owned(),
                ))
            }
            "sslrootcert" => {
                // Empty is unset, as in libpq.
                root = match value {
                    "" => None,
                    "system" => Some(Root::System),
                    path => Some(Root::File(path.into())),
                };
                Ok(None)
            }
            // Empty is unset, as in libpq.
            "sslcert" => {
                client_cert = (!value.is_empty()).then(|| std::path::PathBuf::from(value));
                Ok(None)
            }
            "sslkey" => {
                client_key = (!value.is_empty()).then(|| std::path::PathBuf::from(value));
                Ok(None)
            }
            "sslpassword" => Err(
                "sslpassword is not supported: give sslkey a key that is not \
                                  encrypted"
                    .into(),
            ),
            _ => Ok(Some(value.to_owned())),
        }
    };
    let mut kept = None;
    for scheme in ["postgresql://", "postgres://"] {
        if conninfo.starts_with(scheme) {
            kept = Some(split_url(conninfo, &mut take)?);
        }
    }
    let kept = match kept {
        Some(kept) => kept,
        None => match split_key_values(conninfo, &mut take)? {
            Some(kept) => kept,
            // Not read, and with keys only provisiond reads: tokio-postgres would name
            // one of those (`sslmode`) instead of the problem.
            None if ["sslmode=verify", "sslrootcert", "sslcert", "sslkey"]
                .iter()
                .any(|key| conninfo.contains(key)) =>
            {
                return Err(
                    "not a key=value string libpq could read: a value with a space \
                            must be in single quotes (key='a value')"
                        .into(),
                );
            }
            // What does not read is left whole, for tokio-postgres to say what is wrong.
            None => conninfo.to_owned(),
        },
    };
    let mode = mode.unwrap_or(SslMode::Prefer);
    if root == Some(Root::System) && mode != SslMode::VerifyFull {
        return Err(format!(
            "sslrootcert=system needs sslmode=verify-full, not {}: a certificate any \
             public CA signed is only worth trusting for the name it was issued for",
            mode.as_str()
        ));
    }
    let client = match (client_cert, client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
        (Some(_), None) => return Err("sslcert needs sslkey, the certificate's key".into()),
        (None, Some(_)) => return Err("sslkey needs sslcert, the key's certificate".into()),
    };
    if mode == SslMode::Disable && (client.is_some() || root.is_some()) {
        return Err(
            "sslmode=disable with sslrootcert, sslcert or sslkey: without TLS they would \
             not be used"
                .into(),
        );
    }
    Ok((kept, PgTls { mode, root, client }))
}

/// What makes a connection string's TLS impossible, libpq's way: TLS needs a TCP host
/// (PostgreSQL has no TLS on a unix socket), and `verify-full` a host name to check the
/// certificate against (`hostaddr` alone gives none).
pub(super) fn tls_unreachable(conninfo: &tokio_postgres::Config, mode: SslMode) -> Option<String> {
    use tokio_postgres::config::Host;
    let hosts = conninfo.get_hosts();
    let must = matches!(
        mode,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
    );
    if must && !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_))) {
        return Some(format!(
            "sslmode={}: PostgreSQL has no TLS on a unix socket; use a TCP host, or \
             sslmode=prefer or disable",
            mode.as_str()
        ));
    }
    let unnamed = hosts.is_empty()
        || hosts
            .iter()
            .any(|h| matches!(h, Host::Tcp(name) if name.is_empty()));
    if must && unnamed {
        return Some(format!(
            "sslmode={}: TLS needs a host name to check the server's certificate against; \
             give host (hostaddr alone names no host)",
            mode.as_str()
        ));
    }
    None
}

/// The certificate chain of `sslcert` with the key of `sslkey`, ready to show a server;
/// what is wrong with them, when something is (read at `check` and when the store
/// connects). The key must be the certificate's. The certificate itself is left to the
/// server to judge, as libpq leaves it (an X.509 v1 certificate, which webpki would
/// refuse to read, is what `openssl x509 -req` makes by default).
pub fn read_client_certificate(
    client: &ClientCert,
) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject as _;
    use x509_cert::der::{Decode as _, Encode as _};
    let (cert, key) = (client.cert.display(), client.key.display());
    let chain = read_certificates(&client.cert).map_err(|e| format!("sslcert: {e}"))?;
    let bytes =
        std::fs::read(&client.key).map_err(|e| format!("sslkey: cannot read {key}: {e}"))?;
    let der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!("sslkey: {key} holds no usable private key (PEM, not encrypted): {e}")
    })?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("sslkey: {key}: the key cannot be used ({e})"))?;
    let spki = x509_cert::Certificate::from_der(chain[0].as_ref())
        .ok()
        .and_then(|c| c.tbs_certificate.subject_public_key_info.to_der().ok())
        .ok_or_else(|| format!("sslcert: certificate 1 of {cert} cannot be read"))?;
    if signing
        .public_key()
        .is_some_and(|public| public.as_ref() != spki.as_slice())
    {
        return Err(format!(
            "sslkey: {key} is not the key of the certificate in {cert}"
        ));
    }
    Ok(std::sync::Arc::new(rustls::sign::CertifiedKey::new(
        chain, signing,
    )))
}

/// A URL's query, with each parameter passed through `take` (its key and value
/// percent-decoded); those it answers `None` for are left out.
fn split_url(
    url: &str,
    take: &mut impl FnMut(&str, &str) -> Result<Option<String>, String>,
) -> Result<String, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(url.to_owned());
    };
    let mut kept = Vec::new();
    for part in query.split('&') {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        match take(&percent_decoded(key), &percent_decoded(value))? {
            Some(new) if new == percent_decoded(value) => kept.push(part.to_owned()),
            Some(new) => kept.push(format!("{key}={new}")),
            None => {}
        }
    }
    if kept.is_empty() {
        return Ok(base.to_owned());
    }
    Ok(format!("{base}?{}", kept.join("&")))
}

/// A key=value string with each pair passed through `take` (the value unquoted); those
/// it answers `None` for are left out. `Ok(None)` when it does not read.
fn split_key_values(
    text: &str,
    take: &mut impl FnMut(&str, &str) -> Result<Option<String>, String>,
) -> Result<Option<String>, String> {
    let mut kept = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let Some(key_end) = rest.find(|c: char| c == '=' || c.is_whitespace()) else {
            return Ok(None);
        };
        let key = &rest[..key_end];
        let Some(after_eq) = rest[key_end..].trim_start().strip_prefix('=') else {
            return Ok(None);
        };
        let value_start = after_eq.trim_start();
        let Some(len) = value_length(value_start) else {
            return Ok(None);
        };
        let written = &value_start[..len];
        let value = unquoted(written);
        match take(key, &value)? {
            Some(new) if new == value => kept.push(format!("{key}={written}")),
            Some(new) => kept.push(format!("{key}={new}")),
            None => {}
        }
        rest = value_start[len..].trim_start();
    }
    Ok(Some(kept.join(" ")))
}

/// A key=value string's value as libpq reads it: quotes taken off, `\` escapes undone.
fn unquoted(written: &str) -> String {
    let inner = written
        .strip_prefix('\'')
        .and_then(|w| w.strip_suffix('\''))
        .unwrap_or(written);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{PgTls, Root, SslMode, masked, split_tls};

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

    #[test]
    fn tls_settings_are_taken_out_of_both_forms_and_the_rest_kept_as_written() {
        let file = |path: &str| Some(Root::File(path.into()));
        for (written, kept, mode, root) in [
            (
                "postgres://app:p%40ss@db1,db2/billing?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&target_session_attrs=read-write",
                "postgres://app:p%40ss@db1,db2/billing?sslmode=require&target_session_attrs=read-write",
                SslMode::VerifyFull,
                file("/etc/ca.pem"),
            ),
            (
                "postgres://db/billing?sslrootcert=/etc/ca.pem",
                "postgres://db/billing",
                SslMode::Prefer,
                file("/etc/ca.pem"),
            ),
            (
                "postgres://db/billing",
                "postgres://db/billing",
                SslMode::Prefer,
                None,
            ),
            (
                "host=db user=app password='a b\\'c' sslmode=verify-ca sslrootcert='/etc/my ca.pem'",
                "host=db user=app password='a b\\'c' sslmode=require",
                SslMode::VerifyCa,
                file("/etc/my ca.pem"),
            ),
            (
                "host=db sslmode = disable",
                "host=db sslmode=disable",
                SslMode::Disable,
                None,
            ),
            (
                "host=db sslmode=verify-full sslrootcert=system",
                "host=db sslmode=require",
                SslMode::VerifyFull,
                Some(Root::System),
            ),
        ] {
            assert_eq!(
                split_tls(written),
                Ok((
                    kept.to_owned(),
                    PgTls {
                        mode,
                        root,
                        client: None
                    }
                )),
                "{written}"
            );
            // What is left is for tokio-postgres, which must read it.
            assert!(kept.parse::<tokio_postgres::Config>().is_ok(), "{kept}");
        }
    }

    #[test]
    fn a_tls_setting_libpq_would_refuse_is_refused_naming_it() {
        assert_eq!(
            split_tls("host=db sslmode=verify"),
            Err(
                "sslmode=verify is not one of disable, prefer, require, verify-ca, \
                 verify-full"
                    .to_owned()
            )
        );
        let weak = split_tls("postgres://db/b?sslmode=require&sslrootcert=system").unwrap_err();
        assert!(
            weak.starts_with("sslrootcert=system needs sslmode=verify-full, not require"),
            "{weak}"
        );
        assert!(split_tls("host=db sslrootcert=system").is_err());
    }
}
