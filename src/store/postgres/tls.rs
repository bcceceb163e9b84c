//! TLS to PostgreSQL, with libpq's meaning of `sslmode` and `sslrootcert`.
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
//! (libpq reads `~/.postgresql/root.crt` when `sslrootcert` is not given; a sidecar has
//! no such home, so the system's roots are used, as for `https://` handlers.)

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PgTls, Root, SslMode, read_client_certificate, read_root_certificates};

/// The TLS connector for a store's connections.
pub(super) fn connector(tls: &PgTls) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (&tls.root, tls.mode) {
        (_, SslMode::Disable) | (None, SslMode::Prefer | SslMode::Require) => {
            Arc::new(Unchecked(provider.clone()))
        }
        (Some(Root::File(path)), mode) => {
            let mut roots = RootCertStore::empty();
            for certificate in read_root_certificates(path)? {
                roots.add(certificate).map_err(|e| {
                    format!(
                        "sslrootcert: {}: a certificate is unusable: {e}",
                        path.display()
                    )
                })?;
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert: {}: {e}", path.display()))?;
            any_name_unless_full(verifier, mode)
        }
        (Some(Root::System) | None, mode) => {
            any_name_unless_full(crate::handlers::tls::system_roots(provider.clone()), mode)
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let (chain, key) = read_client_certificate(client)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert and sslkey: {e}"))?
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

fn any_name_unless_full(
    verifier: Arc<dyn ServerCertVerifier>,
    mode: SslMode,
) -> Arc<dyn ServerCertVerifier> {
    if mode == SslMode::VerifyFull {
        verifier
    } else {
        Arc::new(AnyName(verifier))
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

/// `verify-ca`: the chain as `inner` checks it, whatever name the certificate holds.
/// webpki checks the name last, after the chain, so a name error means the chain is
/// good.
#[derive(Debug)]
struct AnyName(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
