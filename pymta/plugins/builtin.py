"""The short names pymta ships with, and the registration type sites reuse.

``twisted.plugin.getPlugins(IPluginRegistration, pymta.plugins)`` finds every
module-level object here (and in any other module of a ``pymta/plugins/``
directory on ``sys.path``) that provides ``IPlugin`` and
``IPluginRegistration``.  A registration names its factory as a
``"module:Attribute"`` string and imports it only in :meth:`load`, so listing
the short names never imports a backend that is not used.

A site drop-in (``<dir on sys.path>/pymta/plugins/mysite.py``, no
``__init__.py`` in that directory) looks like::

    from pymta.plugins.builtin import PluginRegistration

    vip_only = PluginRegistration("vip_only", "mysite.checks:VipOnly",
                                  "Accept mail only for VIP recipients")
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from twisted.plugin import IPlugin
from zope.interface import implementer

from pymta.interfaces import IPluginRegistration


@implementer(IPlugin, IPluginRegistration)
class PluginRegistration:
    """A short name for a plugin factory given as ``"module:Attribute"``."""

    def __init__(self, name: str, target: str, description: str = ""):
        module, sep, attribute = target.partition(":")
        if not sep or not module or not attribute:
            raise ValueError(f"plugin target {target!r} is not of the form 'module:Attribute'")
        self.name = name
        self.target = target
        self.description = description

    def load(self) -> Callable[..., Any]:
        """Import and return the factory (exceptions propagate to the loader, which reports them)."""
        module_name, _, attribute = self.target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
        return obj

    def __repr__(self) -> str:
        return f"PluginRegistration({self.name!r}, {self.target!r})"


localdomain = PluginRegistration(
    "localdomain", "pymta.policy.recipients:LocalDomainRecipients",
    "Accept any safe mailbox name in the local domains")
static = PluginRegistration(
    "static", "pymta.policy.recipients:StaticRecipients",
    "Accept the addresses listed in the config, reject other local ones")
aliasmap = PluginRegistration(
    "aliasmap", "pymta.policy.recipients:AliasMap",
    "Alias / virtual map file: rewrite recipients, reject unknown ones in mapped domains")
maildir = PluginRegistration(
    "maildir", "pymta.delivery.maildir:MaildirBackend",
    "Deliver into Maildir folders")
mbox = PluginRegistration(
    "mbox", "pymta.delivery.mbox:MboxBackend",
    "Deliver into mbox files")
pipe = PluginRegistration(
    "pipe", "pymta.delivery.pipe:PipeBackend",
    "Deliver to a command (message on stdin, exit status decides), as an unprivileged user")
passwdfile = PluginRegistration(
    "passwdfile", "pymta.auth.passwdfile:PasswordFileChecker",
    "SMTP AUTH users from an argon2id password file (maintained with pymta passwd)")
sender_login = PluginRegistration(
    "sender_login", "pymta.policy.sender_login:SenderLoginPolicy",
    "Authenticated users may send only as the addresses a map gives them")
spf = PluginRegistration(
    "spf", "pymta.policy.spf:SPFPolicy",
    "SPF (RFC 7208) checks of HELO and MAIL FROM, Received-SPF header")
authres = PluginRegistration(
    "authres", "pymta.policy.authres:AuthenticationResults",
    "Authentication-Results header (RFC 8601); removes forged ones claiming our authserv-id")
dnsbl = PluginRegistration(
    "dnsbl", "pymta.policy.dnsbl:DNSBL",
    "Refuse clients listed in DNS block lists")
ratelimit = PluginRegistration(
    "ratelimit", "pymta.policy.ratelimit:RateLimit",
    "Connections, messages and recipients per client IP and per user in a time window")
greylist = PluginRegistration(
    "greylist", "pymta.policy.greylist:Greylist",
    "Defer the first attempt of an unknown (client network, sender, recipient) triplet (RFC 6647)")
relay = PluginRegistration(
    "relay", "pymta.relay.backend:RelayBackend",
    "Deliver over SMTP to the MX hosts of each recipient domain")
smarthost = PluginRegistration(
    "smarthost", "pymta.relay.backend:SmarthostBackend",
    "Deliver over SMTP to a fixed next hop (TLS, AUTH)")
lmtp = PluginRegistration(
    "lmtp", "pymta.delivery.lmtp:LMTPBackend",
    "Deliver to a mail store (Dovecot) over LMTP, TCP or a UNIX socket")
dovecot = PluginRegistration(
    "dovecot", "pymta.auth.dovecot:DovecotAuthChecker",
    "SMTP AUTH passwords checked by Dovecot over its auth-client socket")
dkim_sign = PluginRegistration(
    "dkim_sign", "pymta.policy.dkim_sign:DKIMSign",
    "DKIM-sign mail of authenticated users and trusted networks (RSA, Ed25519)")
dkim_verify = PluginRegistration(
    "dkim_verify", "pymta.policy.dkim_verify:DKIMVerify",
    "Verify DKIM signatures of inbound mail (results in Authentication-Results)")
dmarc = PluginRegistration(
    "dmarc", "pymta.policy.dmarc:DMARCPolicy",
    "DMARC (RFC 7489): the From domain's policy over SPF and DKIM alignment")
arc = PluginRegistration(
    "arc", "pymta.policy.arc:ARCPolicy",
    "ARC (RFC 8617): verify the chain of inbound mail and, as an option, seal it")
