"""Outcome of one delivery attempt for one recipient."""

from __future__ import annotations

from dataclasses import dataclass

DELIVERED = "delivered"
DEFERRED = "deferred"   # temporary failure: retry later
FAILED = "failed"       # permanent failure: bounce


@dataclass(frozen=True)
class DeliveryResult:
    status: str            # DELIVERED | DEFERRED | FAILED
    code: int = 250
    enhanced: str = "2.0.0"
    text: str = "delivered"
    #: who took it: "maildir:/path", "mbox:/path", "mx.example.org[192.0.2.1]:25"
    relay: str = ""
    #: the remote SMTP server that gave this result (DSN Remote-MTA), when there was one
    remote_mta: str | None = None
    #: RFC 3464 Diagnostic-Code, e.g. "smtp; 550 5.1.1 User unknown" (None: built from the text)
    diagnostic: str | None = None
    #: delivered to a next hop that took the DSN request (NOTIFY) over: no success DSN from us
    notify_forwarded: bool = False

    @classmethod
    def delivered(cls, text: str = "delivered", relay: str = "") -> "DeliveryResult":
        return cls(DELIVERED, 250, "2.0.0", text, relay)

    @classmethod
    def deferred(cls, text: str, code: int = 451, enhanced: str = "4.3.0", relay: str = "") -> "DeliveryResult":
        return cls(DEFERRED, code, enhanced, text, relay)

    @classmethod
    def failed(cls, text: str, code: int = 550, enhanced: str = "5.1.1", relay: str = "") -> "DeliveryResult":
        return cls(FAILED, code, enhanced, text, relay)

    def summary(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"
