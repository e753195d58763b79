"""The ``spf`` plugin: RFC 7208 checks of the HELO and MAIL FROM identities.

List one instance in the helo, mail and data stages::

    [stages]
    helo = ["spf"]
    mail = ["spf"]
    data = ["spf", "authres"]

* helo: starts the check of the HELO identity (``postmaster@<helo>``, RFC
  7208 2.3) without delaying the reply; the result is kept in
  ``session.notes["spf_helo"]``.
* mail: checks the MAIL FROM identity (the null sender is checked as
  ``postmaster@<helo>``, 2.4), keeps an :class:`SPFCheck` in
  ``transaction.notes["spf"]``, records the result for Authentication-Results
  and applies the configured action for the result: ``reject`` (5xx),
  ``defer`` (4xx) or ``accept`` (no objection: the message goes on, marked
  by its headers).
* data: adds ``Received-SPF:`` (RFC 7208 9.1).

Sessions from trusted networks and authenticated users are not checked.
Reply codes follow RFC 7372: x.7.23 for a failed check, x.7.24 for an error
(temperror, permerror).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from pymta.authresults import comment_text, fold, quoted
from pymta.plugin_api import (DUNNO, AuthResult, IHeloPolicy, IMessageFilter, ISenderPolicy, Kind,
                              Options, Session, Transaction, Verdict, add_auth_result)
from pymta.spf.check import SPFChecker, SPFResult, identity

__all__ = ["SPFPolicy", "SPFCheck", "received_spf", "ACTIONS", "FAIL_ACTIONS"]

log = Logger(namespace="pymta.spf")

ACTIONS = ("reject", "defer", "accept")
FAIL_ACTIONS = ("reject_if_minus_all",) + ACTIONS
DEFAULT_ACTIONS = {"fail": "reject_if_minus_all", "softfail": "accept", "neutral": "accept",
                   "none": "accept", "temperror": "defer", "permerror": "accept"}
HELO_MODES = ("report", "enforce", "off")

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*\Z")
#: longest explanation (exp=) text put into a reply
MAX_EXPLANATION = 400

HELO_NOTE = "spf_helo"
NOTE = "spf"


@dataclass
class SPFCheck:
    """What the plugin found for one identity; ``transaction.notes["spf"]``."""

    identity: str              # "mailfrom" or "helo"
    sender: str                # the address checked (postmaster@helo for the null sender)
    domain: str
    helo: str
    client_ip: str
    result: SPFResult
    #: what the policy did with it: "reject", "defer" or "accept"
    action: str = "accept"
    #: the HELO identity's result, when it was checked
    helo_result: SPFResult | None = None


class _Shared:
    """A check result several callers may wait for (a Deferred can have one chain only)."""

    def __init__(self, d: Deferred) -> None:
        self.result: SPFResult | None = None
        self._waiting: list[Deferred] = []
        d.addCallback(self._fired)

    def _fired(self, result: SPFResult) -> None:
        self.result = result
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.callback(result)

    def wait(self) -> Deferred:
        if self.result is not None:
            return defer.succeed(self.result)
        d = Deferred()
        self._waiting.append(d)
        return d


@implementer(IHeloPolicy, ISenderPolicy, IMessageFilter)
class SPFPolicy:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.actions = {result: opts.str(f"on_{result}", default=default,
                                         choices=FAIL_ACTIONS if result == "fail" else ACTIONS)
                        for result, default in DEFAULT_ACTIONS.items()}
        self.helo_mode = opts.str("helo", default="report", choices=HELO_MODES)
        self.timeout = opts.duration("timeout", default=20.0, above=0)
        self.receiver = opts.str("receiver", default=context.hostname)
        self.header = opts.bool("received_spf", default=True)
        opts.finish()
        if context.resolver is None:
            raise ValueError("the spf plugin needs the shared DNS resolver ([dns])")
        self.reactor = context.reactor
        self.checker = SPFChecker(context.resolver, receiver=self.receiver,
                                  clock=getattr(context.reactor, "seconds", None) or _wall_clock)

    # -- running checks -----------------------------------------------------
    def _check(self, session: Session, domain: str, sender: str, helo: str) -> Deferred:
        """check_host() bounded by ``timeout`` (4.6.4: a slow check is a temperror) and by
        the session's DNS time budget (its lookups through ``session.dns``)."""
        d = self.checker.check_host(session.client_ip, domain, sender, helo, lookup=session.dns)
        if self.reactor is not None:
            d.addTimeout(self.timeout, self.reactor)

        def failed(failure):
            if failure.check(defer.TimeoutError):
                problem = f"no answer within {self.timeout:g} seconds"
            elif failure.check(defer.CancelledError):
                # the stage gave up on it ([limits] plugin_timeout, logged there)
                problem = "cancelled"
            else:
                log.failure("SPF check of {domain} failed", failure, domain=domain)
                problem = f"internal error: {failure.getErrorMessage()}"
            return SPFResult("temperror", domain, problem=problem)
        return d.addErrback(failed)

    @staticmethod
    def skipped(session: Session) -> str | None:
        if session.auth_user:
            return f"authenticated user {session.auth_user}"
        if session.trusted:
            return "client in trusted networks"
        return None

    def _helo_check(self, session: Session, hostname: str) -> _Shared:
        started = session.notes.get(HELO_NOTE)
        if started is not None and started[0] == hostname:
            return started[1]
        sender, domain = identity("", hostname)
        shared = _Shared(self._check(session, domain, sender, hostname))
        session.notes[HELO_NOTE] = (hostname, shared)
        return shared

    # -- IHeloPolicy ----------------------------------------------------------
    def check_helo(self, session: Session, hostname: str) -> Verdict:
        if self.helo_mode != "off" and not self.skipped(session):
            self._helo_check(session, hostname)     # runs while the client goes on
        return DUNNO

    # -- ISenderPolicy --------------------------------------------------------
    def check_sender(self, session: Session, transaction: Transaction):
        if self.skipped(session):
            return DUNNO
        helo = session.helo or ""
        sender, domain = identity(transaction.sender, helo)
        null_sender = not transaction.sender
        helo_shared = self._helo_check(session, helo) if (self.helo_mode != "off" or null_sender) else None
        waits = [helo_shared.wait() if helo_shared is not None else defer.succeed(None)]
        waits.append(helo_shared.wait() if null_sender else self._check(session, domain, sender, helo))
        d = defer.gatherResults(waits, consumeErrors=True)

        def decide(results):
            helo_result, result = results
            check = SPFCheck("helo" if null_sender else "mailfrom", sender, domain, helo,
                             session.client_ip, result, helo_result=helo_result)
            verdict = self._verdict(check, result, "helo" if null_sender else "mailfrom")
            if verdict is DUNNO and self.helo_mode == "enforce" and helo_result is not None \
                    and not null_sender:
                verdict = self._verdict(check, helo_result, "helo")
            check.action = {Kind.REJECT: "reject", Kind.DEFER: "defer"}.get(verdict.kind, "accept")
            transaction.notes[NOTE] = check
            self._record(transaction, check)
            log.info("spf: client={client}[{ip}] identity={identity} sender=<{sender}> "
                     "result={result} mechanism={mechanism} action={action}{problem}",
                     client=session.client_name, ip=session.client_ip, identity=check.identity,
                     sender=sender, result=result.result, mechanism=result.mechanism or "-",
                     action=check.action,
                     problem=f" problem={result.problem}" if result.problem else "")
            return verdict
        return d.addCallback(decide)

    def _action(self, result: SPFResult) -> str:
        action = self.actions.get(result.result, "accept")     # pass: nothing to do
        if action == "reject_if_minus_all":          # the domain publishes -all: it means it
            return "reject" if result.minus_all else "accept"
        return action

    def _verdict(self, check: SPFCheck, result: SPFResult, which: str) -> Verdict:
        action = self._action(result)
        if action == "accept":
            return DUNNO
        who = f"<{check.sender}>" if which == "mailfrom" else f"HELO {check.helo}"
        ip = check.client_ip
        error = result.result in ("temperror", "permerror")
        if result.result in ("fail", "softfail"):
            text = f"SPF: {who} is not allowed to send mail from {ip}"
            if result.result == "softfail":
                text += " (softfail)"
            if result.explanation:
                text += "\n" + _clean(result.explanation)[:MAX_EXPLANATION]
        elif result.result == "neutral":
            text = f"SPF: {who} is neither permitted nor denied to send mail from {ip}"
        elif result.result == "none":
            text = f"SPF: {result.domain or check.domain} publishes no SPF record"
        elif result.result == "temperror":
            text = f"SPF: temporary error while checking {result.domain or check.domain}: " \
                   f"{_clean(result.problem or 'DNS error')}; try again later"
        else:
            text = f"SPF: the SPF record of {result.domain or check.domain} is invalid: " \
                   f"{_clean(result.problem or 'permanent error')}"
        detail = "24" if error else "23"
        if action == "reject":
            return Verdict.reject(text, 550, f"5.7.{detail}")
        return Verdict.defer(text, 451, f"4.7.{detail}")

    def _record(self, transaction: Transaction, check: SPFCheck) -> None:
        """The Authentication-Results items (RFC 8601 2.7.2)."""
        if check.identity == "mailfrom":
            add_auth_result(transaction.notes, AuthResult(
                "spf", check.result.result, (("smtp.mailfrom", check.sender),),
                _ar_comment(check.result, check.client_ip)))
        helo_result = check.result if check.identity == "helo" else check.helo_result
        if helo_result is not None and check.helo:
            add_auth_result(transaction.notes, AuthResult(
                "spf", helo_result.result, (("smtp.helo", check.helo),),
                _ar_comment(helo_result, check.client_ip)))

    # -- IMessageFilter -------------------------------------------------------
    def check_message(self, session: Session, transaction: Transaction, message) -> Verdict:
        check = transaction.notes.get(NOTE)
        if not self.header or not isinstance(check, SPFCheck):
            return DUNNO
        return Verdict(Kind.DUNNO, headers=(("Received-SPF", received_spf(check, self.receiver)),))


