"""The plugins of a config: short-name discovery, instantiation, verification.

The loader (:mod:`pymta.config.loader`) reads the tables; this module makes
the objects they name.  A plugin is named by a short name (registered with
``twisted.plugin`` in a ``pymta/plugins/`` directory on ``sys.path``) or by
a dotted path (``module:Factory``, found on ``[server] plugin_path``, which
:func:`add_plugin_path` puts on ``sys.path``); it is created as
``factory(options, context)`` and checked with
``zope.interface.verify.verifyObject`` against the interface of every stage
it is listed in (:data:`pymta.interfaces.STAGES`) or, for a backend,
``IDeliveryBackend``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable, NoReturn, Sequence

from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins, pluginPackagePaths
from zope.interface.exceptions import (BrokenImplementation, BrokenMethodImplementation,
                                       DoesNotImplement, Invalid, MultipleInvalid)
from zope.interface.verify import verifyObject

from pymta.config.errors import ConfigError, OptionError, one_line
from pymta.config.model import PluginInstance
from pymta.config.options import REQUIRED, OptionRead, Options, closest, describe_value, read_scope
from pymta.interfaces import STAGES, IDeliveryBackend, IPluginRegistration

__all__ = ["PluginLoader", "PluginDiscovery", "discover_plugins", "add_plugin_path",
           "DEFAULT_STAGES"]

DEFAULT_STAGES: dict[str, list[str]] = {stage: [] for stage in STAGES} | {"rcpt": ["localdomain"]}


def add_plugin_path(directories: Sequence[str]) -> None:
    """Put the ``[server] plugin_path`` directories first on ``sys.path`` (once each)."""
    for directory in reversed(directories):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    if directories:
        importlib.invalidate_caches()


# -- plugin discovery -------------------------------------------------------

@dataclasses.dataclass
class PluginDiscovery:
    """The short names found in the ``pymta.plugins`` package directories."""

    registrations: dict[str, Any]
    #: names registered more than once, with different targets
    duplicates: set[str]
    #: plugin modules that failed to import, one line each
    failures: list[str]


def discover_plugins() -> PluginDiscovery:
    """Find every IPluginRegistration with ``twisted.plugin.getPlugins``.

    The plugin package path is refreshed first, so a ``pymta/plugins/``
    directory on a ``sys.path`` entry added after start-up (``plugin_path``)
    is searched too.  twisted.plugin writes ``dropin.cache`` files next to the
    modules; when it cannot (read-only install) it only logs that.  A module
    that fails to import is logged by twisted.plugin and listed in
    ``failures`` so that an "unknown plugin" error can say why.
    """
    import pymta.plugins as package

    for directory in pluginPackagePaths(package.__name__):
        if directory not in package.__path__:
            package.__path__.append(directory)
    importlib.invalidate_caches()
    plugin_dirs = {os.path.abspath(p) for p in package.__path__}
    failures: list[str] = []

    def observe(event: Mapping[str, Any]) -> None:
        failure = event.get("log_failure") or event.get("failure")
        if failure is not None:
            failures.append(_describe_import_failure(failure, plugin_dirs))

    globalLogPublisher.addObserver(observe)
    try:
        found = list(getPlugins(IPluginRegistration, package))
    finally:
        globalLogPublisher.removeObserver(observe)
    registrations: dict[str, Any] = {}
    duplicates: set[str] = set()
    for registration in found:
        name = registration.name
        previous = registrations.get(name)
        if previous is not None and previous is not registration and (
                getattr(previous, "target", None) is None
                or getattr(previous, "target", None) != getattr(registration, "target", None)):
            duplicates.add(name)
        registrations.setdefault(name, registration)
    return PluginDiscovery(registrations, duplicates, failures)


def _describe_import_failure(failure: Any, plugin_dirs: set[str]) -> str:
    where = getattr(failure.value, "filename", None)
    if not where:
        for frame in reversed(getattr(failure, "frames", None) or []):
            filename = os.path.abspath(frame[1])
            if os.path.dirname(filename) in plugin_dirs:
                where = f"{filename}, line {frame[2]}"
                break
    prefix = f"{where}: " if where else ""
    return one_line(f"{prefix}{failure.type.__name__}: {failure.getErrorMessage()}")


# -- zope.interface verification ----------------------------------------------

def _describe_invalid(error: Invalid, interface: Any) -> str:
    if isinstance(error, MultipleInvalid):
        return "; ".join(_describe_invalid(e, interface) for e in error.exceptions)
    if isinstance(error, DoesNotImplement):
        return (f"it does not declare the interface "
                f"(add @implementer({interface.__name__}) to its class)")
    if isinstance(error, BrokenImplementation):
        name = getattr(error.name, "__name__", error.name)
        return f"The {name} attribute was not provided"
    if isinstance(error, BrokenMethodImplementation):
        method = getattr(error.method, "__name__", error.method)
        return f"The {method} method does not match the interface: {error.mess}"
    return str(error)


# -- instantiating ------------------------------------------------------------

class PluginLoader:
    """Creates the backends and stage plugins of one config load.

    ``builder`` is the loader's table reader: it gives ``source``,
    ``context`` (the PluginContext every factory is given), ``fail()`` and
    ``section()`` (problems as ConfigError naming the file and key).
    """

    def __init__(self, builder: Any):
        self.builder = builder
        self._discovery: PluginDiscovery | None = None

    @property
    def source(self) -> str:
        return self.builder.source

    @property
    def context(self) -> Any:
        return self.builder.context

    def fail(self, key: str, problem: str) -> NoReturn:
        self.builder.fail(key, problem)

    def section(self, prefix: str):
        return self.builder.section(prefix)

    # -- [backends.*] -------------------------------------------------------------
    def backends(self, tables: dict[str, Any]) -> dict[str, Any]:
        backends: dict[str, Any] = {}
        for name, table in tables.items():
            key = f"backends.{name}"
            if not isinstance(table, Mapping):
                self.fail(key, f"expected a table, got {describe_value(table)}")
            use, obj = self.instantiate("backends", name, table, key)
            self.verify(IDeliveryBackend, obj, use, key)
            backends[name] = obj
        return backends

    # -- [stages] and [plugins.*] -----------------------------------------------
    def stages(self, stages: dict[str, Any], plugins: dict[str, Any]) -> dict[str, tuple[PluginInstance, ...]]:
        with self.section("stages"):
            opts = Options(stages)
            lists = {stage: opts.list_str(stage, DEFAULT_STAGES[stage]) for stage in STAGES}
            opts.finish()
        references: dict[str, list[tuple[str, str]]] = {}
        for stage, names in lists.items():
            for index, name in enumerate(names):
                key = f"stages.{stage}[{index}]"
                if any(s == stage for s, _ in references.get(name, ())):
                    self.fail(key, f"{name!r} is listed twice in this stage")
                references.setdefault(name, []).append((stage, key))
        for name, table in plugins.items():
            if not isinstance(table, Mapping):
                self.fail(f"plugins.{name}", f"expected a table, got {describe_value(table)}")

        instances: dict[str, PluginInstance] = {}
        for name, uses in references.items():
            table = plugins.get(name)
            use, obj = self.instantiate("plugins", name, table, uses[0][1])
            for stage, key in uses:
                self.verify(STAGES[stage].interface, obj, use, f"plugins.{name}" if table is not None else key)
            instances[name] = PluginInstance(name=name, use=use, obj=obj)
        for name in plugins:
            if name not in references:
                self.fail(f"plugins.{name}", "defined but not listed in any [stages] list "
                                             "(add it to a stage or remove the table)")
        return {stage: tuple(instances[name] for name in names) for stage, names in lists.items()}

    # -- instantiating one plugin ---------------------------------------------
    def instantiate(self, section: str, name: str, table: Mapping[str, Any] | None,
                     reference: str) -> tuple[str, Any]:
        """Create plugin ``name`` from its table (None: listed by short name only)."""
        table_key = f"{section}.{name}"
        if table is None:
            use, use_key, options = name, reference, {}
        else:
            use = table.get("use", name)
            use_key = f"{table_key}.use" if "use" in table else table_key
            if not isinstance(use, str) or not use:
                self.fail(use_key, f"expected a plugin name or 'module:Factory', got {describe_value(use)}")
            options = {k: v for k, v in table.items() if k != "use"}
        factory = self._factory(use, use_key, has_table=table is not None,
                                defaulted=table is not None and "use" not in table)
        try:
            given = [OptionRead("use", "str", table is not None and "use" in table, use)]
            given += [OptionRead(key, "value", True, value, REQUIRED) for key, value in options.items()]
            with read_scope(table_key, given):
                obj = factory(options, self.context)
        except OptionError as e:
            self.fail(f"{table_key}.{e.key}", e.problem)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(self.source, reference if table is None else table_key,
                              one_line(f"plugin {use!r} failed to start: {type(e).__name__}: {e}")) from e
        return use, obj

    def _factory(self, use: str, key: str, *, has_table: bool, defaulted: bool) -> Callable[..., Any]:
        if ":" in use or "." in use:
            return self._import_factory(use, key)
        discovery = self.discovery
        registration = discovery.registrations.get(use)
        if registration is None:
            candidates = list(discovery.registrations)
            hint = closest(use, candidates)
            suggestion = f" (did you mean {hint!r}?)" if hint else ""
            problem = f"unknown plugin {use!r}{suggestion}; known: {', '.join(sorted(candidates))}"
            if not has_table:
                problem += f"; no [plugins.{use}] table defines it either"
            elif defaulted:
                problem += "; the table has no 'use' key, so its name was taken as the plugin name"
            if discovery.failures:
                problem += "; plugin modules that failed to import: " + " | ".join(discovery.failures)
            self.fail(key, problem)
        if use in discovery.duplicates:
            self.fail(key, f"plugin short name {use!r} is registered by more than one module in "
                           "the pymta/plugins directories; remove one of them")
        try:
            return registration.load()
        except Exception as e:
            self.fail(key, f"plugin {use!r} could not be loaded: {type(e).__name__}: {e}")

    @property
    def discovery(self) -> PluginDiscovery:
        if self._discovery is None:
            self._discovery = discover_plugins()
        return self._discovery

    def _import_factory(self, use: str, key: str) -> Callable[..., Any]:
        module_name, colon, attribute = use.partition(":")
        if not colon:
            module_name, _, attribute = use.rpartition(".")
        if not module_name or not attribute:
            self.fail(key, f"invalid dotted path {use!r} (expected 'module:Factory')")
        importlib.invalidate_caches()
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                self.fail(key, f"cannot import module {module_name!r} for {use!r}: no such module "
                               "(is its directory in [server] plugin_path?)")
            self.fail(key, f"importing module {module_name!r} for {use!r} failed: "
                           f"{type(e).__name__}: {e}")
        except Exception as e:
            self.fail(key, f"importing module {module_name!r} for {use!r} failed: "
                           f"{type(e).__name__}: {e}")
        owner = module_name
        for part in attribute.split("."):
            if not hasattr(obj, part):
                names = [n for n in dir(obj) if not n.startswith("_")]
                hint = closest(part, names)
                suggestion = f" (did you mean {hint!r}?)" if hint else ""
                kind = "module" if owner == module_name else "object"
                self.fail(key, f"{kind} {owner!r} has no attribute {part!r}{suggestion}")
            obj = getattr(obj, part)
            owner = f"{owner}.{part}" if owner != module_name else f"{module_name}:{part}"
        if not callable(obj):
            self.fail(key, f"{use!r} is not callable (expected a class or function taking "
                           "(options, context))")
        return obj

    def verify(self, interface: Any, obj: Any, use: str, key: str) -> None:
        try:
            verifyObject(interface, obj)
        except Invalid as e:
            self.fail(key, f"plugin {use!r} does not provide {interface.__name__}: "
                           f"{_describe_invalid(e, interface)}")
