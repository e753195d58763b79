"""What a plugin may import: the one public module for plugin authors.

A site plugin (and every built-in one) takes what it needs from here, never
from another plugin's module or from pymta's internals::

    from zope.interface import implementer

    from pymta.plugin_api import DUNNO, IRecipientPolicy, Options, Verdict

- the interfaces of the stages and backends (:mod:`pymta.interfaces`; which
  method each stage calls is :data:`STAGES`), and :class:`IClosable` for a
  plugin holding connections, timers or threads (closed after a reload);
- :class:`Verdict` (``DUNNO``, :class:`Kind`), what every stage method returns,
  and :class:`DeliveryResult`, what a backend returns per recipient;
  :class:`AuthResult` and :func:`add_auth_result`, how a check records its
  outcome for the ``Authentication-Results`` field;
- :class:`Options`, to read the plugin's own config table, and
  :class:`OptionError` / :class:`ConfigError` for problems with it;
- :class:`PluginContext` (what a factory is given besides its options), the
  :class:`Session` and :class:`Transaction` a stage method is given, and
  :class:`DNSError`, how the resolver's lookups fail;
- :class:`WatchedFile`, a map file re-read when it changes;
- :class:`SMTPCredentials`, what an ``auth`` checker is given (user name,
  password, the session's addresses and TLS), and :class:`TemporaryAuthFailure`,
  how it says that it cannot decide now (454);
- address helpers: :func:`split_address`, :func:`strip_extension`,
  :func:`normalize_domain`, and the mailbox-name rules of local delivery
  (:func:`safe_mailbox_name`, :func:`safe_folder_name`).
"""

from __future__ import annotations

from pymta.auth.credentials import SMTPCredentials, TemporaryAuthFailure
from pymta.authresults import AuthResult, add_auth_result
from pymta.config.durations import format_duration, parse_duration
from pymta.config.errors import ConfigError, OptionError
from pymta.addresses import domain_key, normalize_domain, split_address, split_extension
from pymta.config.options import Options, PluginContext, describe_value
from pymta.config.watched_file import WatchedFile
from pymta.delivery.result import DeliveryResult
from pymta.dns.resolver import DNSError
from pymta.interfaces import (STAGES, IClosable, IConnectPolicy, IConnectPrefetch, IDeliveryBackend,
                              IHeloPolicy, IMessageFilter, IPluginContext, IRecipientPolicy,
                              IRemoteDelivery, ISenderPolicy)
from pymta.mailbox_names import safe_domain_name, safe_folder_name, safe_mailbox_name
from pymta.session import Session, Transaction
from pymta.verdict import DUNNO, Kind, Verdict

__all__ = [
    # interfaces
    "STAGES", "IConnectPolicy", "IConnectPrefetch", "IHeloPolicy", "ISenderPolicy",
    "IRecipientPolicy", "IMessageFilter", "IDeliveryBackend", "IRemoteDelivery",
    "IPluginContext", "IClosable",
    # what a stage method is given, and DNS failures (context.resolver, session.dns)
    "Session", "Transaction", "DNSError",
    # answers, and results for the Authentication-Results field
    "Verdict", "Kind", "DUNNO", "DeliveryResult", "AuthResult", "add_auth_result",
    # what an auth checker is given, and its "cannot decide now" (454)
    "SMTPCredentials", "TemporaryAuthFailure",
    # options and files
    "Options", "OptionError", "ConfigError", "PluginContext", "WatchedFile",
    "describe_value", "format_duration", "parse_duration",
    # addresses
    "split_address", "split_extension", "domain_key", "strip_extension", "read_recipient_delimiter",
    "normalize_domain",
    "safe_mailbox_name", "safe_domain_name", "safe_folder_name",
]


# -- address helpers --------------------------------------------------------

def strip_extension(local: str, delimiters: str) -> str | None:
    """The local part without its ``+extension``, or None when it has none (see split_extension)."""
    base, extension = split_extension(local, delimiters)
    return base if extension is not None else None


def read_recipient_delimiter(opts: Options) -> str:
    """The ``recipient_delimiter`` option (default ``"+"``, ``""`` for none), checked."""
    delimiters = opts.str("recipient_delimiter", default="+", allow_empty=True)
    bad = [c for c in delimiters if c == "@" or c.isspace() or not c.isprintable()]
    if bad:
        raise OptionError("recipient_delimiter", f"{bad[0]!r} cannot be a delimiter")
    return delimiters
