//! The gRPC listener's transport: TLS (rustls, through tonic) and message
//! compression and size limits. [`crate::app`] applies both; the decision
//! whether a listener may run without TLS is
//! [`crate::config::listen_security`].
//!
//! Compression: every service (sked.v1, health, reflection v1 and v1alpha)
//! accepts requests compressed with gzip or zstd (`grpc-encoding`) and
//! compresses its responses with the first of those the client lists in
//! `grpc-accept-encoding`; other encodings are `UNIMPLEMENTED` (as gRPC
//! specifies). A request message may be at most
//! [`MAX_DECODED_MESSAGE_BYTES`] once decompressed; one that does not
//! decompress is `INVALID_ARGUMENT` ([`request_decode_status`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Largest request message a service accepts, in bytes, measured **after
/// decompression**: 4 MiB (tonic's default, set explicitly on every service
/// so it is one documented number).
///
/// tonic (0.14) checks this twice: the length prefix of the message on the
/// wire (`OUT_OF_RANGE` when larger), and, for a compressed message, the
/// decompressed output, which it writes into a buffer limited to this size
/// and stops decompressing at the limit (`RESOURCE_EXHAUSTED` "size limit
/// ... exceeded while decompressing message"). So a small gzip or zstd
/// message that inflates to gigabytes costs at most this much memory and the
/// CPU to inflate this much.
pub const MAX_DECODED_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How long a client has to complete the TLS handshake before its
/// connection is dropped (so half-open handshakes do not pile up).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies sked's codec settings to a generated tonic server (a sked.v1
/// service, health or reflection): accepts gzip and zstd requests, compresses
/// responses with the first of those the client lists in
/// `grpc-accept-encoding` (uncompressed when it lists none), and caps
/// decoded requests at [`MAX_DECODED_MESSAGE_BYTES`].
macro_rules! codec {
    ($server:expr) => {
        $server
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Zstd)
            .max_decoding_message_size($crate::transport::MAX_DECODED_MESSAGE_BYTES)
    };
}
pub(crate) use codec;

/// Why TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("{flag} {path}: {source}")]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// rustls refused the certificate, key or client CA (no certificate or
    /// key found in the PEM, a key that does not match the certificate, a
    /// client CA file without a usable certificate, ...).
    #[error("--tls-cert/--tls-key/--tls-client-ca are not usable: {0}")]
    Invalid(String),
}

/// TLS of the gRPC listener: the server's certificate chain and key, and
/// optionally the CA whose certificates clients must present.
///
/// `Debug` does not print the key.
#[derive(Clone)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// PEM CA certificate(s). When set, every client must present a
    /// certificate signed by one of them; the handshake fails otherwise.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl TlsSettings {
    /// Reads the PEM files of `--tls-cert`, `--tls-key` and
    /// `--tls-client-ca`, and checks rustls accepts them.
    ///
    /// # Errors
    /// [`TlsError::Read`] naming the flag and file; [`TlsError::Invalid`]
    /// when rustls refuses their content.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsSettings, TlsError> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                flag,
                path: path.to_path_buf(),
                source,
            })
        };
        let settings = TlsSettings {
            cert_pem: read("--tls-cert", cert)?,
            key_pem: read("--tls-key", key)?,
            client_ca_pem: client_ca.map(|p| read("--tls-client-ca", p)).transpose()?,
        };
        settings.server_config()?;
        Ok(settings)
    }

    /// The tonic server configuration, checked by building the rustls
    /// acceptor once (tonic only parses the PEM when the server is built).
    ///
    /// # Errors
    /// [`TlsError::Invalid`] with rustls' reason.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| TlsError::Invalid(error_chain(&e)))?;
        Ok(config)
    }
}

/// `e: source: source ...` (tonic's transport error says only "transport
/// error"; the reason is in its sources).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `grpc-message` prefixes (percent-encoded, as tonic sends them) of the
/// errors tonic's decoder raises as `INTERNAL` for a request it cannot
/// read: a compressed message that does not decompress, a bad
/// compressed-flag byte (or the flag without a `grpc-encoding`), and a
/// frame cut short. Bad input from the client, so [`request_decode_status`]
/// answers them `INVALID_ARGUMENT`.
const REQUEST_DECODE_ERRORS: [&[u8]; 5] = [
    // A request body with no message frame at all.
    b"Missing%20request%20message",
    // prost's own decode failure, from services without our codec (health).
    b"failed%20to%20decode%20Protobuf%20message",
    b"Error%20decompressing",
    b"protocol%20error:%20received%20message%20with",
    b"Unexpected%20EOF%20decoding%20stream",
];

