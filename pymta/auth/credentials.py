"""What an ``auth`` checker is given and may answer besides twisted.cred's own.

:class:`SMTPCredentials` is the user name and password of one SMTP AUTH,
with where the session comes from: a checker that asks another service
(Dovecot) passes the client's and the server's address and whether the
session is encrypted.  It provides ``IUsernamePassword``, so any
twisted.cred checker of user names and passwords takes it as it is.

:class:`TemporaryAuthFailure` is how a checker says "cannot decide now" (its
password service is down): the client gets ``454 4.7.0`` and the log one
line with the text, where ``UnauthorizedLogin`` means a wrong password
(``535``).
"""

from __future__ import annotations

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from zope.interface import implementer


class TemporaryAuthFailure(Exception):
    """The checker could not decide now (its password service is unreachable): 454."""


@implementer(IUsernamePassword)
class SMTPCredentials(UsernamePassword):
    """A user name and password given with SMTP AUTH, and the session they came with."""

    def __init__(self, username: bytes, password: bytes, *, mechanism: str = "PLAIN",
                 client_ip: str = "", client_port: int = 0, local_ip: str = "",
                 local_port: int = 0, tls: bool = False, service: str = "smtp") -> None:
        super().__init__(username, password)
        #: the SASL mechanism the client used (PLAIN, LOGIN)
        self.mechanism = mechanism
        self.client_ip = client_ip
        self.client_port = client_port
        #: the address and port of the listener the client connected to
        self.local_ip = local_ip
        self.local_port = local_port
        #: the session is encrypted (STARTTLS or implicit TLS)
        self.tls = tls
        self.service = service
