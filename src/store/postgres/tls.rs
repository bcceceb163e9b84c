//! TLS to PostgreSQL, with libpq's meaning of `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey`.
//!
//! tokio-postgres decides whether TLS is asked for, and whether a server without it is
//! refused (`disable`, `prefer`, `require`; the `verify-*` modes reach it as
//! `require`, see [`crate::config::PgTls`]). The verifier built here decides what the
//! server's certificate must be, as libpq does:
//!
//! | `sslmode` | without `sslrootcert` | with a file |
//! | --- | --- | --- |
//! | `prefer`, `require` | not checked (the link is encrypted, the server not authenticated) | signed by one of its CAs |
//! | `verify-ca` | signed by a CA the system trusts | signed by one of its CAs |
//! | `verify-full` | signed by a CA the system trusts, for the host connected to | signed by one of its CAs, for the host |
//!
//! Certificates are checked by webpki, as rustls does, with two of OpenSSL's habits
//! that PostgreSQL set-ups rely on: a certificate that is itself in the `sslrootcert`
//! file is trusted as it is (a self-signed server certificate made with `openssl req
//! -x509` is a CA certificate, which webpki refuses as a server's), and a certificate
//! with no subjectAltName is taken for the host its common name (CN) names.
//!
//! libpq reads `~/.postgresql/root.crt` when `sslrootcert` is not given; a sidecar has
//! no such home, so the system's roots are used (`SSL_CERT_FILE`, `SSL_CERT_DIR`, as
//! for `https://` handlers). Files are read when the store opens: a CA file rotated
//! while a sidecar runs takes a restart.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::warn;

use crate::config::{PgTls, Root, SslMode, read_client_certificate, read_root_certificates};

/// The TLS connector for a store's connections.
pub(super) fn connector(tls: &PgTls) -> Result<Connector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (&tls.root, tls.mode) {
        (_, SslMode::Disable) | (None, SslMode::Prefer | SslMode::Require) => {
            Arc::new(Unchecked(provider.clone()))
        }
        (Some(Root::File(path)), mode) => {
            let roots = read_root_certificates(path)?;
            let pinned = crate::config::read_pem_certificates(path)?;
            Arc::new(Libpq::new(roots, pinned, mode, &provider)?)
        }
        (Some(Root::System) | None, mode) => {
            Arc::new(Libpq::new(system_roots()?, Vec::new(), mode, &provider)?)
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some(client) => builder
            .with_client_cert_resolver(Arc::new(ClientCert(read_client_certificate(client)?))),
    };
    Ok(Connector(MakeRustlsConnect::new(config)))
}

/// The system's CA certificates (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the system's
/// bundle). Those that cannot be read are said once, here.
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        warn!(error = %error, "a system CA certificate could not be read");
    }
    let mut roots = RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        warn!(
            ignored,
            "system CA certificates that cannot be used were ignored"
        );
    }
    if roots.is_empty() {
        return Err(
            "no system CA certificate to check the database's against: give its \
                    CA as sslrootcert, or set SSL_CERT_FILE"
                .into(),
        );
    }
    Ok(roots)
}

/// The name the connector is given for an empty one: never a real host's (`.invalid`
/// is reserved), and refused by the `verify-full` check.
const NO_HOST: &str = "no-host-name-given.invalid";

/// tokio-postgres-rustls's connector, given [`NO_HOST`] when tokio-postgres has no
/// name: it asks for a connector before it knows whether TLS is needed, with `""` for
/// a unix socket, a bare `hostaddr` or `host=''`, and an empty name would fail the
/// connection there and then, whatever the `sslmode`. (A bare `hostaddr` never gets
/// to a handshake: tokio-postgres refuses TLS without a host name.)
#[derive(Clone)]
pub(super) struct Connector(MakeRustlsConnect);

