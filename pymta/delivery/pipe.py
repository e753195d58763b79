"""Delivery to a command, like Postfix's pipe(8): the ``pipe`` backend.

Options (config table of the backend)::

    command = ["/usr/bin/prog", "--to", "{recipient}"]   # argv; argv[0] an absolute path
    user = "nobody"                  # required: the command runs as this user, never root
    # group = "nogroup"              # default: the user's login group
    timeout = "1000s"                # then SIGKILL to its process group: retried later
    concurrency = 10                 # commands of this backend running at once
    return_path = true               # a "Return-Path: <sender>" line first
    delivered_to = true              # a "Delivered-To: recipient" line (one recipient a run)
    line_endings = "lf"              # "lf" (UNIX, as Postfix's pipe) or "crlf" (as received)
    recipient_delimiter = "+"        # splits {user} and {extension}

Each argument of ``command`` may hold placeholders, replaced in that
argument alone (the command is never run by a shell): ``{sender}``,
``{recipient}``, ``{user}`` (the local part without extension),
``{extension}``, ``{domain}``, ``{queue_id}`` (``{{`` and ``}}`` for
braces).  A command that names any of ``{recipient}``, ``{user}``,
``{extension}`` or ``{domain}`` runs once per recipient; otherwise once per
message for all the recipients the backend is given (then without
``Delivered-To`` unless there is only one).  An address that would put a
leading ``-`` into an argument (option injection: ``-oQ/tmp@example.org``)
is refused (5.1.3), not passed on.

A recipient made by a ``|command`` entry of the system alias file (see
:mod:`pymta.policy.aliases`) runs that command instead (split into words
as a shell would, but never run by one), as the same user; ``command`` may
then be left out of a backend that serves only such recipients.

The message goes to stdin (streamed from the spool file).  The exit status
decides (:mod:`pymta.delivery.sysexits`): 0 delivered; 75 (EX_TEMPFAIL)
and 71 retried; 67 (EX_NOUSER), 65 (EX_DATAERR) and the other sysexits
codes bounced with their enhanced status; any other status bounced; a
command killed by a signal or by the time limit retried.  The first KiB
of its output (stdout and stderr) is quoted in the log line and in the
bounce (``Diagnostic-Code: x-unix; ...``).  The environment holds PATH,
HOME, USER, LOGNAME, SENDER, RECIPIENT, ORIGINAL_RECIPIENT, USER_PART (the
local part without extension), EXTENSION, DOMAIN and QUEUE_ID.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import string
import sys
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from pymta.delivery.mailbox import local_delivery_headers, split_extension
from pymta.delivery.pipe_command import OUTPUT_LIMIT, CommandOutcome, MessageInput, run_command
from pymta.delivery.sysexits import exit_meaning
from pymta.envelope import FILE_COMMAND_PREFIX
from pymta.plugin_api import (DeliveryResult, IDeliveryBackend, Options, OptionError,
                              read_recipient_delimiter, split_address)

#: the placeholders of ``command``
PLACEHOLDERS = ("sender", "recipient", "user", "extension", "domain", "queue_id")
#: those that make the command run once per recipient
PER_RECIPIENT = frozenset(("recipient", "user", "extension", "domain"))
PATH = "/usr/local/bin:/usr/bin:/bin"
FILE_PREFIX = FILE_COMMAND_PREFIX


def parse_command_template(command: list[str], key: str = "command") -> tuple[str, ...]:
    """Check an argv template; OptionError naming ``key[i]`` for a bad argument."""
    if not command:
        raise OptionError(key, "must name a program (an absolute path) and its arguments")
    if not os.path.isabs(command[0]):
        raise OptionError(f"{key}[0]", f"{command[0]!r} is not an absolute path")
    for index, argument in enumerate(command):
        if template_fields(argument, f"{key}[{index}]") and index == 0:
            raise OptionError(f"{key}[0]", "the program path takes no placeholders")
    return tuple(command)


def template_fields(argument: str, key: str) -> set[str]:
    """The placeholders of one argument; OptionError for an unknown or malformed one."""
    try:
        parsed = list(string.Formatter().parse(argument))
    except ValueError as e:
        raise OptionError(key, f"bad template {argument!r}: {e}") from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise OptionError(key, f"unknown placeholder {{{name}}} in {argument!r} "
                                   f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
        if spec or conversion:
            raise OptionError(key, f"placeholder {{{name}}} in {argument!r} takes no format")
        names.add(name)
    return names


@dataclass(frozen=True)
class RunAs:
    """The user a command runs as."""

    name: str
    uid: int
    gid: int
    home: str


def read_user(opts: Options) -> RunAs:
    """The ``user`` (required) and ``group`` options: never root."""
    name = opts.str("user")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise OptionError("user", f"no such user {name!r}") from None
    if entry.pw_uid == 0:
        raise OptionError("user", f"{name!r} is root (uid 0): commands never run as root; "
                                  "use an unprivileged user such as \"nobody\"")
    group = opts.str("group", default=None)
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OptionError("group", f"no such group {group!r}") from None
    if gid == 0:
        raise OptionError("group" if group is not None else "user",
                          "the command would run with group root (gid 0); name another group")
    return RunAs(name, entry.pw_uid, gid, entry.pw_dir or "/")


@dataclass(frozen=True)
class _Run:
    """One command run: its argv and the recipients whose result it decides."""

    argv: tuple[str, ...]
    recipients: list
    #: the recipient whose address fills the per-recipient fields, when there is one
    recipient: Any = None
    #: argv is a |command of the alias file: used as it is, no placeholders
    literal: bool = False
    #: the envelope sender of a run for several recipients (else the recipient's)
    sender: str | None = None


class InjectionRefused(ValueError):
    """A substituted address would start an argument with '-'."""


@implementer(IDeliveryBackend)
class PipeBackend:
    """``use = "pipe"``: see the module docstring."""

    kind = "pipe"
    #: recipients with a ``command`` (|command and /file aliases) may be routed here
    runs_alias_commands = True

    def __init__(self, options: dict[str, Any], context: Any):
        opts = Options(options)
        command = opts.value("command", default=None)
        if command is not None:
            command = opts.list_str("command", allow_empty_list=False)
            self.command: tuple[str, ...] | None = parse_command_template(command)
        else:
            self.command = None
        self.user = read_user(opts)
        self.timeout = opts.duration("timeout", default=1000.0, above=0)
        self.concurrency = opts.int("concurrency", default=10, minimum=1)
        self.return_path = opts.bool("return_path", default=True)
        self.delivered_to = opts.bool("delivered_to", default=True)
        self.unix_lines = opts.str("line_endings", default="lf", choices=("lf", "crlf")) == "lf"
        self.delimiters = read_recipient_delimiter(opts)
        opts.finish()
        fields: set[str] = set()
        for index, argument in enumerate(self.command or ()):
            fields |= template_fields(argument, f"command[{index}]")
        #: one run per recipient (the command names a per-recipient placeholder)
        self.per_recipient = bool(fields & PER_RECIPIENT)
        self._reactor = getattr(context, "reactor", None)
        self._slots = defer.DeferredSemaphore(self.concurrency)

    # -- IDeliveryBackend -----------------------------------------------------

    def deliver(self, message, recipients):
        runs: list[_Run] = []
        shared: list = []
        for recipient in recipients:
            alias_command = getattr(recipient, "command", None)
            if alias_command:
                runs.append(_Run(alias_argv(alias_command), [recipient], recipient, literal=True))
            elif self.per_recipient:
                runs.append(_Run(self.command or (), [recipient], recipient))
            else:
                shared.append(recipient)
        by_sender: dict[str, list] = {}
        for recipient in shared:            # one run per envelope sender (list owners apart)
            by_sender.setdefault(message.envelope.sender_for(recipient), []).append(recipient)
        for group in by_sender.values():
            runs.append(_Run(self.command or (), group, group[0] if len(group) == 1 else None,
                             sender=message.envelope.sender_for(group[0])))
        waits = [self._slots.run(self._run, message, run) for run in runs]
        d = defer.gatherResults(waits, consumeErrors=True)

        def collect(per_run: list[DeliveryResult]) -> list[DeliveryResult]:
            by_recipient = {}
            for run, result in zip(runs, per_run):
                for recipient in run.recipients:
                    by_recipient[id(recipient)] = result
            return [by_recipient[id(r)] for r in recipients]
        return d.addCallback(collect)

    # -- one run ----------------------------------------------------------------

    def _run(self, message, run: _Run) -> defer.Deferred | DeliveryResult:
        if not run.argv:
            return DeliveryResult.deferred(
                "this pipe backend has no command (set command = [...]) and the recipient "
                "is no |command alias", 451, "4.3.5", self.kind)
        program = run.argv[0]
        shown = f"file:{run.argv[-1]}" if run.literal and run.recipient.command.startswith(FILE_PREFIX) \
            else program
        envelope = message.envelope
        values = self._values(envelope, run.recipient, run.sender)
        try:
            argv = list(run.argv) if run.literal else substitute(run.argv, values)
        except InjectionRefused as e:
            return DeliveryResult.failed(str(e), 550, "5.1.3", program)
        if not os.access(program, os.X_OK):
            return DeliveryResult.deferred(f"command {program} is not an executable file",
                                           451, "4.3.5", program)
        ids = self._ids()
        if isinstance(ids, DeliveryResult):
            return ids
        uid, gid = ids
        if shown != program and uid is not None:
            # the appender becomes the user itself, after the interpreter started as root
            argv = argv[:-1] + ["--as", f"{uid}:{gid}", argv[-1]]
            uid = gid = None
        prefix = b""
        if self.return_path or self.delivered_to:
            lines = local_delivery_headers(envelope, run.recipient or run.recipients[0]).split(b"\r\n")
            keep = [lines[0]] if self.return_path else []
            if self.delivered_to and run.recipient is not None:
                keep.append(lines[1])
            prefix = b"".join(line + b"\r\n" for line in keep)
        message_input = MessageInput(prefix + message.prepend_bytes(), message.open_body(),
                                     self.unix_lines)
        d = run_command(self._reactor_or_global(), argv, message_input, env=self._env(values, run),
                        uid=uid, gid=gid, timeout=self.timeout)
        return d.addCallback(self._result, shown)

    def _values(self, envelope, recipient, sender: str | None) -> dict[str, str]:
        if recipient is not None:
            sender = envelope.sender_for(recipient)
        values = {"sender": envelope.sender if sender is None else sender,
                  "queue_id": envelope.queue_id,
                  "recipient": "", "user": "", "extension": "", "domain": ""}
        if recipient is not None:
            local, domain = split_address(recipient.address)
            user, extension = split_extension(local, self.delimiters)
            values.update(recipient=recipient.address, user=user, extension=extension or "",
                          domain=domain)
        return values

    def _env(self, values: dict[str, str], run: _Run) -> dict[str, str]:
        original = run.recipient.original if run.recipient is not None else ""
        return {"PATH": PATH, "HOME": self.user.home, "USER": self.user.name,
                "LOGNAME": self.user.name, "SHELL": "/bin/sh", "SENDER": values["sender"],
                "RECIPIENT": values["recipient"], "ORIGINAL_RECIPIENT": original or "",
                "USER_PART": values["user"], "EXTENSION": values["extension"],
                "DOMAIN": values["domain"], "QUEUE_ID": values["queue_id"]}

    def _ids(self) -> tuple[int | None, int | None] | DeliveryResult:
        """(uid, gid) for spawnProcess: a switch as root, none when already that user."""
        euid = os.geteuid()
        if euid == 0:
            return self.user.uid, self.user.gid
        if euid == self.user.uid:
            return None, None
        return DeliveryResult.deferred(
            f"cannot run the command as user {self.user.name}: the server runs as uid {euid}, "
            "not root", 451, "4.3.0", self.kind)

    def _reactor_or_global(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def _result(self, outcome: CommandOutcome, program: str) -> DeliveryResult:
        output = quote_output(outcome.output)
        said = f": {output}" if output else ""
        if outcome.start_error is not None:
            return DeliveryResult.deferred(f"cannot start command {program}: {outcome.start_error}",
                                           451, "4.3.0", program)
        if outcome.timed_out:
            return _with_output(DeliveryResult.deferred(
                f"command {program} killed: time limit of {self.timeout:g}s exceeded{said}",
                451, "4.3.0", program), output)
        if outcome.status is None:
            return _with_output(DeliveryResult.deferred(
                f"command {program} killed by signal {outcome.signal}{said}", 451, "4.3.0",
                program), output)
        if outcome.status == 0:
            where = f"file: {program[5:]}" if program.startswith("file:") else f"command: {program}"
            return DeliveryResult.delivered(f"delivered to {where}", program)
        meaning = exit_meaning(outcome.status)
        text = f"command {program} died with status {outcome.status} ({meaning.text}){said}"
        if meaning.temporary:
            result = DeliveryResult.deferred(text, 451, meaning.enhanced, program)
        else:
            result = DeliveryResult.failed(text, 550, meaning.enhanced, program)
        return _with_output(result, output or meaning.text)


def alias_argv(command: str) -> tuple[str, ...]:
    """The argv for a recipient's alias command; () if it cannot be split.

    A ``|command`` alias is split into words as a shell would; a ``/file``
    alias (``:file:/path``, see :mod:`pymta.policy.aliases`) runs the
    appender of :mod:`pymta.delivery.append_file` with this interpreter.
    """
    if command.startswith(FILE_PREFIX):
        # -I: the interpreter starts as root with HOME = the user's home; it must not
        # read that user's site-packages (*.pth files run code) nor PYTHON* variables
        return (sys.executable, "-I", "-m", "pymta.delivery.append_file",
                command[len(FILE_PREFIX):])
    # (the backend adds "--as UID:GID" when it runs as root: see PipeBackend._run)
    try:
        return tuple(shlex.split(command))
    except ValueError:
        return ()


def substitute(template: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """The argv: each argument's placeholders filled; InjectionRefused for a leading '-'."""
    argv = []
    for argument in template:
        filled = argument.format(**values)
        if filled.startswith("-") and not argument.startswith("-"):
            used = template_fields(argument, "command")
            culprit = next((values[name] for name in sorted(used) if values[name].startswith("-")),
                           filled)
            raise InjectionRefused(f"<{culprit}>: an address beginning with '-' is not passed "
                                   "to a command (it would read as an option)")
        argv.append(filled)
    return argv


def quote_output(output: bytes) -> str:
    """A command's output for a log line and a bounce: one line, control characters as spaces."""
    text = output.decode("utf-8", errors="replace")
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)
    text = " ".join(text.split())
    if len(output) >= OUTPUT_LIMIT:
        text += " ..."
    return text


def _with_output(result: DeliveryResult, output: str) -> DeliveryResult:
    """``result`` whose DSN Diagnostic-Code quotes the command's output."""
    return replace(result, diagnostic=f"x-unix; {output}" if output else None)
