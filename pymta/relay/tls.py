"""TLS on outbound connections: the policy levels and the OpenSSL connection creators.

Levels, as Postfix's ``smtp_tls_security_level``:

``none``     never STARTTLS.
``may``      opportunistic (RFC 7435): STARTTLS when offered, the certificate
             is not checked; a server that does not offer it, refuses it or
             fails the handshake gets the message in plaintext.
``encrypt``  STARTTLS is required, the certificate is not checked.
``verify``   STARTTLS is required and the certificate must be valid for the
             host name we connected to (checked with service_identity),
             issued by a CA in ``ca_file`` or, without one, the system's trust
             store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

TLS_LEVELS = ("none", "may", "encrypt", "verify")


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedClientTLS:
    """TLS without certificate checks (levels ``may`` and ``encrypt``), with SNI."""

    def __init__(self, hostname: str) -> None:
        self._context = ssl.CertificateOptions().getContext()
        self._context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        name = hostname.strip("[]")
        self._server_name = None if isIPAddress(name) or isIPv6Address(name) else \
            name.encode("idna")

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def load_trust_root(ca_file: str) -> Any:
    """The CA certificates in the PEM file ``ca_file`` (ValueError naming the problem)."""
    try:
        with open(ca_file, "rb") as fp:
            data = fp.read()
    except OSError as e:
        raise ValueError(f"cannot read {ca_file}: {e.strerror}") from None
    certificates = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for part in data.split(marker)[1:]:
        try:
            certificates.append(ssl.Certificate.loadPEM(marker + part))
        except Exception as e:   # OpenSSL's errors are not one type
            raise ValueError(f"{ca_file}: not a valid PEM certificate: {e}") from None
    if not certificates:
        raise ValueError(f"{ca_file}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    return ssl.trustRootFromCertificates(certificates)


@dataclass(frozen=True)
class TLSPolicy:
    level: str = "may"
    #: PEM file of the CAs trusted for ``verify`` (None: the system's trust store)
    ca_file: str | None = None
    _trust: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.level not in TLS_LEVELS:
            raise ValueError(f"TLS level must be one of {', '.join(TLS_LEVELS)}, not {self.level!r}")
        if self.level == "verify" and self.ca_file and self._trust is None:
            object.__setattr__(self, "_trust", load_trust_root(self.ca_file))

    @property
    def wanted(self) -> bool:
        return self.level != "none"

    @property
    def required(self) -> bool:
        return self.level in ("encrypt", "verify")

    def connection_creator(self, hostname: str) -> Any:
        """What ``transport.startTLS`` needs for a connection to ``hostname``."""
        if self.level == "verify":
            trust = self._trust if self._trust is not None else ssl.platformTrust()
            return ssl.optionsForClientTLS(hostname.strip("[]"), trustRoot=trust)
        return UnverifiedClientTLS(hostname)
