"""What plugins are told about a session and its current transaction.

Read-only views for plugin authors; filled by the server layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Session:
    #: client address and port: the socket's peer, or on a proxy_protocol listener
    #: the client named in the load balancer's PROXY header
    client_ip: str
    client_port: int
    #: name of the listener (config) that accepted the connection and its role
    listener: str = "default"
    role: str = "mx"
    #: verified reverse DNS name, or "unknown"
    client_name: str = "unknown"
    #: HELO/EHLO argument once given, else None
    helo: str | None = None
    esmtp: bool = False
    #: TLS details when the session is encrypted: {"version": "TLSv1.3", "cipher": "..."}
    tls: dict[str, str] | None = None
    #: authenticated user name (SMTP AUTH), else None
    auth_user: str | None = None
    #: the client address is in [server] trusted_networks
    trusted: bool = False
    #: unique id of this connection, for log correlation
    session_id: str = ""
    #: free space for plugins to share per-session notes (not persisted)
    notes: dict[str, Any] = field(default_factory=dict)
    #: DNS lookups for this session's checks: the shared resolver within the
    #: session's time budget ([dns] session_budget; a
    #: pymta.dns.budget.SessionResolver, same methods as
    #: pymta.dns.resolver.DNSResolver); None outside a server session
    dns: Any = field(default=None, repr=False)

    @property
    def relay_allowed(self) -> bool:
        """May this session send to domains that are not ours?"""
        return self.trusted or self.auth_user is not None


@dataclass
class Transaction:
    #: reverse-path without <>; "" is the null sender
    sender: str
    #: MAIL FROM parameters, upper-cased keys (values decoded where RFC defines xtext)
    mail_params: dict[str, str | None] = field(default_factory=dict)
    #: recipients accepted so far, as given by the client (forward-paths without <>)
    recipients: list[str] = field(default_factory=list)
    #: the queue id the message will get
    queue_id: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
