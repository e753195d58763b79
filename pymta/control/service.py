"""The server's side of the control socket: :class:`ControlService` and its AMP responder.

The socket is a UNIX socket at ``[control] socket`` (by default
``control.sock`` in the spool directory), mode 0660.  It is created in
``startService``, after twistd switched to the ``--uid`` user, so that it
belongs to the user the server runs as; a lock file beside it
(``control.sock.lock``, Twisted's) lets a restart after a crash replace the
stale socket and keeps a second server off a socket in use.  Failing to
listen is logged and the server goes on without it: mail comes first.

Every change is made by the scheduler (see
:mod:`pymta.delivery.queue_admin`) and logged with the uid of the process
that asked (``SO_PEERCRED``)::

    1K0TJKT10CTYC13Z: held by uid 0 (pymta queue hold)
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from pymta.control import commands, queueview
from pymta.control.commands import BadSelection, NoSuchMessage
from pymta.delivery.queue_admin import DEFAULT_BOUNCE_REASON, QueueError
from pymta.control.offline import read_content
from pymta.spool.queuefile import BODY_SUFFIX

log = Logger(namespace="pymta.control")

SOCKET_MODE = 0o660


def peer_uid(transport: Any) -> int | None:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED), or None."""
    try:
        raw = transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", raw)[1]


class QueueControl:
    """What the commands do, on the scheduler and the spool; ``uid`` is the asker's."""

    def __init__(self, scheduler: Any, spool: Any, route_for: Callable[[str], str | None],
                 reactor: Any) -> None:
        self.scheduler = scheduler
        self.spool = spool
        self.route_for = route_for
        self.reactor = reactor

    # -- reading ------------------------------------------------------------------------
    def list_page(self, queue_id: str | None, arguments: dict[str, Any]) -> dict[str, Any]:
        entries = self.scheduler.entries()
        if queue_id is not None:
            entries = [e for e in entries if e[0].queue_id == queue_id]
            if not entries:
                raise NoSuchMessage(queue_id)
        else:
            wanted = commands.queue_filter(arguments)
            entries = [e for e in entries if wanted.matches(*e)]
        messages, recipients, resume = commands.page(entries, arguments.get("after"),
                                                     arguments.get("after_index") or 0)
        answer = {"messages": messages, "recipients": recipients, "now": self.reactor.seconds()}
        if resume is not None:
            answer["next_id"], answer["next_index"] = resume
        return answer

    def read(self, queue_id: str, offset: int) -> defer.Deferred:
        envelope = self._envelope(queue_id)
        prepend = envelope.prepend_bytes()
        total = len(prepend) + envelope.size
        path = os.path.join(self.spool.queue_dir, queue_id + BODY_SUFFIX)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), read_content,
                                      path, prepend, envelope.size, max(0, offset),
                                      commands.CHUNK_BYTES)

        def gone(failure):
            failure.trap(FileNotFoundError)
            raise NoSuchMessage(queue_id)
        return d.addCallbacks(lambda data: {"data": data, "total": total}, gone)

    def details(self, queue_id: str) -> dict[str, Any]:
        return queueview.details(self._envelope(queue_id))

    def _envelope(self, queue_id: str):
        envelope = self.scheduler.envelope_of(queue_id)
        if envelope is None:
            raise NoSuchMessage(queue_id)
        return envelope

    # -- changing ---------------------------------------------------------------------------
    def select(self, arguments: dict[str, Any]) -> list[str]:
        """The ids a selection names (see :mod:`pymta.control.commands`)."""
        ids = list(arguments.get("ids") or [])
        wanted = commands.queue_filter(arguments)
        every = bool(arguments.get("all"))
        if ids and (every or not wanted.empty):
            raise BadSelection("give message ids, or --all, or filters; not several of them")
        if every and not wanted.empty:
            raise BadSelection("give --all or filters, not both")
        if ids:
            for queue_id in ids:
                if not self.scheduler.has_message(queue_id):
                    raise NoSuchMessage(queue_id)
            return ids
        if not every and wanted.empty:
            raise BadSelection("name the messages: an ID, --all, or a filter "
                               "(--sender, --rcpt, --domain, --held, --deferred)")
        return [envelope.queue_id for envelope, busy in self.scheduler.entries()
                if every or wanted.matches(envelope, busy)]

    def change(self, verb: str, ids: list[str], uid: int | None,
               do: Callable[[str], str]) -> dict[str, Any]:
        """Apply ``do`` to each id; log each change with ``uid``; the command's answer."""
        who = f"uid {uid}" if uid is not None else "an unknown uid"
        changed, notes = 0, []
        for queue_id in ids:
            if not self.scheduler.has_message(queue_id):
                notes.append((queue_id, "no longer in the queue"))
                continue
            try:
                outcome = do(queue_id)
            except QueueError as e:
                notes.append((queue_id, f"not {verb}: {e}"))
                continue
            changed += 1
            log.info("{queue_id}: {outcome} by {who} (pymta queue {verb})", queue_id=queue_id,
                     outcome=outcome, who=who, verb=_VERBS[verb])
            if outcome not in (verb, "flushed"):
                notes.append((queue_id, outcome))
        return {"changed": changed,
                "notes": [{"id": i, "note": n} for i, n in notes[:commands.NOTES_LIMIT]],
                "more_notes": max(0, len(notes) - commands.NOTES_LIMIT)}

    def hold(self, ids, uid):
        reason = f"held by uid {uid} (pymta queue hold)"
        return self.change("held", ids, uid, lambda i: self.scheduler.hold(i, reason))

    def release(self, ids, uid):
        def release(queue_id: str) -> str:
            if not self.scheduler.release(queue_id):
                raise QueueError("not held")
            return "released"
        return self.change("released", ids, uid, release)

    def delete(self, ids, uid):
        return self.change("deleted", ids, uid, self.scheduler.delete)

    def requeue(self, ids, uid):
        return self.change("requeued", ids, uid,
                           lambda i: self.scheduler.requeue(i, self.route_for))

    def bounce(self, ids, reason, uid):
        reason = reason or DEFAULT_BOUNCE_REASON
        return self.change("bounced", ids, uid, lambda i: self.scheduler.bounce(i, reason))

    def flush(self, ids, domain, every, uid):
        if sum(map(bool, (ids, domain, every))) != 1:
            raise BadSelection("give one of: message ids, --domain D, --all")
        if ids:
            for queue_id in ids:
                if not self.scheduler.has_message(queue_id):
                    raise NoSuchMessage(queue_id)
            return self.change("flushed", ids, uid, self.scheduler.flush_message)
        count = self.scheduler.flush(domain)
        log.info("flush of {what} by uid {uid} (pymta queue flush): {count} message(s) due now",
                 what=domain or "the whole queue", uid=uid, count=count)
        return {"changed": count, "notes": [], "more_notes": 0}