/// Turns tonic's `INTERNAL` for an undecodable request message (a compressed
/// message that does not decompress, a bad compressed-flag byte or the flag
/// without `grpc-encoding`, a frame cut short) into `INVALID_ARGUMENT`,
/// keeping tonic's short message, which says what was wrong (e.g. "Error
/// decompressing: corrupt deflate stream, while sending request").
///
/// tonic decodes the request of a unary or server-streaming call before the
/// handler runs and answers a failure as a trailers-only response (status
/// in the headers), which is what this rewrites; every sked.v1 and health
/// method is of that kind. sked makes no outgoing gRPC calls, so such a
/// status can only come from decoding the caller's request. Used as a
/// `tower::util::MapResponseLayer` around all services (in [`crate::app`]).
pub fn request_decode_status<B>(
    response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<CappedBody<B>> {
    let mut response = response.map(|inner| CappedBody { inner });
    let headers = response.headers_mut();
    let internal = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"13");
    let from_decoder = headers.get("grpc-message").is_some_and(|m| {
        REQUEST_DECODE_ERRORS
            .iter()
            .any(|p| m.as_bytes().starts_with(p))
    });
    if internal && from_decoder {
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("3"),
        );
    }
    cap_status_headers(headers);
    response
}

/// A response body whose trailers (the status of a streaming call) get the
/// same caps as a unary call's headers (`cap_status_headers`).
#[derive(Debug)]
pub struct CappedBody<B> {
    inner: B,
}

impl<B> http_body::Body for CappedBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        polled.map(|frame| {
            frame.map(|frame| {
                frame.map(|mut f| {
                    if let Some(trailers) = f.trailers_mut() {
                        cap_status_headers(trailers);
                    }
                    f
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Longest `grpc-message` header sent, in (percent-encoded) bytes.
pub const MAX_GRPC_MESSAGE: usize = 1024;
/// Largest `grpc-status-details-bin` header sent; a larger one is dropped.
pub const MAX_GRPC_DETAILS: usize = 4096;

/// The last line of defence for error sizes (handlers already keep their
/// messages short): a status message over [`MAX_GRPC_MESSAGE`] is cut and
/// details over [`MAX_GRPC_DETAILS`] are dropped, so a client's metadata
/// limit never hides the real status behind a transport error.
fn cap_status_headers(headers: &mut tonic::codegen::http::HeaderMap) {
    if let Some(m) = headers.get("grpc-message")
        && m.len() > MAX_GRPC_MESSAGE
    {
        let bytes = m.as_bytes();
        // Never cut inside a %XX escape.
        let mut end = MAX_GRPC_MESSAGE;
        for back in 1..=2 {
            if bytes[end - back] == b'%' {
                end -= back;
                break;
            }
        }
        if let Ok(v) = tonic::codegen::http::HeaderValue::from_bytes(&bytes[..end]) {
            headers.insert("grpc-message", v);
        }
    }
    if headers
        .get("grpc-status-details-bin")
        .is_some_and(|d| d.len() > MAX_GRPC_DETAILS)
    {
        headers.remove("grpc-status-details-bin");
    }
}

#[cfg(test)]
mod cap_tests {
    use tonic::codegen::http::{HeaderMap, HeaderValue};

    use super::*;

    #[test]
    fn long_status_messages_are_cut_outside_escapes_and_big_details_dropped() {
        let mut h = HeaderMap::new();
        let msg = format!(
            "{}%C3%A9{}",
            "a".repeat(MAX_GRPC_MESSAGE - 2),
            "b".repeat(5000)
        );
        h.insert("grpc-message", HeaderValue::from_str(&msg).unwrap());
        h.insert(
            "grpc-status-details-bin",
            HeaderValue::from_str(&"A".repeat(MAX_GRPC_DETAILS + 1)).unwrap(),
        );
        cap_status_headers(&mut h);
        let m = h.get("grpc-message").unwrap().as_bytes();
        assert_eq!(m.len(), MAX_GRPC_MESSAGE - 2, "cut before the escape");
        assert!(h.get("grpc-status-details-bin").is_none());
        let mut short = HeaderMap::new();
        short.insert("grpc-message", HeaderValue::from_static("fine"));
        cap_status_headers(&mut short);
        assert_eq!(short.get("grpc-message").unwrap(), "fine");
    }
}
