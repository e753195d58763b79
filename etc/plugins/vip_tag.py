"""Example site plugins: copy this file to start your own.

pymta finds this module through ``[server] plugin_path = ["plugins"]`` in
pymta.toml (the directory is put on ``sys.path``) and the dotted path in a
plugin table::

    [stages]
    data = ["vip"]

    [plugins.vip]
    use = "vip_tag:VipTagger"      # module:Factory
    senders = "vip-senders"        # the plugin's own options

A plugin imports what it needs from :mod:`pymta.plugin_api` (interfaces,
Verdict, Options, OptionError, WatchedFile, address helpers) and nothing
else of pymta.  It is any callable taking ``(options, context)``:

- ``options`` is the plugin's table without ``use`` (a dict).  Read it with
  :class:`~pymta.plugin_api.Options`: it checks types, and ``finish()``
  refuses keys you did not ask for (typos), so the admin gets
  ``pymta.toml: plugins.vip.sendres: unknown key (did you mean 'senders'?)``
  at start-up instead of a plugin that silently does nothing (a missing
  required option is reported first, naming the likely typo).
- ``context`` gives ``hostname``, ``domains``, ``config_dir``, ``reactor``
  and ``resolve_path()`` (relative paths are relative to pymta.toml).

The object returned must provide the interface of each stage it is listed
in (``@implementer(...)`` and the methods); pymta checks that with
``zope.interface.verify.verifyObject`` at start-up.  A method returns a
``Verdict`` (or a Deferred firing with one); it never
writes to the connection.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from pymta.plugin_api import (DUNNO, IMessageFilter, IRecipientPolicy, Kind, OptionError, Options,
                              Verdict)


def read_address_file(path: str, option: str) -> frozenset[str]:
    """The addresses in ``path``, lower-cased: one per line, ``#`` starts a comment.

    Problems are OptionError for ``option``, so the admin sees which config
    key pointed at the broken file, and which line of it is wrong.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise OptionError(option, f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise OptionError(option, f"{path} is not UTF-8 text") from None
    addresses = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        local, at, domain = text.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in text):
            raise OptionError(option, f"{path}, line {number}: expected one address "
                                      f"(user@domain) per line, got {text!r}")
        addresses.add(text.lower())
    return frozenset(addresses)


@implementer(IMessageFilter)
class VipTagger:
    """Add ``X-VIP: yes`` to mail whose envelope sender is in the ``senders`` file.

    Options:
        senders: file of sender addresses, one per line (required).

    It answers DUNNO *with* the header rather than ACCEPT, so the filters
    listed after it in the ``data`` stage still run.  The file is read once,
    at start-up: restart pymta after editing it.
    """

    def __init__(self, options: dict[str, Any], context: Any):
        opts = Options(options)
        self.senders_file = opts.path("senders", context)
        opts.finish()
        self.senders = read_address_file(self.senders_file, "senders")

    def check_message(self, session: Any, transaction: Any, message: Any) -> Verdict:
        sender = transaction.sender.lower()
        if sender and sender in self.senders:
            return Verdict(Kind.DUNNO, headers=(("X-VIP", "yes"),))
        return DUNNO


@implementer(IRecipientPolicy)
class BlockedRecipients:
    """Refuse the recipients listed in ``file`` (an ``rcpt`` stage example).

    Options:
        file: addresses that must not receive mail, one per line (required).

    List it before the validators that accept, e.g.
    ``rcpt = ["blocked", "aliases", "localdomain"]``: a listed address gets
    ``550 5.7.1``, any other gets no opinion and the next plugin decides.
    """

    def __init__(self, options: dict[str, Any], context: Any):
        opts = Options(options)
        self.file = opts.path("file", context)
        opts.finish()
        self.blocked = read_address_file(self.file, "file")

    def check_recipient(self, session: Any, transaction: Any, recipient: str) -> Verdict:
        if recipient.lower() in self.blocked:
            return Verdict.reject(f"<{recipient}>: Recipient address rejected: Access denied",
                                  550, "5.7.1")
        return DUNNO