_VERBS = {"held": "hold", "released": "release", "deleted": "delete", "requeued": "requeue",
          "bounced": "bounce", "flushed": "flush"}


class ControlProtocol(amp.AMP):
    """One admin connection: answers the commands of :mod:`pymta.control.commands`."""

    def __init__(self, control: QueueControl) -> None:
        super().__init__()
        self.control = control

    @property
    def uid(self) -> int | None:
        return peer_uid(self.transport)

    # AMP logs every connection made and lost: one admin command is two lines of noise
    def makeConnection(self, transport) -> None:
        self._transportPeer, self._transportHost = transport.getPeer(), transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @commands.ListQueue.responder
    def list_queue(self, queue_id=None, **arguments):
        return self.control.list_page(queue_id, arguments)

    @commands.Details.responder
    def details(self, queue_id):
        return self.control.details(queue_id)

    @commands.ReadMessage.responder
    def read_message(self, queue_id, offset):
        return self.control.read(queue_id, offset)

    @commands.Hold.responder
    def hold(self, **selection):
        return self.control.hold(self.control.select(selection), self.uid)

    @commands.Release.responder
    def release(self, **selection):
        return self.control.release(self.control.select(selection), self.uid)

    @commands.Delete.responder
    def delete(self, confirmed, **selection):
        if selection.get("all") and not confirmed:
            raise BadSelection("delete --all removes every message in the queue: add --yes")
        return self.control.delete(self.control.select(selection), self.uid)

    @commands.Requeue.responder
    def requeue(self, **selection):
        return self.control.requeue(self.control.select(selection), self.uid)

    @commands.Bounce.responder
    def bounce(self, ids, reason=None):
        if not ids:
            raise BadSelection("name the message to bounce")
        self.control.select({"ids": ids})
        return self.control.bounce(ids, reason, self.uid)

    @commands.Flush.responder
    def flush(self, ids, all, domain=None):
        return self.control.flush(ids, domain, all, self.uid)


class ControlService(Service):
    """Listens on the control socket (see the module docstring)."""

    name = "control"

    def __init__(self, path: str, control: QueueControl, reactor: Any) -> None:
        self.path = path
        self.control = control
        self.reactor = reactor
        self.port = None

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(lambda: ControlProtocol(self.control))
        endpoint = UNIXServerEndpoint(self.reactor, self.path, mode=SOCKET_MODE, wantPID=True)
        d = endpoint.listen(factory)

        def listening(port) -> None:
            self.port = port
            log.info("control socket {path} (pymta queue)", path=self.path)

        def failed(failure) -> None:
            log.error("control socket {path}: cannot listen: {error}; pymta queue cannot reach "
                      "this server", path=self.path, error=failure.value)
        d.addCallbacks(listening, failed)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