impl<S> MakeTlsConnect<S> for Connector
where
    MakeRustlsConnect: MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if hostname.is_empty() {
            NO_HOST
        } else {
            hostname
        };
        self.0.make_tls_connect(name)
    }
}

/// `prefer` and `require` without `sslrootcert`: any certificate, as libpq takes it.
/// The handshake's signatures are still checked against the certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate checked against CAs, as libpq checks it (see the module's notes).
#[derive(Debug)]
struct Libpq {
    webpki: Arc<WebPkiServerVerifier>,
    /// The `sslrootcert` file's certificates, trusted as they are when a server shows
    /// one of them.
    pinned: Vec<CertificateDer<'static>>,
    /// `verify-full`: the certificate must name the host.
    names: bool,
}

impl Libpq {
    fn new(
        roots: RootCertStore,
        pinned: Vec<CertificateDer<'static>>,
        mode: SslMode,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            webpki,
            pinned,
            names: mode == SslMode::VerifyFull,
        })
    }
}

impl ServerCertVerifier for Libpq {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.names
            && matches!(server_name, ServerName::DnsName(name) if name.as_ref() == NO_HOST)
        {
            return Err(Error::General(
                "sslmode=verify-full needs a host name to check the certificate against, and \
                 host is empty"
                    .into(),
            ));
        }
        if self
            .pinned
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            let certificate = Parsed::of(end_entity)?;
            certificate.check_validity(now)?;
            if self.names && !certificate.names(end_entity, server_name) {
                return Err(CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: certificate.presented(),
                }
                .into());
            }
            return Ok(ServerCertVerified::assertion());
        }
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // webpki checks the name last, after the chain and the dates: a name error
            // means all else is good.
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if Parsed::of(end_entity).is_ok_and(|c| !c.has_alt_names) => {
                // No subjectAltName: the common name, as libpq reads it.
                let certificate = Parsed::of(end_entity)?;
                if certificate.common_name_is(server_name) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(CertificateError::NotValidForNameContext {
                        expected: server_name.to_owned(),
                        presented: certificate.presented(),
                    }
                    .into())
                }
            }
            Err(Error::InvalidCertificate(CertificateError::Other(other)))
                if format!("{other:?}").contains("CaUsedAsEndEntity") =>
            {
                Err(Error::General(
                    "the server's certificate is a CA certificate (one made with `openssl \
                     req -x509`?): to trust it as it is, give that certificate as \
                     sslrootcert"
                        .into(),
                ))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// What libpq's checks read of a certificate that webpki does not give: its dates, and
/// its common name when it has no subjectAltName.
struct Parsed {
    not_before: u64,
    not_after: u64,
    /// Whether it has a subjectAltName extension (then only those names count).
    has_alt_names: bool,
    common_name: Option<String>,
}

impl Parsed {
    fn of(certificate: &CertificateDer<'_>) -> Result<Self, Error> {
        use x509_cert::der::Decode as _;
        const COMMON_NAME: &str = "2.5.4.3";
        const ALT_NAME: &str = "2.5.29.17";
        let parsed = x509_cert::Certificate::from_der(certificate.as_ref())
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let tbs = &parsed.tbs_certificate;
        // The first common name only, as libpq (OpenSSL's first index) reads it.
        let common_name = tbs
            .subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .find(|attribute| attribute.oid.to_string() == COMMON_NAME)
            .map(|attribute| String::from_utf8_lossy(attribute.value.value()).into_owned());
        let has_alt_names = tbs
            .extensions
            .iter()
            .flatten()
            .any(|extension| extension.extn_id.to_string() == ALT_NAME);
        Ok(Self {
            not_before: tbs.validity.not_before.to_unix_duration().as_secs(),
            not_after: tbs.validity.not_after.to_unix_duration().as_secs(),
            has_alt_names,
            common_name,
        })
    }

    fn check_validity(&self, now: UnixTime) -> Result<(), Error> {
        let at = |secs| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        if now.as_secs() < self.not_before {
            return Err(CertificateError::NotValidYetContext {
                time: now,
                not_before: at(self.not_before),
            }
            .into());
        }
        if now.as_secs() > self.not_after {
            return Err(CertificateError::ExpiredContext {
                time: now,
                not_after: at(self.not_after),
            }
            .into());
        }
        Ok(())
    }

    /// Whether the certificate is for `server_name`: by its subjectAltName, or, when it
    /// has none, by its common name.
    fn names(&self, certificate: &CertificateDer<'_>, server_name: &ServerName<'_>) -> bool {
        let by_alt_names = webpki::EndEntityCert::try_from(certificate)
            .is_ok_and(|c| c.verify_is_valid_for_subject_name(server_name).is_ok());
        by_alt_names || self.common_name_is(server_name)
    }

    /// The names it is for, as an error shows them.
    fn presented(&self) -> Vec<String> {
        if self.has_alt_names {
            return vec!["the names of its subjectAltName".into()];
        }
        self.common_name
            .iter()
            .map(|cn| format!("CN={cn}"))
            .collect()
    }

    /// libpq's fallback: with no subjectAltName, a common name equal to the host
    /// (case aside), or a `*.` wildcard for its first label.
    fn common_name_is(&self, server_name: &ServerName<'_>) -> bool {
        if self.has_alt_names {
            return false;
        }
        let host = match server_name {
            ServerName::DnsName(name) => name.as_ref().to_ascii_lowercase(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            _ => return false,
        };
        self.common_name.iter().any(|cn| {
            let cn = cn.to_ascii_lowercase();
            cn == host
                || cn.strip_prefix("*.").is_some_and(|rest| {
                    host.split_once('.')
                        .is_some_and(|(first, after)| !first.is_empty() && after == rest)
                })
        })
    }
}

/// `sslcert` and `sslkey`: shown to any server that asks.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::Parsed;

    fn fixture(name: &str) -> CertificateDer<'static> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        CertificateDer::from_pem_file(path).unwrap()
    }

    fn name(text: &str) -> ServerName<'static> {
        ServerName::try_from(text.to_owned()).unwrap()
    }

    #[test]
    fn the_common_name_counts_only_without_a_subject_alt_name_and_as_libpq_matches_it() {
        let cn_only = Parsed::of(&fixture("pg-selfsigned-cn-cert.pem")).unwrap();
        assert_eq!(cn_only.common_name.as_deref(), Some("127.0.0.1"));
        assert!(cn_only.common_name_is(&name("127.0.0.1")));
        assert!(!cn_only.common_name_is(&name("localhost")));
        // Its subjectAltName names 127.0.0.1: its common name is not looked at.
        let with_san = Parsed::of(&fixture("localhost-cert.pem")).unwrap();
        assert!(with_san.has_alt_names);
        assert!(!with_san.common_name_is(&name("127.0.0.1")));

        let wildcard = Parsed {
            common_name: Some("*.Example.com".into()),
            ..cn_only
        };
        assert!(wildcard.common_name_is(&name("db1.example.COM")));
        assert!(!wildcard.common_name_is(&name("example.com")));
        assert!(!wildcard.common_name_is(&name("a.db1.example.com")));
    }

    #[test]
    fn a_pinned_certificate_is_held_to_its_dates() {
        let parsed = Parsed::of(&fixture("pg-selfsigned-cn-cert.pem")).unwrap();
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        assert!(parsed.check_validity(at(parsed.not_before + 60)).is_ok());
        let expired = parsed.check_validity(at(parsed.not_after + 1)).unwrap_err();
        assert!(
            expired
                .to_string()
                .starts_with("invalid peer certificate: certificate expired"),
            "{expired}"
        );
        let early = parsed
            .check_validity(at(parsed.not_before - 1))
            .unwrap_err();
        assert!(early.to_string().contains("not valid yet"), "{early}");
    }
}
