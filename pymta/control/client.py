"""The admin's side of the control socket: connect, page through a listing, read a message.

:func:`run` runs one conversation with the server on Twisted's reactor
(``twisted.internet.task.react``) and returns its result or raises its
error; :func:`connect` says clearly why the server cannot be reached.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from pymta.control import commands


class ServerNotRunning(Exception):
    """Nothing answers on the control socket (the text names it)."""


class ServerNotAnswering(ServerNotRunning):
    """The server took the connection but gave no answer in time (the text says so)."""


class SocketPermission(Exception):
    """The control socket is there but this user may not use it (the text says whose it is)."""


def check_socket(path: str) -> None:
    """Raise ServerNotRunning or SocketPermission if ``path`` cannot be connected to."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise SocketPermission(f"permission denied on the control socket {path}"
                                   f"{_owner(path)}: run pymta queue as that user or root") from None
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
            raise ServerNotRunning(f"the server is not running (nothing listens on the control "
                                   f"socket {path})") from None
        raise ServerNotRunning(f"cannot reach the server on the control socket {path}: "
                               f"{e.strerror}") from None
    finally:
        probe.close()


def _owner(path: str) -> str:
    """", owned by USER, mode 0660" of ``path`` (or of the first directory we can stat)."""
    target = path
    while target and target != os.path.dirname(target):
        try:
            st = os.stat(target)
        except PermissionError:
            target = os.path.dirname(target)
            continue
        except OSError:
            return ""
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = str(st.st_uid)
        what = " (" if target == path else f" (its directory {target} is "
        return f"{what}owned by {user}, mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def connect(reactor: Any, path: str) -> defer.Deferred:
    """An AMP connection to the server on ``path`` (after :func:`check_socket`)."""
    check_socket(path)
    return connectProtocol(UNIXClientEndpoint(reactor, path, timeout=10), amp.AMP())


#: seconds a whole conversation may take (a server that hangs must not hang the admin)
ANSWER_TIMEOUT = 300


def run(path: str, conversation: Callable[[amp.AMP], Any]) -> Any:
    """Connect to ``path``, run ``conversation(protocol)`` (a Deferred), return its result.

    Raises ServerNotAnswering when it takes longer than ANSWER_TIMEOUT.
    """
    from twisted.internet import task
    check_socket(path)            # before starting the reactor: a clear error at once
    outcome: list[Any] = []

    def main(reactor: Any) -> defer.Deferred:
        d = connect(reactor, path)

        def talk(protocol: amp.AMP) -> defer.Deferred:
            done = defer.maybeDeferred(conversation, protocol)
            return done.addBoth(lambda result: (protocol.transport.loseConnection(), result)[1])
        d.addCallback(talk)
        d.addTimeout(ANSWER_TIMEOUT, reactor)
        d.addBoth(outcome.append)
        return d.addBoth(lambda _: None)
    try:
        task.react(main)
    except SystemExit:
        pass
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(defer.TimeoutError):
            raise ServerNotAnswering(f"the server did not answer on the control socket {path} "
                                     f"within {ANSWER_TIMEOUT} s")
        result.raiseException()
    return result


@defer.inlineCallbacks
def list_queue(protocol: amp.AMP, queue_id: str | None = None, **filters: Any):
    """(message rows, recipient rows, the server's time), every page of the listing."""
    messages: list[dict] = []
    recipients: list[dict] = []
    seen: set[str] = set()
    after, index = None, 0
    while True:
        answer = yield protocol.callRemote(commands.ListQueue, queue_id=queue_id, after=after,
                                           after_index=index, **filters)
        for row in answer["messages"]:
            if row["id"] not in seen:
                seen.add(row["id"])
                messages.append(row)
        recipients.extend(answer["recipients"])
        if answer.get("next_id") is None:
            return messages, recipients, answer["now"]
        after, index = answer["next_id"], answer["next_index"]


@defer.inlineCallbacks
def read_message(protocol: amp.AMP, queue_id: str, until_blank_line: bool = False):
    """The message's content as delivered (prepended headers, then body); with
    ``until_blank_line``, at least its header."""
    data = b""
    while True:
        answer = yield protocol.callRemote(commands.ReadMessage, queue_id=queue_id,
                                           offset=len(data))
        data += answer["data"]
        if not answer["data"] or len(data) >= answer["total"] \
                or (until_blank_line and b"\r\n\r\n" in data):
            return data
