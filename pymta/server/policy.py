"""The session policy: the plugin chains plus the rules the core enforces.

The core decides what no plugin may change: relaying only for trusted or
authenticated clients, postmaster always accepted (RFC 5321 4.5.1), and no
recipient accepted that has no delivery route.  Everything else is asked of
the configured plugins, stage by stage.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pymta.config.model import Config, PluginInstance
from pymta.envelope import Recipient
from pymta.interfaces import IConnectPrefetch
from pymta.server.chain import StageDeadline, StageObserver, run_stage
from pymta.session import Session, Transaction
from pymta.verdict import DUNNO, AliasTarget, Kind, Verdict

log = Logger(namespace="pymta.plugins")

RELAY_DENIED = Verdict.reject("Relay access denied", 554, "5.7.1")
#: the "plugin" the observer is told the core's own rcpt decisions by (pymta
#: test-session); its answer is the reason, in words
CORE_RULES = PluginInstance("core", "pymta's relay, postmaster and routing rules", None)
USER_UNKNOWN = Verdict.reject("User unknown in local recipient table", 550, "5.1.1")


def _then(result: Verdict | Deferred, fn) -> Any:
    if isinstance(result, Deferred):
        return result.addCallback(fn)
    return fn(result)


class SessionPolicy:
    def __init__(self, config: Config, reactor: Any = None, events: Any = None) -> None:
        """``events``: the metrics' events sink (it times each plugin), or None."""
        self.config = config
        self.stages = config.stages
        if reactor is None:
            from twisted.internet import reactor
        #: each stage's time budget for its plugins ([limits] plugin_timeout)
        self.deadline = StageDeadline(reactor, config.limits.plugin_timeout)
        #: told every plugin's answer: the metrics' plugin timing, pymta test-session's
        #: report; None (no clock read) on a server without metrics
        self.observer: StageObserver | None = events.plugin_answered if events is not None else None
        domains = config.domains
        self.postmaster_domain = config.hostname.lower() if config.hostname.lower() in domains \
            else (domains[0] if domains else config.hostname.lower())

    def prefetch_connect(self, session: Session) -> None:
        """Let the connect stage's plugins that can start their lookups now."""
        for plugin in self.stages.get("connect", ()):
            if IConnectPrefetch.providedBy(plugin.obj):
                try:
                    plugin.obj.prefetch_connect(session)
                except Exception:
                    log.failure("plugin {name} ({use}) failed in prefetch_connect",
                                name=plugin.name, use=plugin.use)

    def _run(self, stage: str, *args):
        return run_stage(stage, self.stages.get(stage, ()), *args, deadline=self.deadline,
                         observer=self.observer)

    def connect(self, session: Session):
        return self._run("connect", session)

    def helo(self, session: Session, hostname: str):
        return self._run("helo", session, hostname)

    def mail(self, session: Session, transaction: Transaction):
        return self._run("mail", session, transaction)

    def message(self, session: Session, transaction: Transaction, view):
        return self._run("data", session, transaction, view)

    def rcpt(self, session: Session, transaction: Transaction, recipient: str, params: dict):
        """The rcpt stage's verdict, or a Deferred firing with it.  An accept carries
        in its ``rewrite`` the recipients ``recipient`` stands for, routed
        (:class:`pymta.envelope.Recipient`)."""
        address = f"postmaster@{self.postmaster_domain}" if recipient == "postmaster" else recipient
        local_part, _, domain = address.rpartition("@")
        local = self.config.is_local_domain(domain)
        if not local and not session.relay_allowed:
            if self.observer is not None:
                self.observer("rcpt", CORE_RULES, f"{RELAY_DENIED.code} {RELAY_DENIED.enhanced} "
                              f"{RELAY_DENIED.text}: {domain} is not a local domain, and the client "
                              "is neither in trusted_networks nor authenticated", 0.0)
            return RELAY_DENIED
        postmaster = local and local_part.lower() == "postmaster"

        def decided(verdict: Verdict):
            if postmaster and verdict.kind is not Kind.ACCEPT:
                verdict = DUNNO          # RFC 5321 4.5.1: always accepted
            elif verdict.kind is Kind.DUNNO and local and not postmaster:
                return USER_UNKNOWN
            if verdict.kind not in (Kind.ACCEPT, Kind.DUNNO):
                return verdict
            targets = verdict.rewrite if verdict.rewrite else (address,)
            recipients = []
            seen = set()
            for target in targets:
                sender = None
                if isinstance(target, AliasTarget):
                    if target.command is not None:
                        command = self._command_recipient(target, recipient, params, seen)
                        if isinstance(command, Verdict):
                            return command
                        recipients.extend(command)
                        continue
                    target, sender = target.address, target.sender
                key = target.lower()
                if key in seen:
                    continue
                seen.add(key)
                route = self.config.route_for(target)
                if route is None:
                    return Verdict.reject(f"<{target}>: no delivery route for this address",
                                          550, "5.4.4")
                recipients.append(Recipient(address=target, original=recipient, route=route,
                                            notify=params.get("NOTIFY"), orcpt=params.get("ORCPT"),
                                            sender=sender))
            return Verdict.accept(verdict.text, rewrite=recipients)

        result = _then(self._run("rcpt", session, transaction, address), decided)
        if self.observer is not None:
            result = _then(result, lambda final: self._explain_rcpt(final, address, postmaster))
        return result

    def _explain_rcpt(self, final: Verdict, address: str, postmaster: bool) -> Verdict:
        """Tell the observer what the core made of the rcpt stage's answer."""
        if final is USER_UNKNOWN:
            why = (f"{final.code} {final.enhanced} {final.text}: no rcpt plugin accepted "
                   f"<{address}>, an address at a local domain")
        elif final.kind is Kind.REJECT and final.enhanced == "5.4.4":
            why = f"{final.code} {final.enhanced} {final.text}: no [[routes]] entry matches it"
        elif final.kind is Kind.ACCEPT:
            routed = ", ".join(f"<{r.address}> to backend {r.route}" for r in final.rewrite)
            always = (" (a postmaster is accepted whatever the plugins say, RFC 5321 4.5.1)"
                      if postmaster else "")
            why = f"accepted{always}: {routed}"
        else:
            return final                 # a plugin's refusal: reported with the plugin
        self.observer("rcpt", CORE_RULES, why, 0.0)
        return final

    def _command_recipient(self, target: AliasTarget, recipient: str, params: dict,
                           seen: set) -> list[Recipient] | Verdict:
        """The recipient for a ``|command`` alias target (none if already there), or a 451."""
        key = f"|{target.address.lower()}|{target.command}"
        if key in seen:
            return []
        seen.add(key)
        backend = self.config.backends.get(target.route)
        if not getattr(backend, "runs_alias_commands", False):
            log.error("<{address}>: alias commands and files need a pipe backend named "
                      "{route!r} (the alias map's command_backend)", address=target.address,
                      route=target.route)
            return Verdict.defer(f"<{target.address}>: no delivery backend for alias commands",
                                 451, "4.3.5")
        return [Recipient(address=target.address, original=recipient, route=target.route,
                          notify=params.get("NOTIFY"), orcpt=params.get("ORCPT"),
                          command=target.command, sender=target.sender)]
