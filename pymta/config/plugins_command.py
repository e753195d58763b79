"""``pymta plugins``: the plugins pymta can find, and which of them a config uses.

::

    pymta plugins                          # every registered short name
    pymta plugins --config pymta.toml      # ... and the config's dotted-path plugins,
                                           # with the tables and stages that use each

For each plugin: its short name (or the dotted path a config names it by),
the interfaces its factory declares (or, for a plugin the config created,
the object provides), the source file, and with ``--config`` the
``[plugins.*]`` / ``[backends.*]`` tables that use it and their stages.
Short names are found as start-up finds them (``twisted.plugin`` in every
``pymta/plugins/`` directory on ``sys.path``; with ``--config`` its
``[server] plugin_path`` too).  A config with a problem is reported as
start-up reports it (exit 1).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementedBy, providedBy

from pymta.admin import EXIT_ERROR, EXIT_OK
from pymta.config.errors import ConfigError

__all__ = ["register", "run", "PluginEntry", "plugin_entries"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plugins", help="list the plugins pymta finds and which a config uses",
        description="List every plugin short name pymta finds (built in and drop-ins), with "
                    "its interfaces and source file.  With --config, also the dotted-path "
                    "plugins of that config, and for each plugin the tables and stages of the "
                    "config that use it.")
    parser.add_argument("--config", metavar="FILE", help="the TOML configuration file")
    parser.set_defaults(run=run)


@dataclass
class PluginEntry:
    """One plugin as listed: ``name`` is its short name or dotted path."""
    name: str
    description: str = ""
    factory: str = ""
    interfaces: list[str] = field(default_factory=list)
    source: str = ""
    #: "plugins.NAME (stages rcpt, data)" / "backends.NAME"
    used_by: list[str] = field(default_factory=list)
    problem: str = ""


def run(args: argparse.Namespace) -> int:
    config = recorder = None
    if args.config:
        from twisted.internet import reactor

        from pymta.config.check_command import configuration_error_line
        from pymta.config.effective import load_recorded
        try:
            config, recorder = load_recorded(args.config, reactor=reactor)
        except ConfigError as e:
            print(configuration_error_line(e), file=sys.stderr)
            return EXIT_ERROR
    for entry in plugin_entries(config, recorder):
        print(f"{entry.name}: {entry.description}" if entry.description else entry.name)
        if entry.factory and entry.factory != entry.name:
            print(f"    factory:    {entry.factory}")
        if entry.problem:
            print(f"    problem:    {entry.problem}")
        print(f"    interfaces: {', '.join(entry.interfaces) or '(none declared)'}")
        print(f"    source:     {entry.source or '(unknown)'}")
        if config is not None:
            print(f"    used by:    {'; '.join(entry.used_by) or '-'}")
    return EXIT_OK


def plugin_entries(config: Any = None, recorder: Any = None) -> list[PluginEntry]:
    """The short names found, then the dotted paths ``config`` uses; with their users."""
    from pymta.config.plugins import discover_plugins

    discovery = discover_plugins()
    entries: dict[str, PluginEntry] = {}
    for name in sorted(discovery.registrations):
        registration = discovery.registrations[name]
        entry = PluginEntry(name, getattr(registration, "description", "") or "",
                            getattr(registration, "target", "") or "")
        try:
            factory = registration.load()
        except Exception as e:
            entry.problem = f"cannot be loaded: {type(e).__name__}: {e}"
        else:
            _describe_factory(entry, factory)
        if name in discovery.duplicates:
            entry.problem = "registered by more than one module (start-up refuses it)"
        entries[name] = entry
    for failure in discovery.failures:
        print(f"pymta plugins: warning: a plugin module failed to import: {failure}", file=sys.stderr)
    if config is None:
        return list(entries.values())

    for use, table, stages, obj in _config_users(config, recorder):
        entry = entries.get(use)
        if entry is None:
            entry = entries[use] = PluginEntry(use, "(dotted path)", use)
            _describe_factory(entry, type(obj))
        entry.interfaces = sorted(set(entry.interfaces) | set(_interface_names(providedBy(obj))))
        entry.used_by.append(f"{table} (stages {', '.join(stages)})" if stages else table)
    return list(entries.values())


def _config_users(config: Any, recorder: Any):
    """(use, table, stages, object) of every plugin and backend the config created."""
    seen: dict[str, tuple[str, list[str], Any]] = {}
    for stage, instances in config.stages.items():
        for instance in instances:
            use, stages, obj = seen.setdefault(instance.name, (instance.use, [], instance.obj))
            stages.append(stage)
    for name, (use, stages, obj) in seen.items():
        yield use, f"plugins.{name}", stages, obj
    for name, backend in config.backends.items():
        use = _recorded_use(recorder, f"backends.{name}") or type(backend).__name__
        yield use, f"backends.{name}", [], backend


def _recorded_use(recorder: Any, scope: str) -> str | None:
    if recorder is None or scope not in recorder.tables:
        return None
    read = recorder.tables[scope][1].get("use")
    return read.value if read is not None else None


def _describe_factory(entry: PluginEntry, factory: Any) -> None:
    entry.interfaces = _interface_names(implementedBy(factory)) if inspect.isclass(factory) else []
    try:
        entry.source = inspect.getsourcefile(factory) or ""
    except TypeError:
        module = sys.modules.get(getattr(factory, "__module__", ""), None)
        entry.source = getattr(module, "__file__", "") or ""


def _interface_names(declared: Any) -> list[str]:
    return sorted({iface.__name__ for iface in declared.interfaces()})