# -- header text ------------------------------------------------------------------

def _wall_clock() -> float:
    import time
    return time.time()


def _clean(text: str) -> str:
    return _CONTROLS.sub(" ", text).strip()


def _kv(value: str) -> str:
    return value if _DOT_ATOM.match(value) else quoted(value)


def _ar_comment(result: SPFResult, ip: str) -> str | None:
    if result.result in ("temperror", "permerror", "none") and result.problem:
        return result.problem
    return f"sender IP is {ip}"


def _explain(check: SPFCheck, receiver: str) -> str:
    """The comment of Received-SPF (RFC 7208 9.1 examples)."""
    r, sender, ip = check.result, check.sender, check.client_ip
    text = {
        "pass": f"domain of {sender} designates {ip} as permitted sender",
        "fail": f"domain of {sender} does not designate {ip} as permitted sender",
        "softfail": f"domain of transitioning {sender} does not designate {ip} as permitted sender",
        "neutral": f"{ip} is neither permitted nor denied by domain of {sender}",
        "none": f"domain of {sender} does not designate permitted sender hosts",
        "temperror": f"error in processing during lookup of {sender}",
        "permerror": f"permanent error in processing domain of {sender}",
    }[r.result]
    return f"{receiver}: {text}"


def received_spf(check: SPFCheck, receiver: str) -> str:
    """The value of ``Received-SPF:`` for ``check`` (RFC 7208 9.1)."""
    r = check.result
    pairs = [f"client-ip={_kv(check.client_ip)}", f"envelope-from={_kv(check.sender)}"]
    if check.helo:
        pairs.append(f"helo={_kv(check.helo)}")
    pairs += [f"receiver={_kv(receiver)}", f"identity={check.identity}"]
    if r.mechanism and r.mechanism != "default":
        pairs.append(f"mechanism={_kv(r.mechanism)}")
    if r.problem and r.result in ("temperror", "permerror"):
        pairs.append(f"problem={quoted(r.problem)}")
    value = f"{r.result} ({comment_text(_explain(check, receiver))}) " + "; ".join(pairs)
    return fold(value, len("Received-SPF: "))
