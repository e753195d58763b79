"""The ``dkim_sign`` plugin (data stage): DKIM-sign mail of authenticated users and trusted networks.

::

    [stages]
    data = ["dkim_sign"]

    [plugins.dkim_sign]
    keys = [
      { domain = "example.org", selector = "2026r", key = "dkim/example.org.2026r.key" },
      { domain = "example.org", selector = "2026e", key = "dkim/example.org.2026e.key" },
    ]
    # headers = [...]          # fields to sign when present (default: RFC 6376 5.4.1's list)
    # oversign = ["from"]      # signed once more than present: none can be added
    # expire = "7d"            # x= tag (default: none)
    # subdomains = true        # a key of example.org signs for news.example.org too

The key is chosen by the domain of the From field; every key listed for that
domain signs (an RSA and an Ed25519 key give two signatures, RFC 8463; two
selectors of one algorithm during a key rollover give two as well).  The
signing runs in the reactor's thread pool, the body streamed from the spool.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pymta.dkim.author import author_domain
from pymta.dkim.blocking import in_thread_pool
from pymta.dkim.keytable import read_key_table
from pymta.dkim.message import HeaderSectionError
from pymta.dkim.signer import (HEADER, NEVER_SIGNED, RECOMMENDED_HEADERS, SignOptions,
                               SigningKey, sign_message)
from pymta.plugin_api import DUNNO, IMessageFilter, Kind, OptionError, Options, Verdict

__all__ = ["DKIMSign"]

log = Logger(namespace="pymta.dkim")


def _names(opts: Options, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(n.lower() for n in opts.list_str(key, default=list(default)))
    for name in names:
        if name in NEVER_SIGNED:
            raise OptionError(key, f"{name!r} must not be signed (RFC 6376 5.4)")
        if not all(33 <= ord(c) <= 126 and c != ":" for c in name):
            raise OptionError(key, f"not a header field name: {name!r}")
    return names


@implementer(IMessageFilter)
class DKIMSign:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.keys = read_key_table(opts.value("keys"), context)
        headers = _names(opts, "headers", tuple(h.lower() for h in RECOMMENDED_HEADERS))
        oversign = _names(opts, "oversign", ("from",))
        expire = opts.duration("expire", default=None, above=0)
        self.subdomains = opts.bool("subdomains", default=True)
        opts.finish()
        if "from" not in headers:
            raise OptionError("headers", "must list 'from' (RFC 6376 5.4)")
        self.options = SignOptions(headers, oversign, expire)
        self.reactor = context.reactor

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The keys for mail from ``domain``: its own, else (subdomains) its nearest parent's."""
        candidate = domain
        while candidate:
            found = [k for k in self.keys if k.domain == candidate]
            if found or not self.subdomains:
                return found
            candidate = candidate.partition(".")[2]
        return []

    def _sign(self, message, now: float | None) -> tuple[list[SigningKey], list[str], str | None]:
        """(keys used, field values, why not signed): blocking, runs in the thread pool."""
        author = author_domain(message.headers())
        if author.domain is None:
            return [], [], author.problem
        keys = self.keys_for(author.domain)
        if not keys:
            return [], [], None               # not ours to sign
        try:
            with message.open() as fp:
                return keys, sign_message(fp, keys, self.options, now=now), None
        except HeaderSectionError as e:
            return [], [], str(e)

    def _signed(self, outcome, queue_id: str) -> Verdict:
        keys, values, problem = outcome
        if problem:
            log.info("{queue_id}: not DKIM-signed: {problem}", queue_id=queue_id, problem=problem)
        for key in keys:
            log.info("{queue_id}: DKIM-Signature field added (s={selector}, d={domain}, a={algorithm})",
                     queue_id=queue_id, selector=key.selector, domain=key.domain,
                     algorithm=key.key.algorithm)
        if not values:
            return DUNNO
        return Verdict(Kind.DUNNO, headers=tuple((HEADER, value) for value in values))

    def check_message(self, session, transaction, message):
        if not (session.auth_user or session.trusted):
            return DUNNO
        now = self.reactor.seconds() if self.reactor is not None else None
        d = in_thread_pool(self.reactor, self._sign, message, now)
        return d.addCallback(self._signed, transaction.queue_id)
