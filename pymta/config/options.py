"""What a plugin factory is given, and how it reads its options.

A plugin is a callable ``factory(options, context)``: ``options`` is its own
config table (a dict, ``use`` removed) and ``context`` a :class:`PluginContext`.
:class:`Options` reads that table with type and range checks and raises
:class:`~pymta.config.errors.OptionError` naming the key; the loader adds the
config file and the table, so the admin reads e.g.::

    /etc/pymta/pymta.toml: plugins.vip.senders: required option missing

Typical use in a factory::

    opts = Options(options)
    self.path = opts.path("file", context)
    self.delimiter = opts.str("recipient_delimiter", default="+")
    opts.finish()          # unknown keys are errors, with a suggestion
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import datetime
import difflib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from pymta.addresses import domain_key
from pymta.config.durations import format_duration, parse_duration
from pymta.config.errors import OptionError
from pymta.interfaces import IPluginContext

__all__ = ["Options", "PluginContext", "describe_value", "closest", "OptionRead", "ReadRecorder",
           "recording_reads", "read_scope"]


class _Missing:
    def __repr__(self) -> builtins.str:
        return "<required>"


REQUIRED: Any = _Missing()
"""Default meaning "this option must be given"."""


# -- what a load read (pymta check-config) ---------------------------------------

@dataclass
class OptionRead:
    """One key an :class:`Options` was asked for: how, whether given, and the result."""

    key: builtins.str
    #: the reader used: "str", "int", "float", "bool", "duration", "list_str",
    #: "table", "path" or "value" (unchecked)
    kind: builtins.str
    given: builtins.bool
    #: what the reader returned (parsed, paths made absolute)
    value: Any = None
    #: what it returns when the key is absent (paths made absolute); REQUIRED if none
    default: Any = None


class ReadRecorder:
    """Every :class:`Options` made while it records, grouped by the table they read.

    The loader names the table being read with :func:`read_scope` (its
    dotted key, e.g. ``"limits"``, ``"listeners[0]"``, ``"plugins.spf"``);
    the first Options made in a scope is that table's.  A scope may carry
    ``fixed`` entries read outside Options (a plugin's ``use``).
    """

    def __init__(self) -> None:
        #: scope -> (the table's Options, fixed entries), in the order first opened
        self.tables: dict[builtins.str, tuple[Options | None, dict[builtins.str, OptionRead]]] = {}
        self._scopes: builtins.list[builtins.str] = []

    def opened(self, options: Options) -> None:
        if self._scopes:
            scope = self._scopes[-1]
            current, fixed = self.tables.get(scope, (None, {}))
            if current is None:
                self.tables[scope] = (options, fixed)


_RECORDER: contextvars.ContextVar[ReadRecorder | None] = contextvars.ContextVar(
    "pymta_option_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[ReadRecorder]:
    """Record what every Options reads until the block ends (a config load for check-config)."""
    recorder = ReadRecorder()
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


@contextlib.contextmanager
def read_scope(scope: builtins.str, fixed: builtins.list[OptionRead] = ()) -> Iterator[None]:
    """Options made inside read the table ``scope`` (a no-op unless recording)."""
    recorder = _RECORDER.get()
    if recorder is None:
        yield
        return
    entry = recorder.tables.setdefault(scope, (None, {}))
    for read in fixed:
        entry[1].setdefault(read.key, read)
    recorder._scopes.append(scope)
    try:
        yield
    finally:
        recorder._scopes.pop()


def describe_value(value: Any) -> builtins.str:
    """Name a TOML value for an error message: ``string 'abc'``, ``integer 5``, ``table``."""
    if isinstance(value, builtins.bool):
        return f"boolean {builtins.str(value).lower()}"
    if isinstance(value, builtins.int):
        return f"integer {value}"
    if isinstance(value, builtins.float):
        return f"float {value}"
    if isinstance(value, builtins.str):
        text = repr(value)
        return f"string {text if len(text) <= 60 else text[:56] + '...' + text[0]}"
    if isinstance(value, (builtins.list, builtins.tuple)):
        return f"array of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return f"date/time {value.isoformat()}"
    return type(value).__name__


def closest(word: builtins.str, candidates: Iterable[builtins.str]) -> builtins.str | None:
    """The candidate most like ``word`` (for "did you mean ...?"), or None."""
    matches = difflib.get_close_matches(word, builtins.list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_problem(key: builtins.str, known: Iterable[builtins.str]) -> builtins.str:
    """The problem text for an unknown key: suggestion first, then the known keys."""
    known = sorted(known)
    if not known:
        return "unknown key (this table takes no keys)"
    hint = closest(key, known)
    suggestion = f" (did you mean '{hint}'?)" if hint else ""
    return f"unknown key{suggestion}; known keys: {', '.join(known)}"


@implementer(IPluginContext)
@dataclass(frozen=True)
class PluginContext:
    """What a plugin factory is given besides its options (see IPluginContext)."""

    hostname: builtins.str
    #: local (final destination) domains, lower case, IDNA-encoded
    domains: builtins.tuple[builtins.str, ...]
    #: directory of the config file: relative paths resolve here
    config_dir: builtins.str
    reactor: Any = None
    #: the shared pymta.dns.resolver.DNSResolver (from [dns])
    resolver: Any = None
    #: pymta.shared_state.SharedState (Redis, from [shared] redis), or None
    shared: Any = None

    def resolve_path(self, path: builtins.str) -> builtins.str:
        """``path`` made absolute relative to :attr:`config_dir` (``~`` is expanded)."""
        return os.path.normpath(os.path.join(self.config_dir, os.path.expanduser(path)))

    def is_local_domain(self, domain: builtins.str) -> builtins.bool:
        return domain_key(domain) in self.domains


class Options:
    """Checked reads from one config table; see the module docstring.

    Each reader takes the key and an optional ``default``; without a default
    the option is required.  A default is returned as given (not checked).
    Every key asked for counts as known, so :meth:`finish` can name the
    unknown ones.
    """

    def __init__(self, options: Mapping[builtins.str, Any] | None = None):
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(f"options must be a mapping, got {type(options).__name__}")
        self._values: dict[builtins.str, Any] = dict(options)
        self._known: builtins.list[builtins.str] = []
        #: key -> how it was read, in the order first read
        self.reads: dict[builtins.str, OptionRead] = {}
        recorder = _RECORDER.get()
        if recorder is not None:
            recorder.opened(self)

    # -- inspection -------------------------------------------------------
    def __contains__(self, key: builtins.str) -> builtins.bool:
        return key in self._values

    def keys(self) -> builtins.list[builtins.str]:
        return builtins.list(self._values)

    @property
    def known(self) -> builtins.tuple[builtins.str, ...]:
        return builtins.tuple(self._known)

    def _take(self, key: builtins.str, default: Any, kind: builtins.str = "value") -> tuple[Any, builtins.bool]:
        """(value, given): mark ``key`` known; raise if required and absent."""
        if key not in self._known:
            self._known.append(key)
        given = key in self._values
        self.reads[key] = OptionRead(key, kind, given, None if given else default, default)
        if given:
            return self._values[key], True
        if default is REQUIRED:
            unread = [k for k in self._values if k not in self._known]
            hint = closest(key, unread)
            typo = f" (is {hint!r} a misspelling of it?)" if hint else ""
            raise OptionError(key, f"required option missing{typo}")
        return default, False

    # -- readers ----------------------------------------------------------
    def _read(self, key: builtins.str, value: Any) -> Any:
        """A given option's checked value: recorded in :attr:`reads`, returned."""
        self.reads[key].value = value
        return value

    def value(self, key: builtins.str, default: Any = REQUIRED) -> Any:
        """The raw value, unchecked."""
        value, given = self._take(key, default)
        return self._read(key, value) if given else value

    def str(self, key: builtins.str, default: Any = REQUIRED, *,
            choices: Iterable[builtins.str] | None = None,
            allow_empty: builtins.bool = False) -> builtins.str:
        value, given = self._take(key, default, "str")
        if not given:
            return value
        return self._read(key, _check_str(key, value, choices, allow_empty))

    def int(self, key: builtins.str, default: Any = REQUIRED, *,
            minimum: builtins.int | None = None,
            maximum: builtins.int | None = None) -> builtins.int:
        value, given = self._take(key, default, "int")
        if not given:
            return value
        if isinstance(value, builtins.bool) or not isinstance(value, builtins.int):
            raise OptionError(key, f"expected an integer, got {describe_value(value)}")
        _check_range(key, value, minimum, maximum, None, builtins.str)
        return self._read(key, value)

    def float(self, key: builtins.str, default: Any = REQUIRED, *,
              minimum: builtins.float | None = None,
              maximum: builtins.float | None = None,
              above: builtins.float | None = None) -> builtins.float:
        value, given = self._take(key, default, "float")
        if not given:
            return value
        if isinstance(value, builtins.bool) or not isinstance(value, (builtins.int, builtins.float)):
            raise OptionError(key, f"expected a number, got {describe_value(value)}")
        _check_range(key, value, minimum, maximum, above, builtins.str)
        return self._read(key, builtins.float(value))

    def bool(self, key: builtins.str, default: Any = REQUIRED) -> builtins.bool:
        value, given = self._take(key, default, "bool")
        if not given:
            return value
        if not isinstance(value, builtins.bool):
            raise OptionError(key, f"expected true or false, got {describe_value(value)}")
        return self._read(key, value)

    def duration(self, key: builtins.str, default: Any = REQUIRED, *,
                 minimum: builtins.float | None = None,
                 maximum: builtins.float | None = None,
                 above: builtins.float | None = None) -> builtins.float:
        """Seconds, from a number or a string such as ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``."""
        value, given = self._take(key, default, "duration")
        if not given:
            return value
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise OptionError(key, builtins.str(e)) from None
        _check_range(key, seconds, minimum, maximum, above, format_duration)
        return self._read(key, seconds)

    def list_str(self, key: builtins.str, default: Any = REQUIRED, *,
                 allow_empty_list: builtins.bool = True) -> builtins.list[builtins.str]:
        """A list of non-empty strings."""
        value, given = self._take(key, default, "list_str")
        if not given:
            return value
        if not isinstance(value, (builtins.list, builtins.tuple)):
            raise OptionError(key, f"expected an array of strings, got {describe_value(value)}")
        if not value and not allow_empty_list:
            raise OptionError(key, "must not be empty")
        return self._read(key, [_check_str(f"{key}[{i}]", item, None, False) for i, item in enumerate(value)])

    def table(self, key: builtins.str, default: Any = REQUIRED) -> dict[builtins.str, Any]:
        """A sub-table (returned as a new dict)."""
        value, given = self._take(key, default, "table")
        if not given:
            return value
        if not isinstance(value, Mapping):
            raise OptionError(key, f"expected a table, got {describe_value(value)}")
        return self._read(key, dict(value))

    def path(self, key: builtins.str, context: Any, default: Any = REQUIRED) -> builtins.str:
        """A file system path, made absolute against the config directory.

        A default, when used, is resolved the same way (unless it is None).
        """
        value, given = self._take(key, default, "path")
        if default is not REQUIRED and default is not None:
            self.reads[key].default = context.resolve_path(default)
        if not given:
            self.reads[key].value = value if value is None else context.resolve_path(value)
            return self.reads[key].value
        return self._read(key, context.resolve_path(_check_str(key, value, None, False)))

    def finish(self) -> None:
        """Raise OptionError for the first key that no reader asked for."""
        for key in self._values:
            if key not in self._known:
                raise OptionError(key, unknown_key_problem(key, self._known))


def _check_str(key: builtins.str, value: Any, choices: Iterable[builtins.str] | None,
               allow_empty: builtins.bool) -> builtins.str:
    if not isinstance(value, builtins.str):
        raise OptionError(key, f"expected a string, got {describe_value(value)}")
    if choices is not None:
        allowed = builtins.list(choices)
        if value not in allowed:
            listed = ", ".join(repr(c) for c in allowed)
            raise OptionError(key, f"expected one of {listed}, got {describe_value(value)}")
    elif not value and not allow_empty:
        raise OptionError(key, "must not be empty")
    return value


def _check_range(key, value, minimum, maximum, above, show) -> None:
    if above is not None and not value > above:
        raise OptionError(key, f"must be greater than {show(above)}, got {show(value)}")
    if minimum is not None and value < minimum:
        raise OptionError(key, f"must be at least {show(minimum)}, got {show(value)}")
    if maximum is not None and value > maximum:
        raise OptionError(key, f"must be at most {show(maximum)}, got {show(value)}")
