"""Which delivery status notifications a message needs now, and to whom.

The scheduler asks :meth:`DeliveryNotifier.notices` whenever none of a
message's recipients is being delivered; the answer is a list of
:class:`Notice` (the new message's envelope and content) to put into the
spool, and the recipients concerned are marked in the envelope so that no
notification is sent twice:

* **failed** recipients: one bounce (Action: failed) per message and round
  of attempts, listing all of them, unless their NOTIFY excludes FAILURE
  (RFC 3461: absent NOTIFY means FAILURE).
* **delayed** recipients (still pending after ``delay_warning`` seconds in
  the queue): one warning (Action: delayed) listing them, if NOTIFY is
  absent or has DELAY.
* **delivered** recipients with NOTIFY=SUCCESS whose next hop did not take
  the request over: Action: delivered (local delivery) or relayed (a next
  hop without DSN).

Notifications go to the envelope sender.  A message with the null sender
(a bounce, or mail received with ``MAIL FROM:<>``) is never bounced to its
sender: its failures go to the postmaster instead (a "double bounce"), and
delays and successes are not reported.  A notification to the postmaster
that fails in turn (``notification = "postmaster"``), or a failure that
cannot reach the postmaster at all (no route), raises
:class:`NotificationHeld`: the scheduler keeps that message in the queue,
held, for an administrator; it is never discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

from pymta.bounce import dsn
from pymta.envelope import DELIVERED, PENDING, Envelope, Recipient
from pymta.verdict import AliasTarget

log = Logger()


class NotificationHeld(Exception):
    """A failure no one can be told about: the message is to be held (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Notice:
    """A notification message to spool: its envelope (no queue id yet) and content."""
    envelope: Envelope
    content: bytes
    action: str
    #: the original's recipients it reports on (marked as notified)
    about: list[Recipient] = field(default_factory=list)

    def unmark(self) -> None:
        """The notice could not be spooled: let the next round decide it again."""
        for recipient in self.about:
            if self.action == dsn.DELAYED:
                recipient.delay_notified = False
            else:
                recipient.notified = False


def wants(recipient: Recipient, what: str) -> bool:
    """Does the recipient's NOTIFY (RFC 3461 4.1) ask for ``what`` (FAILURE, DELAY, SUCCESS)?"""
    notify = recipient.notify
    if notify is None:
        return what in ("FAILURE", "DELAY")
    return what in notify


def postmaster_address(config: Any) -> str:
    """postmaster at the server's host name when it is a local domain, else the first domain."""
    hostname = config.hostname.lower()
    domains = tuple(config.domains)
    domain = hostname if hostname in domains or not domains else domains[0]
    return f"postmaster@{domain}"


def by_sender(envelope: Envelope, recipients: list[Recipient]) -> list[tuple[str, list[Recipient]]]:
    """``recipients`` grouped by the sender their notifications go to (list owners apart)."""
    groups: dict[str, list[Recipient]] = {}
    for recipient in recipients:
        groups.setdefault(envelope.sender_for(recipient), []).append(recipient)
    return list(groups.items())


class DeliveryNotifier:
    """Builds the DSN messages of a message; see the module docstring."""

    def __init__(self, hostname: str, postmaster: str,
                 route_for: Callable[[str], str | None],
                 return_limit: int = dsn.RETURN_SIZE_LIMIT,
                 expand: Callable[[str], list | None] | None = None) -> None:
        self.hostname = hostname
        self.postmaster = postmaster
        self.route_for = route_for
        #: what a notification's address stands for (the alias maps of the rcpt
        #: stage, see notice_recipients), or None: delivered to the address itself
        self.expand = expand
        self.return_limit = return_limit

    @classmethod
    def from_config(cls, config: Any) -> "DeliveryNotifier":
        return cls(config.hostname, postmaster_address(config), config.route_for,
                   expand=alias_expansion(config))

    # -- what is due ---------------------------------------------------------------------
    def failures(self, message: Any, recipients: list[Recipient], now: float) -> list[Notice]:
        """The bounce for ``recipients`` (FAILED, not yet notified); marks them notified.

        Raises :class:`NotificationHeld` for a failed postmaster notification,
        and when the postmaster has no delivery route.
        """
        envelope = message.envelope
        if envelope.notification == "postmaster":
            raise NotificationHeld("undeliverable postmaster notification: " + "; ".join(
                f"<{r.address}>: {r.last_result or 'failed'}" for r in recipients))
        for recipient in recipients:
            recipient.notified = True
        wanted = [r for r in recipients if wants(r, "FAILURE")]
        if not wanted:
            return []
        notices: list[Notice] = []
        for sender, group in by_sender(envelope, wanted):
            if sender:
                notices += self._notice(message, group, dsn.FAILED, sender, now,
                                        full=envelope.ret != "HDRS")
                continue
            addresses = ", ".join(f"<{r.address}>" for r in group)
            log.info("{queue_id}: null sender: the non-delivery notification for {addresses} "
                     "goes to <{postmaster}>", queue_id=envelope.queue_id, addresses=addresses,
                     postmaster=self.postmaster)
            notices += self._notice(message, group, dsn.FAILED, self.postmaster, now, full=True,
                                    postmaster=True)
        return notices

    def others(self, message: Any, now: float, delay_warning: float,
               lifetime: float | None) -> list[Notice]:
        """Delay warnings and success reports now due; marks the recipients."""
        envelope = message.envelope
        notices: list[Notice] = []
        delayed = []
        if delay_warning > 0 and now - envelope.received_at >= delay_warning:
            for recipient in envelope.recipients:
                if recipient.state == PENDING and recipient.attempts > 0 \
                        and not recipient.delay_notified:
                    recipient.delay_notified = True
                    if wants(recipient, "DELAY"):
                        delayed.append(recipient)
        succeeded = []
        for recipient in envelope.recipients:
            if recipient.state == DELIVERED and not recipient.notified:
                recipient.notified = True
                if recipient.notify and "SUCCESS" in recipient.notify:
                    succeeded.append(recipient)
        if envelope.notification:
            return []
        for sender, group in by_sender(envelope, delayed):
            if sender:
                notices += self._notice(message, group, dsn.DELAYED, sender, now,
                                        lifetime=lifetime)
        for sender, group in by_sender(envelope, succeeded):
            relayed = [r for r in group if r.remote_mta]
            local = [r for r in group if not r.remote_mta]
            for part, action in ((local, dsn.DELIVERED), (relayed, dsn.RELAYED)):
                if part and sender:
                    notices += self._notice(message, part, action, sender, now)
        return notices

    # -- building one ---------------------------------------------------------------------
    def _notice(self, message: Any, recipients: list[Recipient], action: str, to: str, now: float,
                lifetime: float | None = None, full: bool = False,
                postmaster: bool = False) -> list[Notice]:
        envelope = message.envelope
        route = self.route_for(to)
        if route is None and not postmaster and action == dsn.FAILED:
            log.error("{queue_id}: no delivery route for <{to}>: the non-delivery notification "
                      "goes to <{postmaster}> instead", queue_id=envelope.queue_id, to=to,
                      postmaster=self.postmaster)
            to, postmaster = self.postmaster, True
            route = self.route_for(to)
        if route is None:
            if postmaster and action == dsn.FAILED:
                raise NotificationHeld(f"no delivery route for the postmaster <{to}>: the "
                                       "non-delivery notification cannot be sent")
            log.error("{queue_id}: no delivery route for <{to}>: {action} notification not sent",
                      queue_id=envelope.queue_id, to=to, action=action)
            return []
        report = dsn.compose(action=action, hostname=self.hostname, envelope=envelope,
                             recipients=recipients, prepend=message.prepend_bytes(),
                             body_path=message.body_path, body_size=envelope.size, to=to, now=now,
                             lifetime=lifetime, full=full, return_limit=self.return_limit, postmaster_copy=postmaster)
        kind = "postmaster" if postmaster else {dsn.FAILED: "bounce", dsn.DELAYED: "delay"}.get(
            action, "success")
        notice_envelope = Envelope(
            queue_id="", sender="", recipients=self.notice_recipients(to, route), received_at=now,
            body="8BITMIME" if report.eight_bit else None, smtputf8=report.smtputf8,
            client_name="localhost", helo=self.hostname, protocol="local", notification=kind)
        return [Notice(notice_envelope, report.content, action, list(recipients))]

    def notice_recipients(self, to: str, route: str) -> list[Recipient]:
        """The recipients of a notification to ``to``: what its aliases expand to.

        A notification is mail pymta makes, not received over SMTP: the alias
        maps are asked here (``owner-list`` -> the list owner's mailbox,
        ``postmaster`` -> the admin), as they would be at RCPT TO.  Without
        an alias (or when one expands to nothing routable) it goes to ``to``.
        """
        targets = None
        if self.expand is not None:
            try:
                targets = self.expand(to)
            except Exception:
                log.failure("expanding <{to}> for a notification failed; sent to it unexpanded",
                            to=to)
        recipients: list[Recipient] = []
        for target in targets or ():
            if isinstance(target, AliasTarget) and target.command is not None:
                recipients.append(Recipient(target.address, to, target.route or route,
                                            command=target.command))
                continue
            address = target.address if isinstance(target, AliasTarget) else target
            target_route = self.route_for(address)
            if target_route is not None and all(r.address.lower() != address.lower()
                                                for r in recipients):
                recipients.append(Recipient(address, to, target_route))
        return recipients or [Recipient(to, to, route)]


def alias_expansion(config: Any) -> Callable[[str], list | None] | None:
    """The rcpt stage's alias maps as one function (the first that knows the address), or None."""
    expanders = [plugin.obj.expand_address for plugin in config.stages.get("rcpt", ())
                 if callable(getattr(plugin.obj, "expand_address", None))]
    if not expanders:
        return None

    def expand(address: str) -> list | None:
        for expander in expanders:
            targets = expander(address)
            if targets is not None:
                return targets
        return None
    return expand
