"""The ``arc`` plugin (data stage): verify the ARC chain (RFC 8617) and, as an option, seal.

List it after the other checks and before ``authres``::

    [stages]
    data = ["dkim_verify", "dmarc", "arc", "authres"]

    [plugins.arc]
    # seal = { domain = "example.org", selector = "arc2026", key = "dkim/arc.key" }
    # authserv_id = "mx.example.org"   # as authres's (default server.hostname)
    # seal_max_size = 1048576          # larger messages are not sealed (dkimpy holds them
    #                                  # in memory and holds the GIL ~30 ms per MiB)

``arc=pass``/``fail``/``none`` (``temperror`` on DNS trouble) goes into
Authentication-Results.  With ``seal``, every inbound message gets the next
ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results with
the results of pymta's checks so far): list it on a server that forwards
mail (aliases to other domains), so that the next hop can trust what this
one found.  Authenticated users and trusted networks are neither checked
nor sealed.  The seal key is RSA (dkimpy seals with rsa-sha256).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.authresults import NOTES_KEY, valid_authserv_id
from pymta.dkim.arc import ChainResult, SealRefused, parse_chain, seal_message, verify_chain
from pymta.dkim.blocking import in_thread_pool, on_body
from pymta.dkim.keys import RSA
from pymta.dkim.keytable import read_key_entry
from pymta.dkim.prefetch import fetch_txt
from pymta.dkim.verifier import KeyRecords
from pymta.plugin_api import (DUNNO, AuthResult, IMessageFilter, Kind, OptionError, Options,
                              Verdict, add_auth_result)

__all__ = ["ARCPolicy", "NOTE"]

log = Logger(namespace="pymta.arc")

NOTE = "arc"
SEALABLE = ("pass", "none", "fail")


@implementer(IMessageFilter)
class ARCPolicy:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        seal = opts.value("seal", default=None)
        self.authserv_id = opts.str("authserv_id", default=context.hostname)
        self.seal_max_size = opts.int("seal_max_size", default=1024 * 1024, minimum=0)
        opts.finish()
        self.seal = read_key_entry(seal, context, "seal") if seal is not None else None
        if self.seal is not None and self.seal.key.algorithm != RSA:
            raise OptionError("seal.key", f"{self.seal.path}: ARC seals with RSA keys only")
        if not valid_authserv_id(self.authserv_id):
            raise OptionError("authserv_id", f"not a valid authserv-id: {self.authserv_id!r}")
        if context.resolver is None:
            raise ValueError("the arc plugin needs the shared DNS resolver ([dns])")
        self.resolver = context.resolver
        self.reactor = context.reactor

    def _in_thread(self, f, *args) -> defer.Deferred:
        return in_thread_pool(self.reactor, f, *args)

    @staticmethod
    def _parse(message):
        with message.open() as fp:
            return parse_chain(fp)

    @staticmethod
    def _verify(message, chain, keys: KeyRecords) -> ChainResult:
        return on_body(message, lambda fp: verify_chain(chain, fp, keys))

    def _seal(self, message, results: str, now: float | None):
        with message.open() as fp:
            return seal_message(fp.read(), self.seal, self.authserv_id, results, now)

    def check_message(self, session, transaction, message):
        if session.auth_user or session.trusted:
            return DUNNO
        resolver = session.dns if session.dns is not None else self.resolver

        def parsed(chain):
            if chain.instance == 0 or chain.problem:
                return verify_chain(chain, None, KeyRecords())
            d = fetch_txt(resolver, chain.key_names)
            return d.addCallback(lambda answers: self._in_thread(
                self._verify, message, chain, KeyRecords(answers)))

        def record(result: ChainResult):
            transaction.notes[NOTE] = result
            comment = f"i={result.instance}" if result.instance else None
            if result.reason:
                comment = f"{comment}; {result.reason}" if comment else result.reason
            add_auth_result(transaction.notes, AuthResult("arc", result.result, (), comment))
            log.info("{queue_id}: arc={result}{instance}{reason}", queue_id=transaction.queue_id,
                     result=result.result,
                     instance=f" i={result.instance}" if result.instance else "",
                     reason=f" ({result.reason})" if result.reason else "")
            if self.seal is None or result.result not in SEALABLE:
                return DUNNO
            if message.size > self.seal_max_size:
                log.info("{queue_id}: not ARC-sealed: {size} bytes, over seal_max_size",
                         queue_id=transaction.queue_id, size=message.size)
                return DUNNO
            results = "; ".join(r.format() for r in transaction.notes.get(NOTES_KEY, ()))
            now = self.reactor.seconds() if self.reactor is not None else None
            return self._in_thread(self._seal, message, results, now).addCallbacks(sealed, refused)

        def refused(failure):
            failure.trap(SealRefused)
            log.info("{queue_id}: not ARC-sealed: {reason}", queue_id=transaction.queue_id,
                     reason=failure.value)
            return DUNNO

        def sealed(fields):
            if not fields:
                return DUNNO
            log.info("{queue_id}: ARC set added (s={selector}, d={domain})",
                     queue_id=transaction.queue_id, selector=self.seal.selector,
                     domain=self.seal.domain)
            return Verdict(Kind.DUNNO, headers=tuple(fields))

        return self._in_thread(self._parse, message).addCallback(parsed).addCallback(record)
