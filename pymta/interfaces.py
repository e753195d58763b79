"""Plugin interfaces: one small interface per decision point.

Stages follow the SMTP session (connect, helo, mail, rcpt, data) and then the
spool (deliver).  At each stage the configured plugins run in order until one
returns a decided :class:`pymta.verdict.Verdict` (anything but DUNNO).  Every
method may return the verdict directly or a Deferred that fires with it.
Plugins never touch the transport.

A plugin is a class (or any callable) taking ``(options, context)``:
``options`` is its own config table (a dict, ``use`` removed) and ``context`` a
:class:`PluginContext`.  Bad options raise :class:`pymta.config.errors.OptionError`
naming the key; the loader reports it with the config file and table name.
The object returned must provide the interface of the stage it is listed in;
that is checked with ``zope.interface.verify.verifyObject`` at start-up.
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.cred.checkers import ICredentialsChecker
from zope.interface import Attribute, Interface
from zope.interface.interface import InterfaceClass


class IConnectPolicy(Interface):
    """Decide whether a new connection may talk to us (DNSBL, rate limits)."""

    def check_connect(session):
        """Return a Verdict for the connecting client (``session.helo`` is None)."""


class IConnectPrefetch(Interface):
    """Optional, for connect-stage plugins: start slow work (DNS queries) early.

    ``prefetch_connect`` is called as soon as the connection is made, while
    the client's name is still being looked up, so that both run at once;
    ``check_connect`` follows when the name is known and may use what was
    started (kept in ``session.notes``).
    """

    def prefetch_connect(session):
        """Start what ``check_connect`` will need; return nothing."""


class IHeloPolicy(Interface):
    """Decide on the HELO/EHLO name."""

    def check_helo(session, hostname):
        """Return a Verdict for ``hostname`` (the HELO/EHLO argument)."""


class ISenderPolicy(Interface):
    """Decide on the envelope sender (MAIL FROM): SPF and other sender policy."""

    def check_sender(session, transaction):
        """Return a Verdict for ``transaction.sender`` ("" is the null sender)."""


class IRecipientPolicy(Interface):
    """Validate one recipient (RCPT TO).

    ACCEPT may carry ``rewrite``: the addresses the recipient expands to
    (alias and virtual maps).  The core has already refused relaying before
    this stage runs: a plugin cannot open the relay.
    """

    def check_recipient(session, transaction, recipient):
        """Return a Verdict for ``recipient`` (forward-path without <>)."""


class IMessageFilter(Interface):
    """Inspect a received message before the server answers end of data.

    ``message`` is a :class:`pymta.spool.message.MessageView`-like object with
    ``headers()`` (list of (name, value)), ``open()`` (binary file of the body
    as received) and ``size``.  ACCEPT or DUNNO may carry ``headers`` to add.
    """

    def check_message(session, transaction, message):
        """Return a Verdict for the complete message."""


class IDeliveryBackend(Interface):
    """Deliver a spooled message to some of its recipients."""

    def deliver(message, recipients):
        """Deliver ``message`` (a :class:`pymta.spool.message.SpooledMessage`)
        to ``recipients`` (list of :class:`pymta.envelope.Recipient`).

        Return (or fire a Deferred with) a list of
        :class:`pymta.delivery.result.DeliveryResult`, one per recipient in the
        same order.  Must not raise for a recipient-specific problem: report it
        as a deferred (4xx) or failed (5xx) result.  An exception is taken as a
        temporary failure for every recipient.
        """


class IRemoteDelivery(IDeliveryBackend):
    """A delivery backend that hands mail on to other mail servers (MX relay, smarthost).

    A marker: nothing more to implement than ``deliver``.  The loader refuses
    a configuration that would send a local domain's mail (``[server]
    domains``) to such a backend through a route that does not name that
    domain: mail for our own domains would loop back to us or leave the
    site.  A site's own relaying backend declares it too
    (``@implementer(IRemoteDelivery)``); local stores (Maildir, mbox, LMTP)
    do not.
    """


class IClosable(Interface):
    """Optional, for any plugin or backend holding more than memory (connections, timers, threads).

    A reload (SIGHUP) builds new plugins from the new configuration; the
    previous ones serve the sessions and deliveries that started before it.
    Once none uses them any more, ``close`` is called on each that provides
    this interface, once.  It is not called at shutdown (a plugin that needs
    that registers a reactor shutdown trigger).
    """

    def close():
        """Release what the plugin holds; return nothing.  No call follows."""


class IPluginRegistration(Interface):
    """A drop-in short name, found by ``twisted.plugin.getPlugins`` in ``pymta.plugins``."""

    name = Attribute("Short name used in config: use = \"name\"")
    description = Attribute("One line for humans")

    def load():
        """Return the plugin factory: a callable taking (options, context)."""


class IPluginContext(Interface):
    """What a plugin factory is given besides its options."""

    hostname = Attribute("The server's host name")
    domains = Attribute("Tuple of the local (final destination) domains, lower case")
    config_dir = Attribute("Directory of the config file: relative paths resolve here")
    reactor = Attribute("The reactor")
    resolver = Attribute("The shared DNS resolver (pymta.dns.resolver.DNSResolver), from [dns]; "
                         "for a session's lookups use session.dns instead (the same methods, "
                         "within the session's DNS time budget) when it is not None")
    shared = Attribute("State shared between nodes (pymta.shared_state.SharedState: Redis, "
                       "from [shared] redis), or None; a call fails fast with "
                       "SharedStateUnavailable and the plugin then decides from its own memory")

    def resolve_path(path):
        """Return ``path`` made absolute relative to ``config_dir``."""


class Stage(NamedTuple):
    """One decision point: the interface its plugins provide and the method the core calls."""

    interface: InterfaceClass
    method: str


STAGES: dict[str, Stage] = {
    # SMTP AUTH: twisted.cred credential checkers (IUsernamePassword), tried in order
    "auth": Stage(ICredentialsChecker, "requestAvatarId"),
    "connect": Stage(IConnectPolicy, "check_connect"),
    "helo": Stage(IHeloPolicy, "check_helo"),
    "mail": Stage(ISenderPolicy, "check_sender"),
    "rcpt": Stage(IRecipientPolicy, "check_recipient"),
    "data": Stage(IMessageFilter, "check_message"),
}
"""The stages of ``[stages]``, in session order: stage name -> (interface, method).

The one statement of that mapping: the loader verifies each listed plugin
against ``interface`` (``verifyObject``), and the core calls ``method`` on
it (:func:`pymta.server.chain.run_stage`; the ``auth`` stage through a
twisted.cred Portal).
"""
