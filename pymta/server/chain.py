"""Run a stage's plugins in order until one decides.

A plugin may answer synchronously or with a Deferred; the runner stays
synchronous as long as the plugins are (no Deferred on the hot path).
A plugin that raises or fails is logged and turns into a temporary refusal
(451 4.3.5), never a traceback to the client.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pymta.config.model import PluginInstance
from pymta.verdict import DUNNO, Kind, Verdict

log = Logger(namespace="pymta.plugins")

PLUGIN_FAILURE = Verdict(Kind.DEFER, 451, "4.3.5", "Server configuration problem; try again later")


def run_chain(plugins: Sequence[PluginInstance], method: str, *args: Any) -> Verdict | Deferred:
    """Return the first decided verdict (or DUNNO); header changes of undecided ones are kept."""
    return _run(plugins, 0, method, args, ((), ()))


def _run(plugins, start, method, args, headers) -> Verdict | Deferred:
    for i in range(start, len(plugins)):
        plugin = plugins[i]
        try:
            result = getattr(plugin.obj, method)(*args)
        except Exception:
            log.failure("plugin {name} ({use}) failed in {method}", name=plugin.name,
                        use=plugin.use, method=method)
            return PLUGIN_FAILURE
        if isinstance(result, Deferred):
            def resumed(verdict, i=i, plugin=plugin):
                verdict = _checked(plugin, method, verdict)
                if verdict is None:
                    return PLUGIN_FAILURE
                merged = _merge(headers, verdict)
                if verdict.decided:
                    return _with_headers(verdict, merged)
                return _run(plugins, i + 1, method, args, merged)

            def failed(failure, plugin=plugin):
                log.failure("plugin {name} ({use}) failed in {method}", failure,
                            name=plugin.name, use=plugin.use, method=method)
                return PLUGIN_FAILURE

            return result.addCallbacks(resumed, failed)
        verdict = _checked(plugin, method, result)
        if verdict is None:
            return PLUGIN_FAILURE
        headers = _merge(headers, verdict)
        if verdict.decided:
            return _with_headers(verdict, headers)
    return _with_headers(DUNNO, headers)


def _checked(plugin: PluginInstance, method: str, result: Any) -> Verdict | None:
    if result is None:
        return DUNNO
    if isinstance(result, Verdict):
        return result
    log.error("plugin {name} ({use}) returned {result!r} from {method}, not a Verdict",
              name=plugin.name, use=plugin.use, result=result, method=method)
    return None


def _merge(acc: tuple, verdict: Verdict) -> tuple:
    """Header additions and removals of every plugin that ran, in order."""
    added, dropped = acc
    return added + verdict.headers, dropped + verdict.drop_headers


def _with_headers(verdict: Verdict, acc: tuple) -> Verdict:
    added, dropped = acc
    if added == verdict.headers and dropped == verdict.drop_headers:
        return verdict
    return dataclasses.replace(verdict, headers=added, drop_headers=tuple(sorted(set(dropped))))
