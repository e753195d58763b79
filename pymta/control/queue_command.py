"""``pymta queue``: see and manage the queue of a running server (mailq, postqueue, postsuper).

::

    pymta queue list [--json] [--sender S] [--rcpt R] [--domain D] [--held] [--deferred]
    pymta queue show ID [--body]
    pymta queue flush [ID ... | --domain D | --all]
    pymta queue hold|release|requeue (ID ... | --all | filters)
    pymta queue delete (ID ... | --all --yes | filters)
    pymta queue bounce ID ... [--reason TEXT]

Each verb takes ``--config FILE`` (the socket is its ``[control] socket``,
by default ``control.sock`` in its spool directory) or ``--socket PATH``;
with neither, the embedded default config's.  The server makes every
change; ``list`` and ``show`` read the spool directly when it is not running.

An unknown id is one line, ``pymta: no message ID in the queue``, and exit
status 1 (as the issue words it; other problems are ``pymta queue: ...``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from twisted.internet import defer
from twisted.protocols import amp

from pymta.admin import EXIT_ERROR, EXIT_OK, CommandError
from pymta.control import client, commands, offline, queueview

__all__ = ["register"]

CHANGES = {"hold": (commands.Hold, "held"), "release": (commands.Release, "released"),
           "delete": (commands.Delete, "deleted"), "requeue": (commands.Requeue, "requeued")}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "queue", help="list, show, flush, hold, release, delete, requeue or bounce queued mail",
        description="Manage the queue of the running server over its control socket.")
    verbs = parser.add_subparsers(title="verbs", dest="verb", metavar="VERB", required=True)

    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--config", metavar="FILE", help="the server's config file")
    group.add_argument("--socket", metavar="PATH", help="the control socket")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--sender", help="messages from this envelope sender ('' for <>)")
    filters.add_argument("--rcpt", help="messages with this recipient")
    filters.add_argument("--domain", help="messages with a recipient at this domain "
                                          "(@domain: and its subdomains)")
    filters.add_argument("--held", action="store_true", help="held messages")
    filters.add_argument("--deferred", action="store_true",
                         help="messages waiting for a retry after a failed attempt")

    listing = verbs.add_parser("list", parents=[where, filters], help="list the queue (mailq)")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    listing.set_defaults(run=run_list)

    show = verbs.add_parser("show", parents=[where], help="a message's envelope and header")
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="the whole message")
    show.set_defaults(run=run_show)

    flush = verbs.add_parser("flush", parents=[where], help="deliver now (postqueue -f, ETRN)")
    flush.add_argument("ids", metavar="ID", nargs="*")
    flush.add_argument("--domain", help="the recipients at this domain (@domain: and subdomains)")
    flush.add_argument("--all", action="store_true", help="every queued message")
    flush.set_defaults(run=run_flush)

    for verb, text in (("hold", "hold messages: never delivered nor expired until released"),
                       ("release", "release held messages"),
                       ("delete", "remove messages from the queue, without a bounce"),
                       ("requeue", "route messages again and retry them now, backoff reset")):
        change = verbs.add_parser(verb, parents=[where, filters], help=text)
        change.add_argument("ids", metavar="ID", nargs="*")
        change.add_argument("--all", action="store_true", help="every message in the queue")
        if verb == "delete":
            change.add_argument("--yes", action="store_true", help="confirm --all")
        change.set_defaults(run=run_change)

    bounce = verbs.add_parser("bounce", parents=[where],
                              help="return messages to their senders (RFC 3464 DSN)")
    bounce.add_argument("ids", metavar="ID", nargs="+")
    bounce.add_argument("--reason", help="the text the sender reads")
    bounce.set_defaults(run=run_bounce)


# -- where the server is ------------------------------------------------------------------

def _locate(args: argparse.Namespace) -> tuple[str, str]:
    """(control socket, spool directory) from --socket / --config / the embedded default."""
    from pymta.config.control import control_socket_of_file
    from pymta.config.errors import ConfigError
    try:
        socket_path, spool_dir = control_socket_of_file(args.config)
    except ConfigError as e:
        raise CommandError(f"configuration error: {e}") from None
    return (args.socket or socket_path), spool_dir


def _talk(args: argparse.Namespace, conversation, offline: bool = False) -> Any:
    """Run ``conversation`` with the server; errors become one line.

    With ``offline``, ServerNotRunning is raised for the caller to read the spool.
    """
    socket_path, _ = _locate(args)
    try:
        return client.run(socket_path, conversation)
    except client.ServerNotRunning as e:
        if offline:
            raise
        raise CommandError(str(e)) from None
    except (client.SocketPermission, commands.BadSelection) as e:
        raise CommandError(str(e)) from None
    except amp.RemoteAmpError as e:
        raise CommandError(f"the server could not do it ({e}); see its log") from None


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"sender": args.sender, "rcpt": args.rcpt, "domain": args.domain,
            "held": args.held, "deferred": args.deferred}


def _no_such_message(queue_id: str) -> int:
    print(f"pymta: no message {queue_id} in the queue", file=sys.stderr)
    return EXIT_ERROR


# -- list and show ---------------------------------------------------------------------------

def _offline_entries(args: argparse.Namespace, why: Exception) -> tuple[list, float]:
    _, spool_dir = _locate(args)
    print(f"pymta queue: {why}; reading the spool {spool_dir} directly", file=sys.stderr)
    try:
        return offline.entries(spool_dir), time.time()
    except PermissionError:
        raise CommandError(f"cannot read the spool {spool_dir}: permission denied") from None


def run_list(args: argparse.Namespace) -> int:
    filters = _filters(args)
    try:
        messages, recipients, now = _talk(
            args, lambda protocol: client.list_queue(protocol, **filters), offline=True)
    except client.ServerNotRunning as e:
        found, now = _offline_entries(args, e)
        wanted = commands.queue_filter(filters)
        selected = [entry for entry in found if wanted.matches(*entry)]
        messages = [queueview.message_row(*entry) for entry in selected]
        recipients = [row for entry in selected for row in queueview.recipient_rows(*entry)]
    out = queueview.format_json if args.json else queueview.format_text
    sys.stdout.write(out(messages, recipients, now))
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    @defer.inlineCallbacks
    def conversation(protocol):
        listing = yield client.list_queue(protocol, queue_id=args.id)
        about = yield protocol.callRemote(commands.Details, queue_id=args.id)
        data = yield client.read_message(protocol, args.id, until_blank_line=not args.body)
        return listing, about, data
    try:
        (messages, recipients, now), about, data = _talk(args, conversation, offline=True)
    except commands.NoSuchMessage:
        return _no_such_message(args.id)
    except client.ServerNotRunning as e:
        found, now = _offline_entries(args, e)
        entry = next((entry for entry in found if entry[0].queue_id == args.id), None)
        if entry is None:
            return _no_such_message(args.id)
        messages = [queueview.message_row(*entry)]
        recipients = queueview.recipient_rows(*entry)
        about = queueview.details(entry[0])
        try:
            data = offline.content(_locate(args)[1], entry[0],
                                   None if args.body else 256 * 1024)
        except FileNotFoundError:
            return _no_such_message(args.id)
    sys.stdout.write(queueview.format_text(messages, recipients, now))
    sys.stdout.write(queueview.format_details(about))
    if not args.body:
        end = data.find(b"\r\n\r\n")
        data = data[:end + 2] if end >= 0 else data
    sys.stdout.write("\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    return EXIT_OK


# -- changes ------------------------------------------------------------------------------------

def _report(answer: dict[str, Any], done: str) -> int:
    count = answer["changed"]
    print(f"{done} {count} message{'' if count == 1 else 's'}")
    for note in answer["notes"]:
        print(f"{note['id']}: {note['note']}")
    if answer["more_notes"]:
        print(f"... and {answer['more_notes']} more")
    return EXIT_OK


def _change(args: argparse.Namespace, command: type, done: str, **arguments: Any) -> int:
    try:
        answer = _talk(args, lambda protocol: protocol.callRemote(command, **arguments))
    except commands.NoSuchMessage as e:
        return _no_such_message(str(e))
    return _report(answer, done)


def run_change(args: argparse.Namespace) -> int:
    command, done = CHANGES[args.verb]
    extra = {}
    if args.verb == "delete":
        if args.all and not args.yes:
            raise CommandError("delete --all removes every message in the queue: add --yes")
        extra["confirmed"] = bool(args.yes)
    return _change(args, command, done, ids=args.ids, all=args.all, **_filters(args), **extra)


def run_flush(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.ids, args.domain, args.all))) != 1:
        raise CommandError("give one of: message ids, --domain D, --all")
    return _change(args, commands.Flush, "flushed", ids=args.ids, domain=args.domain, all=args.all)


def run_bounce(args: argparse.Namespace) -> int:
    return _change(args, commands.Bounce, "bounced", ids=args.ids, reason=args.reason)

