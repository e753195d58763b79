"""Running one delivery command: spawn, feed the message on stdin, wait, time out.

The reactor never blocks: the command is started with
``reactor.spawnProcess`` (as another user when ``uid``/``gid`` are given),
the message is streamed to its stdin by a pull producer (64 KiB at a time,
read from the spool file: a 50 MiB message is never held in memory), and
its output (stdout and stderr together) is read as it comes, the first
:data:`OUTPUT_LIMIT` bytes kept for the log and the bounce.

A command may exit without reading its input (or close stdin early): the
feed then stops (EPIPE) and the exit status alone decides.  The command runs
in a process group of its own (``setsid``), so the time limit kills it and
whatever it started (SIGKILL to the group).
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

#: bytes of a command's output kept (for the log line and the bounce)
OUTPUT_LIMIT = 1024
CHUNK = 64 * 1024

#: seconds between looks for the exit of a command whose output closed (see childConnectionLost)
REAP_INTERVAL = 0.1
#: util-linux setsid(1): the command becomes the leader of a new process group
SETSID = shutil.which("setsid")


@dataclass(frozen=True)
class CommandOutcome:
    """How a command ended."""

    #: exit status, None when it did not exit by itself (signal, time limit, not started)
    status: int | None = None
    #: the signal that killed it (not by the time limit), or None
    signal: int | None = None
    #: it ran out of time and was killed
    timed_out: bool = False
    #: the first OUTPUT_LIMIT bytes of its stdout and stderr
    output: bytes = b""
    #: it could not be started: why
    start_error: str | None = None


class MessageInput:
    """A readable file of ``prefix`` then ``body``, CRLF turned into LF when ``unix_lines``.

    ``read(n)`` returns at most about ``n`` bytes, b"" at the end; the body is
    read as it is asked for (FileSender pulls 64 KiB at a time).
    """

    def __init__(self, prefix: bytes, body: BinaryIO, unix_lines: bool):
        self._prefix = prefix
        self._body = body
        self._unix = unix_lines
        self._held_cr = False      # a chunk ended in CR: is the next byte LF?

    def read(self, size: int = CHUNK) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data.replace(b"\r\n", b"\n") if self._unix else data
        data = self._body.read(size)
        if not self._unix:
            return data
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            following = self._body.read(1)       # CRLF split between two reads?
            data += following
            if following and data.endswith(b"\r"):
                self._held_cr = True
                data = data[:-1]
        return data.replace(b"\r\n", b"\n")

    def close(self) -> None:
        self._body.close()


class _CommandProtocol(ProcessProtocol):
    """Feeds stdin, collects output, fires ``done`` with a CommandOutcome."""

    def __init__(self, message_input: MessageInput, reactor: Any = None):
        self.input = message_input
        self._reactor = reactor
        self._reaper: Any = None
        self._ended = False
        #: how the command itself ended, once known
        self._exit: Failure | None = None
        #: its process group (its pid under setsid), which outlives its reaping
        self._group: int | None = None
        self.done: defer.Deferred = defer.Deferred()
        self.output = bytearray()
        self.timed_out = False
        self.timer: Any = None
        self._sender: FileSender | None = None

    def connectionMade(self) -> None:
        self._sender = FileSender()
        self._sender.CHUNK_SIZE = CHUNK
        d = self._sender.beginFileTransfer(self.input, self.transport)
        # fed completely: close stdin; stopped (the command closed stdin): nothing to do
        d.addCallbacks(lambda _: self.transport.closeStdin(), lambda _: None)

    def childConnectionLost(self, childFD: int) -> None:
        # Its output is closed: it is exiting.  The reactor learns of the exit
        # from SIGCHLD; one run without signal handlers (installSignalHandlers
        # =False) would not, when the exit came a moment after the close:
        # look for it now and then until it is reaped.
        if childFD in (1, 2) and self._reaper is None and self._reactor is not None:
            self._reaper = self._reactor.callLater(REAP_INTERVAL, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        if self._ended:
            return
        if getattr(self.transport, "pid", None) is not None:     # None once reaped
            self.transport.reapProcess()
        if not self._ended:
            self._reaper = self._reactor.callLater(REAP_INTERVAL, self._reap)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        room = OUTPUT_LIMIT - len(self.output)
        if room > 0:
            self.output += data[:room]

    def processExited(self, reason: Failure) -> None:
        # it exited (its exit status is known), though something it started may
        # still hold its output open: processEnded waits for that
        self._exit = reason

    def processEnded(self, reason: Failure) -> None:
        self._ended = True
        if self._exit is not None:
            reason = self._exit
        for call in (self.timer, self._reaper):
            if call is not None and call.active():
                call.cancel()
        self.input.close()
        output = bytes(self.output)
        value = reason.value
        if self.timed_out:
            outcome = CommandOutcome(timed_out=True, output=output)
        elif isinstance(value, error.ProcessDone):
            outcome = CommandOutcome(status=0, output=output)
        elif isinstance(value, error.ProcessTerminated) and value.exitCode is not None:
            outcome = CommandOutcome(status=value.exitCode, output=output)
        else:
            outcome = CommandOutcome(signal=getattr(value, "signal", None), output=output)
        self.done.callback(outcome)

    def kill(self) -> None:
        """The time limit: SIGKILL to the command's process group (or the command alone).

        A command that exited by itself, leaving a process of its group
        with its output open, keeps its exit status: only the leftovers die.
        """
        if self._exit is None and getattr(self.transport, "pid", None) is not None:
            self.transport.reapProcess()       # exited unnoticed (no SIGCHLD handling)?
        if self._ended:
            return
        self.timed_out = self._exit is None
        pid = getattr(self.transport, "pid", None)
        if pid is None:
            pid = self._group
        if pid is None:
            return
        try:
            if SETSID is not None:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_command(reactor: Any, argv: list[str], message_input: MessageInput, *,
                env: dict[str, str], uid: int | None, gid: int | None,
                timeout: float, directory: str = "/") -> defer.Deferred:
    """Run ``argv`` (``argv[0]`` an absolute path) with the message on stdin.

    Fires with a :class:`CommandOutcome`; never fails.
    """
    protocol = _CommandProtocol(message_input, reactor)
    executable, args = argv[0], list(argv)
    if SETSID is not None:
        executable, args = SETSID, [SETSID, "--"] + args
    try:
        reactor.spawnProcess(protocol, executable, args, env=env, path=directory,
                             uid=uid, gid=gid, usePTY=False,
                             childFDs={0: "w", 1: "r", 2: "r"})
    except Exception as e:         # OSError, or Twisted's checks of the arguments
        message_input.close()
        return defer.succeed(CommandOutcome(start_error=str(e) or type(e).__name__))
    protocol._group = protocol.transport.pid if SETSID is not None else None
    protocol.timer = reactor.callLater(timeout, protocol.kill)
    return protocol.done

