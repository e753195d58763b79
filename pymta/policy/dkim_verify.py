"""The ``dkim_verify`` plugin (data stage): verify every DKIM signature of inbound mail.

::

    [stages]
    data = ["dkim_verify", "dmarc", "authres"]

    [plugins.dkim_verify]
    # max_signatures = 10      # signatures verified per message (the others are ignored)
    # allow_sha1 = false       # rsa-sha1 signatures are "policy" (RFC 8301), not "pass"

Each signature gets an Authentication-Results item (``dkim=pass header.d=...
header.s=... header.b=...``, RFC 8601 and RFC 6008), ``dkim=none`` when the
message has none; the results are also kept in ``transaction.notes["dkim"]``.
The key records are fetched through pymta's resolver first (within the
session's DNS budget; a DNS failure is ``temperror``), then dkimpy verifies
in the reactor's thread pool with those answers and the body hash, streamed
from the spool.  The plugin gives no verdict: refusing is DMARC's business.
Authenticated users and trusted networks are not checked.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.dkim.blocking import in_thread_pool, on_body
from pymta.dkim.prefetch import fetch_txt
from pymta.dkim.verifier import KeyRecords, parse_signatures, verify_signatures
from pymta.plugin_api import DUNNO, AuthResult, IMessageFilter, Options, add_auth_result

__all__ = ["DKIMVerify", "NOTE"]

log = Logger(namespace="pymta.dkim")

#: transaction.notes key: the list of pymta.dkim.verifier.SignatureResult
NOTE = "dkim"


@implementer(IMessageFilter)
class DKIMVerify:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.limit = opts.int("max_signatures", default=10, minimum=1)
        self.allow_sha1 = opts.bool("allow_sha1", default=False)
        opts.finish()
        if context.resolver is None:
            raise ValueError("the dkim_verify plugin needs the shared DNS resolver ([dns])")
        self.resolver = context.resolver
        self.reactor = context.reactor

    def _in_thread(self, f, *args) -> defer.Deferred:
        return in_thread_pool(self.reactor, f, *args)

    def _parse(self, message):
        with message.open() as fp:
            return parse_signatures(fp, self.limit, self.allow_sha1)

    @staticmethod
    def _verify(message, header: bytes, parsed, keys: KeyRecords):
        return on_body(message, lambda fp: verify_signatures(header, fp, parsed, keys))

    def check_message(self, session, transaction, message):
        if session.auth_user or session.trusted:
            return DUNNO
        resolver = session.dns if session.dns is not None else self.resolver

        def parsed(outcome):
            header, signatures = outcome
            if not signatures:
                return []
            names = [s.key_name for s in signatures if s.key_name]
            d = fetch_txt(resolver, names)
            d.addCallback(lambda answers: self._in_thread(
                self._verify, message, header, signatures, KeyRecords(answers)))
            return d

        def record(results):
            transaction.notes[NOTE] = results
            if not results:
                add_auth_result(transaction.notes, AuthResult("dkim", "none"))
                log.info("{queue_id}: dkim=none", queue_id=transaction.queue_id)
            for r in results:
                add_auth_result(transaction.notes,
                                AuthResult("dkim", r.result, r.properties(), r.reason))
                log.info("{queue_id}: dkim={result} d={domain} s={selector}{reason}",
                         queue_id=transaction.queue_id, result=r.result, domain=r.domain or "-",
                         selector=r.selector or "-", reason=f" ({r.reason})" if r.reason else "")
            return DUNNO

        return self._in_thread(self._parse, message).addCallback(parsed).addCallback(record)
