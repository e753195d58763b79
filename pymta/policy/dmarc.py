"""The ``dmarc`` plugin (data stage): RFC 7489 checks of the From domain's policy.

List it after ``dkim_verify`` (whose results it reads) and before ``authres``
(which writes its result), with ``spf`` in the mail stage::

    [stages]
    mail = ["spf"]
    data = ["dkim_verify", "dmarc", "authres"]

    [plugins.dmarc]
    # on_reject = "reject"          # what p=reject asks: "reject" (550 5.7.1), "quarantine", "none"
    # on_quarantine = "quarantine"  # what p=quarantine asks: "reject", "quarantine", "none"
    # on_temperror = "accept"       # DNS trouble finding the policy: "accept" or "defer" (451 4.7.5)
    # quarantine_header = "X-Quarantine"   # the field a quarantined message gets
    # report_directory = "dmarc"    # aggregate-report data, one JSON line a message, a file a day
    # public_suffix_list = "/usr/share/publicsuffix/public_suffix_list.dat"   # default: bundled

The SPF result comes from the Authentication-Results items that ``spf``
recorded (``smtp.mailfrom``, or ``smtp.helo`` for the null sender), the
DKIM results from ``dkim_verify``'s (``dkim=pass header.d=``): the plugin
reads what the others recorded, never their internals.  The organizational
domain comes from the Public Suffix List (the ``publicsuffixlist``
package).  Authenticated users and trusted networks are not checked.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.authresults import NOTES_KEY
from pymta.dkim.author import author_domain
from pymta.dkim.dmarc import OrganizationalDomain, discover_policy, evaluate
from pymta.plugin_api import (DUNNO, AuthResult, IMessageFilter, Kind, OptionError, Options,
                              Verdict, add_auth_result, split_address)

__all__ = ["DMARCPolicy", "NOTE"]

log = Logger(namespace="pymta.dmarc")

NOTE = "dmarc"
ACTIONS = ("reject", "quarantine", "none")
#: the order in which the actions of several author domains win (the strictest)
STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}
#: author domains checked at most in a message with several From addresses
MAX_AUTHOR_DOMAINS = 10


def spf_identity(results) -> tuple[str, str] | None:
    """(result, domain) of the SPF check DMARC uses: MAIL FROM's, else HELO's (null sender)."""
    by_scope = {}
    for item in results:
        if item.method != "spf":
            continue
        for name, value in item.properties:
            if name in ("smtp.mailfrom", "smtp.helo") and name not in by_scope:
                by_scope[name] = (item.result, value)
    if "smtp.mailfrom" in by_scope:
        result, sender = by_scope["smtp.mailfrom"]
        return result, split_address(sender)[1]
    return by_scope.get("smtp.helo")


def dkim_passes(results) -> list[str]:
    return [value for item in results if item.method == "dkim" and item.result == "pass"
            for name, value in item.properties if name == "header.d"]


@implementer(IMessageFilter)
class DMARCPolicy:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.actions = {"reject": opts.str("on_reject", default="reject", choices=ACTIONS),
                        "quarantine": opts.str("on_quarantine", default="quarantine",
                                               choices=ACTIONS),
                        "none": "none"}
        self.on_temperror = opts.str("on_temperror", default="accept", choices=("accept", "defer"))
        self.quarantine_header = opts.str("quarantine_header", default="X-Quarantine")
        self.report_directory = opts.path("report_directory", context, default=None)
        suffix_list = opts.path("public_suffix_list", context, default=None)
        opts.finish()
        if context.resolver is None:
            raise ValueError("the dmarc plugin needs the shared DNS resolver ([dns])")
        if self.report_directory is not None:
            os.makedirs(self.report_directory, exist_ok=True)
        self.resolver = context.resolver
        self.reactor = context.reactor
        try:
            self.org = OrganizationalDomain(suffix_list)
        except OSError as e:
            raise OptionError("public_suffix_list", f"cannot read {suffix_list}: {e.strerror}") from None
        self.sample = random.random

    def check_message(self, session, transaction, message):
        if session.auth_user or session.trusted:
            return DUNNO
        author = author_domain(message.headers())
        # RFC 7489 6.6.1: several From addresses (or fields) - each domain is checked and
        # the strictest policy among those that fail applies
        domains = (author.domain,) if author.domain is not None else \
            author.domains[:MAX_AUTHOR_DOMAINS]
        if not domains:
            # no author domain at all, nothing DMARC can check
            add_auth_result(transaction.notes, AuthResult("dmarc", "permerror", (), author.problem))
            log.info("{queue_id}: dmarc=permerror ({problem})", queue_id=transaction.queue_id,
                     problem=author.problem)
            return DUNNO
        resolver = session.dns if session.dns is not None else self.resolver
        recorded = list(transaction.notes.get(NOTES_KEY, ()))
        spf = spf_identity(recorded)
        passes = dkim_passes(recorded)

        def one(lookup, domain: str):
            result = evaluate(domain, lookup, spf, passes, self.org, self.sample)
            action = self.actions[result.disposition] if result.result == "fail" else "none"
            add_auth_result(transaction.notes, AuthResult(
                "dmarc", result.result, (("header.from", domain),), result.comment() or None))
            log.info("{queue_id}: dmarc={result} header.from={domain} policy={policy} "
                     "disposition={disposition} action={action}{reason}",
                     queue_id=transaction.queue_id, result=result.result, domain=domain,
                     policy=result.policy, disposition=result.disposition, action=action,
                     reason=f" ({result.reason})" if result.reason else "")
            if result.record is not None and result.record.rua and self.report_directory:
                self._report(session, transaction, result, spf, passes, action)
            return result, action

        def decide(outcomes):
            result, action = max(outcomes, key=lambda outcome: (
                STRICTNESS[outcome[1]], outcome[0].result == "temperror"))
            transaction.notes[NOTE] = result
            if action == "reject":
                return Verdict.reject(f"DMARC: message from {result.author} refused by the "
                                      f"domain's policy (p={result.policy})", 550, "5.7.1")
            if action == "quarantine":
                return Verdict(Kind.DUNNO, headers=((self.quarantine_header,
                                                     f"DMARC policy of {result.author}"),))
            if result.result == "temperror" and self.on_temperror == "defer":
                return Verdict.defer(f"DMARC: temporary error finding the policy of "
                                     f"{result.author}; try again later", 451, "4.7.5")
            return DUNNO

        checks = [discover_policy(resolver, domain, self.org).addCallback(one, domain)
                  for domain in domains]
        return defer.gatherResults(checks).addCallback(decide)

    def _report(self, session, transaction, result, spf, passes, action) -> None:
        """One line of aggregate-report data (RFC 7489 7.2) in the file of the day (UTC)."""
        now = self.reactor.seconds() if self.reactor is not None else time.time()
        record = result.record
        line = {
            "time": int(now), "source_ip": session.client_ip, "header_from": result.author,
            "policy_domain": result.policy_domain, "rua": list(record.rua),
            "policy_published": {"p": record.p, "sp": record.sp, "pct": record.pct,
                                 "adkim": record.adkim, "aspf": record.aspf},
            "disposition": action, "dmarc": result.result,
            "dkim_aligned": result.dkim_aligned, "spf_aligned": result.spf_aligned,
            "dkim_pass_domains": passes,
            "spf": {"result": spf[0], "domain": spf[1]} if spf else None,
            "envelope_from": transaction.sender, "queue_id": transaction.queue_id,
        }
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        path = os.path.join(self.report_directory, f"{day}.jsonl")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, sort_keys=True) + "\n")
        except OSError as e:
            log.error("dmarc: cannot write report data to {path}: {error}", path=path, error=e)
