//! TLS for `https://` handlers: the platform's roots, read at the first handshake.
//!
//! reqwest's own rustls set-up reads every CA certificate of the system when the client
//! is built (on Debian, the bundle and then each of the ~150 files of `/etc/ssl/certs`):
//! a few milliseconds at start and about 0.4 MiB kept for the life of the process, paid
//! even when every handler is `http://` on loopback, as a sidecar's usually are. Here the
//! verifier is built the first time a server's certificate has to be checked, and kept.
//! Certificate checks are the platform verifier's (`rustls-platform-verifier`, as
//! reqwest uses), so `SSL_CERT_FILE` and `SSL_CERT_DIR` work as they do there.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, SignatureScheme};

/// The client config every `https://` handler call uses.
pub(crate) fn config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LazyRoots {
            provider,
            verifier: OnceLock::new(),
        }))
        .with_no_client_auth()
}

/// The platform verifier, built when first needed. The signature checks need only the
/// crypto provider, so a handshake reads the roots once, for the server's certificate.
#[derive(Debug)]
struct LazyRoots {
    provider: Arc<CryptoProvider>,
    verifier: OnceLock<Result<rustls_platform_verifier::Verifier, Error>>,
}

impl ServerCertVerifier for LazyRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // No roots at all (an empty `SSL_CERT_FILE`, a bare container) fails every
        // https call with that reason, and is tried again on the next process only.
        let verifier = self
            .verifier
            .get_or_init(|| rustls_platform_verifier::Verifier::new(self.provider.clone()))
            .as_ref()
            .map_err(Clone::clone)?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
