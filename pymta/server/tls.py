"""Server-side TLS: certificates from the config, SNI, reload without dropping sessions.

One :class:`ServerTLS` serves every listener: STARTTLS (``transport.startTLS``)
and implicit TLS (``TLSMemoryBIOFactory``) both ask it for a connection
object.  :meth:`ServerTLS.reload` builds fresh OpenSSL contexts from the
files; connections already established keep the context they started with.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="pymta.tls")

#: TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are OpenSSL's defaults)
MODERN_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                  "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")
VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}


class TLSFileError(Exception):
    """A certificate, key or chain file that cannot be used; names the file."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class CertificateFiles:
    certificate: str
    key: str
    chain: str | None = None


def _readable(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TLSFileError(path, e.strerror or str(e)) from None


def build_context(files: CertificateFiles, min_version: str, ciphers: str) -> SSL.Context:
    """An OpenSSL server context for one certificate; raises TLSFileError naming the bad file."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(VERSIONS[min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    ctx.set_cipher_list(ciphers.encode())
    for path in filter(None, (files.certificate, files.key, files.chain)):
        _readable(path)
    try:
        # the certificate file may carry the chain after the certificate
        ctx.use_certificate_chain_file(files.certificate.encode())
    except SSL.Error:
        raise TLSFileError(files.certificate, "not a PEM certificate (chain)") from None
    try:
        ctx.use_privatekey_file(files.key.encode())
    except SSL.Error:
        raise TLSFileError(files.key, "not a PEM private key (or it is encrypted)") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSFileError(files.key, f"does not match the certificate {files.certificate}") from None
    if files.chain:
        with open(files.chain, "rb") as f:
            data = f.read()
        try:
            chain = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise TLSFileError(files.chain, "not PEM certificates") from None
        for cert in chain:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    def __init__(self, default: CertificateFiles, sni: dict[str, CertificateFiles] | None = None,
                 min_version: str = "TLSv1.2", ciphers: str = MODERN_CIPHERS) -> None:
        self.default_files = default
        self.sni_files = {k.lower(): v for k, v in (sni or {}).items()}
        self.min_version = min_version
        self.ciphers = ciphers
        self._contexts: dict[str | None, SSL.Context] = {}
        self.reload()

    def reload(self) -> None:
        """(Re)read every file; on any error keep the current contexts and raise."""
        contexts = {None: self._context(self.default_files)}
        for name, files in self.sni_files.items():
            contexts[name] = self._context(files)
        default = contexts[None]
        default.set_tlsext_servername_callback(self._servername(contexts))
        self._contexts = contexts

    def _context(self, files: CertificateFiles) -> SSL.Context:
        return build_context(files, self.min_version, self.ciphers)

    @staticmethod
    def _servername(contexts):
        def callback(connection: SSL.Connection) -> None:
            name = connection.get_servername()
            if name:
                ctx = contexts.get(name.decode("ascii", "replace").lower())
                if ctx is not None:
                    connection.set_context(ctx)
        return callback

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(self._contexts[None], None)


def server_tls(settings) -> ServerTLS:
    """A ServerTLS from pymta.config.model.TLSSettings."""
    def files(paths) -> CertificateFiles:
        return CertificateFiles(paths.certificate, paths.key, paths.chain)
    return ServerTLS(files(settings.default), {k: files(v) for k, v in settings.sni.items()},
                     settings.min_version, settings.ciphers or MODERN_CIPHERS)
